-- A conversation turn's idempotency key, on every row the turn stored (the
-- client's messages and the answer): a request repeating the key in the
-- same conversation gets the stored answer back instead of a second turn,
-- so a client (or the gateway, failing over) may retry a turn safely.
--
-- Not unique, on purpose: rows arrive from every region, and two regions
-- cut off from each other may both have stored a turn under one key. A
-- unique index would stall the replication stream that brought the second;
-- the lookup takes the first by (turn, id) instead.
ALTER TABLE conversation_messages
    ADD COLUMN idempotency_key text
        CHECK (idempotency_key IS NULL OR octet_length(idempotency_key) BETWEEN 1 AND 255);

CREATE INDEX conversation_messages_by_key
    ON conversation_messages (conversation_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
