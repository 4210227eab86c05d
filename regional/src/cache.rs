//! The response cache: repeated and paraphrased questions answered without a
//! model call.
//!
//! Three layers, looked up in order: L1, each node's bounded in-process map
//! (`moka`, weighed in bytes); L2, the region's Redis, shared by its nodes;
//! and the semantic index, which serves the answer of an earlier question
//! whose last user message embeds close enough to this one's. Only requests
//! whose answer is reproducible are cached (temperature 0 or a seed), unless
//! the client opts in. Identical concurrent misses make one model call: the
//! others wait for it (single-flight, moka's coalesced initialisation).
//!
//! Redis is a help, never a dependency: every Redis call is bounded by
//! `cache.redis_timeout_ms`, and a failure counts as a miss.

mod guard;
mod key;
mod metrics;
mod semantic;

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::config::CacheConfig;
use crate::error::Error;
use crate::inference::{
    ChatRequest, Chunk, ChunkStream, EMBEDDING_MODEL_ID, Embedder, Finish, Usage,
};

pub use self::guard::compatible;
pub(crate) use self::key::{Key, Query, keys};
use self::metrics::Metrics;
pub(crate) use self::metrics::TenantStats;
use self::semantic::{Entry, Index, PartKey};

/// Request header: `allow` caches a request that is not deterministic.
pub(crate) const OPT_IN_HEADER: &str = meridian_proto::header::CACHE;
/// Response header: how the cache took part (`hit-l1`, `hit-l2`,
/// `hit-semantic`, `miss`, `bypass`).
pub(crate) const RESULT_HEADER: &str = meridian_proto::header::CACHE;

const PREFIX: &str = "meridian:cache:v1";
/// The region's stream of semantic entries and purges, which every node
/// follows to keep its index in step with the others.
const EVENTS: &str = "meridian:cache:v1:events";
/// How often a node reads new events: new entries reach the other nodes'
/// indexes within about this long.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(100);

/// A cached answer: what replaying a completion needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Answer {
    pub text: String,
    pub finish: Finish,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

impl Answer {
    pub(crate) fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
        }
    }

    /// The answer as a stream of word-sized deltas, so a streaming client
    /// reads a hit the way it reads a generation.
    pub(crate) fn stream(self: Arc<Self>) -> ChunkStream {
        let pieces: Vec<_> = self
            .text
            .split_inclusive(' ')
            .map(|p| Ok(Chunk::Delta(p.to_string())))
            .collect();
        let done = Ok(Chunk::Done {
            finish: self.finish,
            usage: self.usage(),
        });
        Box::pin(futures::stream::iter(pieces.into_iter().chain([done])))
    }
}

/// How the cache took part in answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    HitL1,
    HitL2,
    HitSemantic,
    Miss,
    Bypass,
}

impl Outcome {
    /// The metric label and the usage table's `cache` value.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::HitL1 => "hit_l1",
            Self::HitL2 => "hit_l2",
            Self::HitSemantic => "hit_semantic",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
        }
    }

    /// The `x-meridian-cache` response header value.
    pub(crate) fn header(self) -> &'static str {
        match self {
            Self::HitL1 => "hit-l1",
            Self::HitL2 => "hit-l2",
            Self::HitSemantic => "hit-semantic",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
        }
    }

    pub(crate) fn proto(self) -> meridian_proto::v1::CacheResult {
        use meridian_proto::v1::CacheResult;
        match self {
            Self::HitL1 => CacheResult::HitL1,
            Self::HitL2 => CacheResult::HitL2,
            Self::HitSemantic => CacheResult::HitSemantic,
            Self::Miss => CacheResult::Miss,
            Self::Bypass => CacheResult::Bypass,
        }
    }

    pub(crate) fn is_hit(self) -> bool {
        matches!(self, Self::HitL1 | Self::HitL2 | Self::HitSemantic)
    }
}

/// What the client asked of the cache, from `Cache-Control`,
/// `x-meridian-cache` or the gRPC `no_cache` field.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Directives {
    /// Neither read nor write (`no-store`, gRPC `no_cache`).
    pub no_store: bool,
    /// Do not read, but store the fresh answer (`no-cache`).
    pub no_cache: bool,
    /// Cache even a request that is not deterministic.
    pub opt_in: bool,
}

impl Directives {
    /// Reads the directives from request headers (or gRPC metadata).
    pub(crate) fn parse<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Self {
        let mut d = Self::default();
        for token in header("cache-control")
            .unwrap_or_default()
            .split(',')
            .map(|t| t.trim().to_ascii_lowercase())
        {
            match token.as_str() {
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = true,
                _ => {}
            }
        }
        d.opt_in = header(OPT_IN_HEADER).is_some_and(|v| v.trim().eq_ignore_ascii_case("allow"));
        d
    }
}

/// What to do with the cache for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    /// Neither read nor write.
    Bypass,
    /// Skip the lookup, store the fresh answer.
    Refresh,
    /// Look up, and store on a miss.
    Use,
}

/// A lookup's result: the hit, and the query's embedding when the semantic
/// layer computed one (a miss stores it with the answer).
struct Probe {
    hit: Option<(Arc<Answer>, Outcome)>,
    vector: Option<Vec<f32>>,
}

/// What [`ResponseCache::lookup`] found for a caller that streams its miss
/// itself.
pub(crate) struct Lookup {
    pub hit: Option<(Arc<Answer>, Outcome)>,
    /// What storing the answer of a miss needs, computed once by the lookup.
    pub pending: Pending,
}

/// The keys of a looked-up request and its query's embedding, kept until
/// its answer is known ([`ResponseCache::store_answer`]).
pub(crate) struct Pending {
    key: Key,
    query: Option<Query>,
    vector: Option<Vec<f32>>,
}

struct Semantic {
    embedder: Arc<Embedder>,
    index: RwLock<Index>,
}

/// Per-tenant counters and the region-wide sizes, for `Admin.RegionStatus`.
#[derive(Debug, Clone)]
pub(crate) struct Stats {
    pub tenants: Vec<TenantStats>,
    pub l1_entries: u64,
    pub semantic_entries: u64,
}

/// One per node.
pub(crate) struct ResponseCache {
    config: CacheConfig,
    l1: moka::future::Cache<Key, Arc<Answer>>,
    redis: ConnectionManager,
    semantic: Option<Semantic>,
    metrics: Metrics,
}

impl ResponseCache {
    pub(crate) fn new(
        config: &CacheConfig,
        region: &str,
        redis: ConnectionManager,
        embedder: Option<Arc<Embedder>>,
    ) -> Self {
        let l1 = moka::future::Cache::builder()
            .max_capacity(config.l1_max_bytes)
            .weigher(|k: &Key, v: &Arc<Answer>| {
                let bytes = k.tenant.len() + 32 + v.text.len() + 64;
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .time_to_live(config.ttl())
            .support_invalidation_closures()
            .build();
        let semantic = embedder
            .filter(|_| config.semantic_on(true))
            .map(|embedder| Semantic {
                index: RwLock::new(Index::new(
                    embedder.dimensions(),
                    config.semantic.max_entries,
                )),
                embedder,
            });
        Self {
            config: config.clone(),
            l1,
            redis,
            semantic,
            metrics: Metrics::new(region),
        }
    }

    /// The policy for `req` (its model resolved) given the client's directives.
    pub(crate) fn policy(&self, req: &ChatRequest, d: Directives) -> Policy {
        let deterministic = req.temperature == Some(0.0) || req.seed.is_some();
        if !self.config.enabled || d.no_store || !(deterministic || d.opt_in) {
            Policy::Bypass
        } else if d.no_cache {
            Policy::Refresh
        } else {
            Policy::Use
        }
    }

    /// Answers from the cache or with `compute`, as `policy` says. Under
    /// [`Policy::Use`], concurrent misses of one key make one call of
    /// `compute`; the others get its answer (or its error) and report a
    /// miss. A caller that goes away mid-call hands the call over to a
    /// waiting one.
    pub(crate) async fn get_or_compute<F>(
        &self,
        tenant: &str,
        req: &ChatRequest,
        policy: Policy,
        compute: F,
    ) -> Result<(Arc<Answer>, Outcome), Error>
    where
        F: Future<Output = Result<Answer, Error>>,
    {
        if policy == Policy::Bypass {
            self.metrics.count(tenant, Outcome::Bypass);
            return Ok((Arc::new(compute.await?), Outcome::Bypass));
        }
        let (key, query) = keys(tenant, req);
        if policy == Policy::Refresh {
            let vector = match &query {
                Some(q) => self.embed(tenant, q).await,
                None => None,
            };
            let answer = Arc::new(compute.await?);
            self.store(&key, query.as_ref(), vector, answer.clone())
                .await;
            self.metrics.count(tenant, Outcome::Miss);
            return Ok((answer, Outcome::Miss));
        }
        if let Some(answer) = self.l1.get(&key).await {
            self.metrics.count(tenant, Outcome::HitL1);
            return Ok((answer, Outcome::HitL1));
        }
        // Set by this caller's initialisation if it runs; left as is when
        // another caller's call answered.
        let mut outcome = None;
        let init = async {
            let probe = self.probe_shared(&key, query.as_ref()).await;
            if let Some((answer, layer)) = probe.hit {
                outcome = Some(layer);
                return Ok(answer);
            }
            outcome = Some(Outcome::Miss);
            let answer = Arc::new(compute.await?);
            // L1 is filled by the coalescing call itself.
            self.store_shared(&key, query.as_ref(), probe.vector, &answer)
                .await;
            Ok::<_, Error>(answer)
        };
        let result = self.l1.try_get_with(key.clone(), init).await;
        let outcome = outcome.unwrap_or_else(|| {
            self.metrics.coalesced.with_label_values(&[tenant]).inc();
            Outcome::Miss
        });
        self.metrics.count(tenant, outcome);
        result
            .map(|answer| (answer, outcome))
            .map_err(|e| Error::shared(&e))
    }

    /// Looks `req` up in every layer, for a caller that streams its miss
    /// itself and stores the answer afterwards with [`Self::store_answer`].
    pub(crate) async fn lookup(&self, tenant: &str, req: &ChatRequest, policy: Policy) -> Lookup {
        let (key, query) = keys(tenant, req);
        let probe = match policy {
            Policy::Bypass => Probe {
                hit: None,
                vector: None,
            },
            Policy::Refresh => Probe {
                hit: None,
                vector: match &query {
                    Some(q) => self.embed(tenant, q).await,
                    None => None,
                },
            },
            Policy::Use => match self.l1.get(&key).await {
                Some(answer) => Probe {
                    hit: Some((answer, Outcome::HitL1)),
                    vector: None,
                },
                None => {
                    let probe = self.probe_shared(&key, query.as_ref()).await;
                    if let Some((answer, _)) = &probe.hit {
                        self.l1.insert(key.clone(), answer.clone()).await;
                    }
                    probe
                }
            },
        };
        let outcome = match (&probe.hit, policy) {
            (Some((_, layer)), _) => *layer,
            (None, Policy::Bypass) => Outcome::Bypass,
            (None, _) => Outcome::Miss,
        };
        self.metrics.count(tenant, outcome);
        Lookup {
            hit: probe.hit,
            pending: Pending {
                key,
                query,
                vector: probe.vector,
            },
        }
    }

    /// Stores in every layer the answer of a request [`Self::lookup`]
    /// missed.
    pub(crate) async fn store_answer(&self, pending: Pending, answer: Answer) {
        self.store(
            &pending.key,
            pending.query.as_ref(),
            pending.vector,
            Arc::new(answer),
        )
        .await;
    }

    async fn store(
        &self,
        key: &Key,
        query: Option<&Query>,
        vector: Option<Vec<f32>>,
        answer: Arc<Answer>,
    ) {
        self.l1.insert(key.clone(), answer.clone()).await;
        self.store_shared(key, query, vector, &answer).await;
    }

    /// L2, then the semantic index.
    async fn probe_shared(&self, key: &Key, query: Option<&Query>) -> Probe {
        if let Some(answer) = self.l2_get(key).await {
            return Probe {
                hit: Some((answer, Outcome::HitL2)),
                vector: None,
            };
        }
        let (Some(semantic), Some(query)) = (&self.semantic, query) else {
            return Probe {
                hit: None,
                vector: None,
            };
        };
        let Some(vector) = self.embed(&key.tenant, query).await else {
            return Probe {
                hit: None,
                vector: None,
            };
        };
        let part = PartKey {
            tenant: key.tenant.clone(),
            digest: query.partition,
        };
        let threshold = self.config.threshold(&key.tenant);
        let found = semantic.index.read().expect("index lock").search(
            &part,
            &query.text,
            &vector,
            threshold,
        );
        self.metrics
            .similarity
            .with_label_values(&[&*key.tenant])
            .observe(f64::from(found.similarity));
        Probe {
            hit: found.answer.map(|a| (a, Outcome::HitSemantic)),
            vector: Some(vector),
        }
    }

    /// The unit-length embedding of the query, when the semantic layer is
    /// on for this tenant; `None` (a semantic miss) if the model fails.
    async fn embed(&self, tenant: &str, query: &Query) -> Option<Vec<f32>> {
        let semantic = self.semantic.as_ref()?;
        if self.config.threshold(tenant) > 1.0 {
            return None;
        }
        let mut vectors = semantic
            .embedder
            .embed(EMBEDDING_MODEL_ID, vec![query.text.clone()])
            .await
            .inspect_err(|e| tracing::debug!(error = %e, "semantic cache: embedding failed"))
            .ok()?
            .vectors;
        let mut v = vectors.pop()?;
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
        Some(v)
    }

    async fn l2_get(&self, key: &Key) -> Option<Arc<Answer>> {
        let mut conn = self.redis.clone();
        let bytes: Option<Vec<u8>> = self
            .bounded("get", conn.get(exact_key(key)))
            .await
            .flatten()?;
        match serde_json::from_slice::<Answer>(&bytes?) {
            Ok(a) => Some(Arc::new(a)),
            Err(e) => {
                tracing::warn!(error = %e, "cache: unreadable L2 entry, treated as a miss");
                None
            }
        }
    }

    /// L2 and the semantic layer (local index, Redis entry, event).
    async fn store_shared(
        &self,
        key: &Key,
        query: Option<&Query>,
        vector: Option<Vec<f32>>,
        answer: &Arc<Answer>,
    ) {
        let ttl = self.config.ttl_secs;
        let json = serde_json::to_vec(&**answer).expect("answers serialize");
        let mut conn = self.redis.clone();
        let _: Option<()> = self
            .bounded("set", conn.set_ex(exact_key(key), json, ttl))
            .await;
        let (Some(semantic), Some(query), Some(vector)) = (&self.semantic, query, vector) else {
            return;
        };
        let id = entry_id(&key.tenant, query);
        let expires_ms = now_ms() + ttl * 1000;
        let stored = StoredEntry {
            text: query.text.clone(),
            tenant: key.tenant.to_string(),
            partition: hex::encode(query.partition),
            vector: vector.clone(),
            answer: (**answer).clone(),
            expires_ms,
        };
        semantic.index.write().expect("index lock").insert(Entry {
            id,
            part: PartKey {
                tenant: key.tenant.clone(),
                digest: query.partition,
            },
            text: Arc::from(query.text.as_str()),
            vector,
            answer: answer.clone(),
            expires: Instant::now() + self.config.ttl(),
        });
        self.update_sizes();
        let entry_key = semantic_key(&key.tenant, &id);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .set_ex(
                &entry_key,
                serde_json::to_vec(&stored).expect("entries serialize"),
                ttl,
            )
            .ignore()
            .xadd_maxlen(
                EVENTS,
                redis::streams::StreamMaxlen::Approx(self.config.semantic.max_entries),
                "*",
                &[("op", "add"), ("key", entry_key.as_str())],
            )
            .ignore();
        let _: Option<()> = self.bounded("add", pipe.query_async(&mut conn)).await;
    }

    /// Runs a Redis call under the timeout; a failure is a logged, counted
    /// `None`.
    async fn bounded<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(self.config.redis_timeout(), call).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.metrics.redis_errors.with_label_values(&[op]).inc();
                tracing::debug!(op, error = %e, "cache: redis failed, treated as a miss");
                None
            }
            Err(_) => {
                self.metrics.redis_errors.with_label_values(&[op]).inc();
                tracing::debug!(op, "cache: redis timed out, treated as a miss");
                None
            }
        }
    }

    /// Removes every entry of `tenant` in the region: this node's L1 and
    /// index now, Redis's entries, and the other nodes' through the event
    /// stream. Returns the Redis entries removed.
    pub(crate) async fn purge(&self, tenant: &str) -> Result<u64, Error> {
        self.purge_local(tenant);
        let mut conn = self.redis.clone();
        let unavailable = |e: redis::RedisError| {
            Error::Unavailable(format!("cache purge: the region's redis failed: {e}"))
        };
        let pattern = format!("{PREFIX}:{tenant}:*");
        let mut cursor = 0u64;
        let mut removed = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if !keys.is_empty() {
                let n: u64 = conn.unlink(&keys).await.map_err(unavailable)?;
                removed += n;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let _: String = conn
            .xadd_maxlen(
                EVENTS,
                redis::streams::StreamMaxlen::Approx(self.config.semantic.max_entries),
                "*",
                &[("op", "purge"), ("key", tenant)],
            )
            .await
            .map_err(unavailable)?;
        tracing::info!(tenant, removed, "cache purged");
        Ok(removed)
    }

    fn purge_local(&self, tenant: &str) {
        let owned: Arc<str> = Arc::from(tenant);
        // Only fails when the builder did not enable closures, which it does.
        let _ = self.l1.invalidate_entries_if(move |k, _| k.tenant == owned);
        if let Some(s) = &self.semantic {
            s.index.write().expect("index lock").purge(tenant);
        }
        self.update_sizes();
    }

    fn update_sizes(&self) {
        self.metrics
            .l1_entries
            .set(i64::try_from(self.l1.entry_count()).unwrap_or(i64::MAX));
        self.metrics
            .l1_bytes
            .set(i64::try_from(self.l1.weighted_size()).unwrap_or(i64::MAX));
        if let Some(s) = &self.semantic {
            let n = s.index.read().expect("index lock").len();
            self.metrics
                .semantic_entries
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub(crate) fn render_metrics(&self) -> String {
        self.update_sizes();
        self.metrics.render()
    }

    pub(crate) fn stats(&self) -> Stats {
        self.update_sizes();
        Stats {
            tenants: self.metrics.tenant_stats(),
            l1_entries: self.l1.entry_count(),
            semantic_entries: self.metrics.semantic_entries.get().max(0) as u64,
        }
    }

    /// Follows the region's event stream until `shutdown`: loads the
    /// semantic entries other nodes stored (all of them at start, so a new
    /// node's index matches the region's) and applies purges.
    pub(crate) async fn follow(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut last = "0-0".to_string();
        let mut backoff = FOLLOW_INTERVAL;
        loop {
            let wait = match self.follow_once(&mut last).await {
                Ok(0) => {
                    backoff = FOLLOW_INTERVAL;
                    FOLLOW_INTERVAL
                }
                Ok(_) => Duration::ZERO,
                Err(e) => {
                    tracing::debug!(error = %e, "cache: cannot read the event stream, retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    backoff
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Reads and applies one batch of events after `last`; returns how many.
    async fn follow_once(&self, last: &mut String) -> redis::RedisResult<usize> {
        let mut conn = self.redis.clone();
        let opts = redis::streams::StreamReadOptions::default().count(500);
        let reply: Option<redis::streams::StreamReadReply> = conn
            .xread_options(&[EVENTS], &[last.as_str()], &opts)
            .await?;
        let events: Vec<_> = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect();
        // A restarted, empty Redis numbers its events from scratch, after
        // `last` only by its clock: reading on from `last` is still right.
        let mut adds = Vec::new();
        for event in &events {
            let field = |name: &str| event.get::<String>(name).unwrap_or_default();
            match field("op").as_str() {
                "add" => adds.push(field("key")),
                "purge" => {
                    // Entries added before the purge are gone from Redis;
                    // dropping the pending ones keeps the order right.
                    let tenant = field("key");
                    adds.retain(|k| tenant_of(k) != Some(tenant.as_str()));
                    self.purge_local(&tenant);
                }
                _ => {}
            }
        }
        if let Some(semantic) = &self.semantic {
            let fresh: Vec<String> = {
                let index = semantic.index.read().expect("index lock");
                adds.into_iter()
                    .filter(|k| id_of(k).is_none_or(|id| !index.contains(&id)))
                    .collect()
            };
            for chunk in fresh.chunks(200) {
                let values: Vec<Option<Vec<u8>>> = conn.mget(chunk).await?;
                let mut index = semantic.index.write().expect("index lock");
                for (key, value) in chunk.iter().zip(values) {
                    if let Some(entry) = value.and_then(|v| self.decode(key, &v)) {
                        index.insert(entry);
                    }
                }
            }
        }
        if let Some(e) = events.last() {
            last.clone_from(&e.id);
        }
        Ok(events.len())
    }

    fn decode(&self, key: &str, bytes: &[u8]) -> Option<Entry> {
        let stored: StoredEntry = serde_json::from_slice(bytes).ok()?;
        let left = stored.expires_ms.checked_sub(now_ms())?;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(&stored.partition, &mut digest).ok()?;
        Some(Entry {
            id: id_of(key)?,
            part: PartKey {
                tenant: Arc::from(stored.tenant.as_str()),
                digest,
            },
            text: Arc::from(stored.text.as_str()),
            vector: stored.vector,
            answer: Arc::new(stored.answer),
            expires: Instant::now() + Duration::from_millis(left),
        })
    }
}

/// A semantic entry as Redis keeps it.
#[derive(Serialize, Deserialize)]
struct StoredEntry {
    text: String,
    tenant: String,
    partition: String,
    vector: Vec<f32>,
    answer: Answer,
    expires_ms: u64,
}

fn exact_key(key: &Key) -> String {
    format!("{PREFIX}:{}:x:{}", key.tenant, hex::encode(key.hash))
}

fn semantic_key(tenant: &str, id: &[u8; 32]) -> String {
    format!("{PREFIX}:{tenant}:s:{}", hex::encode(id))
}

/// One id per question of a partition, so the same question stored by two
/// nodes is one entry.
fn entry_id(tenant: &str, query: &Query) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(tenant.as_bytes());
    h.update([0]);
    h.update(query.partition);
    h.update(query.text.as_bytes());
    h.finalize().into()
}

fn tenant_of(key: &str) -> Option<&str> {
    key.strip_prefix(PREFIX)?
        .strip_prefix(':')?
        .split(':')
        .next()
}

fn id_of(key: &str) -> Option<[u8; 32]> {
    let mut id = [0u8; 32];
    hex::decode_to_slice(key.rsplit(':').next()?, &mut id).ok()?;
    Some(id)
}

fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_read_cache_control_and_opt_in() {
        let d = Directives::parse(|name| match name {
            "cache-control" => Some("max-age=0, No-Cache"),
            OPT_IN_HEADER => Some("allow"),
            _ => None,
        });
        assert!(d.no_cache && d.opt_in && !d.no_store);
        let d = Directives::parse(|name| (name == "cache-control").then_some("no-store"));
        assert!(d.no_store && !d.opt_in);
    }

    #[test]
    fn redis_keys_name_their_tenant_and_id() {
        let id = [7u8; 32];
        let key = semantic_key("acme.prod", &id);
        assert_eq!(tenant_of(&key), Some("acme.prod"));
        assert_eq!(id_of(&key), Some(id));
    }

    #[tokio::test]
    async fn hits_stream_back_the_whole_answer() {
        use futures::StreamExt;
        let answer = Arc::new(Answer {
            text: "one two three".into(),
            finish: Finish::Length,
            prompt_tokens: 4,
            completion_tokens: 3,
        });
        let chunks: Vec<_> = answer.stream().map(|c| c.unwrap()).collect().await;
        let text: String = chunks
            .iter()
            .filter_map(|c| match c {
                Chunk::Delta(d) => Some(d.as_str()),
                Chunk::Done { .. } => None,
            })
            .collect();
        assert_eq!(text, "one two three");
        assert_eq!(chunks.len(), 4);
        assert!(
            matches!(chunks[3], Chunk::Done { finish: Finish::Length, usage } if usage.completion_tokens == 3)
        );
    }
}
