//! Finding a service's nodes through DNS SRV records (RFC 2782), kept fresh
//! by re-resolving when the answer's TTL runs out.
//!
//! A [`SrvWatch`] owns one SRV name and publishes its current node set on a
//! `tokio::sync::watch` channel; whoever routes subscribes and applies
//! changes. The gateway uses it for a region's nodes; regions can use it for
//! peers.
//!
//! Failure policy: a resolution that fails (timeout, SERVFAIL, refused, a
//! target without an answer) keeps the last good set and is counted. An
//! empty answer replaces the set only when it is a proper negative answer
//! (NXDOMAIN or NODATA carrying the zone's SOA, RFC 2308), which both an
//! authoritative server and a recursive resolver give when the records are
//! really gone; a bare empty answer is treated as a failure. A hiccup in DNS
//! must never take a healthy region out of routing.

mod resolve;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use self::resolve::SrvResolver;

/// How SRV names are resolved and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// Name servers to ask, UDP with TCP for truncated answers; empty means
    /// the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Shortest time between two resolutions of one name, whatever the TTL
    /// says; also the retry interval after a failure.
    pub min_refresh: Duration,
    /// Longest time an answer is kept before asking again, whatever the TTL.
    pub max_refresh: Duration,
    /// Time one query may take before the next name server (or a retry).
    pub timeout: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            min_refresh: Duration::from_secs(1),
            max_refresh: Duration::from_secs(300),
            timeout: Duration::from_secs(2),
        }
    }
}

/// One node an SRV record points at: its address (the target's A/AAAA with
/// the record's port) and the record's priority and weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SrvNode {
    /// Lower is preferred: nodes of a higher priority take work only when
    /// no node of a lower one can.
    pub priority: u16,
    /// Relative share of work among nodes of one priority.
    pub weight: u16,
    /// Where the node listens.
    pub addr: SocketAddr,
}

/// What one resolution found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The nodes, sorted by priority then address; empty when the name
    /// authoritatively has no SRV records.
    pub nodes: Vec<SrvNode>,
    /// How long the answer may be used (the smallest TTL involved, or the
    /// negative TTL of an empty answer).
    pub ttl: Duration,
}

/// A resolution that did not give a usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryError(pub String);

impl std::fmt::Display for DiscoveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DiscoveryError {}

/// The state of one SRV name as published to subscribers.
#[derive(Debug, Clone, Default)]
pub struct Discovered {
    /// The current nodes; empty before the first good answer.
    pub nodes: Arc<[SrvNode]>,
    /// When the last good answer arrived; none before the first.
    pub refreshed: Option<Instant>,
    /// Resolutions that failed since the watch started.
    pub failures: u64,
    /// Why the last resolution failed, while it is the latest outcome.
    pub last_error: Option<String>,
}

/// Keeps one SRV name's node set current; see the module docs for the
/// failure policy.
#[derive(Debug)]
pub struct SrvWatch {
    name: String,
    resolver: Arc<SrvResolver>,
    tx: watch::Sender<Discovered>,
}

impl SrvWatch {
    /// A watch of `name` (made fully qualified when it is not) that resolves
    /// nothing until [`SrvWatch::run`].
    pub fn new(name: &str, resolver: Arc<SrvResolver>) -> Self {
        let name = if name.ends_with('.') {
            name.to_string()
        } else {
            format!("{name}.")
        };
        Self {
            name,
            resolver,
            tx: watch::channel(Discovered::default()).0,
        }
    }

    /// The fully qualified SRV name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current state, and every change after it.
    pub fn subscribe(&self) -> watch::Receiver<Discovered> {
        self.tx.subscribe()
    }

    /// Resolves now and then again whenever the answer expires, until
    /// `shutdown` completes.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        let config = self.resolver.config().clone();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let outcome = self.resolver.resolve(&self.name).await;
            let wait = self.apply(outcome, &config);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = &mut shutdown => return,
            }
        }
    }

    /// Publishes an outcome; returns how long to wait before the next.
    fn apply(&self, outcome: Result<Answer, DiscoveryError>, config: &DiscoveryConfig) -> Duration {
        match outcome {
            Ok(answer) => {
                // Every good answer is published, a routine one too: the
                // follower records its time (the refresh age operators
                // alert on) and finds the same nodes, which costs nothing.
                self.tx.send_modify(|state| {
                    if *state.nodes != *answer.nodes {
                        tracing::info!(
                            name = %self.name,
                            nodes = answer.nodes.len(),
                            ttl_ms = answer.ttl.as_millis() as u64,
                            "srv nodes changed"
                        );
                        state.nodes = answer.nodes.into();
                    }
                    state.refreshed = Some(Instant::now());
                    state.last_error = None;
                });
                refresh_after(answer.ttl, config)
            }
            Err(e) => {
                tracing::warn!(name = %self.name, error = %e, "srv resolution failed; keeping the last good nodes");
                self.tx.send_modify(|state| {
                    state.failures += 1;
                    state.last_error = Some(e.0);
                });
                config.min_refresh
            }
        }
    }
}

/// The TTL clamped to the configured bounds, plus a little so the resolver's
/// own cache (which serves an answer up to and including its expiry instant)
/// has let go of it.
pub(crate) fn refresh_after(ttl: Duration, config: &DiscoveryConfig) -> Duration {
    const PAST_EXPIRY: Duration = Duration::from_millis(10);
    (ttl + PAST_EXPIRY).clamp(
        config.min_refresh,
        config.max_refresh.max(config.min_refresh),
    )
}
