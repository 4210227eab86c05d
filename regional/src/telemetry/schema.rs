//! The time-series tables in both storage modes, side by side: TimescaleDB
//! hypertables when the extension is usable, else native range partitions
//! maintained by pg_partman. Same columns, keys and queries in both; only
//! how partitions (chunks) are made, compressed and dropped differs.
//!
//! sqlx migrations are static, so this DDL runs at every start instead,
//! idempotently, under an advisory lock so that nodes of one region starting
//! together do not race.

use std::fmt;
use std::time::Duration;

use sqlx::postgres::types::PgInterval;
use sqlx::{PgConnection, PgPool};

use crate::config::TelemetryConfig;
use crate::config::telemetry::Storage;
use crate::error::Error;

/// How the region stores time series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Hypertables; TimescaleDB's own jobs compress and drop chunks.
    Timescale,
    /// Native declarative range partitions on `ts`, made and dropped by
    /// pg_partman's `run_maintenance`.
    Partman,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Timescale => "timescaledb",
            Self::Partman => "pg_partman",
        }
    }

    /// Start of the bucket of `ts`: `$1` is the width, `$2` the origin the
    /// buckets are aligned to. TimescaleDB's default origin is 2000-01-03, so
    /// it is always passed; with it, both give the same buckets.
    pub(crate) fn bucket_sql(self) -> &'static str {
        match self {
            Self::Timescale => "time_bucket($1, ts, origin => $2)",
            Self::Partman => "date_bin($1, ts, $2)",
        }
    }

    /// The value of the latest reading of a group. `ts` is unique per series
    /// (primary key), so both have exactly one answer. Plain PostgreSQL has
    /// no `last`; the largest [epoch µs, value] pair is the same answer
    /// without sorting each group (3× faster than `array_agg(... ORDER BY)`),
    /// and epoch microseconds (< 2^53) are exact in a float8.
    pub(crate) fn last_sql(self) -> &'static str {
        match self {
            Self::Timescale => "last(value, ts)",
            Self::Partman => "(max(ARRAY[(extract(epoch FROM ts) * 1000000)::float8, value]))[2]",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The tables of both modes. Only the clause after the column list differs:
/// a partitioned table needs `PARTITION BY`, a hypertable starts as a plain
/// table. Primary and unique keys of both must contain `ts`; the dedup key
/// (tenant, device_id, metric, ts) does, in the order queries filter by.
const READINGS_COLUMNS: &str = "
    tenant    text             NOT NULL,
    device_id text             NOT NULL,
    metric    text             NOT NULL,
    ts        timestamptz      NOT NULL,
    value     double precision NOT NULL,
    labels    jsonb            NOT NULL DEFAULT '{}',
    PRIMARY KEY (tenant, device_id, metric, ts)";

const USAGE_COLUMNS: &str = "
    tenant            text        NOT NULL,
    model             text        NOT NULL,
    region            text        NOT NULL,
    ts                timestamptz NOT NULL,
    prompt_tokens     integer     NOT NULL,
    completion_tokens integer     NOT NULL,
    ttft_ms           integer     NOT NULL,
    latency_ms        integer     NOT NULL,
    cache             text        NOT NULL,
    status            text        NOT NULL";

/// Indexes both modes share (created on the parent, inherited by every
/// partition or chunk): label filters, and usage summaries per tenant.
const INDEXES: &str = "
    CREATE INDEX IF NOT EXISTS telemetry_readings_labels
        ON telemetry_readings USING gin (labels jsonb_path_ops);
    CREATE INDEX IF NOT EXISTS inference_usage_tenant_ts
        ON inference_usage (tenant, ts, model);";

// ---- pg_partman ------------------------------------------------------------

const PARTMAN_EXTENSION: &str = "
    CREATE SCHEMA IF NOT EXISTS partman;
    CREATE EXTENSION IF NOT EXISTS pg_partman SCHEMA partman;";

const PARTMAN_TABLE_SUFFIX: &str = "PARTITION BY RANGE (ts)";

/// Registers a table once. Readings' partitions are made back to the start
/// of the retention window, so a late reading that ingest accepts always has
/// a partition and never lands in the default one (which retention would not
/// drop, and which blocks creating a partition over rows it holds). Usage
/// rows are written as they happen and need no back-fill (`$4` is zero).
const PARTMAN_CREATE_PARENT: &str = "
    SELECT partman.create_parent(
        p_parent_table    => $1,
        p_control         => 'ts',
        p_type            => 'native',
        p_interval        => $2,
        p_premake         => $3,
        p_start_partition => (now() - $4::interval)::text)
    WHERE NOT EXISTS (SELECT 1 FROM partman.part_config WHERE parent_table = $1)";

/// Applies the current config on every start. Expired partitions are dropped
/// (not detached and kept); partitions are made ahead even while no data
/// arrives, which pg_partman only does with `infinite_time_partitions`.
const PARTMAN_CONFIGURE: &str = "
    UPDATE partman.part_config
       SET premake = $2, retention = $3::interval::text, retention_keep_table = false,
           retention_keep_index = false, infinite_time_partitions = true
     WHERE parent_table = $1";

const PARTMAN_MAINTAIN: &str = "SELECT partman.run_maintenance($1, p_analyze => false)";

// ---- TimescaleDB -----------------------------------------------------------

const TIMESCALE_EXTENSION: &str = "CREATE EXTENSION IF NOT EXISTS timescaledb;";

const TIMESCALE_TABLE_SUFFIX: &str = "";

const TIMESCALE_CREATE_HYPERTABLE: &str = "
    SELECT create_hypertable($1::regclass, 'ts', chunk_time_interval => $2::interval,
                             if_not_exists => true)";

const TIMESCALE_SET_CHUNK_INTERVAL: &str =
    "SELECT set_chunk_time_interval($1::regclass, $2::interval)";

/// Policies are replaced rather than added `if_not_exists`, which would keep
/// the interval of the first start.
const TIMESCALE_RETENTION: &str = "
    SELECT remove_retention_policy($1::regclass, if_exists => true),
           add_retention_policy($1::regclass, $2::interval)";

/// Segmenting by series keeps each compressed batch one device's metric, the
/// unit queries read.
const TIMESCALE_ENABLE_COMPRESSION: &str = "
    ALTER TABLE telemetry_readings SET (
        timescaledb.compress,
        timescaledb.compress_segmentby = 'tenant, device_id, metric',
        timescaledb.compress_orderby = 'ts')";

const TIMESCALE_COMPRESSION_ENABLED: &str = "
    SELECT compression_enabled FROM timescaledb_information.hypertables
     WHERE hypertable_name = 'telemetry_readings'";

const TIMESCALE_COMPRESSION: &str = "
    SELECT remove_compression_policy('telemetry_readings', if_exists => true),
           add_compression_policy('telemetry_readings', $1::interval)";

const TIMESCALE_NO_COMPRESSION: &str =
    "SELECT remove_compression_policy('telemetry_readings', if_exists => true)";

/// TimescaleDB's retention job runs on its own schedule (daily); maintenance
/// also drops expired chunks, so retention takes effect at start and on
/// `maintenance_interval_ms` in both modes alike.
const TIMESCALE_MAINTAIN: &str = "SELECT drop_chunks($1::regclass, older_than => $2::interval)";

// ---------------------------------------------------------------------------

/// A table that holds time series.
struct Table {
    name: &'static str,
    retention: Duration,
    /// How far back partitions are made at first setup.
    backfill: Duration,
}

fn tables(config: &TelemetryConfig) -> [Table; 2] {
    [
        Table {
            name: "public.telemetry_readings",
            retention: config.retention(),
            backfill: config.retention(),
        },
        Table {
            name: "public.inference_usage",
            retention: config.usage_retention(),
            backfill: Duration::ZERO,
        },
    ]
}

/// Which extensions the server can provide.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Available {
    /// Installed, or installable and preloaded (TimescaleDB refuses to load
    /// otherwise).
    pub timescale: bool,
    pub partman: bool,
}

/// Picks the mode: the one recorded for this database, else the configured
/// one, else TimescaleDB when usable, else pg_partman.
pub(crate) fn choose(
    recorded: Option<&str>,
    wanted: Storage,
    available: Available,
) -> Result<Mode, Error> {
    let wanted = match wanted {
        Storage::Auto => None,
        Storage::Timescaledb => Some(Mode::Timescale),
        Storage::PgPartman => Some(Mode::Partman),
    };
    let recorded = match recorded {
        Some("timescaledb") => Some(Mode::Timescale),
        Some(_) => Some(Mode::Partman),
        None => None,
    };
    if let (Some(recorded), Some(wanted)) = (recorded, wanted)
        && recorded != wanted
    {
        return Err(Error::TimeSeriesModeMismatch {
            recorded: recorded.name(),
            configured: wanted.name(),
        });
    }
    let usable = |mode| match mode {
        Mode::Timescale => available.timescale,
        Mode::Partman => available.partman,
    };
    match recorded.or(wanted) {
        Some(mode) if usable(mode) => Ok(mode),
        Some(mode) => Err(Error::TimeSeriesModeUnavailable(mode.name())),
        None if available.timescale => Ok(Mode::Timescale),
        None if available.partman => Ok(Mode::Partman),
        None => Err(Error::NoTimeSeriesExtension),
    }
}

async fn available(conn: &mut PgConnection) -> Result<Available, Error> {
    let (timescale, partman): (bool, bool) = sqlx::query_as(
        "SELECT
           EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
           OR (EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
               AND current_setting('shared_preload_libraries') LIKE '%timescaledb%'),
           EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_partman')",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(Available { timescale, partman })
}

/// Creates or updates the tables for the mode this database uses.
pub(crate) async fn setup(pool: &PgPool, config: &TelemetryConfig) -> Result<Mode, Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('meridian.telemetry.schema'))")
        .execute(&mut *tx)
        .await?;
    let recorded: Option<String> = sqlx::query_scalar("SELECT mode FROM telemetry_storage")
        .fetch_optional(&mut *tx)
        .await?;
    let available = available(&mut tx).await?;
    if recorded.is_none() && !available.timescale {
        tracing::info!("timescaledb is not usable here (not installed or not preloaded)");
    }
    let mode = choose(recorded.as_deref(), config.storage, available)?;
    let (extension, suffix) = match mode {
        Mode::Timescale => (TIMESCALE_EXTENSION, TIMESCALE_TABLE_SUFFIX),
        Mode::Partman => (PARTMAN_EXTENSION, PARTMAN_TABLE_SUFFIX),
    };
    let ddl = format!(
        "{extension}
         CREATE TABLE IF NOT EXISTS telemetry_readings ({READINGS_COLUMNS}) {suffix};
         CREATE TABLE IF NOT EXISTS inference_usage ({USAGE_COLUMNS}) {suffix};
         {INDEXES}"
    );
    // Only the constant fragments above go into this text.
    sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
        .execute(&mut *tx)
        .await?;
    match mode {
        Mode::Partman => partman(&mut tx, config).await?,
        Mode::Timescale => timescale(&mut tx, config).await?,
    }
    sqlx::query("INSERT INTO telemetry_storage (mode) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(mode.name())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(mode)
}

async fn partman(conn: &mut PgConnection, config: &TelemetryConfig) -> Result<(), Error> {
    let interval = format!("{} hours", config.partition_interval_hours);
    for table in tables(config) {
        sqlx::query(PARTMAN_CREATE_PARENT)
            .bind(table.name)
            .bind(&interval)
            .bind(i32::try_from(config.premake).unwrap_or(i32::MAX))
            .bind(interval_of(table.backfill))
            .execute(&mut *conn)
            .await?;
        // The interval of an existing set stays: pg_partman cannot re-cut
        // partitions that exist.
        sqlx::query(PARTMAN_CONFIGURE)
            .bind(table.name)
            .bind(i32::try_from(config.premake).unwrap_or(i32::MAX))
            .bind(interval_of(table.retention))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

async fn timescale(conn: &mut PgConnection, config: &TelemetryConfig) -> Result<(), Error> {
    let chunk = interval_of(config.chunk_interval());
    for table in tables(config) {
        sqlx::query(TIMESCALE_CREATE_HYPERTABLE)
            .bind(table.name)
            .bind(chunk)
            .execute(&mut *conn)
            .await?;
        sqlx::query(TIMESCALE_SET_CHUNK_INTERVAL)
            .bind(table.name)
            .bind(chunk)
            .execute(&mut *conn)
            .await?;
        sqlx::query(TIMESCALE_RETENTION)
            .bind(table.name)
            .bind(interval_of(table.retention))
            .execute(&mut *conn)
            .await?;
    }
    match config.compress_after() {
        Some(after) => {
            let enabled: Option<bool> = sqlx::query_scalar(TIMESCALE_COMPRESSION_ENABLED)
                .fetch_optional(&mut *conn)
                .await?;
            // Re-applying the settings fails once chunks are compressed.
            if enabled != Some(true) {
                sqlx::query(TIMESCALE_ENABLE_COMPRESSION)
                    .execute(&mut *conn)
                    .await?;
            }
            sqlx::query(TIMESCALE_COMPRESSION)
                .bind(interval_of(after))
                .execute(&mut *conn)
                .await?;
        }
        None => {
            sqlx::query(TIMESCALE_NO_COMPRESSION)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// Makes partitions ahead and drops expired ones (pg_partman), or drops
/// expired chunks (TimescaleDB, which makes chunks on demand).
pub(crate) async fn maintain(
    pool: &PgPool,
    mode: Mode,
    config: &TelemetryConfig,
) -> Result<(), Error> {
    for table in tables(config) {
        match mode {
            Mode::Partman => {
                sqlx::query(PARTMAN_MAINTAIN)
                    .bind(table.name)
                    .execute(pool)
                    .await?;
            }
            Mode::Timescale => {
                sqlx::query(TIMESCALE_MAINTAIN)
                    .bind(table.name)
                    .bind(interval_of(table.retention))
                    .execute(pool)
                    .await?;
            }
        }
    }
    Ok(())
}

/// A fixed-length interval (no months or days), as `date_bin` requires.
pub(crate) fn interval_of(d: Duration) -> PgInterval {
    PgInterval {
        months: 0,
        days: 0,
        microseconds: i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_follows_the_record_then_what_is_available() {
        let both = Available {
            timescale: true,
            partman: true,
        };
        let partman_only = Available {
            timescale: false,
            partman: true,
        };
        let auto = Storage::Auto;
        assert_eq!(choose(None, auto, both).unwrap(), Mode::Timescale);
        assert_eq!(choose(None, auto, partman_only).unwrap(), Mode::Partman);
        assert_eq!(
            choose(None, Storage::PgPartman, both).unwrap(),
            Mode::Partman
        );
        assert_eq!(
            choose(Some("pg_partman"), auto, both).unwrap(),
            Mode::Partman
        );
        let e = choose(Some("timescaledb"), auto, partman_only).unwrap_err();
        assert!(e.to_string().contains("timescaledb"), "{e}");
        let e = choose(None, Storage::Timescaledb, partman_only).unwrap_err();
        assert!(e.to_string().contains("timescaledb"), "{e}");
        let e = choose(Some("pg_partman"), Storage::Timescaledb, both).unwrap_err();
        assert!(e.to_string().contains("`telemetry.storage`"), "{e}");
    }

    #[test]
    fn neither_extension_says_how_to_install_one() {
        let e = choose(None, Storage::Auto, Available::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("postgresql-15-partman"), "{e}");
        assert!(e.contains("timescaledb"), "{e}");
        assert!(e.starts_with(|c: char| c.is_lowercase()), "{e}");
    }
}
