-- Model routes set through the management API: aliases (by size or by
-- weight) and their fallbacks, which every region applies over the
-- `[[aliases]]` of its config. Replicated, so a route changed in one
-- region reaches all; each region checks a route against its own models
-- and leaves out one it cannot serve (the API says why).
CREATE TABLE model_routes (
    id            text        PRIMARY KEY,
    -- The alias as `[[aliases]]` writes it, without its id: `small` and
    -- `large` (with `large_above_prompt_tokens`) or `weights`, and
    -- `fallbacks`, `context_fallbacks`.
    route         jsonb       NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    hlc           bigint      NOT NULL DEFAULT 0,
    origin_region text        COLLATE "C" NOT NULL DEFAULT ''
);

CREATE INDEX model_routes_origin_hlc ON model_routes (origin_region, hlc);

CREATE TRIGGER replication_lock BEFORE INSERT OR UPDATE OR DELETE ON model_routes
    FOR EACH STATEMENT EXECUTE FUNCTION replication_lock_clock();
CREATE TRIGGER replication_stamp BEFORE INSERT OR UPDATE ON model_routes
    FOR EACH ROW EXECUTE FUNCTION replication_stamp();
CREATE TRIGGER replication_log AFTER INSERT OR UPDATE OR DELETE ON model_routes
    FOR EACH ROW EXECUTE FUNCTION replication_log_change('id');
