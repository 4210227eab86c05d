-- Budgets that hold across regions: what each tenant may spend per period,
-- the price of each model, and what was spent, per region.
--
-- A budget is in tokens, in money, or both, per UTC day or month. Money is
-- kept in integers: budgets in micro-dollars, prices in micro-dollars per
-- million tokens, spend in nano-dollars (a cheap model's few tokens cost
-- less than a micro-dollar, and a sum of rounded micro-dollars would drift).
ALTER TABLE tenants
    ADD COLUMN budget_tokens     bigint CHECK (budget_tokens > 0),
    ADD COLUMN budget_usd_micros bigint CHECK (budget_usd_micros > 0),
    -- NULL: 'month'. Nullable like every column added to a replicated
    -- table: a peer not yet upgraded sends rows without it.
    ADD COLUMN budget_period     text   CHECK (budget_period IN ('day', 'month'));

-- Prices set through the management API; they take precedence over a
-- region's `[spend.prices]`. Replicated, so every region charges alike.
CREATE TABLE model_prices (
    model                  text        PRIMARY KEY,
    input_micros_per_mtok  bigint      NOT NULL CHECK (input_micros_per_mtok >= 0),
    output_micros_per_mtok bigint      NOT NULL CHECK (output_micros_per_mtok >= 0),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    hlc                    bigint      NOT NULL DEFAULT 0,
    origin_region          text        COLLATE "C" NOT NULL DEFAULT ''
);

-- Spend: a grow-only counter per (region, day, tenant, model). Only its
-- region writes a row, adding to it; every other region applies the row as
-- its region last wrote it. Summing rows across regions counts each
-- request once, whatever the replication order. `id` joins the key's parts
-- (none but the model may hold a '/', and it comes last).
CREATE TABLE spend (
    id            text        PRIMARY KEY,
    region        text        NOT NULL,
    day           date        NOT NULL,
    tenant_id     text        NOT NULL,
    model         text        NOT NULL,
    requests      bigint      NOT NULL DEFAULT 0,
    input_tokens  bigint      NOT NULL DEFAULT 0,
    output_tokens bigint      NOT NULL DEFAULT 0,
    cost_nanos    bigint      NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    hlc           bigint      NOT NULL DEFAULT 0,
    origin_region text        COLLATE "C" NOT NULL DEFAULT ''
);

CREATE INDEX spend_by_tenant ON spend (tenant_id, day);
CREATE INDEX spend_origin_hlc ON spend (origin_region, hlc);
CREATE INDEX model_prices_origin_hlc ON model_prices (origin_region, hlc);

CREATE TRIGGER replication_lock BEFORE INSERT OR UPDATE OR DELETE ON model_prices
    FOR EACH STATEMENT EXECUTE FUNCTION replication_lock_clock();
CREATE TRIGGER replication_stamp BEFORE INSERT OR UPDATE ON model_prices
    FOR EACH ROW EXECUTE FUNCTION replication_stamp();
CREATE TRIGGER replication_log AFTER INSERT OR UPDATE OR DELETE ON model_prices
    FOR EACH ROW EXECUTE FUNCTION replication_log_change('model');
CREATE TRIGGER replication_lock BEFORE INSERT OR UPDATE OR DELETE ON spend
    FOR EACH STATEMENT EXECUTE FUNCTION replication_lock_clock();
CREATE TRIGGER replication_stamp BEFORE INSERT OR UPDATE ON spend
    FOR EACH ROW EXECUTE FUNCTION replication_stamp();
CREATE TRIGGER replication_log AFTER INSERT OR UPDATE OR DELETE ON spend
    FOR EACH ROW EXECUTE FUNCTION replication_log_change('id');
