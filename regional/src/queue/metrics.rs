//! Job metrics, registered in a registry of their own per node (a process
//! may host several nodes, as the tests do) and served on `/metrics`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use super::store::Priority;

pub(crate) struct Metrics {
    registry: Registry,
    /// Jobs accepted by Submit (idempotent replays excluded).
    pub submitted: IntCounter,
    /// Jobs that reached a terminal state, by state.
    pub finished: IntCounterVec,
    /// Attempts that failed and were scheduled again.
    pub retries: IntCounter,
    /// Jobs dead-lettered after their last attempt.
    pub dead_lettered: IntCounter,
    /// Jobs re-enqueued from PostgreSQL or reclaimed from a dead worker.
    pub recovered: IntCounter,
    /// Jobs adopted from a lost region, by that region (`peer`).
    pub adopted: IntCounterVec,
    /// 1 while this node's job fence is up (it hears from no peer region).
    pub fenced: IntGauge,
    /// Attempts the fence stopped: cancelled while running, or refused the
    /// write of their outcome.
    pub fenced_attempts: IntCounter,
    /// Queued jobs per lane, as of the latest sweep.
    pub queue_depth: IntGaugeVec,
    /// Submission to first start.
    pub queue_wait: Histogram,
    /// One attempt, start to end.
    pub run_time: Histogram,
}

const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

impl Metrics {
    pub(crate) fn new(region: &str) -> Self {
        let registry = Registry::new_custom(
            None,
            Some([("region".to_string(), region.to_string())].into()),
        )
        .expect("static registry labels are valid");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            c
        };
        let histogram = |name: &str, help: &str| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("registered once");
            h
        };
        let submitted = counter("meridian_jobs_submitted_total", "Jobs accepted by Submit.");
        let retries = counter(
            "meridian_jobs_retries_total",
            "Failed attempts scheduled to run again.",
        );
        let dead_lettered = counter(
            "meridian_jobs_dead_lettered_total",
            "Jobs dead-lettered after their last allowed attempt.",
        );
        let recovered = counter(
            "meridian_jobs_recovered_total",
            "Jobs re-enqueued from PostgreSQL or reclaimed from a dead worker.",
        );
        let finished = IntCounterVec::new(
            Opts::new(
                "meridian_jobs_finished_total",
                "Jobs that reached a terminal state.",
            ),
            &["state"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(finished.clone()))
            .expect("registered once");
        let adopted = IntCounterVec::new(
            Opts::new(
                "meridian_jobs_adopted_total",
                "Unfinished jobs of a lost region adopted by this one.",
            ),
            &["peer"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(adopted.clone()))
            .expect("registered once");
        let fenced_attempts = counter(
            "meridian_jobs_fenced_attempts_total",
            "Attempts stopped by the job fence: cancelled while running, or refused the write of their outcome.",
        );
        let fenced = IntGauge::new(
            "meridian_jobs_fenced",
            "1 while this node runs none of its region's jobs: it has heard from no peer region for fence_after_ms.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(fenced.clone()))
            .expect("registered once");
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "meridian_jobs_queue_depth",
                "Queued jobs per lane, as of the latest sweep.",
            ),
            &["lane"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(queue_depth.clone()))
            .expect("registered once");
        let queue_wait = histogram(
            "meridian_jobs_queue_wait_seconds",
            "Time from submission to the first attempt's start.",
        );
        let run_time = histogram(
            "meridian_jobs_run_seconds",
            "Time one attempt ran, whatever its outcome.",
        );
        Self {
            registry,
            submitted,
            finished,
            retries,
            dead_lettered,
            recovered,
            adopted,
            fenced,
            fenced_attempts,
            queue_depth,
            queue_wait,
            run_time,
        }
    }

    pub(crate) fn set_depth(&self, lane: Priority, depth: i64) {
        self.queue_depth
            .with_label_values(&[lane.as_str()])
            .set(depth);
    }

    /// The Prometheus text exposition of every job metric.
    pub(crate) fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into memory does not fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}
