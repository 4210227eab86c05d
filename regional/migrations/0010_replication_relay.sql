-- Relaying a lost region's changes between the regions that survive it.
--
-- Every region pulls every origin directly, so a change that reached one
-- survivor before its origin died may never have reached another. A region
-- that loses a peer asks its other peers for the rows that peer wrote last
-- and that it lacks: those whose (origin_region, hlc) is past
-- `applied_hlc`. An origin's clock grows with its log sequence (both are
-- taken under its clock's lock), so that one number says which of the
-- origin's changes are here.
--
-- `applied_hlc`: every change of the peer with a clock at or below it is
-- applied here. Raised by each applied batch, and by the peer's clock as
-- its Pull reports it whenever this region has caught up with its log; it
-- also decides when a tombstone can go (no peer can still send anything
-- older than it).
ALTER TABLE replication_peers
    ADD COLUMN applied_hlc bigint NOT NULL DEFAULT 0;

-- The relay's scan per replicated table. Only replicated writes move these
-- columns, so the job path's local updates (claims, renewals) stay HOT.
CREATE INDEX tenants_origin_hlc ON tenants (origin_region, hlc);
CREATE INDEX api_keys_origin_hlc ON api_keys (origin_region, hlc);
CREATE INDEX conversations_origin_hlc ON conversations (origin_region, hlc);
CREATE INDEX conversation_messages_origin_hlc ON conversation_messages (origin_region, hlc);
CREATE INDEX jobs_origin_hlc ON jobs (origin_region, hlc);
CREATE INDEX replication_tombstones_origin_hlc ON replication_tombstones (origin_region, hlc);
