//! Cache metrics, in a registry of their own per node, served on `/metrics`.

use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use super::Outcome;

pub(super) struct Metrics {
    registry: Registry,
    pub lookups: IntCounterVec,
    pub coalesced: IntCounterVec,
    pub redis_errors: IntCounterVec,
    pub l1_entries: IntGauge,
    pub l1_bytes: IntGauge,
    pub semantic_entries: IntGauge,
    /// Best similarity found by each semantic lookup, hit or not: the
    /// distribution an operator tunes the threshold against.
    pub similarity: HistogramVec,
}

/// Lookups of one tenant by outcome, read back from the counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct TenantStats {
    pub tenant: String,
    pub hits_l1: u64,
    pub hits_l2: u64,
    pub hits_semantic: u64,
    pub misses: u64,
    pub bypassed: u64,
}

impl Metrics {
    pub(super) fn new(region: &str) -> Self {
        let registry = Registry::new_custom(None, Some([("region".into(), region.into())].into()))
            .expect("static registry labels are valid");
        fn reg<T: Collector + Clone + 'static>(r: &Registry, c: T) -> T {
            r.register(Box::new(c.clone())).expect("registered once");
            c
        }
        let counter = |name, help, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge = |name, help| reg(&registry, IntGauge::new(name, help).expect("valid metric"));
        Self {
            lookups: counter(
                "meridian_cache_lookups_total",
                "Cacheable and bypassed requests by tenant and outcome (hit_l1, hit_l2, hit_semantic, miss, bypass).",
                &["tenant", "result"],
            ),
            coalesced: counter(
                "meridian_cache_coalesced_total",
                "Misses answered by another request's upstream call for the same key (single-flight).",
                &["tenant"],
            ),
            redis_errors: counter(
                "meridian_cache_redis_errors_total",
                "Cache operations on Redis that failed or timed out, counted as misses.",
                &["op"],
            ),
            l1_entries: gauge(
                "meridian_cache_l1_entries",
                "Answers held in this node's L1.",
            ),
            l1_bytes: gauge(
                "meridian_cache_l1_size_bytes",
                "Weighted size of the answers held in this node's L1.",
            ),
            semantic_entries: gauge(
                "meridian_cache_semantic_entries",
                "Entries in this node's semantic index.",
            ),
            similarity: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "meridian_cache_semantic_best_similarity",
                        "Best cosine similarity found by each semantic lookup.",
                    )
                    .buckets(vec![
                        0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.96, 0.98, 1.0,
                    ]),
                    &["tenant"],
                )
                .expect("valid metric"),
            ),
            registry,
        }
    }

    pub(super) fn count(&self, tenant: &str, outcome: Outcome) {
        self.lookups
            .with_label_values(&[tenant, outcome.label()])
            .inc();
    }

    pub(super) fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding of gathered metrics");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }

    /// Per-tenant lookup counts, sorted by tenant.
    pub(super) fn tenant_stats(&self) -> Vec<TenantStats> {
        let mut by_tenant = std::collections::BTreeMap::<String, TenantStats>::new();
        for family in self.lookups.collect() {
            for m in family.get_metric() {
                let label = |name: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_string())
                        .unwrap_or_default()
                };
                let tenant = label("tenant");
                let value = m.get_counter().get_value() as u64;
                let stats = by_tenant
                    .entry(tenant.clone())
                    .or_insert_with(|| TenantStats {
                        tenant,
                        ..TenantStats::default()
                    });
                match label("result").as_str() {
                    "hit_l1" => stats.hits_l1 += value,
                    "hit_l2" => stats.hits_l2 += value,
                    "hit_semantic" => stats.hits_semantic += value,
                    "miss" => stats.misses += value,
                    _ => stats.bypassed += value,
                }
            }
        }
        by_tenant.into_values().collect()
    }
}
