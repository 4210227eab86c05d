-- Cross-region replication through a transactional outbox.
--
-- Every write to a replicated table, whoever makes it (the node, the
-- `meridian keys` CLI, an operator's psql), is stamped with the region's
-- hybrid logical clock and logged in `replication_outbox` by triggers, in the
-- writer's own transaction. Peers pull the outbox over `Replication.Pull`.
-- A node applying a peer's changes sets `meridian.applying = on` for its
-- transaction, so applied rows keep their origin's stamp and are not logged
-- again (every region pulls from every origin directly).

-- The clock lives on the identity row. Ticking it takes that row's lock
-- until commit, which makes outbox sequences commit in sequence order: a
-- reader that has seen sequence n can never later find an n - 1 committing.
-- Encoding: Unix milliseconds << 16 | a logical counter.
ALTER TABLE region_identity ADD COLUMN hlc bigint NOT NULL DEFAULT 0;

CREATE TABLE replication_outbox (
    sequence      bigserial   PRIMARY KEY,
    table_name    text        NOT NULL,
    -- UTF-8 of the primary key's text form.
    key           bytea       NOT NULL,
    op            text        NOT NULL CHECK (op IN ('upsert', 'delete')),
    -- The whole row for an upsert (bytea columns in base64); NULL for a delete.
    payload       jsonb,
    hlc           bigint      NOT NULL,
    origin_region text        COLLATE "C" NOT NULL,
    committed_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- How far the log was trimmed: a peer asking for an older sequence needs a
-- snapshot (REPLICATION_LOG_TRUNCATED).
CREATE TABLE replication_log (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_through bigint  NOT NULL DEFAULT 0
);
INSERT INTO replication_log DEFAULT VALUES;

-- Both directions of each peering. `applied_*`: the peer's log as applied
-- here, updated in the same transaction as the applied rows. `acked_*`: this
-- region's log as the peer last acknowledged it, which bounds pruning.
CREATE TABLE replication_peers (
    peer               text        PRIMARY KEY,
    applied_sequence   bigint      NOT NULL DEFAULT 0,
    applied_at         timestamptz,
    -- Changes from the peer written here, and changes that lost to a newer
    -- (hlc, origin_region) already here: together, every change received once.
    applied_changes    bigint      NOT NULL DEFAULT 0,
    superseded_changes bigint      NOT NULL DEFAULT 0,
    acked_sequence     bigint      NOT NULL DEFAULT 0,
    acked_at           timestamptz
);

-- Deleted keys with the clock of their delete, so that an older upsert that
-- arrives late does not bring the row back.
CREATE TABLE replication_tombstones (
    table_name    text        NOT NULL,
    key           bytea       NOT NULL,
    hlc           bigint      NOT NULL,
    origin_region text        COLLATE "C" NOT NULL,
    deleted_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, key)
);

-- The clock for a local write: max(last + 1, now in ms << 16). NULLs when
-- the region identity is not set yet.
CREATE FUNCTION replication_tick(OUT hlc bigint, OUT region text) LANGUAGE sql AS $$
    UPDATE region_identity
       SET hlc = GREATEST(region_identity.hlc + 1,
                          (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) << 16)
 RETURNING hlc, region
$$;

-- BEFORE each statement: takes the clock's lock before any row is touched.
-- Row triggers would come too late for an UPDATE (its row is locked before
-- BEFORE ROW triggers run) and for a conflicting INSERT (which waits on the
-- other writer's index entry): a writer holding a row while waiting for the
-- clock, and one holding the clock while waiting for the row, deadlock. So
-- every replicated write, and every apply (`replication/apply.rs`), takes
-- the clock first, then rows.
CREATE FUNCTION replication_lock_clock() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('meridian.applying', true) IS DISTINCT FROM 'on' THEN
        PERFORM 1 FROM region_identity FOR UPDATE;
    END IF;
    RETURN NULL;
END
$$;

-- BEFORE INSERT OR UPDATE: stamps a local write.
CREATE FUNCTION replication_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    clock record;
BEGIN
    IF current_setting('meridian.applying', true) = 'on' THEN
        RETURN NEW;
    END IF;
    SELECT * INTO clock FROM replication_tick();
    IF clock.region IS NULL THEN
        RAISE EXCEPTION 'replicated write to % before the region identity is set', TG_TABLE_NAME;
    END IF;
    NEW.hlc := clock.hlc;
    NEW.origin_region := clock.region;
    RETURN NEW;
END
$$;

-- AFTER INSERT OR UPDATE OR DELETE: logs a local write. Arguments: the key
-- column, then the bytea columns (sent in base64, as the proto says).
CREATE FUNCTION replication_log_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    payload jsonb;
    k       bytea;
    b64     text;
    clock   record;
BEGIN
    IF current_setting('meridian.applying', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        k := convert_to(to_jsonb(OLD) ->> TG_ARGV[0], 'UTF8');
        SELECT * INTO clock FROM replication_tick();
        IF clock.region IS NULL THEN
            RAISE EXCEPTION 'replicated delete from % before the region identity is set', TG_TABLE_NAME;
        END IF;
        INSERT INTO replication_tombstones (table_name, key, hlc, origin_region)
             VALUES (TG_TABLE_NAME, k, clock.hlc, clock.region)
        ON CONFLICT (table_name, key) DO UPDATE
             SET hlc = EXCLUDED.hlc, origin_region = EXCLUDED.origin_region, deleted_at = now();
        INSERT INTO replication_outbox (table_name, key, op, payload, hlc, origin_region)
             VALUES (TG_TABLE_NAME, k, 'delete', NULL, clock.hlc, clock.region);
    ELSE
        payload := to_jsonb(NEW) - 'hlc' - 'origin_region';
        k := convert_to(payload ->> TG_ARGV[0], 'UTF8');
        FOR i IN 1 .. TG_NARGS - 1 LOOP
            EXECUTE format('SELECT translate(encode(($1).%I, ''base64''), E''\n'', '''')', TG_ARGV[i])
               INTO b64 USING NEW;
            payload := payload || jsonb_build_object(TG_ARGV[i], b64);
        END LOOP;
        INSERT INTO replication_outbox (table_name, key, op, payload, hlc, origin_region)
             VALUES (TG_TABLE_NAME, k, 'upsert', payload, NEW.hlc, NEW.origin_region);
        -- A local write is newer than any delete this region has seen.
        DELETE FROM replication_tombstones WHERE table_name = TG_TABLE_NAME AND key = k;
    END IF;
    PERFORM pg_notify('meridian_replication', '');
    RETURN NULL;
END
$$;

-- Tenants and API keys replicate to every region.
ALTER TABLE tenants
    ADD COLUMN hlc           bigint NOT NULL DEFAULT 0,
    ADD COLUMN origin_region text   COLLATE "C" NOT NULL DEFAULT '';
ALTER TABLE api_keys
    ADD COLUMN hlc           bigint NOT NULL DEFAULT 0,
    ADD COLUMN origin_region text   COLLATE "C" NOT NULL DEFAULT '';

CREATE TRIGGER replication_lock BEFORE INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH STATEMENT EXECUTE FUNCTION replication_lock_clock();
CREATE TRIGGER replication_stamp BEFORE INSERT OR UPDATE ON tenants
    FOR EACH ROW EXECUTE FUNCTION replication_stamp();
CREATE TRIGGER replication_log AFTER INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION replication_log_change('id');
CREATE TRIGGER replication_lock BEFORE INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION replication_lock_clock();
CREATE TRIGGER replication_stamp BEFORE INSERT OR UPDATE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION replication_stamp();
CREATE TRIGGER replication_log AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION replication_log_change('id', 'key_hash');

-- Rows written before replication existed enter the log now (tenants first:
-- keys refer to them).
UPDATE tenants SET hlc = hlc;
UPDATE api_keys SET hlc = hlc;
