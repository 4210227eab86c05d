//! A pool of upstreams serving one model, all speaking one protocol
//! ([`Protocol`]: OpenAI, Anthropic Messages or Azure OpenAI).
//!
//! Choice: prefix affinity first (a request whose prompt starts like an
//! earlier one goes where that one went, so the upstream's prefix cache
//! hits), unless that upstream is overloaded; otherwise the less loaded of
//! two random upstreams (power of two choices on outstanding requests).
//! Affinity alone would pile a popular prefix onto one server.
//!
//! An upstream takes requests while its health check passes and its
//! circuit breaker is not open. A failure before the first token (connect
//! error, 5xx, 429, a stream that ends before its first token) is retried
//! on another upstream after a jittered backoff; once a token went to the
//! client, a failure ends the client's stream instead.

mod breaker;
mod client;
mod health;
mod protocol;
mod send;
mod whole;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::metrics::{Metrics, UpstreamMetrics};
use super::sim::Fnv;
use super::{ChatRequest, ChunkStream, first_chunk};
use crate::config::{ApiKey, OpenAiConfig};
use crate::error::Error;

use self::breaker::Breaker;
pub(crate) use self::client::Material;
use self::health::Down;
pub(crate) use self::protocol::Protocol;

/// Affinity slots: a direct-mapped table of prefix hash → upstream, so its
/// size is fixed whatever the traffic; a collision only costs a cache miss.
const AFFINITY_SLOTS: usize = 4096;

pub(crate) struct Pool {
    model: String,
    upstream_model: String,
    protocol: Protocol,
    config: OpenAiConfig,
    upstreams: Vec<Upstream>,
    /// Upstream index + 1 per slot; 0 is empty.
    affinity: Vec<AtomicU32>,
    client: reqwest::Client,
    /// What the client and the keys were made from, to tell at a reload
    /// whether the pool can be kept.
    material: Material,
}

struct Upstream {
    base_url: String,
    /// Scrubbed from whatever the upstream says before anyone sees it.
    key: Option<ApiKey>,
    /// Its static headers and its key, sent on every request to it.
    headers: reqwest::header::HeaderMap,
    /// Why its latest health check or attempt failed, while it fails: what
    /// a request that finds no usable upstream is told.
    failure: Mutex<Option<Down>>,
    outstanding: AtomicU32,
    /// Moving average of the time to the first token of its answers, in
    /// microseconds; 0 before the first.
    ttft_us: AtomicU64,
    /// The latest health check passed (true until the first one says no).
    healthy: AtomicBool,
    breaker: Mutex<Breaker>,
    metrics: UpstreamMetrics,
}

enum Failure {
    /// Worth another upstream: connect errors, 5xx, 429, early ends.
    Retry(Error),
    /// The request itself is at fault; every upstream would refuse it.
    Fatal(Error),
}

impl Pool {
    /// Makes the pool of `models[index]` from its config and `material`,
    /// and starts its health checker, which stops with `shutdown` or when
    /// the pool is dropped (replaced by a reload). An error names the key
    /// at fault.
    pub(super) fn start(
        (index, model): (usize, &str),
        (protocol, config): (Protocol, OpenAiConfig),
        material: Material,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, String> {
        let client = material.client(index, &config)?;
        let upstreams = config
            .upstreams
            .iter()
            .enumerate()
            .map(|(j, u)| {
                let key = material.key(j).cloned();
                let headers = client::headers(u, key.as_ref(), &protocol).map_err(|e| {
                    format!("`models[{index}].backend.upstreams[{j}].headers`: {e}")
                })?;
                let base_url = u.base_url.trim_end_matches('/').to_string();
                let metrics = metrics.upstream(model, &base_url);
                metrics.up.set(1);
                Ok(Upstream {
                    base_url,
                    key,
                    headers,
                    failure: Mutex::new(None),
                    outstanding: AtomicU32::new(0),
                    ttft_us: AtomicU64::new(0),
                    healthy: AtomicBool::new(true),
                    breaker: Mutex::new(Breaker::Closed { failures: 0 }),
                    metrics,
                })
            })
            .collect::<Result<_, String>>()?;
        let pool = Arc::new(Self {
            model: model.to_string(),
            upstream_model: config.upstream_model.clone().unwrap_or(model.to_string()),
            protocol,
            upstreams,
            affinity: (0..AFFINITY_SLOTS).map(|_| AtomicU32::new(0)).collect(),
            config,
            client,
            material,
        });
        tokio::spawn(health::check_health(Arc::downgrade(&pool), shutdown));
        Ok(pool)
    }

    /// What the pool was made from.
    pub(super) fn material(&self) -> &Material {
        &self.material
    }

    /// Upstreams taking requests now, and all of them.
    pub(super) fn health(&self) -> (u32, u32) {
        let now = Instant::now();
        let up = self.upstreams.iter().filter(|u| u.usable(now)).count();
        (up as u32, self.upstreams.len() as u32)
    }

    /// Streams a completion from one upstream, retrying on others until one
    /// produced its first chunk.
    pub(super) async fn stream(self: &Arc<Self>, req: ChatRequest) -> Result<ChunkStream, Error> {
        let key = self.affinity_key(&req);
        let body = self.protocol.body(&req, &self.upstream_model)?;
        let prompt_tokens = req.prompt_tokens();
        let body = &body;
        let (stream, guard) = self
            .retrying(key, |i| async move {
                let stream = self.send(&self.upstreams[i], body, prompt_tokens).await?;
                first_chunk(stream).await.map_err(Failure::Retry)
            })
            .await?;
        Ok(self.watch(stream, guard))
    }

    /// Runs `attempt` (given the upstream's index) on one upstream after
    /// another until one answers, the request itself is refused, or the
    /// retries are spent; the breakers, the latency averages and the
    /// affinity table learn from each. Hands back the answer and the
    /// attempt's outstanding count, which a stream keeps while it runs.
    async fn retrying<T, Fut>(
        self: &Arc<Self>,
        key: Option<u64>,
        attempt: impl Fn(usize) -> Fut,
    ) -> Result<(T, Outstanding), Error>
    where
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut tried = Vec::new();
        let mut last = None;
        for n in 0..=self.config.retries {
            if n > 0 {
                // Full jitter: retries from many requests do not line up.
                let cap = self.config.retry_backoff_ms << (n - 1).min(10);
                let wait = rand::rng().random_range(0..=cap);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            let Some(i) = self.pick(key, &tried) else {
                break;
            };
            tried.push(i);
            let mut guard = Outstanding::new(self.clone(), i);
            let up = &self.upstreams[i];
            let started = Instant::now();
            let result = attempt(i).await;
            guard.decided = true;
            match result {
                Ok(answer) => {
                    let ttft = started.elapsed();
                    if self.slow(i, ttft) {
                        up.metrics.slow.inc();
                        self.outcome(i, false);
                    } else {
                        self.outcome(i, true);
                    }
                    up.record_ttft(ttft);
                    if let Some(key) = key {
                        self.affinity[key as usize % AFFINITY_SLOTS]
                            .store(i as u32 + 1, Ordering::Relaxed);
                    }
                    return Ok((answer, guard));
                }
                Err(Failure::Retry(e)) => {
                    tracing::warn!(model = %self.model, upstream = %up.base_url, error = %e, attempt = n, "upstream attempt failed");
                    self.outcome(i, false);
                    last = Some(e);
                }
                Err(Failure::Fatal(e)) => {
                    // The upstream answered: it is alive.
                    self.outcome(i, true);
                    return Err(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| self.none_usable()))
    }

    /// Whether `ttft` at upstream `i` is a latency outlier: more than
    /// `outlier_latency_factor` times the median of the other usable
    /// upstreams' moving averages (and over `outlier_min_ttft_ms`). The
    /// peers are the yardstick, so a model that is slow everywhere (long
    /// prompts, a big model) is not an outlier anywhere.
    fn slow(&self, i: usize, ttft: Duration) -> bool {
        let factor = self.config.outlier_latency_factor;
        if factor == 0.0 || ttft < Duration::from_millis(self.config.outlier_min_ttft_ms) {
            return false;
        }
        let now = Instant::now();
        let mut peers: Vec<u64> = self
            .upstreams
            .iter()
            .enumerate()
            .filter(|(j, u)| *j != i && u.usable(now))
            .map(|(_, u)| u.ttft_us.load(Ordering::Relaxed))
            .filter(|us| *us > 0)
            .collect();
        if peers.is_empty() {
            return false;
        }
        peers.sort_unstable();
        let median = peers[peers.len() / 2] as f64;
        ttft.as_micros() as f64 > factor * median
    }

    /// The prompt's first `affinity_prefix_bytes` bytes, hashed.
    fn affinity_key(&self, req: &ChatRequest) -> Option<u64> {
        let mut left = self.config.affinity_prefix_bytes;
        if left == 0 {
            return None;
        }
        let mut hash = Fnv::new();
        'messages: for m in &req.messages {
            for part in [m.role.as_bytes(), b"\n", m.content.as_bytes(), b"\n"] {
                let take = part.len().min(left);
                hash.write(&part[..take]);
                left -= take;
                if left == 0 {
                    break 'messages;
                }
            }
        }
        Some(hash.finish())
    }

    /// The upstream for the next attempt, not one already tried while an
    /// untried one is usable; `None` when none is usable.
    fn pick(&self, key: Option<u64>, tried: &[usize]) -> Option<usize> {
        let now = Instant::now();
        let usable: Vec<usize> = (0..self.upstreams.len())
            .filter(|i| self.upstreams[*i].usable(now))
            .collect();
        let mut candidates: Vec<usize> = usable
            .iter()
            .copied()
            .filter(|i| !tried.contains(i))
            .collect();
        if candidates.is_empty() {
            candidates = usable.clone();
        }
        let load = |i: usize| self.upstreams[i].outstanding.load(Ordering::Relaxed);
        let mean =
            usable.iter().map(|i| f64::from(load(*i))).sum::<f64>() / usable.len().max(1) as f64;
        while !candidates.is_empty() {
            let affine = key
                .map(|k| self.affinity[k as usize % AFFINITY_SLOTS].load(Ordering::Relaxed))
                .filter(|slot| *slot > 0)
                .map(|slot| slot as usize - 1)
                .filter(|i| candidates.contains(i))
                .filter(|i| {
                    f64::from(load(*i)) <= self.config.affinity_overload_factor * mean.max(1.0)
                });
            let choice = affine.unwrap_or_else(|| {
                if candidates.len() == 1 {
                    return candidates[0];
                }
                let mut rng = rand::rng();
                let a = rng.random_range(0..candidates.len());
                let mut b = rng.random_range(0..candidates.len() - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (candidates[a], candidates[b]);
                if load(b) < load(a) { b } else { a }
            });
            if self.upstreams[choice]
                .breaker
                .lock()
                .expect("breaker lock")
                .admit(now)
            {
                return Some(choice);
            }
            candidates.retain(|c| *c != choice);
        }
        None
    }

    /// One chat attempt at one upstream, in a client span that ends with
    /// the response head.
    async fn send(
        &self,
        up: &Upstream,
        body: &serde_json::Value,
        prompt_tokens: u32,
    ) -> Result<ChunkStream, Failure> {
        let cx = self.span("upstream.chat", up);
        let url = self.protocol.chat_url(&up.base_url, &self.upstream_model);
        let result = self
            .within_first_byte(up, async {
                let response = self.post(&cx, up, url, body).await?;
                Ok(self
                    .protocol
                    .chunks(response, prompt_tokens, up.base_url.clone()))
            })
            .await;
        // Whatever the upstream said may quote the key it was sent.
        let result = result.map(|stream| match up.key.clone() {
            Some(key) => stream
                .map(move |item| item.map_err(|e| client::scrub_error(e, Some(&key))))
                .boxed(),
            None => stream,
        });
        self.settle(&cx, up, result)
    }

    fn outcome(&self, i: usize, ok: bool) {
        let up = &self.upstreams[i];
        let now = Instant::now();
        {
            let mut breaker = up.breaker.lock().expect("breaker lock");
            if ok {
                *breaker = Breaker::Closed { failures: 0 };
            } else {
                breaker.failure(
                    now,
                    self.config.breaker_failures,
                    Duration::from_millis(self.config.breaker_cooldown_ms),
                );
            }
        }
        if ok {
            up.metrics.ok.inc();
        } else {
            up.metrics.failed.inc();
        }
        up.metrics.up.set(i64::from(up.usable(now)));
    }

    /// Counts a failure that ends a stream already started against its
    /// upstream; the outstanding count lasts as long as the stream.
    fn watch(self: &Arc<Self>, stream: ChunkStream, guard: Outstanding) -> ChunkStream {
        async_stream::stream! {
            let guard = guard;
            let mut stream = stream;
            while let Some(item) = stream.next().await {
                if item.is_err() {
                    guard.pool.outcome(guard.index, false);
                }
                yield item;
            }
        }
        .boxed()
    }
}

impl Upstream {
    /// Folds one first-token time into the moving average (weight 1/5:
    /// a few answers move it, one does not).
    fn record_ttft(&self, ttft: Duration) {
        let sample = u64::try_from(ttft.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .ttft_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |avg| {
                Some(if avg == 0 {
                    sample
                } else {
                    avg.saturating_mul(4).saturating_add(sample) / 5
                })
            });
    }

    fn usable(&self, now: Instant) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && self.breaker.lock().expect("breaker lock").usable(now)
    }
}

/// One request counted against an upstream while it lives.
struct Outstanding {
    pool: Arc<Pool>,
    index: usize,
    /// The attempt's outcome reached the breaker. An attempt dropped before
    /// (deadline, client gone) gives back the half-open probe slot it may
    /// hold, or the breaker would wait for its verdict forever.
    decided: bool,
}

impl Outstanding {
    fn new(pool: Arc<Pool>, index: usize) -> Self {
        let up = &pool.upstreams[index];
        up.outstanding.fetch_add(1, Ordering::Relaxed);
        up.metrics.outstanding.inc();
        Self {
            pool,
            index,
            decided: false,
        }
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        let up = &self.pool.upstreams[self.index];
        up.outstanding.fetch_sub(1, Ordering::Relaxed);
        up.metrics.outstanding.dec();
        if !self.decided {
            let mut breaker = up.breaker.lock().expect("breaker lock");
            if *breaker == (Breaker::HalfOpen { probing: true }) {
                *breaker = Breaker::HalfOpen { probing: false };
            }
        }
    }
}
