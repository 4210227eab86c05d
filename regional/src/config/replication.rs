//! The `[replication]` section: which peer regions this region pulls
//! changes from, and the limits of pulling, applying and keeping the log.

use std::time::Duration;

use meridian_proto::config::Problems;
use serde::Deserialize;

/// Most `max_batch_bytes`: half of the largest replication message either
/// end accepts, so a change that outgrows a batch still fits in one.
pub(crate) const MAX_BATCH_BYTES: u64 = 32 << 20;

/// Cross-region replication. Every key has a default; no peers means the
/// region only logs its changes (for peers that may come later).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// The other regions, each pulled from by a task of its own.
    pub peers: Vec<PeerConfig>,
    /// A change whose clock is more than this far ahead of this region's
    /// wall clock is refused (its batch is retried later): a peer with a
    /// runaway clock must not drag every region's clock with it. In
    /// milliseconds.
    pub max_clock_drift_ms: u64,
    /// Most changes per batch, asked of peers and served to them.
    pub batch_size: u32,
    /// Most bytes of changes (payloads and keys) per Pull batch and per
    /// snapshot or relay chunk served. A single change larger than this
    /// still travels, alone in its batch. At most 32 MiB: both ends accept
    /// replication messages up to 64 MiB, which leaves room for a change
    /// that outgrows the budget.
    pub max_batch_bytes: u64,
    /// How long a snapshot or relay stream waits for its taker to read on,
    /// in milliseconds, before it is cut: it holds a database snapshot
    /// (and a connection) open while it runs.
    pub snapshot_write_timeout_ms: u64,
    /// First wait before reconnecting to a peer after a failure, in
    /// milliseconds; it doubles per failure up to `reconnect_backoff_max_ms`.
    pub reconnect_backoff_ms: u64,
    /// Longest wait between two reconnections, in milliseconds.
    pub reconnect_backoff_max_ms: u64,
    /// How often a Pull stream that has nothing new sends a heartbeat (and
    /// looks at the log, should a commit notification have been lost), in
    /// milliseconds.
    pub heartbeat_interval_ms: u64,
    /// Least time between two Acks to a peer that are not right after an
    /// applied batch (those go at once: synchronous writers wait on them),
    /// in milliseconds.
    pub ack_interval_ms: u64,
    /// How often the log is trimmed of changes every peer acknowledged, in
    /// milliseconds.
    pub prune_interval_ms: u64,
    /// How long a delete's tombstone is kept at least, in milliseconds. It
    /// goes after that once every peer is known to have nothing older left
    /// to send (each peer's clock, as its Pull reports it, is past the
    /// delete). Keep it above the longest a region may lag and still catch
    /// up from logs rather than a snapshot.
    pub tombstone_retention_ms: u64,
    /// Most changes the log keeps for a peer that does not acknowledge them:
    /// past this, older changes are trimmed anyway and that peer needs a
    /// snapshot (its Pull fails with REPLICATION_LOG_TRUNCATED).
    pub max_retained_changes: u64,
    /// Tenants whose writes are synchronous unless a request asks for
    /// `x-meridian-durability: async`: acknowledged only once a peer region
    /// applied them. Needs at least one peer.
    pub sync_tenants: Vec<String>,
    /// Longest time a synchronous write waits for a peer's confirmation
    /// after its local commit, in milliseconds; past it the client gets
    /// UNAVAILABLE (the write stays stored here and may still replicate).
    pub sync_timeout_ms: u64,
    /// The peer a region with an empty database (no rows, nothing applied)
    /// copies a snapshot from before it follows any log; unset, the first
    /// peer in `peers` that answers. A region that falls behind a peer's
    /// trimmed log takes its snapshot from that peer either way.
    pub bootstrap_from: Option<String>,
    /// A peer that has not answered this region's Pull (no batch, no
    /// heartbeat) for this long is lost: its unfinished jobs are adopted by
    /// the surviving regions. Also how long a region that starts without
    /// reaching a peer waits before running its own jobs, since that peer
    /// may have adopted them. In milliseconds; 0 turns job failover off.
    pub adopt_after_ms: u64,
    /// A peer that has not answered for this long has its changes relayed:
    /// this region asks its other peers for the rows that peer wrote which
    /// reached them and not this region, so that the survivors of a lost
    /// region hold the same data (and the adopter every lost job). In
    /// milliseconds; 0 turns relaying off. Unset: half of `adopt_after_ms`
    /// but at most 5 s, or 5 s when job failover is off. Must be below
    /// `adopt_after_ms`.
    pub relay_after_ms: Option<u64>,
    /// The peers this region's telemetry readings replicate to, each one of
    /// `peers`; empty (the default): readings stay in this region. Readings
    /// are logged in chunks in the ingest's own transaction, which then
    /// takes the replication clock: ingest inserts run one at a time.
    pub telemetry_peers: Vec<String>,
    /// A region that has heard from none of its peers (no batch, no
    /// heartbeat) for this long fences itself: it stops starting its jobs
    /// and cancels the attempts running, since its peers may be about to
    /// adopt them. Must be less than `adopt_after_ms` minus
    /// `heartbeat_interval_ms` (a peer's last heartbeat may be that much
    /// older than the cut), so the region has stopped before anyone adopts,
    /// and at least twice `heartbeat_interval_ms`, so the gap between two
    /// heartbeats never fences a healthy region. Only with two or more
    /// peers: a region with one cannot tell that peer's death from its own
    /// isolation. In milliseconds; unset, half of `adopt_after_ms`. Ignored
    /// when job failover is off.
    pub fence_after_ms: Option<u64>,
}

/// One peer region.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's region name; over mTLS its certificate must name it.
    pub region: String,
    /// `host:port` of the peer's API (HTTP and gRPC port).
    pub address: String,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            max_clock_drift_ms: 5_000,
            batch_size: 500,
            max_batch_bytes: 4 << 20,
            snapshot_write_timeout_ms: 30_000,
            reconnect_backoff_ms: 100,
            reconnect_backoff_max_ms: 5_000,
            heartbeat_interval_ms: 1_000,
            ack_interval_ms: 500,
            prune_interval_ms: 10_000,
            tombstone_retention_ms: 7 * 24 * 3_600_000,
            max_retained_changes: 1_000_000,
            sync_tenants: Vec::new(),
            sync_timeout_ms: 2_000,
            bootstrap_from: None,
            adopt_after_ms: 30_000,
            relay_after_ms: None,
            telemetry_peers: Vec::new(),
            fence_after_ms: None,
        }
    }
}

impl ReplicationConfig {
    pub(crate) fn validate(&self, region: &str, problems: &mut Problems) {
        if self.snapshot_write_timeout_ms < 10 {
            problems.push("`replication.snapshot_write_timeout_ms` must be at least 10");
        }
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.peers.iter().enumerate() {
            if p.region == region {
                problems.push(format!(
                    "`replication.peers[{i}].region` is this region itself"
                ));
            }
            if !seen.insert(p.region.as_str()) {
                problems.push(format!(
                    "`replication.peers[{i}].region` repeats peer {:?}",
                    p.region
                ));
            }
            problems.check(
                meridian_mesh::Identity::region(&p.region)
                    .map(drop)
                    .map_err(|e| format!("`replication.peers[{i}].region`: {e}")),
            );
            let uri: Result<tonic::transport::Uri, _> = format!("http://{}", p.address).parse();
            if !uri.is_ok_and(|u| u.port_u16().is_some() && u.path() == "/") {
                problems.push(format!(
                    "`replication.peers[{i}].address` must be host:port, got {:?}",
                    p.address
                ));
            }
        }
        for (key, value) in [
            ("batch_size", u64::from(self.batch_size)),
            ("max_batch_bytes", self.max_batch_bytes),
            ("reconnect_backoff_ms", self.reconnect_backoff_ms),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("prune_interval_ms", self.prune_interval_ms),
            ("max_retained_changes", self.max_retained_changes),
            ("tombstone_retention_ms", self.tombstone_retention_ms),
            ("sync_timeout_ms", self.sync_timeout_ms),
        ] {
            if value == 0 {
                problems.push(format!("`replication.{key}` must be at least 1"));
            }
        }
        if self.max_batch_bytes > MAX_BATCH_BYTES {
            problems.push(format!(
                "`replication.max_batch_bytes` ({}) must be at most {MAX_BATCH_BYTES}: \
                 replication messages are accepted up to twice that",
                self.max_batch_bytes
            ));
        }
        if !self.sync_tenants.is_empty() && self.peers.is_empty() {
            problems.push(
                "`replication.sync_tenants` needs at least one of `replication.peers` to confirm writes"
                    ,
            );
        }
        if let Some(from) = &self.bootstrap_from
            && !self.peers.iter().any(|p| &p.region == from)
        {
            problems.push(format!(
                "`replication.bootstrap_from` names {from:?}, which is not one of `replication.peers`"
            ));
        }
        if let (Some(relay), true) = (self.relay_after_ms, self.adopt_after_ms > 0)
            && relay > 0
            && relay >= self.adopt_after_ms
        {
            problems.push(format!(
                "`replication.relay_after_ms` ({relay}) must be below `adopt_after_ms` ({}): \
                 the adopter needs the lost region's jobs relayed first",
                self.adopt_after_ms
            ));
        }
        for (i, t) in self.telemetry_peers.iter().enumerate() {
            if !self.peers.iter().any(|p| &p.region == t) {
                problems.push(format!(
                    "`replication.telemetry_peers[{i}]` names {t:?}, which is not one of `replication.peers`"
                ));
            }
        }
        if self.adopt_after_ms > 0 {
            let fence = self.fence_after_ms.unwrap_or(self.adopt_after_ms / 2);
            let (adopt, heartbeat) = (self.adopt_after_ms, self.heartbeat_interval_ms);
            if fence.saturating_add(heartbeat) >= adopt {
                problems.push(format!(
                    "`replication.fence_after_ms` ({fence}) plus `heartbeat_interval_ms` ({heartbeat}) \
                     must be less than `adopt_after_ms` ({adopt}): a region cut off from its peers \
                     must have stopped its jobs before they adopt them (unset, fence_after_ms is \
                     half of adopt_after_ms)"
                ));
            }
            if fence < heartbeat.saturating_mul(2) {
                problems.push(format!(
                    "`replication.fence_after_ms` ({fence}) must be at least twice \
                     `heartbeat_interval_ms` ({heartbeat}), or the silence between two heartbeats \
                     fences a healthy region (unset, fence_after_ms is half of adopt_after_ms)"
                ));
            }
        }
        if self.reconnect_backoff_ms > self.reconnect_backoff_max_ms {
            problems.push(
                "`replication.reconnect_backoff_ms` must not exceed `reconnect_backoff_max_ms`",
            );
        }
    }

    /// `None` when job failover is off.
    pub(crate) fn adopt_after(&self) -> Option<Duration> {
        (self.adopt_after_ms > 0).then(|| Duration::from_millis(self.adopt_after_ms))
    }

    /// `None` when relaying is off.
    pub(crate) fn relay_after(&self) -> Option<Duration> {
        const MOST: u64 = 5_000;
        let ms = self.relay_after_ms.unwrap_or(match self.adopt_after_ms {
            0 => MOST,
            adopt => (adopt / 2).min(MOST),
        });
        (ms > 0).then(|| Duration::from_millis(ms))
    }

    /// Whether `peer` receives this region's telemetry readings.
    pub(crate) fn sends_readings_to(&self, peer: &str) -> bool {
        self.telemetry_peers.iter().any(|p| p == peer)
    }

    /// How long a region may hear from no peer before it fences its jobs;
    /// `None` when job failover is off.
    pub(crate) fn fence_after(&self) -> Option<Duration> {
        self.adopt_after()?;
        Some(Duration::from_millis(
            self.fence_after_ms.unwrap_or(self.adopt_after_ms / 2),
        ))
    }

    pub(crate) fn max_clock_drift(&self) -> Duration {
        Duration::from_millis(self.max_clock_drift_ms)
    }
}
