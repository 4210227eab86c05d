-- Tenants and their API keys. The gateway reads these (it never migrates);
-- regions own the schema. Keys are stored as the SHA-256 of the whole key,
-- with only a short, non-secret prefix kept in clear for display.
CREATE TABLE tenants (
    id                  text        PRIMARY KEY
                            CHECK (id ~ '^[A-Za-z0-9._-]{1,64}$'),
    display_name        text        NOT NULL DEFAULT '',
    -- NULL: the gateway's `[rate_limit]` default applies.
    requests_per_second integer     CHECK (requests_per_second > 0),
    tokens_per_minute   bigint      CHECK (tokens_per_minute > 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id         uuid        PRIMARY KEY,
    tenant_id  text        NOT NULL REFERENCES tenants (id),
    -- The key's first characters (`mk-` and a few more), to tell keys apart.
    prefix     text        NOT NULL,
    -- SHA-256 of the key.
    key_hash   bytea       NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Set to revoke; the gateway drops the key at its next reload.
    revoked_at timestamptz
);

-- The gateway's reload reads only live keys.
CREATE INDEX api_keys_live ON api_keys (tenant_id) WHERE revoked_at IS NULL;
