//! Inference metrics, in a registry of their own per node (a process may
//! host several nodes, as the tests do), served on `/metrics` next to the
//! job metrics. Simulator metrics carry vLLM's names behind `meridian_sim_`,
//! so dashboards for a real engine read the simulator unchanged.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub(crate) struct Metrics {
    registry: Registry,
    sim_running: IntGaugeVec,
    sim_waiting: IntGaugeVec,
    sim_hits: IntCounterVec,
    sim_queries: IntCounterVec,
    sim_ttft: HistogramVec,
    upstream_up: IntGaugeVec,
    upstream_outstanding: IntGaugeVec,
    upstream_attempts: IntCounterVec,
    embed_batches: IntCounterVec,
    embed_batch_inputs: HistogramVec,
    embed_merged: IntCounterVec,
}

/// One upstream embedding model's batching metrics.
#[derive(Clone)]
pub(crate) struct EmbedBatchMetrics {
    /// Upstream calls the batcher made.
    pub batches: IntCounter,
    /// Inputs per upstream call.
    pub inputs: Histogram,
    /// Requests that shared their upstream call with at least one other.
    pub merged: IntCounter,
}

/// One simulated model's metrics.
#[derive(Clone)]
pub(crate) struct SimMetrics {
    pub running: IntGauge,
    pub waiting: IntGauge,
    /// Prompt tokens found in the prefix cache.
    pub prefix_hits: IntCounter,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: IntCounter,
    pub ttft: Histogram,
}

/// One upstream's metrics.
#[derive(Clone)]
pub(crate) struct UpstreamMetrics {
    /// 1 while the upstream takes requests (healthy, breaker not open).
    pub up: IntGauge,
    pub outstanding: IntGauge,
    pub ok: IntCounter,
    pub failed: IntCounter,
    /// Answered, but its first token came so late next to its peers' that
    /// the breaker counts it as a failure.
    pub slow: IntCounter,
}

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];

impl Metrics {
    /// A registry whose series carry `labels` (the region, for a node).
    pub(crate) fn with_labels(labels: Option<(&str, &str)>) -> Self {
        let registry = Registry::new_custom(
            None,
            labels.map(|(k, v)| [(k.to_string(), v.to_string())].into()),
        )
        .expect("static registry labels are valid");
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
            r.register(Box::new(c.clone())).expect("registered once");
            c
        }
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        Self {
            sim_running: gauge(
                "meridian_sim_num_requests_running",
                "Requests the simulator is generating for.",
                &["model"],
            ),
            sim_waiting: gauge(
                "meridian_sim_num_requests_waiting",
                "Requests waiting for a simulator slot.",
                &["model"],
            ),
            sim_hits: counter(
                "meridian_sim_prefix_cache_hits_total",
                "Prompt tokens served from the simulator's prefix cache.",
                &["model"],
            ),
            sim_queries: counter(
                "meridian_sim_prefix_cache_queries_total",
                "Prompt tokens looked up in the simulator's prefix cache.",
                &["model"],
            ),
            sim_ttft: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "meridian_sim_time_to_first_token_seconds",
                        "Time from a slot being taken to the first token.",
                    )
                    .buckets(TTFT_BUCKETS.to_vec()),
                    &["model"],
                )
                .expect("valid metric"),
            ),
            upstream_up: gauge(
                "meridian_upstream_up",
                "1 while an upstream takes requests (health check passing, breaker not open).",
                &["model", "upstream"],
            ),
            upstream_outstanding: gauge(
                "meridian_upstream_outstanding_requests",
                "Requests sent to an upstream and not finished.",
                &["model", "upstream"],
            ),
            upstream_attempts: counter(
                "meridian_upstream_attempts_total",
                "Attempts sent to an upstream, by outcome (ok: it started answering; slow: it did, but its first token took outlier_latency_factor times its peers' typical time; failed).",
                &["model", "upstream", "outcome"],
            ),
            embed_batches: counter(
                "meridian_upstream_embedding_batches_total",
                "Upstream embedding calls made by the batcher, each carrying one or more requests.",
                &["model"],
            ),
            embed_batch_inputs: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "meridian_upstream_embedding_batch_inputs",
                        "Inputs per upstream embedding call made by the batcher.",
                    )
                    .buckets(vec![
                        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0,
                    ]),
                    &["model"],
                )
                .expect("valid metric"),
            ),
            embed_merged: counter(
                "meridian_upstream_embedding_requests_merged_total",
                "Embedding requests that shared their upstream call with at least one other.",
                &["model"],
            ),
            registry,
        }
    }

    pub(crate) fn new(region: &str) -> Self {
        Self::with_labels(Some(("region", region)))
    }

    pub(crate) fn sim(&self, model: &str) -> SimMetrics {
        SimMetrics {
            running: self.sim_running.with_label_values(&[model]),
            waiting: self.sim_waiting.with_label_values(&[model]),
            prefix_hits: self.sim_hits.with_label_values(&[model]),
            prefix_queries: self.sim_queries.with_label_values(&[model]),
            ttft: self.sim_ttft.with_label_values(&[model]),
        }
    }

    pub(crate) fn upstream(&self, model: &str, upstream: &str) -> UpstreamMetrics {
        UpstreamMetrics {
            up: self.upstream_up.with_label_values(&[model, upstream]),
            outstanding: self
                .upstream_outstanding
                .with_label_values(&[model, upstream]),
            ok: self
                .upstream_attempts
                .with_label_values(&[model, upstream, "ok"]),
            failed: self
                .upstream_attempts
                .with_label_values(&[model, upstream, "failed"]),
            slow: self
                .upstream_attempts
                .with_label_values(&[model, upstream, "slow"]),
        }
    }

    pub(crate) fn embed_batch(&self, model: &str) -> EmbedBatchMetrics {
        EmbedBatchMetrics {
            batches: self.embed_batches.with_label_values(&[model]),
            inputs: self.embed_batch_inputs.with_label_values(&[model]),
            merged: self.embed_merged.with_label_values(&[model]),
        }
    }

    /// The Prometheus text exposition of every inference metric.
    pub(crate) fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into memory does not fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}
