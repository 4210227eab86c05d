-- Data residency: the regions a tenant's requests may be served in. NULL:
-- anywhere. The gateway routes the tenant's requests only to these regions,
-- failover included, and answers 503 naming the rule when none is up. The
-- column replicates with the rest of the tenant, so every gateway, reading
-- any region's database, applies the same rule.
ALTER TABLE tenants
    ADD COLUMN allowed_regions text[]
        CHECK (allowed_regions IS NULL OR cardinality(allowed_regions) > 0);
