//! The soak's mixed load through the gateway: a few workers, each cycling
//! through chat, streaming chat, embeddings, telemetry ingest and a job,
//! counting answers (2xx) and failures per kind.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

const KINDS: [&str; 5] = ["chat", "stream", "embed", "telemetry", "job"];
const WORKERS: usize = 4;
/// Between two requests of one worker: a steady, modest rate that a
/// loaded 2-core machine sustains for half an hour.
const PAUSE: Duration = Duration::from_millis(50);

/// Answers and failures per kind, since the last `take`.
#[derive(Clone, Default)]
pub(crate) struct Counters(Arc<[(AtomicU64, AtomicU64); 5]>);

/// Counts per kind: (ok, failed).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Totals([(u64, u64); 5]);

impl Counters {
    fn add(&self, kind: usize, ok: bool) {
        let (a, f) = &self.0[kind];
        if ok { a } else { f }.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn take(&self) -> Totals {
        let mut t = Totals::default();
        for (i, (a, f)) in self.0.iter().enumerate() {
            t.0[i] = (a.swap(0, Ordering::Relaxed), f.swap(0, Ordering::Relaxed));
        }
        t
    }
}

impl Totals {
    fn add(&mut self, other: &Totals) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            a.0 += b.0;
            a.1 += b.1;
        }
    }

    /// Whether every kind of request succeeded at least once.
    pub(crate) fn every_kind_answered(&self) -> bool {
        self.0.iter().all(|(ok, _)| *ok > 0)
    }
}

impl fmt::Display for Totals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (ok, failed)) in self.0.iter().enumerate() {
            write!(
                f,
                "{}{} {ok}/{failed}",
                if i > 0 { ", " } else { "" },
                KINDS[i]
            )?;
        }
        write!(f, " (ok/failed)")
    }
}

async fn one(http: &reqwest::Client, base: &str, kind: usize, n: u64) -> bool {
    let chat = |model: &str, stream: bool| {
        json!({
            "model": model,
            "messages": [{"role": "user", "content": format!("soak question {}", n % 97)}],
            "max_tokens": 16,
            "stream": stream,
        })
    };
    let post = |path: &str, body: serde_json::Value| {
        http.post(format!("{base}{path}"))
            .timeout(Duration::from_secs(30))
            .json(&body)
            .send()
    };
    let answer = match kind {
        0 => post("/v1/chat/completions", chat("sim-fast", false)).await,
        1 => post("/v1/chat/completions", chat("sim-slow", true)).await,
        2 => {
            post(
                "/v1/embeddings",
                json!({"model": "all-minilm-l6-v2", "input": [format!("soak text {n}")]}),
            )
            .await
        }
        3 => {
            let ts = chrono::Utc::now().to_rfc3339();
            let readings: Vec<_> = (0..10)
                .map(|i| json!({"device_id": format!("d{}", n % 50), "metric": "temp_c", "ts": ts, "value": i as f64, "labels": {"i": i.to_string()}}))
                .collect();
            post("/v1/telemetry", json!(readings)).await
        }
        _ => post("/v1/jobs", chat("sim-fast", false)).await,
    };
    match answer {
        // The whole body: a stream that breaks midway is a failure.
        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
        _ => false,
    }
}

/// Runs the load until `end`; the handle yields the run's totals.
pub(crate) fn run(
    base: String,
    counters: Counters,
    end: Instant,
) -> tokio::task::JoinHandle<Totals> {
    let mut sum = Totals::default();
    let all = Counters::default();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (base, counters, all) = (base.clone(), counters.clone(), all.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut n = w as u64;
                while Instant::now() < end {
                    let kind = (n as usize) % KINDS.len();
                    let ok = one(&http, &base, kind, n).await;
                    counters.add(kind, ok);
                    all.add(kind, ok);
                    n += WORKERS as u64;
                    tokio::time::sleep(PAUSE).await;
                }
            })
        })
        .collect();
    tokio::spawn(async move {
        for w in workers {
            w.await.ok();
        }
        sum.add(&all.take());
        sum
    })
}
