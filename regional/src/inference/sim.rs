//! The built-in simulated LLM. It answers with deterministic text for a given
//! prompt and seed, and takes the time a real engine would: prefill per prompt
//! token, a time to first token, a time per output token, and a concurrency
//! limit beyond which requests wait. A prefix cache remembers the prompt
//! blocks it prefilled lately, and prefill is charged only for the blocks it
//! does not hold, as in an engine with automatic prefix caching; so routing
//! that keeps shared prefixes together shows up as a lower time to first
//! token. [`serve_sim`] serves it over HTTP as an OpenAI-compatible server.

mod anthropic;
mod cache;
mod logprobs;
mod moderation;
mod server;
mod tools;

pub use self::server::{
    SimProtocol, serve_sim, serve_sim_as, serve_sim_requiring, serve_sim_traced,
};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use futures::StreamExt;
use futures::stream::BoxStream;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;

use self::cache::PrefixCache;
use super::metrics::SimMetrics;
use super::{
    ChatRequest, Chunk, Completion, Delta, Finish, FunctionDelta, Meta, ToolCall, ToolCallDelta,
    Usage,
};
use crate::config::SimConfig;
use crate::error::Error;

const VOCABULARY: &[&str] = &[
    "the",
    "model",
    "answers",
    "with",
    "a",
    "short",
    "reply",
    "about",
    "edge",
    "inference",
    "regions",
    "latency",
    "tokens",
    "request",
    "cache",
    "queue",
    "replica",
    "gateway",
    "routes",
    "nearest",
    "healthy",
    "cluster",
    "stream",
    "of",
    "and",
    "to",
    "in",
    "for",
    "is",
    "fast",
    "stable",
    "data",
];

pub(crate) struct SimBackend {
    config: SimConfig,
    engine: Arc<Engine>,
    /// Completions started, numbering the failure-injection draws.
    calls: AtomicU64,
}

/// What the generations of one backend share.
struct Engine {
    slots: Semaphore,
    cache: Mutex<PrefixCache>,
    metrics: SimMetrics,
}

impl SimBackend {
    pub(crate) fn new(config: SimConfig, metrics: SimMetrics) -> Self {
        let engine = Arc::new(Engine {
            slots: Semaphore::new(config.max_concurrency as usize),
            cache: Mutex::new(PrefixCache::new(config.prefix_cache_blocks as usize)),
            metrics,
        });
        Self {
            config,
            engine,
            calls: AtomicU64::new(0),
        }
    }

    /// Whether the next completion fails, by `fail_rate`; the n-th draw of a
    /// given `fail_seed` always comes out the same.
    fn inject_failure(&self) -> bool {
        if self.config.fail_rate <= 0.0 {
            return false;
        }
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let mut hash = Fnv::new();
        hash.write(&self.config.fail_seed.to_le_bytes());
        hash.write(&n.to_le_bytes());
        let draw = StdRng::seed_from_u64(hash.finish()).random::<f64>();
        draw < self.config.fail_rate
    }

    pub(crate) async fn complete(&self, req: &ChatRequest) -> Result<Completion, Error> {
        if self.inject_failure() {
            return Err(Error::Unavailable(
                "simulated backend failure (fail_rate)".into(),
            ));
        }
        super::collect(
            plan(&self.config, req)
                .run(self.engine.clone())
                .map(Ok)
                .boxed(),
        )
        .await
    }

    pub(crate) fn stream(&self, req: ChatRequest) -> BoxStream<'static, Chunk> {
        plan(&self.config, &req).run(self.engine.clone())
    }
}

/// Everything about one generation decided up front, so the output depends
/// only on the request, never on timing.
struct Plan {
    /// The answer, one piece per output token.
    pieces: Vec<Delta>,
    finish: Finish,
    usage: Usage,
    /// Prefill time per prompt token not in the prefix cache.
    prefill_per_token: Duration,
    /// Chained hashes of the prompt's whole blocks, first block first.
    blocks: Vec<u64>,
    block_tokens: u32,
    ttft: Duration,
    per_token: Duration,
}

/// The chained hash of each whole block of `block_tokens` prompt tokens
/// (each message's role, then its words): block k's hash covers blocks 1 to
/// k, so equal hashes mean equal prefixes.
fn prefix_blocks(req: &ChatRequest, block_tokens: u32) -> Vec<u64> {
    let mut blocks = Vec::new();
    let mut hash = Fnv::new();
    let mut in_block = 0;
    let tokens = req
        .messages
        .iter()
        .flat_map(|m| std::iter::once(m.role.as_str()).chain(m.content.split_whitespace()));
    for token in tokens {
        hash.write(token.as_bytes());
        hash.write(&[0]);
        in_block += 1;
        if in_block == block_tokens {
            blocks.push(hash.finish());
            in_block = 0;
        }
    }
    blocks
}

fn plan(config: &SimConfig, req: &ChatRequest) -> Plan {
    let mut hash = Fnv::new();
    hash.write(&req.seed.unwrap_or(0).to_le_bytes());
    hash.write(req.model.as_bytes());
    for m in &req.messages {
        hash.write(m.role.as_bytes());
        hash.write(&[0]);
        hash.write(m.content.as_bytes());
        hash.write(&[0]);
    }
    let mut rng = StdRng::seed_from_u64(hash.finish());
    let max = req.max_tokens.unwrap_or(config.default_max_tokens).max(1);
    let (mut pieces, finish) = match tools::shape(req) {
        tools::Shape::Text => text(req, max, &mut rng),
        tools::Shape::Calls(offered) => {
            let calls = tools::calls(&offered, &mut rng);
            (call_pieces(&calls), Finish::ToolCalls)
        }
        tools::Shape::Json(schema) => {
            let document = tools::document(schema.unwrap_or(&serde_json::Value::Null), &mut rng);
            (
                fragments(&document).map(Delta::text).collect(),
                Finish::Stop,
            )
        }
    };
    // Calls and documents are cut by `max_tokens` like text.
    let finish = if pieces.len() > max as usize {
        pieces.truncate(max as usize);
        Finish::Length
    } else {
        finish
    };
    if let Some(top) = logprobs::asked(req) {
        logprobs::annotate(&mut pieces, top);
    }
    let prompt = req.prompt_tokens();
    Plan {
        usage: Usage {
            prompt_tokens: prompt,
            completion_tokens: pieces.len() as u32,
        },
        pieces,
        finish,
        prefill_per_token: Duration::from_micros(config.prefill_us_per_token),
        blocks: prefix_blocks(req, config.prefix_block_tokens),
        block_tokens: config.prefix_block_tokens,
        ttft: Duration::from_millis(config.ttft_ms),
        per_token: Duration::from_millis(config.per_token_ms),
    }
}

/// Words drawn until the natural length, `max` or a stop sequence.
fn text(req: &ChatRequest, max: u32, rng: &mut StdRng) -> (Vec<Delta>, Finish) {
    let natural = rng.random_range(max.min(8)..=max);
    // Routing bounds `max_tokens` by the context window, but the capacity
    // asked of the allocator never comes from a client's number alone.
    let mut pieces = Vec::with_capacity(natural.min(4_096) as usize);
    let mut finish = if natural == max {
        Finish::Length
    } else {
        Finish::Stop
    };
    let mut text_so_far = String::new();
    for i in 0..natural {
        let word = VOCABULARY[rng.random_range(0..VOCABULARY.len())];
        text_so_far.push(' ');
        text_so_far.push_str(word);
        if req
            .stop
            .iter()
            .any(|s| !s.is_empty() && text_so_far.contains(s.as_str()))
        {
            finish = Finish::Stop;
            break;
        }
        pieces.push(Delta::text(if i == 0 {
            word.to_string()
        } else {
            format!(" {word}")
        }));
    }
    (pieces, finish)
}

/// Tool calls as a stream sends them: per call, its id, type and name,
/// then its arguments in fragments, all under the call's index.
fn call_pieces(calls: &[ToolCall]) -> Vec<Delta> {
    let mut pieces = Vec::new();
    for (i, call) in calls.iter().enumerate() {
        let fragment = |id: Option<&str>, name: Option<&str>, arguments: &str| Delta {
            tool_calls: vec![ToolCallDelta {
                index: i as u32,
                id: id.map(str::to_string),
                kind: id.map(|_| "function".to_string()),
                function: Some(FunctionDelta {
                    name: name.map(str::to_string),
                    arguments: Some(arguments.to_string()),
                }),
            }],
            ..Delta::default()
        };
        pieces.push(fragment(Some(&call.id), Some(&call.function.name), ""));
        pieces.extend(fragments(&call.function.arguments).map(|a| fragment(None, None, a)));
    }
    pieces
}

/// `text` in pieces of about a token (8 bytes, cut at character bounds).
fn fragments(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(8);
        while !rest.is_char_boundary(end) {
            end += 1;
        }
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

impl Plan {
    fn run(self, engine: Arc<Engine>) -> BoxStream<'static, Chunk> {
        async_stream::stream! {
            let arrived = Instant::now();
            let metrics = &engine.metrics;
            metrics.waiting.inc();
            let permit = engine.slots.acquire().await;
            metrics.waiting.dec();
            // The permit and the running count live as long as the stream: a
            // client that stops reading frees its slot when it is dropped.
            let Ok(_permit) = permit else {
                return;
            };
            let _running = Running::new(metrics);
            let cached_blocks = engine.cache.lock().expect("prefix cache lock").lookup_insert(&self.blocks);
            let cached = cached_blocks as u32 * self.block_tokens;
            metrics.prefix_queries.inc_by(u64::from(self.usage.prompt_tokens));
            metrics.prefix_hits.inc_by(u64::from(cached));
            let uncached = self.usage.prompt_tokens.saturating_sub(cached);
            sleep(self.prefill_per_token * uncached + self.ttft).await;
            metrics.ttft.observe(arrived.elapsed().as_secs_f64());
            for (i, piece) in self.pieces.into_iter().enumerate() {
                if i > 0 {
                    sleep(self.per_token).await;
                }
                yield Chunk::Delta(piece);
            }
            yield Chunk::Done { finish: self.finish, usage: self.usage, meta: Meta::default() };
        }
        .boxed()
    }
}

/// Counts a generation as running while it lives.
struct Running(prometheus::IntGauge);

impl Running {
    fn new(metrics: &SimMetrics) -> Self {
        metrics.running.inc();
        Self(metrics.running.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn sleep(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// FNV-1a: a stable hash, so the same request gives the same text across
/// builds and platforms (std's hasher makes no such promise).
pub(super) struct Fnv(u64);

impl Fnv {
    pub(super) fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    pub(super) fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    pub(super) fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests;
