//! The `[telemetry]` section: partitions, retention, maintenance and the
//! limits of ingest and query.

use std::time::Duration;

use meridian_proto::config::Problems;
use serde::Deserialize;

/// Time-series storage and its limits. Every key has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Which extension keeps the time series: `auto` (TimescaleDB when the
    /// server has it preloaded, else pg_partman), `timescaledb` or
    /// `pg_partman`. A database keeps the mode it was first set up with.
    pub storage: Storage,
    /// Width of one partition (pg_partman) in hours; TimescaleDB uses it as
    /// the chunk interval unless `timescale_chunk_interval_hours` is set.
    pub partition_interval_hours: u32,
    /// Partitions created ahead of the current one (pg_partman `premake`).
    pub premake: u32,
    /// Readings older than this many days are refused at ingest, and their
    /// partitions (or chunks) are dropped whole.
    pub retention_days: u32,
    /// Inference usage records are kept this many days.
    pub usage_retention_days: u32,
    /// How often partition maintenance runs, in milliseconds; it also runs
    /// once at start.
    pub maintenance_interval_ms: u64,
    /// Most readings in one HTTP request or one gRPC `IngestRequest`; a
    /// larger batch is rejected whole.
    pub max_batch: u32,
    /// Largest `POST /v1/telemetry` body, in bytes; by default
    /// `max_batch` KiB, room for a full batch of readings with labels. A
    /// larger body is refused (413) before it is read.
    pub max_body_bytes: Option<usize>,
    /// How far ahead of the node's clock a reading may be, in seconds.
    pub max_future_skew_s: u64,
    /// Most labels on one reading; a reading with more is rejected (alone,
    /// not its batch). Labels are stored and replicated with every reading.
    pub max_labels: u32,
    /// Longest label key, in bytes of UTF-8.
    pub max_label_key_bytes: u32,
    /// Longest label value, in bytes of UTF-8.
    pub max_label_value_bytes: u32,
    /// Most bytes of one reading's label keys and values together.
    pub max_labels_bytes: u32,
    /// Readings waiting to be written; ingest waits for room beyond this.
    pub write_buffer_readings: u32,
    /// Usage records waiting to be written; more are dropped and counted.
    pub usage_buffer: u32,
    /// Most buckets one query may produce.
    pub max_query_buckets: u32,
    /// TimescaleDB chunk interval in hours; defaults to
    /// `partition_interval_hours`.
    pub timescale_chunk_interval_hours: Option<u32>,
    /// TimescaleDB compresses chunks older than this many days (segments by
    /// tenant, device and metric, ordered by time); 0 turns compression off.
    pub timescale_compress_after_days: u32,
}

/// The extension that keeps time series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// TimescaleDB when usable, else pg_partman.
    Auto,
    /// TimescaleDB hypertables; the node refuses to start without it.
    Timescaledb,
    /// Native partitions maintained by pg_partman.
    PgPartman,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            storage: Storage::Auto,
            partition_interval_hours: 24,
            premake: 4,
            retention_days: 30,
            usage_retention_days: 90,
            maintenance_interval_ms: 3_600_000,
            max_batch: 10_000,
            max_body_bytes: None,
            max_future_skew_s: 300,
            max_labels: 32,
            max_label_key_bytes: 128,
            max_label_value_bytes: 1024,
            max_labels_bytes: 8192,
            write_buffer_readings: 100_000,
            usage_buffer: 10_000,
            max_query_buckets: 10_000,
            timescale_chunk_interval_hours: None,
            timescale_compress_after_days: 7,
        }
    }
}

impl TelemetryConfig {
    pub(crate) fn validate(&self, problems: &mut Problems) {
        let at_least_one = [
            (
                "partition_interval_hours",
                u64::from(self.partition_interval_hours),
            ),
            ("premake", u64::from(self.premake)),
            ("retention_days", u64::from(self.retention_days)),
            ("usage_retention_days", u64::from(self.usage_retention_days)),
            ("maintenance_interval_ms", self.maintenance_interval_ms),
            ("max_batch", u64::from(self.max_batch)),
            ("usage_buffer", u64::from(self.usage_buffer)),
            ("max_query_buckets", u64::from(self.max_query_buckets)),
            ("max_label_key_bytes", u64::from(self.max_label_key_bytes)),
            ("max_labels_bytes", u64::from(self.max_labels_bytes)),
            (
                "max_body_bytes",
                self.max_body_bytes.map_or(1, |n| n as u64),
            ),
            (
                "timescale_chunk_interval_hours",
                self.timescale_chunk_interval_hours.map_or(1, u64::from),
            ),
        ];
        for (key, _) in at_least_one.iter().filter(|(_, v)| *v == 0) {
            problems.push(format!("`telemetry.{key}` must be at least 1"));
        }
        if self.write_buffer_readings < self.max_batch {
            problems.push(format!(
                "`telemetry.write_buffer_readings` must be at least `telemetry.max_batch` ({})",
                self.max_batch
            ));
        }
    }

    /// `max_body_bytes`, or its default.
    pub(crate) fn body_limit(&self) -> usize {
        self.max_body_bytes
            .unwrap_or((self.max_batch as usize).saturating_mul(1024))
            .max(64 * 1024)
    }

    pub(crate) fn chunk_interval(&self) -> Duration {
        hours(
            self.timescale_chunk_interval_hours
                .unwrap_or(self.partition_interval_hours),
        )
    }

    pub(crate) fn retention(&self) -> Duration {
        days(self.retention_days)
    }

    pub(crate) fn usage_retention(&self) -> Duration {
        days(self.usage_retention_days)
    }

    pub(crate) fn compress_after(&self) -> Option<Duration> {
        (self.timescale_compress_after_days > 0).then(|| days(self.timescale_compress_after_days))
    }

    pub(crate) fn maintenance_interval(&self) -> Duration {
        Duration::from_millis(self.maintenance_interval_ms)
    }

    pub(crate) fn max_future_skew(&self) -> Duration {
        Duration::from_secs(self.max_future_skew_s)
    }
}

fn hours(h: u32) -> Duration {
    Duration::from_secs(u64::from(h) * 3600)
}

fn days(d: u32) -> Duration {
    Duration::from_secs(u64::from(d) * 86_400)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const MINIMAL: &str = "region = \"eu-west\"\n[mesh]\nplaintext = true\n[redis]\nurl = \"redis://127.0.0.1:6379/\"\n\
                           [postgres]\nurl = \"postgres://meridian@127.0.0.1:5432/meridian\"\n";

    fn parse(telemetry: &str) -> Result<Config, String> {
        Config::from_toml(
            &format!("{MINIMAL}[telemetry]\n{telemetry}"),
            "regional.toml",
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_overrides() {
        let c = parse("").unwrap().telemetry;
        assert_eq!(
            (c.max_batch, c.retention_days, c.max_future_skew_s),
            (10_000, 30, 300)
        );
        assert_eq!(
            c.compress_after(),
            Some(std::time::Duration::from_secs(7 * 86_400))
        );
        let c = parse("storage = \"pg_partman\"\npremake = 2\ntimescale_compress_after_days = 0\n")
            .unwrap()
            .telemetry;
        assert_eq!(c.storage, super::Storage::PgPartman);
        assert_eq!(c.premake, 2);
        assert_eq!(c.compress_after(), None);
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = parse("retention_days = 0\n").unwrap_err();
        assert!(
            e.contains("`telemetry.retention_days` must be at least 1"),
            "{e}"
        );
        let e = parse("max_batch = 500\nwrite_buffer_readings = 100\n").unwrap_err();
        assert!(e.contains("`telemetry.write_buffer_readings`"), "{e}");
        let e = parse("retention = 3\n").unwrap_err();
        assert!(e.contains("unknown field `retention`"), "{e}");
        let e = parse("storage = \"influx\"\n").unwrap_err();
        assert!(e.contains("unknown variant `influx`"), "{e}");
    }
}
