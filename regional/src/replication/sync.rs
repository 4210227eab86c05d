//! Synchronous durability: a writer waits, after its commit, until at least
//! one peer acknowledged having applied this region's log through the
//! writer's last change. Acks arrive on `Replication.Ack` and are kept here
//! in memory, so a waiter never polls PostgreSQL.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::Replication;
use crate::error::Error;

/// Request header (and gRPC metadata key) asking for a durability mode, and
/// response header reporting the one a write got.
pub(crate) const DURABILITY_HEADER: &str = meridian_proto::header::DURABILITY;

/// How a write is acknowledged to its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Once committed in this region; peers get it within the lag.
    Async,
    /// Once committed here and applied by at least one peer region.
    Sync,
}

impl Durability {
    /// Parses the header's value; `None` for an empty one.
    pub(crate) fn parse(value: &str) -> Result<Option<Self>, Error> {
        match value.trim() {
            "" => Ok(None),
            v if v.eq_ignore_ascii_case("async") => Ok(Some(Self::Async)),
            v if v.eq_ignore_ascii_case("sync") => Ok(Some(Self::Sync)),
            _ => Err(Error::invalid(
                format!("`{DURABILITY_HEADER}` must be `sync` or `async`"),
                None,
            )),
        }
    }

    /// The durability a request asks for in its headers (or metadata).
    pub(crate) fn requested(value: Option<&[u8]>) -> Result<Option<Self>, Error> {
        let Some(value) = value else { return Ok(None) };
        let value = std::str::from_utf8(value)
            .map_err(|_| Error::invalid(format!("`{DURABILITY_HEADER}` must be ASCII"), None))?;
        Self::parse(value)
    }

    pub(crate) fn header(self) -> &'static str {
        match self {
            Self::Async => "async",
            Self::Sync => "sync",
        }
    }
}

/// The highest sequence of this region's log each configured peer has
/// acknowledged since this node started.
pub(crate) type Acked = watch::Sender<BTreeMap<String, u64>>;

impl Replication {
    /// The durability a write of `tenant` gets: the request's choice, else
    /// the tenant's configured default. Sync with no peer to confirm it is
    /// refused before any work is done, rather than quietly made async.
    pub(crate) fn durability(
        &self,
        tenant: &str,
        requested: Option<Durability>,
    ) -> Result<Durability, Error> {
        let durability = requested.unwrap_or_else(|| {
            if self.config.sync_tenants.iter().any(|t| t == tenant) {
                Durability::Sync
            } else {
                Durability::Async
            }
        });
        if durability == Durability::Sync && self.config.peers.is_empty() {
            return Err(Error::SyncUnavailable);
        }
        Ok(durability)
    }

    /// Records that `peer` applied this region's log through `sequence`;
    /// acks from regions that are not configured peers do not count.
    pub(crate) fn note_ack(&self, peer: &str, sequence: u64) {
        if !self.config.peers.iter().any(|p| p.region == peer) {
            return;
        }
        self.acked.send_if_modified(|acked| {
            let entry = acked.entry(peer.to_string()).or_default();
            if sequence > *entry {
                *entry = sequence;
                true
            } else {
                false
            }
        });
    }

    /// Waits until some peer has applied this region's log through
    /// `sequence`, or, for `None` (a write that stored nothing new, such as
    /// an idempotent replay of an earlier one), through everything logged so
    /// far, which holds the earlier write too.
    pub(crate) async fn wait_logged(&self, sequence: Option<u64>) -> Result<(), Error> {
        let sequence = match sequence {
            Some(s) => s,
            None => super::log::bounds(&self.pool).await?.1,
        };
        self.wait_applied(sequence).await
    }

    /// Waits until some peer has applied this region's log through
    /// `sequence`, for at most `sync_timeout_ms`.
    pub(crate) async fn wait_applied(&self, sequence: u64) -> Result<(), Error> {
        let started = Instant::now();
        let timeout = Duration::from_millis(self.config.sync_timeout_ms);
        let mut acked = self.acked.subscribe();
        let reached = acked.wait_for(|a| a.values().any(|&s| s >= sequence));
        let outcome = tokio::select! {
            r = tokio::time::timeout(timeout, reached) => match r {
                Ok(Ok(_)) => Ok(()),
                // The sender lives as long as `self`: unreachable, but a
                // closed channel must not count as confirmed.
                Ok(Err(_)) | Err(_) => Err(Error::SyncTimeout { waited_ms: self.config.sync_timeout_ms }),
            },
            () = self.shutdown.cancelled() => Err(Error::SyncTimeout { waited_ms: started.elapsed().as_millis() as u64 }),
        };
        self.metrics
            .sync_wait_seconds
            .observe(started.elapsed().as_secs_f64());
        if outcome.is_err() {
            self.metrics.sync_timeouts.inc();
            tracing::warn!(
                sequence,
                timeout_ms = self.config.sync_timeout_ms,
                "no peer confirmed a synchronous write in time"
            );
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_names_sync_or_async() {
        assert_eq!(Durability::parse("sync").unwrap(), Some(Durability::Sync));
        assert_eq!(Durability::parse("ASYNC").unwrap(), Some(Durability::Async));
        assert_eq!(Durability::parse("").unwrap(), None);
        assert!(Durability::parse("quorum").is_err());
    }
}
