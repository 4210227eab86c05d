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
//!
//! One file per job: [`policy`] decides whether a request uses the cache,
//! [`layers`] looks it up and stores its answer, [`follow`] keeps this
//! node's semantic index in step with the region's, [`purge`] removes a
//! tenant's entries, [`layout`] names and encodes what Redis keeps, and
//! [`metrics`] counts; [`key`], [`semantic`] and [`guard`] say what makes two
//! requests the same.

mod answer;
mod follow;
mod guard;
mod key;
mod layers;
mod layout;
mod metrics;
mod policy;
mod purge;
mod semantic;

use std::future::Future;
use std::sync::{Arc, RwLock};

use redis::aio::ConnectionManager;

use crate::config::CacheConfig;
use crate::inference::Embedder;

pub(crate) use self::answer::{Answer, Outcome};
pub use self::guard::compatible;
pub(crate) use self::key::{Key, Query, keys};
use self::metrics::Metrics;
pub(crate) use self::metrics::TenantStats;
pub(crate) use self::policy::{Directives, Policy};
use self::semantic::Index;

/// Request header: `allow` caches a request that is not deterministic.
pub(crate) const OPT_IN_HEADER: &str = meridian_proto::header::CACHE;
/// Response header: how the cache took part (`hit-l1`, `hit-l2`,
/// `hit-semantic`, `miss`, `bypass`).
pub(crate) const RESULT_HEADER: &str = meridian_proto::header::CACHE;

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

    /// Runs a Redis call under the timeout; a failure is a logged, counted
    /// `None`.
    pub(super) async fn bounded<T>(
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

    pub(super) fn update_sizes(&self) {
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
}
