//! The two ways a region keeps time series, as tests select them: every
//! time-series test is written once, over a [`TimeSeries`], and
//! [`in_both_time_series_modes!`](crate::in_both_time_series_modes) makes
//! one test per mode of it, named after the mode (`<test>::pg_partman`,
//! `<test>::timescaledb`).
//!
//! A mode whose extension is not installed fails its tests with a message
//! naming the extension; it never passes without running. `make test`
//! leaves such tests out of the selection on a developer's machine (and
//! says so), and keeps them in under CI, where they fail.

use std::fmt;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// A time-series storage mode, as `telemetry.storage` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSeries {
    /// Native range partitions kept by pg_partman.
    Partman,
    /// TimescaleDB hypertables.
    Timescaledb,
}

impl TimeSeries {
    /// The `telemetry.storage` value.
    pub fn storage(self) -> &'static str {
        match self {
            Self::Partman => "pg_partman",
            Self::Timescaledb => "timescaledb",
        }
    }

    /// A `[telemetry]` table selecting this mode, followed by `more` keys of
    /// that table (each ending in a newline).
    pub fn config(self, more: &str) -> String {
        format!("[telemetry]\nstorage = \"{}\"\n{more}", self.storage())
    }

    /// Panics, naming what is missing, unless this machine's PostgreSQL has
    /// the mode's extension installed.
    pub fn require(self) {
        match self {
            Self::Partman => require_extension("pg_partman", None),
            Self::Timescaledb => require_extension("timescaledb", Some("timescaledb")),
        }
    }

    /// The partitions (pg_partman) or chunks (TimescaleDB) of `table`, with
    /// their time ranges, oldest first, read from the catalogs rather than
    /// from either extension's bookkeeping. Names are qualified as `regclass`
    /// prints them, so `to_regclass(name)` finds each.
    pub async fn partitions(
        self,
        pool: &PgPool,
        table: &str,
    ) -> Vec<(String, DateTime<Utc>, DateTime<Utc>)> {
        let sql = match self {
            Self::Partman => {
                r"SELECT c.oid::regclass::text,
                         substring(pg_get_expr(c.relpartbound, c.oid) FROM 'FROM \(''([^'']+)''\)')::timestamptz,
                         substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)')::timestamptz
                    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                   WHERE i.inhparent = $1::regclass
                     AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'
                   ORDER BY 2"
            }
            Self::Timescaledb => {
                r"SELECT format('%I.%I', chunk_schema, chunk_name), range_start, range_end
                    FROM timescaledb_information.chunks
                   WHERE format('%I.%I', hypertable_schema, hypertable_name)::regclass = $1::regclass
                   ORDER BY range_start"
            }
        };
        sqlx::query_as(sql)
            .bind(table)
            .fetch_all(pool)
            .await
            .unwrap_or_else(|e| panic!("{self} partitions of {table}: {e}"))
    }
}

impl fmt::Display for TimeSeries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.storage())
    }
}

/// Panics unless extension `name` (and its library, if it has one) is
/// installed in the PostgreSQL the harness starts.
pub fn require_extension(name: &str, library: Option<&str>) {
    assert!(
        meridian_launcher::extension_installed(name, library),
        "{name} is not installed in this machine's PostgreSQL, so this test cannot run: \
         infra/scripts/setup.sh installs it (from the vendor's package or from the sources \
         in ../shared/vendor); `make test` leaves such tests out where an extension is \
         missing, except under MERIDIAN_REQUIRE_PG_EXTENSIONS=1 (CI)"
    );
}

/// Makes two tests of each `async fn name(mode: TimeSeries)` listed, one per
/// mode, in a module named after the function: `name::pg_partman` and
/// `name::timescaledb`.
#[macro_export]
macro_rules! in_both_time_series_modes {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pg_partman() {
                $crate::TimeSeries::Partman.require();
                super::$name($crate::TimeSeries::Partman).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn timescaledb() {
                $crate::TimeSeries::Timescaledb.require();
                super::$name($crate::TimeSeries::Timescaledb).await;
            }
        }
    )+};
}
