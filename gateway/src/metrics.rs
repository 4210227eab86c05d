//! Prometheus metrics of one gateway. Each gateway has its own registry, so
//! two gateways in one process (tests, `meridian up`) do not mix counts; the
//! admin module serves it. The metrics know no other module: the parts of
//! the gateway that count call in here.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub retries: IntCounterVec,
    pub store_refusals: IntCounterVec,
    pub store_reroutes: IntCounterVec,
    pub region_healthy: IntGaugeVec,
    pub ejections: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub rate_limit_redis_errors: IntCounter,
    region_nodes: IntGaugeVec,
    pub discovery_failures: IntCounterVec,
    discovery_refresh_age: GaugeVec,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "meridian_gateway_requests_total",
                "Requests answered, by region, routing reason and status.",
            ),
            &["region", "reason", "status"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "meridian_gateway_request_duration_seconds",
                "Time from request to the end of the response, by region.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["region"],
        )
        .expect("valid metric");
        let retries = IntCounterVec::new(
            Opts::new(
                "meridian_gateway_retries_total",
                "Retries in another region, by whether the retry budget allowed them, or not_replayed: a write without an idempotency key that may have reached a region.",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let store_refusals = IntCounterVec::new(
            Opts::new(
                "meridian_gateway_store_refusals_total",
                "Requests a region refused because a store they need (postgres, redis) is down there; replayed in the next region while one is left.",
            ),
            &["region", "store"],
        )
        .expect("valid metric");
        let store_reroutes = IntCounterVec::new(
            Opts::new(
                "meridian_gateway_store_reroutes_total",
                "Requests sent past a region because a store they need is down there, as its last status said.",
            ),
            &["region"],
        )
        .expect("valid metric");
        let region_healthy = IntGaugeVec::new(
            Opts::new(
                "meridian_gateway_region_healthy",
                "1 when the region passes health checks, 0 when ejected.",
            ),
            &["region"],
        )
        .expect("valid metric");
        let ejections = IntCounterVec::new(
            Opts::new(
                "meridian_gateway_region_ejections_total",
                "Times a region was ejected by health checks or failed requests.",
            ),
            &["region"],
        )
        .expect("valid metric");
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "meridian_gateway_rate_limited_total",
                "Requests refused with 429, by tenant and the limit that refused (requests, tokens).",
            ),
            &["tenant", "kind"],
        )
        .expect("valid metric");
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "meridian_gateway_auth_failures_total",
                "Requests refused for their API key, by reason (missing, invalid, not_loaded).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let rate_limit_redis_errors = IntCounter::new(
            "meridian_gateway_rate_limit_redis_errors_total",
            "Rate-limit decisions Redis failed or was too slow for (then decided locally).",
        )
        .expect("valid metric");
        let region_nodes = IntGaugeVec::new(
            Opts::new(
                "meridian_gateway_region_nodes",
                "Nodes the gateway knows for a region (static or from DNS), by health (healthy, ejected).",
            ),
            &["region", "state"],
        )
        .expect("valid metric");
        let discovery_failures = IntCounterVec::new(
            Opts::new(
                "meridian_gateway_discovery_failures_total",
                "SRV resolutions of a region that failed; the last good nodes were kept.",
            ),
            &["region"],
        )
        .expect("valid metric");
        let discovery_refresh_age = GaugeVec::new(
            Opts::new(
                "meridian_gateway_discovery_last_refresh_age_seconds",
                "Time since a region's SRV name last resolved well; absent before the first answer.",
            ),
            &["region"],
        )
        .expect("valid metric");
        for m in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(retries.clone()),
            Box::new(store_refusals.clone()),
            Box::new(store_reroutes.clone()),
            Box::new(region_healthy.clone()),
            Box::new(ejections.clone()),
            Box::new(rate_limited.clone()),
            Box::new(auth_failures.clone()),
            Box::new(rate_limit_redis_errors.clone()),
            Box::new(region_nodes.clone()),
            Box::new(discovery_failures.clone()),
            Box::new(discovery_refresh_age.clone()),
        ] {
            registry.register(m).expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            duration,
            retries,
            store_refusals,
            store_reroutes,
            region_healthy,
            ejections,
            rate_limited,
            auth_failures,
            rate_limit_redis_errors,
            region_nodes,
            discovery_failures,
            discovery_refresh_age,
        }
    }

    /// Sets a region's node gauges; the admin endpoint calls it from the
    /// region table just before a scrape, so nothing on the request path
    /// keeps them.
    pub(crate) fn set_region_nodes(&self, region: &str, healthy: i64, ejected: i64) {
        self.region_nodes
            .with_label_values(&[region, "healthy"])
            .set(healthy);
        self.region_nodes
            .with_label_values(&[region, "ejected"])
            .set(ejected);
    }

    /// Sets the time since a region's SRV name last resolved well.
    pub(crate) fn set_discovery_refresh_age(&self, region: &str, age: std::time::Duration) {
        self.discovery_refresh_age
            .with_label_values(&[region])
            .set(age.as_secs_f64());
    }

    /// The text exposition format.
    pub(crate) fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }
}
