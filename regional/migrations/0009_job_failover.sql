-- Jobs replicate, so that when a region is lost a surviving region can
-- adopt the jobs it had not finished, with a fencing epoch so that the old
-- region, once back, neither runs them again nor overwrites a newer result.
--
-- Only the changes failover needs travel: the submission (INSERT), an
-- adoption (a new owner_epoch) and a terminal state with its result. Claims,
-- lease renewals and retries stay local: they are the busy part of the job
-- path, and a peer needs none of them to adopt a job or to show its result.

-- Where the job was submitted; never changes. Idempotency keys are unique
-- per home region: two regions may each accept the same key while cut off
-- from each other, and the second row must still apply everywhere.
ALTER TABLE jobs
    ADD COLUMN home_region   text   COLLATE "C" NOT NULL DEFAULT '',
    -- The region whose workers may run the job, and the fencing token of
    -- that ownership: every adoption increments it, a higher epoch wins
    -- whatever the clocks say, and every state change of an attempt
    -- requires the owner and epoch it started with.
    ADD COLUMN owner_region  text   COLLATE "C" NOT NULL DEFAULT '',
    ADD COLUMN owner_epoch   bigint NOT NULL DEFAULT 0,
    ADD COLUMN hlc           bigint NOT NULL DEFAULT 0,
    ADD COLUMN origin_region text   COLLATE "C" NOT NULL DEFAULT '';

UPDATE jobs SET home_region = i.region, owner_region = i.region
  FROM region_identity i WHERE i.region IS NOT NULL;

ALTER TABLE jobs DROP CONSTRAINT jobs_tenant_idempotency_key_key;
ALTER TABLE jobs ADD CONSTRAINT jobs_idempotency_per_home
    UNIQUE (tenant, idempotency_key, home_region);

-- The sweeper's scan and the adopter's: unfinished jobs by owner.
DROP INDEX jobs_unfinished;
CREATE INDEX jobs_unfinished ON jobs (owner_region, created_at)
    WHERE state IN ('queued', 'running');

-- Admission control counts the jobs this region owns: a peer's replicated
-- jobs are not its load until it adopts them, and an adopted job leaves the
-- old owner's count when the adoption arrives there.
CREATE OR REPLACE FUNCTION jobs_count_active() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    here  text := (SELECT region FROM region_identity);
    delta integer := (NEW.state IN ('queued', 'running') AND NEW.owner_region = here)::integer
        - (TG_OP = 'UPDATE' AND OLD.state IN ('queued', 'running')
           AND OLD.owner_region = here)::integer;
BEGIN
    IF delta > 0 THEN
        INSERT INTO job_depth AS d (scope, active) VALUES (NEW.tenant, delta)
            ON CONFLICT (scope) DO UPDATE SET active = d.active + EXCLUDED.active;
        INSERT INTO job_depth AS d (scope, active) VALUES ('', delta)
            ON CONFLICT (scope) DO UPDATE SET active = d.active + EXCLUDED.active;
    ELSIF delta < 0 THEN
        UPDATE job_depth SET active = active + delta WHERE scope = NEW.tenant;
        UPDATE job_depth SET active = active + delta WHERE scope = '';
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER jobs_count_active ON jobs;
CREATE TRIGGER jobs_count_active
    AFTER INSERT OR UPDATE OF state, owner_region ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_count_active();

-- The replication triggers of 0005, limited to the changes above. There is
-- no statement trigger taking the clock's lock first: it cannot see which
-- rows change, and taking it for every claim and renewal would serialise
-- the region's whole job path. The store takes the clock explicitly before
-- each replicated job write instead (`queue/store.rs`), in the same order
-- as every other replicated write; the row-level stamp still ticks the
-- clock, so a write made some other way is logged correctly, only without
-- that ordering guarantee against a concurrent apply (a deadlock Postgres
-- detects and aborts, never a wrong row).
CREATE TRIGGER replication_stamp BEFORE INSERT ON jobs
    FOR EACH ROW EXECUTE FUNCTION replication_stamp();
CREATE TRIGGER replication_stamp_update BEFORE UPDATE ON jobs
    FOR EACH ROW
    WHEN (NEW.owner_epoch <> OLD.owner_epoch
          OR (NEW.state <> OLD.state AND NEW.state NOT IN ('queued', 'running')))
    EXECUTE FUNCTION replication_stamp();
CREATE TRIGGER replication_log AFTER INSERT OR DELETE ON jobs
    FOR EACH ROW EXECUTE FUNCTION replication_log_change('id');
CREATE TRIGGER replication_log_update AFTER UPDATE ON jobs
    FOR EACH ROW
    WHEN (NEW.owner_epoch <> OLD.owner_epoch
          OR (NEW.state <> OLD.state AND NEW.state NOT IN ('queued', 'running')))
    EXECUTE FUNCTION replication_log_change('id');
