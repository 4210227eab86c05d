-- Snapshots and log incarnations.
--
-- A region's log is numbered from 1 in a new database, so a region wiped and
-- started afresh reuses sequences its peers have applied already. The
-- incarnation, chosen when the database is created, names the log: a peer
-- that sees another incarnation than the one it followed starts again from
-- sequence 0 (applying is idempotent, so nothing is doubled).
ALTER TABLE region_identity
    ADD COLUMN log_incarnation uuid NOT NULL DEFAULT gen_random_uuid();

-- The incarnation of the peer's log that `applied_sequence` counts in;
-- empty until the peer first answered a Pull.
ALTER TABLE replication_peers
    ADD COLUMN log_incarnation text NOT NULL DEFAULT '';
