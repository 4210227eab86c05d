-- Conversations as the Conversations and Responses APIs see them: items
-- (messages, function calls and their outputs) with ids, metadata, and
-- deletion.
--
-- A row written through those APIs keeps its whole item (`item`) and the
-- item's id (`item_id`); `role` and `content` still hold a role (or the
-- item's type) and its text, for the transcript and the size limits. Rows
-- of chat completions' turns leave both NULL and are shown as message
-- items named after their row id. Nullable, as columns added to replicated
-- tables must be.
ALTER TABLE conversation_messages ADD COLUMN item jsonb;
ALTER TABLE conversation_messages ADD COLUMN item_id text;

CREATE INDEX conversation_messages_by_item
    ON conversation_messages (tenant_id, conversation_id, item_id)
    WHERE item_id IS NOT NULL;

-- A deleted conversation is marked, not removed: the mark replicates and
-- wins by the clock over a late copy of the row, and its items are
-- removed with it. A chat turn naming the id again starts it afresh.
ALTER TABLE conversations ADD COLUMN deleted_at timestamptz;
