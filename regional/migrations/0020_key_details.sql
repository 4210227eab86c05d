-- What operators say about a key, and what it may do: a name and labels
-- (for people and for Terraform), an expiry (a rotated key's old secret
-- lives until its grace period ends), and the models it may use. A tenant
-- may be limited to some models too; a key's list narrows its tenant's.
-- Every column is nullable, as columns added to replicated tables must be
-- (a peer not yet upgraded sends rows without them).
ALTER TABLE api_keys
    ADD COLUMN name           text,
    ADD COLUMN labels         jsonb,
    -- NULL: never.
    ADD COLUMN expires_at     timestamptz,
    -- NULL: any model its tenant may use; names as requests send them
    -- (models or routes).
    ADD COLUMN allowed_models text[];

ALTER TABLE tenants
    ADD COLUMN allowed_models text[];
