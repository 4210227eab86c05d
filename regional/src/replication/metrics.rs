//! Replication metrics, in a registry of their own per node, served on
//! `/metrics` beside the others.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub(crate) struct Metrics {
    registry: Registry,
    /// Peer's high watermark minus the last sequence applied from it.
    pub lag_changes: IntGaugeVec,
    /// Age of the newest applied change while more are waiting; 0 caught up.
    pub lag_seconds: GaugeVec,
    /// 1 while a Pull stream to the peer is open.
    pub connected: IntGaugeVec,
    /// 1 while this region considers the peer lost (silent for
    /// `adopt_after_ms`), as of the latest look.
    pub lost: IntGaugeVec,
    /// Changes written from each peer.
    pub applied: IntCounterVec,
    /// Changes from each peer that lost to a newer version here.
    pub superseded: IntCounterVec,
    /// Per applied batch, how long its oldest change took from its commit
    /// in the peer to its apply here: the measured replication lag.
    pub apply_delay: HistogramVec,
    /// Batches refused because a change's clock was too far ahead.
    pub drift_refusals: IntCounterVec,
    /// What a peer sent that this region refused, by peer and reason.
    pub refused: IntCounterVec,
    /// Pull streams that failed or could not start, by peer.
    pub stream_failures: IntCounterVec,
    /// Changes trimmed from this region's log.
    pub pruned: IntCounter,
    /// Tombstones trimmed once no peer could still send an older write.
    pub trimmed_tombstones: IntCounter,
    /// Snapshots taken from each peer, by result.
    pub snapshots: IntCounterVec,
    /// Rows and tombstones received in snapshots from each peer.
    pub snapshot_changes: IntCounterVec,
    /// Relays of a lost origin's changes asked of another peer, by result.
    pub relays: IntCounterVec,
    /// A lost origin's changes written here from a relay, by origin and the
    /// peer that relayed them.
    pub relayed: IntCounterVec,
    /// Times a peer's log was found restarted (wiped, or restored from an
    /// older backup) and followed again from its start.
    pub log_restarts: IntCounterVec,
    /// Time synchronous writers waited for a peer's confirmation.
    pub sync_wait_seconds: Histogram,
    /// Synchronous writes no peer confirmed within `sync_timeout_ms`.
    pub sync_timeouts: IntCounter,
}

impl Metrics {
    pub(crate) fn new(region: &str) -> Self {
        let registry = Registry::new_custom(
            None,
            Some([("region".to_string(), region.to_string())].into()),
        )
        .expect("static registry labels are valid");
        let peer = &["peer"];
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).expect("registered once");
        };
        let lag_changes = IntGaugeVec::new(
            Opts::new(
                "meridian_replication_lag_changes",
                "Changes committed in the peer not applied here yet.",
            ),
            peer,
        )
        .expect("valid metric");
        reg(Box::new(lag_changes.clone()));
        let lag_seconds = GaugeVec::new(
            Opts::new(
                "meridian_replication_lag_seconds",
                "Age of the newest applied change while the peer has more; 0 when caught up.",
            ),
            peer,
        )
        .expect("valid metric");
        reg(Box::new(lag_seconds.clone()));
        let connected = IntGaugeVec::new(
            Opts::new(
                "meridian_replication_peer_connected",
                "1 while a Pull stream from the peer is open.",
            ),
            peer,
        )
        .expect("valid metric");
        reg(Box::new(connected.clone()));
        let lost = IntGaugeVec::new(
            Opts::new(
                "meridian_replication_peer_lost",
                "1 while this region considers the peer lost: silent for adopt_after_ms.",
            ),
            peer,
        )
        .expect("valid metric");
        reg(Box::new(lost.clone()));
        let counter = |name: &str, help: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), peer).expect("valid metric");
            reg(Box::new(c.clone()));
            c
        };
        let applied = counter(
            "meridian_replication_applied_changes_total",
            "Changes from the peer written here.",
        );
        let superseded = counter(
            "meridian_replication_superseded_changes_total",
            "Changes from the peer that lost to a newer version here.",
        );
        let apply_delay = HistogramVec::new(
            HistogramOpts::new(
                "meridian_replication_apply_delay_seconds",
                "Per applied batch, the time its oldest change took from its commit in the peer to its apply here.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ]),
            peer,
        )
        .expect("valid metric");
        reg(Box::new(apply_delay.clone()));
        let drift_refusals = counter(
            "meridian_replication_clock_drift_refusals_total",
            "Batches refused because a change's clock was too far ahead.",
        );
        let refused = IntCounterVec::new(
            Opts::new(
                "meridian_replication_refused_total",
                "Batches, snapshots and acks of the peer refused as untrustworthy, by reason.",
            ),
            &["peer", "reason"],
        )
        .expect("valid metric");
        reg(Box::new(refused.clone()));
        let stream_failures = counter(
            "meridian_replication_stream_failures_total",
            "Pull streams from the peer that failed or could not start.",
        );
        let snapshots = IntCounterVec::new(
            Opts::new(
                "meridian_replication_snapshots_total",
                "Snapshots taken from the peer, by result (applied, failed).",
            ),
            &["peer", "result"],
        )
        .expect("valid metric");
        reg(Box::new(snapshots.clone()));
        let snapshot_changes = counter(
            "meridian_replication_snapshot_changes_total",
            "Rows and tombstones received in snapshots from the peer.",
        );
        let log_restarts = counter(
            "meridian_replication_log_restarts_total",
            "Times the peer's log was found restarted and followed again from its start.",
        );
        let relays = IntCounterVec::new(
            Opts::new(
                "meridian_replication_relays_total",
                "Relays of a lost origin's changes asked of another peer, by result (applied, failed).",
            ),
            &["origin", "via", "result"],
        )
        .expect("valid metric");
        reg(Box::new(relays.clone()));
        let relayed = IntCounterVec::new(
            Opts::new(
                "meridian_replication_relayed_changes_total",
                "A lost origin's changes written here from a relay by another peer.",
            ),
            &["origin", "via"],
        )
        .expect("valid metric");
        reg(Box::new(relayed.clone()));
        let pruned = IntCounter::new(
            "meridian_replication_pruned_changes_total",
            "Changes trimmed from this region's log.",
        )
        .expect("valid metric");
        reg(Box::new(pruned.clone()));
        let trimmed_tombstones = IntCounter::new(
            "meridian_replication_trimmed_tombstones_total",
            "Tombstones trimmed once every peer's clock had passed their delete.",
        )
        .expect("valid metric");
        reg(Box::new(trimmed_tombstones.clone()));
        let sync_wait_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "meridian_replication_sync_wait_seconds",
                "Time a synchronous write waited, after its commit, for a peer to apply it.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid metric");
        reg(Box::new(sync_wait_seconds.clone()));
        let sync_timeouts = IntCounter::new(
            "meridian_replication_sync_timeouts_total",
            "Synchronous writes stored here that no peer confirmed within the timeout.",
        )
        .expect("valid metric");
        reg(Box::new(sync_timeouts.clone()));
        Self {
            registry,
            lag_changes,
            lag_seconds,
            connected,
            lost,
            applied,
            superseded,
            apply_delay,
            drift_refusals,
            refused,
            stream_failures,
            pruned,
            trimmed_tombstones,
            snapshots,
            snapshot_changes,
            relays,
            relayed,
            log_restarts,
            sync_wait_seconds,
            sync_timeouts,
        }
    }

    pub(crate) fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding does not fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}
