-- Append-only rows in the replication log: telemetry readings, for the
-- peers named in `replication.telemetry_peers`.
--
-- No triggers: ingest writes ~100k readings/s, and a trigger per row would
-- stamp the clock and log a change per reading. The ingest writes one
-- 'append' change per chunk of readings itself (`telemetry/ingest.rs`), in
-- the same transaction as the readings: the payload is a JSON array of the
-- rows it inserted, the key is empty, and the clock is taken first, as
-- every replicated write does (0005). Readings have no clock columns:
-- appending merges by primary key (the first write wins), so there is
-- nothing for last-writer-wins to decide and nothing to tombstone.
ALTER TABLE replication_outbox DROP CONSTRAINT replication_outbox_op_check;
ALTER TABLE replication_outbox ADD CONSTRAINT replication_outbox_op_check
    CHECK (op IN ('upsert', 'delete', 'append'));
