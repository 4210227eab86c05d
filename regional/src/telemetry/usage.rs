//! Usage records of inference requests: queued without waiting and written
//! in batches, so recording never slows the request it describes. When the
//! queue is full the record is dropped and counted instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::Error;
use crate::inference::Usage;
use crate::tenancy::spend::Spend;

/// Records in one insert at most.
const MAX_ROWS_PER_INSERT: usize = 1_000;

/// One finished inference request.
#[derive(Debug, Clone)]
pub(crate) struct UsageRecord {
    pub tenant: String,
    /// The API key's id, when the gateway named it.
    pub key: Option<String>,
    pub model: String,
    pub ts: DateTime<Utc>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub ttft_ms: u32,
    pub latency_ms: u32,
    /// `miss`, `hit_l1`, `hit_l2`, `hit_semantic` or `bypass`.
    pub cache: &'static str,
    /// `ok`, or the gRPC code of the failure (`not_found`, ...).
    pub status: String,
}

/// Queues usage records; cheap to clone.
#[derive(Clone)]
pub(crate) struct UsageRecorder {
    queue: mpsc::Sender<UsageRecord>,
    dropped: Arc<AtomicU64>,
    /// Budgets count every answered request, whatever the queue does.
    spend: Arc<Spend>,
}

impl UsageRecorder {
    pub(crate) fn start(
        pool: PgPool,
        region: &str,
        capacity: usize,
        spend: Arc<Spend>,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Self {
        let (queue, rx) = mpsc::channel(capacity);
        tasks.spawn(write(pool, region.into(), rx, shutdown));
        Self {
            queue,
            dropped: Arc::new(AtomicU64::new(0)),
            spend,
        }
    }

    /// Queues `record` without waiting; drops it when the queue is full.
    pub(crate) fn record(&self, mut record: UsageRecord) {
        // A cache hit generated nothing, and a failure used nothing.
        if record.status == "ok" && !record.cache.starts_with("hit") {
            self.spend.add(
                &record.tenant,
                record.key.as_deref(),
                &record.model,
                record.prompt_tokens,
                record.completion_tokens,
            );
        }
        // The model is the one the request named, found or not; PostgreSQL's
        // text cannot hold U+0000, and one such row would fail the insert of
        // its whole batch, other tenants' records with it.
        for text in [&mut record.tenant, &mut record.model, &mut record.status] {
            if text.contains('\0') {
                *text = text.replace('\0', "\u{fffd}");
            }
        }
        if self.queue.try_send(record).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(dropped, "usage queue full or closed: usage records dropped");
            }
        }
    }

    /// Records dropped since start.
    #[allow(dead_code)] // read by metrics, when the node exports them
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Starts timing one request of `tenant` for `model`.
    pub(crate) fn begin(&self, tenant: &str, key: Option<&str>, model: &str) -> UsageDraft {
        UsageDraft {
            recorder: self.clone(),
            tenant: tenant.to_string(),
            key: key.map(str::to_string),
            model: model.to_string(),
            started: Instant::now(),
            at: Utc::now(),
        }
    }
}

/// A request being timed; records one row when it completes or fails.
#[derive(Clone)]
pub(crate) struct UsageDraft {
    recorder: UsageRecorder,
    tenant: String,
    key: Option<String>,
    model: String,
    started: Instant,
    at: DateTime<Utc>,
}

impl UsageDraft {
    /// The model that served, when a fallback did rather than the one the
    /// request was routed to.
    pub(crate) fn served_by(&mut self, model: &str) {
        model.clone_into(&mut self.model);
    }

    pub(crate) fn completed(&self, usage: Usage, ttft: Duration, cache: &'static str) {
        self.finish(usage, ttft, cache, "ok".into());
    }

    /// Time since the request started.
    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub(crate) fn failed(&self, error: &Error) {
        let status = format!("{:?}", error.code());
        self.finish(Usage::default(), Duration::ZERO, "bypass", snake(&status));
    }

    fn finish(&self, usage: Usage, ttft: Duration, cache: &'static str, status: String) {
        self.recorder.record(UsageRecord {
            tenant: self.tenant.clone(),
            key: self.key.clone(),
            model: self.model.clone(),
            ts: self.at,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            ttft_ms: millis(ttft),
            latency_ms: millis(self.started.elapsed()),
            cache,
            status,
        });
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// `NotFound` → `not_found`.
fn snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

async fn write(
    pool: PgPool,
    region: Arc<str>,
    mut rx: mpsc::Receiver<UsageRecord>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_ROWS_PER_INSERT);
    loop {
        let first = tokio::select! {
            biased;
            r = rx.recv() => r,
            () = shutdown.cancelled() => {
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < MAX_ROWS_PER_INSERT {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if let Err(e) = insert(&pool, &region, &batch).await {
            tracing::warn!(error = %e, rows = batch.len(), "usage records not stored");
        }
        batch.clear();
    }
}

const INSERT_USAGE: &str = "
    INSERT INTO inference_usage (tenant, model, region, ts, prompt_tokens, completion_tokens,
                                 ttft_ms, latency_ms, cache, status)
    SELECT t, m, $3, ts, p, c, f, l, ca, s
      FROM UNNEST($1::text[], $2::text[], $4::timestamptz[], $5::int[], $6::int[], $7::int[],
                  $8::int[], $9::text[], $10::text[]) AS u(t, m, ts, p, c, f, l, ca, s)";

async fn insert(pool: &PgPool, region: &str, batch: &[UsageRecord]) -> Result<(), sqlx::Error> {
    let int = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    sqlx::query(INSERT_USAGE)
        .bind(batch.iter().map(|r| r.tenant.as_str()).collect::<Vec<_>>())
        .bind(batch.iter().map(|r| r.model.as_str()).collect::<Vec<_>>())
        .bind(region)
        .bind(batch.iter().map(|r| r.ts).collect::<Vec<_>>())
        .bind(
            batch
                .iter()
                .map(|r| int(r.prompt_tokens))
                .collect::<Vec<_>>(),
        )
        .bind(
            batch
                .iter()
                .map(|r| int(r.completion_tokens))
                .collect::<Vec<_>>(),
        )
        .bind(batch.iter().map(|r| int(r.ttft_ms)).collect::<Vec<_>>())
        .bind(batch.iter().map(|r| int(r.latency_ms)).collect::<Vec<_>>())
        .bind(batch.iter().map(|r| r.cache).collect::<Vec<_>>())
        .bind(batch.iter().map(|r| r.status.as_str()).collect::<Vec<_>>())
        .execute(pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn codes_become_snake_case() {
        assert_eq!(super::snake("NotFound"), "not_found");
        assert_eq!(super::snake("Ok"), "ok");
    }
}
