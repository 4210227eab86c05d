//! Embedding metrics, in a registry of their own per node (a process may host
//! several nodes, as the tests do), served on `/metrics`. Batches against
//! requests is the number that shows whether batching pays.

use prometheus::{Encoder, Gauge, Histogram, HistogramOpts, IntCounter, Registry, TextEncoder};

pub(super) struct Metrics {
    registry: Registry,
    /// Requests that reached the model's queue.
    pub requests: IntCounter,
    /// Texts embedded.
    pub inputs: IntCounter,
    /// Forward passes run.
    pub batches: IntCounter,
    /// Texts per forward pass.
    pub batch_size: Histogram,
    /// Time of one forward pass, pooling included.
    pub forward: Histogram,
    /// Time it took to load the model at start.
    pub load: Gauge,
}

impl Metrics {
    pub(super) fn new(region: &str) -> Self {
        let registry = Registry::new_custom(
            None,
            Some([("region".to_string(), region.to_string())].into()),
        )
        .expect("static registry labels are valid");
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
            r.register(Box::new(c.clone())).expect("registered once");
            c
        }
        let counter = |name: &str, help: &str| {
            reg(
                &registry,
                IntCounter::new(name, help).expect("valid metric"),
            )
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let opts = HistogramOpts::new(name, help).buckets(buckets);
            reg(&registry, Histogram::with_opts(opts).expect("valid metric"))
        };
        Self {
            requests: counter(
                "meridian_embedding_requests_total",
                "Embedding requests queued for the model.",
            ),
            inputs: counter("meridian_embedding_inputs_total", "Texts embedded."),
            batches: counter(
                "meridian_embedding_batches_total",
                "Forward passes of the embedding model.",
            ),
            batch_size: histogram(
                "meridian_embedding_batch_inputs",
                "Texts per forward pass of the embedding model.",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
            ),
            forward: histogram(
                "meridian_embedding_forward_seconds",
                "Time of one forward pass of the embedding model.",
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            ),
            load: reg(
                &registry,
                Gauge::new(
                    "meridian_embedding_load_seconds",
                    "Time the node took to load the embedding model.",
                )
                .expect("valid metric"),
            ),
            registry,
        }
    }

    pub(super) fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("metrics encode");
        String::from_utf8(buf).expect("metrics are UTF-8")
    }
}
