-- Operators' controls of where gateways send traffic: a region drained
-- takes no new work from any gateway while another region can; a weight
-- below 100 sends only that share of the traffic that would go to it
-- first, the rest to the next region in line. Set through the management
-- API in any region and replicated, so every gateway (reading any
-- region's database with its keys) applies the same; `/routing` shows it.
CREATE TABLE region_controls (
    region        text        PRIMARY KEY,
    drained       boolean     NOT NULL DEFAULT false,
    weight        integer     NOT NULL DEFAULT 100 CHECK (weight BETWEEN 0 AND 100),
    -- Why, for the next operator.
    reason        text        NOT NULL DEFAULT '',
    updated_at    timestamptz NOT NULL DEFAULT now(),
    hlc           bigint      NOT NULL DEFAULT 0,
    origin_region text        COLLATE "C" NOT NULL DEFAULT ''
);

CREATE INDEX region_controls_origin_hlc ON region_controls (origin_region, hlc);

CREATE TRIGGER replication_lock BEFORE INSERT OR UPDATE OR DELETE ON region_controls
    FOR EACH STATEMENT EXECUTE FUNCTION replication_lock_clock();
CREATE TRIGGER replication_stamp BEFORE INSERT OR UPDATE ON region_controls
    FOR EACH ROW EXECUTE FUNCTION replication_stamp();
CREATE TRIGGER replication_log AFTER INSERT OR UPDATE OR DELETE ON region_controls
    FOR EACH ROW EXECUTE FUNCTION replication_log_change('region');
