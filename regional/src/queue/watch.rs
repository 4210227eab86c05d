//! What job watchers wait on: one LISTEN per node for the state changes of
//! every node of the region (and of replicated writes), fanned out to the
//! node's watchers, so a watcher costs no query until its job changes; and
//! a per-tenant cap on open watches.
//!
//! The `jobs_notify_state` trigger (`0012_job_notify.sql`) notifies on every
//! state change, whoever made it. A notification lost while the listener
//! reconnects is made good by a resync: every watcher re-reads its job.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sqlx::PgPool;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::Error;
use crate::store::Heard;

/// The channel the `jobs_notify_state` trigger notifies on.
const CHANNEL: &str = "meridian_job_changes";

/// Sent to the watchers in place of an id when notifications may have been
/// lost: every watcher re-reads its job.
pub(super) const RESYNC: Uuid = Uuid::nil();

/// Forwards the region's job state changes to `changes` until `shutdown`.
pub(super) async fn listen(
    pool: PgPool,
    changes: broadcast::Sender<Uuid>,
    shutdown: CancellationToken,
) {
    crate::store::listen(&pool, CHANNEL, "job changes", &shutdown, |heard| {
        let id = match heard {
            Heard::Payload(id) => match id.parse::<Uuid>() {
                Ok(id) => id,
                Err(_) => return,
            },
            // Whatever changed while nobody listened.
            Heard::Gap => RESYNC,
        };
        let _ = changes.send(id);
    })
    .await;
}

/// Open watches per tenant on this node.
pub(super) struct Watches {
    max: u32,
    open: Arc<Mutex<HashMap<String, u32>>>,
}

/// One open watch; dropping it closes it.
pub(crate) struct WatchSlot {
    tenant: String,
    open: Arc<Mutex<HashMap<String, u32>>>,
}

impl Watches {
    pub(super) fn new(max: u32) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    /// A slot for one more watch of `tenant`, or the refusal.
    pub(super) fn open(&self, tenant: &str) -> Result<WatchSlot, Error> {
        let mut open = self.open.lock().expect("not poisoned");
        let n = open.entry(tenant.to_string()).or_default();
        if *n >= self.max {
            return Err(Error::TooManyWatches { max: self.max });
        }
        *n += 1;
        Ok(WatchSlot {
            tenant: tenant.to_string(),
            open: self.open.clone(),
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("not poisoned");
        if let Some(n) = open.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_are_counted_per_tenant_and_given_back() {
        let w = Watches::new(2);
        let a1 = w.open("a").unwrap();
        let _a2 = w.open("a").unwrap();
        assert!(matches!(w.open("a"), Err(Error::TooManyWatches { max: 2 })));
        let _b = w.open("b").unwrap();
        drop(a1);
        let _a3 = w.open("a").unwrap();
        assert!(w.open("a").is_err());
    }
}
