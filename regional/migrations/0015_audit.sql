-- The audit log of the management API (`/admin/v1/...`): one row per write,
-- saying who made it (the caller's mesh identity), what it did, to what,
-- when, and from where. It replicates to every region like the tenants and
-- keys it describes, so any region answers "who revoked this key".
--
-- Append-only: a row is written once and never updated, so rows from two
-- regions merge without conflict.
CREATE TABLE audit_log (
    id            uuid        PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    -- The caller: a mesh identity (`spiffe://meridian/operator/alice`), or
    -- `unauthenticated` on a node whose mesh is plaintext.
    actor         text        NOT NULL,
    -- What was done: `tenant.create`, `tenant.update`, `key.create`,
    -- `key.revoke`.
    action        text        NOT NULL,
    -- To what: `tenants/<id>`, `keys/<uuid>`.
    resource      text        NOT NULL,
    -- From where: the caller's address as the region saw it, and the
    -- region that took the write.
    source        text        NOT NULL,
    region        text        NOT NULL,
    -- What changed, with no secret in it (a key's prefix, never the key).
    detail        jsonb       NOT NULL DEFAULT '{}',
    hlc           bigint      NOT NULL DEFAULT 0,
    origin_region text        COLLATE "C" NOT NULL DEFAULT ''
);

CREATE INDEX audit_log_by_time ON audit_log (at DESC, id DESC);

CREATE TRIGGER replication_lock BEFORE INSERT OR UPDATE OR DELETE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION replication_lock_clock();
CREATE TRIGGER replication_stamp BEFORE INSERT OR UPDATE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION replication_stamp();
CREATE TRIGGER replication_log AFTER INSERT OR UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION replication_log_change('id');
