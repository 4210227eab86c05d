-- Conversations: the turns a region stores so that a client sends only its
-- new message and the region prepends the history to the model call. Both
-- tables replicate to every region through the outbox (0005), so a
-- conversation continues elsewhere when its home region is lost.
--
-- No foreign keys, on purpose: each origin's log is pulled on its own
-- stream, so a region can receive a message (appended after a failover in
-- region B) before the conversation row (written in its home A). A foreign
-- key would stall B's whole stream until A's row arrived, perhaps never.

-- The conversation's metadata: last writer wins by (hlc, origin_region).
CREATE TABLE conversations (
    id            text        PRIMARY KEY
                      CHECK (id ~ '^[A-Za-z0-9._:-]{1,128}$'),
    tenant_id     text        NOT NULL,
    -- The region where the first turn was stored.
    home_region   text        NOT NULL,
    title         text,
    metadata      jsonb       NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    hlc           bigint      NOT NULL DEFAULT 0,
    origin_region text        COLLATE "C" NOT NULL DEFAULT ''
);

-- Append-only: a row is written once and never updated, so rows from two
-- regions merge without conflict. `turn` orders them; two regions that both
-- appended while cut off from each other can produce the same turn, and
-- `id` (a UUIDv7) then orders the pair the same way everywhere.
CREATE TABLE conversation_messages (
    id              uuid        PRIMARY KEY,
    conversation_id text        NOT NULL,
    -- Copied from the conversation, so a region that has the messages but
    -- not yet the conversation row still never shows them to another tenant.
    tenant_id       text        NOT NULL,
    turn            integer     NOT NULL CHECK (turn >= 1),
    role            text        NOT NULL,
    content         text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    hlc             bigint      NOT NULL DEFAULT 0,
    origin_region   text        COLLATE "C" NOT NULL DEFAULT ''
);

CREATE INDEX conversation_messages_by_turn
    ON conversation_messages (conversation_id, turn, id);

CREATE TRIGGER replication_lock BEFORE INSERT OR UPDATE OR DELETE ON conversations
    FOR EACH STATEMENT EXECUTE FUNCTION replication_lock_clock();
CREATE TRIGGER replication_stamp BEFORE INSERT OR UPDATE ON conversations
    FOR EACH ROW EXECUTE FUNCTION replication_stamp();
CREATE TRIGGER replication_log AFTER INSERT OR UPDATE OR DELETE ON conversations
    FOR EACH ROW EXECUTE FUNCTION replication_log_change('id');
CREATE TRIGGER replication_lock BEFORE INSERT OR UPDATE OR DELETE ON conversation_messages
    FOR EACH STATEMENT EXECUTE FUNCTION replication_lock_clock();
CREATE TRIGGER replication_stamp BEFORE INSERT OR UPDATE ON conversation_messages
    FOR EACH ROW EXECUTE FUNCTION replication_stamp();
CREATE TRIGGER replication_log AFTER INSERT OR UPDATE OR DELETE ON conversation_messages
    FOR EACH ROW EXECUTE FUNCTION replication_log_change('id');
