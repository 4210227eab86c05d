-- Which time-series storage this database was set up with. The telemetry
-- tables themselves are created by the node at start (regional/src/telemetry/
-- schema.rs), because their DDL differs between TimescaleDB and pg_partman;
-- what both modes share is that a database, once set up, keeps its mode: a
-- hypertable cannot become a partitioned table or the reverse.
CREATE TABLE telemetry_storage (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    mode       text        NOT NULL CHECK (mode IN ('timescaledb', 'pg_partman')),
    created_at timestamptz NOT NULL DEFAULT now()
);
