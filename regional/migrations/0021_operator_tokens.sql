-- Operator tokens: bearer tokens for the management API, for tools that
-- hold no mesh certificate (the Terraform provider, CI jobs) and for
-- operators who reach the API through a gateway. Stored like API keys: the
-- SHA-256 of the token and a short prefix in clear. Replicated, so a token
-- made in one region works in every region; the regions check them, never
-- the gateway, which only passes them on.
CREATE TABLE operator_tokens (
    id            uuid        PRIMARY KEY,
    -- Who or what holds it, for the audit log (`token:<name>`).
    name          text        NOT NULL CHECK (name ~ '^[A-Za-z0-9._@-]{1,64}$'),
    -- `admin` may call every management method; `read-only` only reads.
    role          text        NOT NULL CHECK (role IN ('admin', 'read-only')),
    prefix        text        NOT NULL,
    token_hash    bytea       NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- NULL: never.
    expires_at    timestamptz,
    revoked_at    timestamptz,
    hlc           bigint      NOT NULL DEFAULT 0,
    origin_region text        COLLATE "C" NOT NULL DEFAULT ''
);

CREATE INDEX operator_tokens_origin_hlc ON operator_tokens (origin_region, hlc);

CREATE TRIGGER replication_lock BEFORE INSERT OR UPDATE OR DELETE ON operator_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION replication_lock_clock();
CREATE TRIGGER replication_stamp BEFORE INSERT OR UPDATE ON operator_tokens
    FOR EACH ROW EXECUTE FUNCTION replication_stamp();
CREATE TRIGGER replication_log AFTER INSERT OR UPDATE OR DELETE ON operator_tokens
    FOR EACH ROW EXECUTE FUNCTION replication_log_change('id', 'token_hash');
