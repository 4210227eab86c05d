//! Readings in: per-item checks, then a bounded buffer drained by one
//! collector that coalesces whatever is queued into multi-row inserts, so
//! many small requests cost few statements and one large one is not split.
//!
//! Duplicates (same tenant, device, metric and ts) keep the row written
//! first (`ON CONFLICT DO NOTHING`): a client retrying a batch after a lost
//! answer changes nothing, and duplicates inside one insert are harmless,
//! where `DO UPDATE` would fail the whole insert on them.
//!
//! When readings replicate (`replication.telemetry_peers`), each insert also
//! logs the rows it actually inserted, in chunks, as 'append' changes of the
//! replication log in its own transaction (`0011_replication_append.sql`).

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::types::Json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::TelemetryConfig;
use crate::error::Error;

/// Longest device id or metric name, in bytes.
const MAX_NAME_BYTES: usize = 256;
/// Rows in one insert statement at most; bigger statements gain little.
const MAX_ROWS_PER_INSERT: usize = 20_000;
/// Inserts running at once: one fills the next while another commits.
const CONCURRENT_INSERTS: usize = 2;

/// One reading, as every API hands it in.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reading {
    pub device_id: String,
    pub ts: DateTime<Utc>,
    pub metric: String,
    pub value: f64,
    pub labels: BTreeMap<String, String>,
}

/// The checks of one reading that do not depend on its wire format.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    max_future_skew: chrono::Duration,
    retention: chrono::Duration,
    retention_days: u32,
    future_skew_s: u64,
    max_labels: usize,
    max_label_key_bytes: usize,
    max_label_value_bytes: usize,
    max_labels_bytes: usize,
}

impl Limits {
    pub(crate) fn new(config: &TelemetryConfig) -> Self {
        Self {
            max_future_skew: chrono::Duration::from_std(config.max_future_skew())
                .unwrap_or(chrono::Duration::MAX),
            retention: chrono::Duration::from_std(config.retention())
                .unwrap_or(chrono::Duration::MAX),
            retention_days: config.retention_days,
            future_skew_s: config.max_future_skew_s,
            max_labels: config.max_labels as usize,
            max_label_key_bytes: config.max_label_key_bytes as usize,
            max_label_value_bytes: config.max_label_value_bytes as usize,
            max_labels_bytes: config.max_labels_bytes as usize,
        }
    }

    /// Why `r` cannot be stored at `now`, if it cannot.
    pub(crate) fn check(&self, r: &Reading, now: DateTime<Utc>) -> Result<(), String> {
        if r.device_id.is_empty() {
            return Err("missing device_id".into());
        }
        if r.metric.is_empty() {
            return Err("missing metric".into());
        }
        for (name, value) in [("device_id", &r.device_id), ("metric", &r.metric)] {
            if value.len() > MAX_NAME_BYTES {
                return Err(format!("{name} is longer than {MAX_NAME_BYTES} bytes"));
            }
        }
        // PostgreSQL's text and jsonb cannot hold U+0000: refused here, per
        // item, rather than failing the whole batch's insert.
        for (name, value) in [("device_id", &r.device_id), ("metric", &r.metric)] {
            if value.contains('\0') {
                return Err(format!("{name} contains a NUL character"));
            }
        }
        if r.labels
            .iter()
            .any(|(k, v)| k.contains('\0') || v.contains('\0'))
        {
            return Err("labels contain a NUL character".into());
        }
        if !r.value.is_finite() {
            return Err("value is not finite".into());
        }
        self.check_labels(&r.labels)?;
        if r.ts > now + self.max_future_skew {
            return Err(format!(
                "ts is more than {} s in the future",
                self.future_skew_s
            ));
        }
        if r.ts < now - self.retention {
            return Err(format!(
                "ts is older than the retention of {} days",
                self.retention_days
            ));
        }
        Ok(())
    }
}

/// One batch split into what can be stored and what cannot.
#[derive(Debug, Default)]
pub(crate) struct Sorted {
    pub good: Vec<Reading>,
    /// Rejected items' positions and reasons; for an oversized batch, only
    /// the first few are listed.
    pub bad: Vec<(usize, String)>,
    /// Every rejected item, listed or not.
    pub rejected: u64,
}

impl Sorted {
    /// A batch of `count` items over `max_batch`, rejected whole, as the
    /// Ingest proto allows: storing its head would make the client find and
    /// resend the tail. Only `listed` rejections are spelled out, so the
    /// answer costs the same whatever the count.
    pub(crate) fn oversized(count: usize, max_batch: u32, listed: usize) -> Self {
        let reason = format!("batch of {count} readings is over the limit of {max_batch}");
        Self {
            good: Vec::new(),
            bad: (0..count.min(listed))
                .map(|i| (i, reason.clone()))
                .collect(),
            rejected: count as u64,
        }
    }
}

impl Limits {
    /// Labels are stored, indexed and replicated with every reading: their
    /// count and sizes are bounded, each limit named when passed.
    fn check_labels(&self, labels: &BTreeMap<String, String>) -> Result<(), String> {
        if labels.len() > self.max_labels {
            return Err(format!(
                "{} labels, more than the limit of {} (`telemetry.max_labels`)",
                labels.len(),
                self.max_labels
            ));
        }
        let mut total = 0usize;
        for (key, value) in labels {
            if key.len() > self.max_label_key_bytes {
                return Err(format!(
                    "label key {:?} is longer than {} bytes (`telemetry.max_label_key_bytes`)",
                    key.chars().take(32).collect::<String>(),
                    self.max_label_key_bytes
                ));
            }
            if value.len() > self.max_label_value_bytes {
                return Err(format!(
                    "label {key:?} has a value longer than {} bytes (`telemetry.max_label_value_bytes`)",
                    self.max_label_value_bytes
                ));
            }
            total += key.len() + value.len();
        }
        if total > self.max_labels_bytes {
            return Err(format!(
                "labels take {total} bytes, more than {} (`telemetry.max_labels_bytes`)",
                self.max_labels_bytes
            ));
        }
        Ok(())
    }
}

/// Splits one batch into what can be stored and what cannot, with each
/// rejected item's position and reason. `items` hold the readings that
/// parsed, or why they did not.
pub(crate) fn sort_out(
    items: Vec<Result<Reading, String>>,
    limits: &Limits,
    now: DateTime<Utc>,
) -> Sorted {
    let mut good = Vec::with_capacity(items.len());
    let mut bad = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        match item.and_then(|r| limits.check(&r, now).map(|()| r)) {
            Ok(r) => good.push(r),
            Err(reason) => bad.push((i, reason)),
        }
    }
    let rejected = bad.len() as u64;
    Sorted {
        good,
        bad,
        rejected,
    }
}

/// Queues readings for the writer; cheap to clone.
#[derive(Clone)]
pub(crate) struct ReadingWriter {
    queue: mpsc::Sender<Pending>,
    room: Arc<Semaphore>,
    capacity: usize,
}

/// Readings of one call, and who waits for their commit.
struct Pending {
    tenant: String,
    readings: Vec<Reading>,
    done: oneshot::Sender<Result<(), String>>,
    /// Held until written: the buffer is bounded in readings, not calls.
    _room: OwnedSemaphorePermit,
}

/// Resolves once the submitted readings are committed.
pub(crate) struct Commit(Option<oneshot::Receiver<Result<(), String>>>);

impl Commit {
    pub(crate) async fn wait(self) -> Result<(), Error> {
        let Some(rx) = self.0 else { return Ok(()) };
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Unavailable(format!("readings not stored: {e}"))),
            Err(_) => Err(Error::Unavailable(
                "readings not stored: the node is shutting down".into(),
            )),
        }
    }
}

impl ReadingWriter {
    /// Starts the collector on `tasks`; it flushes what is queued and stops
    /// when `shutdown` is cancelled. With `replicate`, inserts log what they
    /// insert for replication.
    pub(crate) fn start(
        pool: PgPool,
        config: &TelemetryConfig,
        replicate: bool,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Self {
        let capacity = config.write_buffer_readings as usize;
        let (queue, rx) = mpsc::channel(capacity);
        tasks.spawn(collect(pool, replicate, rx, shutdown, tasks.clone()));
        Self {
            queue,
            room: Arc::new(Semaphore::new(capacity)),
            capacity,
        }
    }

    /// Waits for room in the buffer (backpressure), then queues `readings`.
    /// At most `write_buffer_readings` may be submitted at once.
    pub(crate) async fn submit(
        &self,
        tenant: &str,
        readings: Vec<Reading>,
    ) -> Result<Commit, Error> {
        if readings.is_empty() {
            return Ok(Commit(None));
        }
        let closed = || Error::Unavailable("the node is shutting down".into());
        // More than the whole buffer would wait for room forever.
        let n = u32::try_from(readings.len())
            .ok()
            .filter(|_| readings.len() <= self.capacity)
            .ok_or_else(|| Error::invalid("too many readings in one call", None))?;
        let room = self
            .room
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| closed())?;
        let (done, rx) = oneshot::channel();
        let pending = Pending {
            tenant: tenant.to_string(),
            readings,
            done,
            _room: room,
        };
        self.queue.send(pending).await.map_err(|_| closed())?;
        Ok(Commit(Some(rx)))
    }
}

async fn collect(
    pool: PgPool,
    replicate: bool,
    mut rx: mpsc::Receiver<Pending>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let inserts = Arc::new(Semaphore::new(CONCURRENT_INSERTS));
    loop {
        let first = tokio::select! {
            biased;
            p = rx.recv() => p,
            () = shutdown.cancelled() => {
                // Calls that already queued get their answer; later ones are
                // refused by the closed channel.
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        let mut rows = batch[0].readings.len();
        while rows < MAX_ROWS_PER_INSERT {
            match rx.try_recv() {
                Ok(p) => {
                    rows += p.readings.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let Ok(permit) = inserts.clone().acquire_owned().await else {
            break;
        };
        let pool = pool.clone();
        tasks.spawn(async move {
            let result = insert(&pool, &batch, replicate).await.map_err(|e| {
                tracing::warn!(error = %e, rows, "telemetry insert failed");
                e.to_string()
            });
            for p in batch {
                let _ = p.done.send(result.clone());
            }
            drop(permit);
        });
    }
}

const INSERT_READINGS: &str = "
    INSERT INTO telemetry_readings (tenant, device_id, metric, ts, value, labels)
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[],
                         $5::float8[], $6::jsonb[])
    ON CONFLICT (tenant, device_id, metric, ts) DO NOTHING";

/// The insert above, and the rows it inserted (not the duplicates it left
/// out: peers have those already, or will from where they were first
/// written) logged as 'append' changes of at most `$7` rows each, stamped
/// `$8`/`$9`. One statement: the rows never travel back to the node.
/// Chunks keep a change (and the Pull batch carrying it) a bounded size; the
/// applier inserts one change's rows in one statement.
const INSERT_AND_LOG_READINGS: &str = "
    WITH inserted AS (
        INSERT INTO telemetry_readings (tenant, device_id, metric, ts, value, labels)
        SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[],
                             $5::float8[], $6::jsonb[])
        ON CONFLICT (tenant, device_id, metric, ts) DO NOTHING
        RETURNING tenant, device_id, metric, ts, value, labels
    ), chunked AS (
        SELECT (row_number() OVER () - 1) / $7 AS chunk, to_jsonb(inserted) AS reading
          FROM inserted
    )
    INSERT INTO replication_outbox (table_name, key, op, payload, hlc, origin_region)
    SELECT 'telemetry_readings', ''::bytea, 'append', jsonb_agg(reading), $8, $9
      FROM chunked GROUP BY chunk ORDER BY chunk";

/// Writes every reading of `batch` in one statement; with `replicate`, logs
/// them in the same transaction.
async fn insert(pool: &PgPool, batch: &[Pending], replicate: bool) -> Result<(), Error> {
    let mut rows: Vec<(&str, &Reading)> = batch
        .iter()
        .flat_map(|p| p.readings.iter().map(|r| (p.tenant.as_str(), r)))
        .collect();
    // Concurrent inserts take row locks in key order, so two of them that
    // share keys wait for each other instead of deadlocking. The sort is
    // stable: of duplicates in one insert, the one that arrived first wins.
    // (The replication applier inserts in the same order.)
    rows.sort_by(|a, b| {
        (a.0, &a.1.device_id, &a.1.metric, a.1.ts).cmp(&(b.0, &b.1.device_id, &b.1.metric, b.1.ts))
    });
    let n = rows.len();
    let mut tenants = Vec::with_capacity(n);
    let mut devices = Vec::with_capacity(n);
    let mut metrics = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    let mut values = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    for (tenant, r) in rows {
        tenants.push(tenant);
        devices.push(r.device_id.as_str());
        metrics.push(r.metric.as_str());
        times.push(r.ts);
        values.push(r.value);
        labels.push(Json(&r.labels));
    }
    if !replicate {
        sqlx::query(INSERT_READINGS)
            .bind(tenants)
            .bind(devices)
            .bind(metrics)
            .bind(times)
            .bind(values)
            .bind(labels)
            .execute(pool)
            .await?;
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    // The clock before any reading, the order every replicated write and
    // every apply keeps (0005_replication.sql): the other order deadlocks
    // against a peer's readings being applied to the same keys. Its lock,
    // held to commit, also makes this insert's log sequences commit in
    // order, and serialises replicated inserts with each other.
    let hlc = crate::replication::tick(&mut tx).await?;
    let logged = sqlx::query(INSERT_AND_LOG_READINGS)
        .bind(tenants)
        .bind(devices)
        .bind(metrics)
        .bind(times)
        .bind(values)
        .bind(labels)
        .bind(crate::replication::READINGS_PER_CHANGE)
        .bind(hlc.hlc)
        .bind(&hlc.region)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if logged > 0 {
        crate::replication::notify_commit(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(ts: DateTime<Utc>) -> Reading {
        Reading {
            device_id: "d1".into(),
            ts,
            metric: "temp_c".into(),
            value: 1.5,
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn each_bad_reading_gets_its_reason() {
        let limits = Limits::new(&TelemetryConfig::default());
        let now = Utc::now();
        assert_eq!(limits.check(&reading(now), now), Ok(()));
        type Spoil = fn(&mut Reading, DateTime<Utc>);
        let cases: [(Spoil, &str); 6] = [
            (|r, _| r.device_id.clear(), "missing device_id"),
            (|r, _| r.metric.clear(), "missing metric"),
            (|r, _| r.metric = "m".repeat(300), "metric is longer"),
            (|r, _| r.value = f64::NAN, "not finite"),
            (
                |r, now| r.ts = now + chrono::Duration::minutes(6),
                "in the future",
            ),
            (
                |r, now| r.ts = now - chrono::Duration::days(31),
                "older than the retention",
            ),
        ];
        for (spoil, reason) in cases {
            let mut r = reading(now);
            spoil(&mut r, now);
            let e = limits.check(&r, now).unwrap_err();
            assert!(e.contains(reason), "{e} vs {reason}");
        }
        let mut r = reading(now + chrono::Duration::minutes(4));
        r.value = f64::MAX;
        assert_eq!(limits.check(&r, now), Ok(()));
    }

    #[test]
    fn labels_are_bounded_by_count_key_value_and_total() {
        let config = TelemetryConfig {
            max_labels: 3,
            max_label_key_bytes: 8,
            max_label_value_bytes: 16,
            max_labels_bytes: 30,
            ..TelemetryConfig::default()
        };
        let limits = Limits::new(&config);
        let now = Utc::now();
        let with = |labels: &[(&str, &str)]| Reading {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..reading(now)
        };
        let fits = with(&[("a", "x".repeat(16).as_str()), ("bb", "y"), ("k", "")]);
        assert_eq!(limits.check(&fits, now), Ok(()));
        let too_long = "v".repeat(17);
        let cases = [
            (
                with(&[("a", ""), ("b", ""), ("c", ""), ("d", "")]),
                "max_labels`",
            ),
            (with(&[("keykeykey", "")]), "max_label_key_bytes"),
            (with(&[("k", too_long.as_str())]), "max_label_value_bytes"),
            (
                with(&[
                    ("a", "\u{1}".repeat(16).as_str()),
                    ("b", "x".repeat(16).as_str()),
                ]),
                "max_labels_bytes",
            ),
        ];
        for (r, reason) in cases {
            let e = limits.check(&r, now).unwrap_err();
            assert!(e.contains(reason), "{e} vs {reason}");
        }
    }
}
