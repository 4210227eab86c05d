-- Async jobs. PostgreSQL is the record of every job; Redis Streams only carry
-- job ids to workers, so anything Redis loses can be rebuilt from this table.
CREATE TABLE jobs (
    id               uuid        PRIMARY KEY,
    tenant           text        NOT NULL,
    -- NULL when the client gave none; NULLs never collide in the unique key.
    idempotency_key  text,
    priority         text        NOT NULL CHECK (priority IN ('interactive', 'batch')),
    state            text        NOT NULL CHECK (state IN
                         ('queued', 'running', 'succeeded', 'failed', 'dead_lettered', 'cancelled')),
    request          jsonb       NOT NULL,
    result           jsonb,
    last_error       jsonb,
    attempts         integer     NOT NULL DEFAULT 0,
    -- Successful completions recorded: the terminal UPDATE is conditional on
    -- the attempt's lease, and this CHECK makes a second one impossible even
    -- if that condition were ever wrong.
    completions      integer     NOT NULL DEFAULT 0 CHECK (completions BETWEEN 0 AND 1),
    -- A fresh id per attempt: only the attempt holding it may finish the job.
    lease_owner      uuid,
    lease_expires_at timestamptz,
    -- Not before this may a queued job start (retry backoff).
    run_after        timestamptz NOT NULL DEFAULT now(),
    queued_since     timestamptz,
    queued_ms        bigint      NOT NULL DEFAULT 0,
    running_ms       bigint      NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    UNIQUE (tenant, idempotency_key)
);

-- The sweeper's scan: only unfinished jobs, which stay few.
CREATE INDEX jobs_unfinished ON jobs (created_at) WHERE state IN ('queued', 'running');

-- Unfinished jobs per tenant (scope = tenant) and per region (scope = ''),
-- kept by the trigger below so admission control reads one row instead of
-- counting. The row lock an increment takes also serialises concurrent
-- submitters, so a limit cannot be overshot.
CREATE TABLE job_depth (
    scope  text   PRIMARY KEY,
    active bigint NOT NULL DEFAULT 0 CHECK (active >= 0)
);

CREATE FUNCTION jobs_count_active() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta integer := (NEW.state IN ('queued', 'running'))::integer
        - (TG_OP = 'UPDATE' AND OLD.state IN ('queued', 'running'))::integer;
BEGIN
    -- Tenant row first, region row second, in every transaction: no
    -- lock-order deadlock. A decrement is a plain UPDATE: the row exists,
    -- and the CHECK would refuse a negative row proposed for insertion even
    -- when it conflicts.
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

CREATE TRIGGER jobs_count_active
    AFTER INSERT OR UPDATE OF state ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_count_active();
