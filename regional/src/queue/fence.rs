//! The job fence: a node of a region that hears from none of its peers for
//! `fence_after` (see `Peers::isolated`) stops running the jobs its
//! region owns, because its peers, if they can still talk to each other,
//! adopt those jobs once `adopt_after_ms` has passed and run them there.
//! `fence_after` is validated to end a heartbeat interval before
//! `adopt_after_ms`, so the fence is up before anyone adopts.
//!
//! While fenced the node claims nothing, cancels its running attempts (their
//! upstream calls are dropped, and they record nothing), records no outcome
//! of an attempt and adopts nothing. The fence lifts as soon as a peer is
//! heard again; the dispatcher then waits for `may_run_own_jobs`, whose
//! caught-up flags the fence cleared, so adoptions made meanwhile are known
//! here before any job runs again.
//!
//! A finish racing the fence: every outcome write goes through
//! [`Fence::admit_finish`], which refuses once the fence is raised and
//! counts the writes it let through; raising waits until they are done
//! before it reports the fence up. So no outcome of this node commits after
//! `meridian_jobs_fenced` reads 1.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::Workers;

/// Most often the fence looks at the peers' silence; a fifth of
/// `fence_after` when that is shorter.
const MAX_INTERVAL: Duration = Duration::from_millis(250);

pub(crate) struct Fence {
    gate: Mutex<Gate>,
    /// Woken when the last admitted outcome write ends.
    drained: Notify,
    /// Whether the fence is raised, for the dispatcher to wait on.
    raised: watch::Sender<bool>,
}

struct Gate {
    raised: bool,
    /// Outcome writes admitted and not finished.
    finishing: usize,
    /// Cancelled when the fence is raised: every attempt started under it
    /// watches it. A new one replaces it when the fence lifts.
    attempts: CancellationToken,
}

impl Fence {
    pub(crate) fn new() -> Self {
        Self {
            gate: Mutex::new(Gate {
                raised: false,
                finishing: 0,
                attempts: CancellationToken::new(),
            }),
            drained: Notify::new(),
            raised: watch::channel(false).0,
        }
    }

    pub(crate) fn is_raised(&self) -> bool {
        self.gate.lock().expect("not poisoned").raised
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<bool> {
        self.raised.subscribe()
    }

    /// The token an attempt about to start watches, cancelled when the fence
    /// is raised; `None` while it is raised.
    pub(crate) fn admit_attempt(&self) -> Option<CancellationToken> {
        let gate = self.gate.lock().expect("not poisoned");
        (!gate.raised).then(|| gate.attempts.clone())
    }

    /// Lets one outcome write through, or refuses it while the fence is
    /// raised. The write must finish before the guard is dropped.
    pub(crate) fn admit_finish(&self) -> Option<Finishing<'_>> {
        let mut gate = self.gate.lock().expect("not poisoned");
        if gate.raised {
            return None;
        }
        gate.finishing += 1;
        Some(Finishing(self))
    }

    /// Raises the fence: refuses new attempts and outcome writes, cancels
    /// the attempts running, and returns once the outcome writes admitted
    /// before have ended.
    async fn raise(&self) {
        {
            let mut gate = self.gate.lock().expect("not poisoned");
            gate.raised = true;
            gate.attempts.cancel();
        }
        self.raised.send_replace(true);
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.gate.lock().expect("not poisoned").finishing == 0 {
                return;
            }
            drained.await;
        }
    }

    fn lift(&self) {
        {
            let mut gate = self.gate.lock().expect("not poisoned");
            gate.raised = false;
            gate.attempts = CancellationToken::new();
        }
        self.raised.send_replace(false);
    }
}

/// An admitted outcome write; the fence waits for it before it is up.
pub(crate) struct Finishing<'a>(&'a Fence);

impl Drop for Finishing<'_> {
    fn drop(&mut self) {
        let mut gate = self.0.gate.lock().expect("not poisoned");
        gate.finishing -= 1;
        if gate.finishing == 0 {
            self.0.drained.notify_waiters();
        }
    }
}

pub(super) fn spawn(state: Arc<Workers>) {
    let Some(after) = state.peers.fence_after() else {
        return;
    };
    if !state.peers.has_peers() {
        return;
    }
    let interval = (after / 5).clamp(Duration::from_millis(10), MAX_INTERVAL);
    let tasks = state.tasks.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = state.shutdown().cancelled() => return,
            }
            let fence = &state.jobs.fence;
            let isolated = state.peers.isolated();
            if isolated && !fence.is_raised() {
                // Before the fence is reported up: whatever lifts it must
                // find the flags cleared.
                state.peers.forget_caught_up();
                tokio::select! {
                    () = fence.raise() => {}
                    () = state.shutdown().cancelled() => return,
                }
                state.jobs.metrics.fenced.set(1);
                tracing::error!(
                    silent_for_ms = after.as_millis() as u64,
                    "heard from no peer region for fence_after_ms: this region may be cut off, \
                     and its peers may adopt its jobs; it runs none of them until it hears a \
                     peer again and has caught up with every peer"
                );
            } else if !isolated && fence.is_raised() {
                fence.lift();
                state.jobs.metrics.fenced.set(0);
                tracing::warn!(
                    "heard from a peer region again: the job fence is lifted; jobs run once \
                     every peer has been caught up with"
                );
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn raising_waits_for_admitted_finishes_and_refuses_new_ones() {
        let fence = Arc::new(Fence::new());
        let attempt = fence.admit_attempt().expect("not raised");
        let finishing = fence.admit_finish().expect("not raised");
        let raising = tokio::spawn({
            let fence = fence.clone();
            async move { fence.raise().await }
        });
        // Raised at once for what comes next, but not up until the admitted
        // write ends.
        tokio::time::timeout(Duration::from_secs(5), async {
            while !fence.is_raised() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the fence is raised");
        assert!(attempt.is_cancelled(), "running attempts are cancelled");
        assert!(fence.admit_finish().is_none());
        assert!(fence.admit_attempt().is_none());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!raising.is_finished(), "an admitted write is still running");
        drop(finishing);
        tokio::time::timeout(Duration::from_secs(5), raising)
            .await
            .expect("raising returns once the write ended")
            .unwrap();

        fence.lift();
        let next = fence.admit_attempt().expect("lifted");
        assert!(!next.is_cancelled(), "a new attempt runs under a new token");
        assert!(fence.admit_finish().is_some());
    }
}
