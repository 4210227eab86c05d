//! The benches' load generator: a fixed-rate open loop for latency and a
//! closed loop for saturation throughput, against any URL that takes the
//! sandbox's chat completion.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::TEST_MODEL;

/// A numeric environment variable, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile (0 to 1) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Milliseconds, for printing.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Sends `n` requests to `url` at `rps`, open loop (a slow answer does not
/// delay the next send), the `i`th with `body(i)`, each expected to answer
/// 200; the time each took from its send, in sending order. Unlike
/// [`Load::fixed_rate`], which counts from when a request was due, this is
/// the service time alone, for comparing two paths finely.
pub async fn service_times(
    client: &reqwest::Client,
    url: &str,
    rps: u64,
    n: u64,
    body: impl Fn(u64) -> serde_json::Value,
) -> Vec<Duration> {
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rps));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        ticker.tick().await;
        let (client, url, body) = (client.clone(), url.to_string(), body(i));
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let res = client.post(&url).json(&body).send().await.expect("send");
            assert_eq!(res.status(), 200);
            res.bytes().await.expect("body");
            started.elapsed()
        }));
    }
    let mut times = Vec::with_capacity(tasks.len());
    for t in tasks {
        times.push(t.await.expect("request task"));
    }
    times
}

/// What every request sends: a short completion of the zero-latency test
/// model, and an optional bearer key (only a gateway with `[auth]` checks it).
#[derive(Clone)]
pub struct Load {
    body: Arc<str>,
    authorization: Option<Arc<str>>,
}

impl Load {
    /// Requests without a key.
    pub fn new() -> Self {
        let body = serde_json::json!({
            "model": TEST_MODEL,
            "messages": [{ "role": "user", "content": "bench" }],
            "max_tokens": 8
        });
        Self {
            body: body.to_string().into(),
            authorization: None,
        }
    }

    /// Requests that carry `Authorization: Bearer <key>`.
    pub fn with_key(mut self, key: &str) -> Self {
        self.authorization = Some(format!("Bearer {key}").into());
        self
    }

    /// One request; true when it got a 200 and its whole body.
    pub async fn one(&self, client: &reqwest::Client, url: &str) -> bool {
        let mut req = client
            .post(url)
            .header("content-type", "application/json")
            .body(self.body.to_string());
        if let Some(auth) = &self.authorization {
            req = req.header("authorization", auth.as_ref());
        }
        match req.send().await {
            Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
            Err(_) => false,
        }
    }

    /// Open loop at `rate` per second: latency counts from when the request
    /// was due, so a stall shows up instead of slowing the load (no
    /// coordinated omission). Sorted latencies and the number of failures.
    pub async fn fixed_rate(&self, url: &str, rate: u64, seconds: u64) -> (Vec<Duration>, usize) {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .expect("an HTTP client");
        let url: Arc<str> = url.into();
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let start = Instant::now();
        let mut tasks = Vec::with_capacity((rate * seconds) as usize);
        for i in 0..rate * seconds {
            let due = start + interval * i as u32;
            tokio::time::sleep_until(due.into()).await;
            let (load, client, url) = (self.clone(), client.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                (load.one(&client, &url).await, due.elapsed())
            }));
        }
        let (mut latencies, mut failures) = (Vec::with_capacity(tasks.len()), 0);
        for t in tasks {
            match t.await.expect("load task") {
                (true, latency) => latencies.push(latency),
                (false, _) => failures += 1,
            }
        }
        latencies.sort();
        (latencies, failures)
    }

    /// Closed loop with `concurrency` clients: requests per second.
    pub async fn saturation(&self, url: &str, concurrency: u64, seconds: u64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (load, url) = (self.clone(), url.to_string());
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut done = 0u64;
                while Instant::now() < deadline {
                    if load.one(&client, &url).await {
                        done += 1;
                    }
                }
                done
            }));
        }
        let mut done = 0;
        for t in tasks {
            done += t.await.expect("load task");
        }
        done as f64 / seconds as f64
    }
}

impl Default for Load {
    fn default() -> Self {
        Self::new()
    }
}
