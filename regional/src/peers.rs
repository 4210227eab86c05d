//! Peer liveness: which peer regions this region hears, which it has lost,
//! which losses every region still heard agrees on, whether it has caught
//! up with each peer's log, and so whether it may run its own jobs.
//!
//! The replication followers write it (a batch or heartbeat heard, a peer's
//! whole log applied); job adoption, the job fence, the relay of a lost
//! peer's changes and the lost-regions view sent to peers read it. Nothing
//! here touches the network, the database or a metric.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// What this region has heard of one peer.
#[derive(Debug)]
struct Peer {
    region: String,
    heard: Mutex<Heard>,
    /// Whether this node has applied the peer's whole log at least once
    /// since it started (or since the latest fence): every adoption the
    /// peer made before is known here.
    caught_up: AtomicBool,
}

/// The peer's latest answer, and the view that came with it: one lock, so
/// whoever reads a fresh time reads the view it brought.
#[derive(Debug)]
struct Heard {
    /// When the peer last answered (a batch or a heartbeat); the node's
    /// start until it first does.
    at: Instant,
    /// The peers the peer reported lost in its latest batch; `None` until
    /// it sent one.
    lost_view: Option<Vec<String>>,
}

/// The liveness of every configured peer of this region.
#[derive(Debug)]
pub(crate) struct Peers {
    region: String,
    /// Silence after which a peer counts as lost and its jobs may be
    /// adopted; `None` when job failover is off.
    adopt_after: Option<Duration>,
    /// Silence from every peer after which this region fences its jobs;
    /// `None` when job failover is off.
    fence_after: Option<Duration>,
    peers: Vec<Peer>,
    /// Woken when a peer is first caught up with.
    caught_up: Notify,
}

impl Peers {
    pub(crate) fn new(
        region: &str,
        peers: impl IntoIterator<Item = String>,
        adopt_after: Option<Duration>,
        fence_after: Option<Duration>,
    ) -> Self {
        let now = Instant::now();
        Self {
            region: region.to_string(),
            adopt_after,
            fence_after,
            peers: peers
                .into_iter()
                .map(|region| Peer {
                    region,
                    heard: Mutex::new(Heard {
                        at: now,
                        lost_view: None,
                    }),
                    caught_up: AtomicBool::new(false),
                })
                .collect(),
            caught_up: Notify::new(),
        }
    }

    /// How long ago `peer` last answered, when this node has caught up
    /// with it since it started; `None` before that (or for no such peer).
    pub(crate) fn caught_up_and_heard(&self, peer: &str) -> Option<Duration> {
        let p = self.peer(peer)?;
        if !p.caught_up.load(Ordering::Relaxed) {
            return None;
        }
        Some(p.heard.lock().expect("not poisoned").at.elapsed())
    }

    /// `peer` answered, reporting `lost_view` as the regions it has lost.
    pub(crate) fn heard(&self, peer: &str, lost_view: Vec<String>) {
        if let Some(p) = self.peer(peer) {
            *p.heard.lock().expect("not poisoned") = Heard {
                at: Instant::now(),
                lost_view: Some(lost_view),
            };
        }
    }

    /// Every change of `peer`'s log up to its latest high watermark is
    /// applied here.
    pub(crate) fn caught_up_with(&self, peer: &str) {
        if let Some(p) = self.peer(peer)
            && !p.caught_up.swap(true, Ordering::Relaxed)
        {
            self.caught_up.notify_waiters();
        }
    }

    pub(crate) fn has_peers(&self) -> bool {
        !self.peers.is_empty()
    }

    /// How long a silent peer is given before its jobs are adopted; `None`
    /// when job failover is off.
    pub(crate) fn adopt_after(&self) -> Option<Duration> {
        self.adopt_after
    }

    /// How long this region may hear from no peer before it fences its
    /// jobs; `None` when job failover is off.
    pub(crate) fn fence_after(&self) -> Option<Duration> {
        self.fence_after
    }

    /// Each configured peer and whether it is lost (silent for
    /// `adopt_after`; never with job failover off), in config order.
    pub(crate) fn liveness(&self) -> impl Iterator<Item = (&str, bool)> {
        self.peers.iter().map(|p| {
            let lost = self.adopt_after.is_some_and(|a| p.silent_for() >= a);
            (p.region.as_str(), lost)
        })
    }

    /// The configured peers not heard from for `adopt_after` (none when job
    /// failover is off), sorted.
    pub(crate) fn lost(&self) -> Vec<String> {
        let mut lost: Vec<String> = self
            .liveness()
            .filter(|(_, lost)| *lost)
            .map(|(p, _)| p.to_string())
            .collect();
        lost.sort();
        lost
    }

    /// The configured peers not heard from for `after`.
    pub(crate) fn silent(&self, after: Duration) -> Vec<String> {
        self.peers
            .iter()
            .filter(|p| p.silent_for() >= after)
            .map(|p| p.region.clone())
            .collect()
    }

    /// The lost peers whose jobs may be adopted: lost here, and lost too in
    /// the latest view of every peer still heard from here (a peer that has
    /// sent no view yet does not agree). A region cut off from this one but
    /// heard by another is alive, and may be running its jobs.
    pub(crate) fn agreed_lost(&self) -> Vec<String> {
        let lost = self.lost();
        let views: Vec<Option<Vec<String>>> = self
            .peers
            .iter()
            .filter(|p| !lost.contains(&p.region))
            .map(|p| p.heard.lock().expect("not poisoned").lost_view.clone())
            .collect();
        lost.into_iter()
            .filter(|x| {
                views
                    .iter()
                    .all(|v| v.as_ref().is_some_and(|v| v.contains(x)))
            })
            .collect()
    }

    /// This region and every peer not lost: the candidates to adopt a lost
    /// peer's jobs.
    pub(crate) fn survivors(&self) -> Vec<String> {
        let lost = self.lost();
        std::iter::once(self.region.clone())
            .chain(
                self.peers
                    .iter()
                    .map(|p| p.region.clone())
                    .filter(|r| !lost.contains(r)),
            )
            .collect()
    }

    /// Whether this region must fence its jobs: it has heard from none of
    /// its peers for `fence_after`, so it may be the one cut off, and they
    /// may adopt its jobs once `adopt_after_ms` has passed. Never with
    /// failover off, nor with fewer than two peers: with one, its death and
    /// this region's isolation look the same, and fencing would stop the
    /// survivor's own jobs whenever its only peer dies.
    pub(crate) fn isolated(&self) -> bool {
        let Some(after) = self.fence_after else {
            return false;
        };
        self.peers.len() >= 2 && self.peers.iter().all(|p| p.silent_for() >= after)
    }

    /// Called when this region fences its jobs: `may_run_own_jobs` then
    /// waits for a fresh catch-up with every peer, so adoptions made while
    /// it was cut off are known here before it runs anything again.
    pub(crate) fn forget_caught_up(&self) {
        for p in &self.peers {
            p.caught_up.store(false, Ordering::Relaxed);
        }
    }

    /// Returns once this region may run the jobs it owns. Every peer has
    /// been caught up with since start (or since the latest fence), so any
    /// adoption it made is known here and fences those jobs off, and its
    /// latest view no longer reports this region lost (it would still adopt
    /// from it otherwise); or the peer is lost and every other peer heard
    /// agrees (it cannot be running them). At once when job failover is off.
    pub(crate) async fn may_run_own_jobs(&self) {
        if self.adopt_after.is_none() {
            return;
        }
        loop {
            let notified = self.caught_up.notified();
            if self.own_jobs_settled() {
                return;
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    fn own_jobs_settled(&self) -> bool {
        let gone = self.agreed_lost();
        let reports_us_lost = |p: &Peer| {
            p.heard
                .lock()
                .expect("not poisoned")
                .lost_view
                .as_ref()
                .is_some_and(|v| v.contains(&self.region))
        };
        // A peer may adopt this region's jobs only once every region it
        // still hears agrees this one is lost; a report that some peer heard
        // from here contradicts cannot lead to an adoption, so one peer
        // alone (honest but cut off, or lying) keeps no healthy region from
        // its own jobs. Adoptions that do happen fence the old owner's
        // attempts by epoch wherever they arrive.
        let heard: Vec<&Peer> = self
            .peers
            .iter()
            .filter(|p| !gone.contains(&p.region))
            .collect();
        let agreed_against_us = !heard.is_empty() && heard.iter().all(|p| reports_us_lost(p));
        self.peers
            .iter()
            .all(|p| gone.contains(&p.region) || p.caught_up.load(Ordering::Relaxed))
            && !agreed_against_us
    }

    fn peer(&self, region: &str) -> Option<&Peer> {
        self.peers.iter().find(|p| p.region == region)
    }
}

impl Peer {
    fn silent_for(&self) -> Duration {
        self.heard.lock().expect("not poisoned").at.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(adopt_ms: u64) -> Peers {
        Peers::new(
            "eu-west",
            ["us-east".to_string(), "ap-south".to_string()],
            Some(Duration::from_millis(adopt_ms)),
            Some(Duration::from_millis(adopt_ms)),
        )
    }

    #[test]
    fn a_loss_is_agreed_only_when_every_peer_heard_reports_it() {
        let p = peers(0);
        // Silent for 0 ms: everyone counts as lost, and no one is heard.
        assert_eq!(p.lost(), vec!["ap-south", "us-east"]);
        assert!(p.isolated());
        let p = peers(60_000);
        assert!(p.lost().is_empty());
        assert!(!p.isolated());
        assert_eq!(p.survivors(), vec!["eu-west", "us-east", "ap-south"]);
    }

    #[test]
    fn failover_off_loses_no_one_and_never_fences() {
        let p = Peers::new("eu-west", ["us-east".to_string()], None, None);
        assert!(p.lost().is_empty());
        assert!(!p.isolated());
        assert!(p.liveness().all(|(_, lost)| !lost));
    }

    #[tokio::test]
    async fn own_jobs_wait_for_a_catch_up_with_every_peer() {
        let p = peers(60_000);
        let wait = p.may_run_own_jobs();
        tokio::pin!(wait);
        assert!(
            tokio::time::timeout(Duration::from_millis(150), &mut wait)
                .await
                .is_err()
        );
        p.heard("us-east", vec![]);
        p.caught_up_with("us-east");
        p.heard("ap-south", vec!["eu-west".into()]);
        p.heard("us-east", vec!["eu-west".into()]);
        p.caught_up_with("ap-south");
        // Every peer reports this region lost: they may adopt its jobs.
        assert!(!p.own_jobs_settled());
        p.heard("us-east", vec![]);
        tokio::time::timeout(Duration::from_secs(1), wait)
            .await
            .expect("settled once every peer is caught up and one hears us");
        p.forget_caught_up();
        assert!(!p.own_jobs_settled());
    }

    #[test]
    fn one_peer_reporting_this_region_lost_does_not_hold_its_jobs() {
        let p = peers(60_000);
        p.heard("us-east", vec![]);
        p.heard("ap-south", vec!["eu-west".into(), "us-east".into()]);
        p.caught_up_with("us-east");
        p.caught_up_with("ap-south");
        // ap-south alone: us-east, heard here, does not agree, so ap-south
        // cannot adopt; nor is us-east lost, for it is heard here.
        assert!(p.own_jobs_settled());
        assert!(p.agreed_lost().is_empty());
    }
}
