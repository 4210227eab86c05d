-- A conversation id names a conversation of its tenant only: two tenants
-- may use one id without meeting, so no tenant can take an id another will
-- use, nor learn from an answer that another tenant uses it.
--
-- Replication keys a row by one column, hence `scoped_id`, the tenant and
-- the id together (a tenant id holds no '/'). It is computed, never sent:
-- a peer's row carries `tenant_id` and `id`, and this region derives the
-- key from them.
ALTER TABLE conversations
    ADD COLUMN scoped_id text GENERATED ALWAYS AS (tenant_id || '/' || id) STORED;
ALTER TABLE conversations DROP CONSTRAINT conversations_pkey;
ALTER TABLE conversations ADD PRIMARY KEY (scoped_id);

DROP TRIGGER replication_log ON conversations;
CREATE TRIGGER replication_log AFTER INSERT OR UPDATE OR DELETE ON conversations
    FOR EACH ROW EXECUTE FUNCTION replication_log_change('scoped_id');

-- Every lookup of messages names the tenant now.
DROP INDEX conversation_messages_by_turn;
CREATE INDEX conversation_messages_by_turn
    ON conversation_messages (tenant_id, conversation_id, turn, id);
DROP INDEX conversation_messages_by_key;
CREATE INDEX conversation_messages_by_key
    ON conversation_messages (tenant_id, conversation_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
