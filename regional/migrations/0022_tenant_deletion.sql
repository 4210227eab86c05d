-- Tenants are deleted softly: `deleted_at` stops the tenant (its keys are
-- revoked in the same transaction) and `purge_at` is when every region
-- erases its stored data (keys, conversations, messages, jobs, telemetry
-- readings; spend and usage counts stay, for billing). The tenant row
-- itself stays, so a late replicated row still names a known tenant and a
-- `PUT` of the same id restores it (with no keys). Nullable, as columns
-- added to replicated tables must be.
ALTER TABLE tenants
    ADD COLUMN deleted_at timestamptz,
    ADD COLUMN purge_at   timestamptz;

CREATE INDEX tenants_purge ON tenants (purge_at) WHERE purge_at IS NOT NULL;
