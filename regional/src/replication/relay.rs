//! Relaying a lost peer's changes between the regions that survive it.
//!
//! Every region pulls every origin directly, so what a region wrote just
//! before it died may have reached one survivor and not another. Once a
//! peer has been silent for `relay_after_ms`, this region asks each of its
//! other peers, in a partial snapshot, for the rows and tombstones the lost
//! peer wrote last with a clock past the newest change applied here from
//! it (`replication_peers.applied_hlc`; an origin's clock grows with its
//! log, so every older change of it is here already). Applying is last
//! writer wins as always, so a relayed row and the same change pulled
//! later from its origin, once it returns, are one write.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;

use super::Replication;
use super::snapshot::{self, Scope};
use crate::config::PeerConfig;
use crate::error::Error;

/// Most often a lost peer's changes are asked for.
const MAX_INTERVAL: Duration = Duration::from_secs(1);

/// Relays the changes of every lost peer from every other peer until
/// shutdown.
pub(super) async fn run(r: Arc<Replication>, peers: Vec<(PeerConfig, Channel)>) {
    let Some(after) = r.config.relay_after() else {
        return;
    };
    if peers.len() < 2 {
        return;
    }
    let interval = (after / 4).clamp(Duration::from_millis(50), MAX_INTERVAL);
    // (origin, via) → the newest clock relayed, so that each round asks only
    // for newer rows; forgotten once the origin answers again.
    let mut marks: HashMap<(String, String), i64> = HashMap::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = r.shutdown.cancelled() => return,
        }
        let lost = r.liveness.silent(after);
        marks.retain(|(origin, _), _| lost.contains(origin));
        for origin in &lost {
            for (via, channel) in peers.iter().filter(|(p, _)| !lost.contains(&p.region)) {
                let key = (origin.clone(), via.region.clone());
                let mark = match marks.get(&key) {
                    Some(m) => *m,
                    None => match applied_hlc(&r, origin).await {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(origin = %origin, error = %e, "cannot read what was applied from a lost peer");
                            continue;
                        }
                    },
                };
                let newest = relay(&r, origin, &via.region, channel.clone(), mark).await;
                marks.insert(key, newest.unwrap_or(mark));
            }
        }
    }
}

/// Takes from `via` every other origin's rows newer than what this region
/// applied of that origin: what `via` knew when it wrote a change that
/// refers to one of them. One relay per origin; failures are counted and
/// left for the next attempt.
pub(super) async fn parents_from(r: &Replication, via: &str, channel: Channel) {
    for origin in r
        .config
        .peers
        .iter()
        .map(|p| p.region.as_str())
        .filter(|o| *o != via)
    {
        match applied_hlc(r, origin).await {
            Ok(mark) => {
                relay(r, origin, via, channel.clone(), mark).await;
            }
            Err(e) => {
                tracing::warn!(origin, error = %e, "cannot read what was applied from a peer");
            }
        }
    }
}

/// One relay of `origin`'s rows newer than `mark` from `via`; the newest
/// clock received, or `None` when the call failed.
async fn relay(
    r: &Replication,
    origin: &str,
    via: &str,
    channel: Channel,
    mark: i64,
) -> Option<i64> {
    let scope = Scope::Relay {
        origin: origin.to_string(),
        after_hlc: mark,
    };
    match snapshot::receive(r, via, channel, scope).await {
        Ok(got) => {
            r.metrics
                .relays
                .with_label_values(&[origin, via, "applied"])
                .inc();
            r.metrics
                .relayed
                .with_label_values(&[origin, via])
                .inc_by(got.written);
            if got.written > 0 {
                tracing::warn!(
                    origin,
                    via,
                    rows = got.rows,
                    written = got.written,
                    "relayed another region's changes that had not reached this region directly"
                );
            }
            Some(mark.max(i64::try_from(got.max_hlc).unwrap_or(i64::MAX)))
        }
        Err(e) => {
            r.metrics
                .relays
                .with_label_values(&[origin, via, "failed"])
                .inc();
            tracing::debug!(origin, via, error = %e, "relay of a lost region's changes failed");
            None
        }
    }
}

/// The newest clock of `origin`'s log applied here.
async fn applied_hlc(r: &Replication, origin: &str) -> Result<i64, Error> {
    let hlc: Option<i64> =
        sqlx::query_scalar("SELECT applied_hlc FROM replication_peers WHERE peer = $1")
            .bind(origin)
            .fetch_optional(&r.pool)
            .await?;
    Ok(hlc.unwrap_or(0))
}
