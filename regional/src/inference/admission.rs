//! Admission control: a bounded number of inference requests in flight per
//! region and per tenant. Past either bound a request is refused at once
//! (429 / RESOURCE_EXHAUSTED with a retry hint): a queue here would only
//! turn overload into timeouts, and the gateway can send the client to
//! another region instead.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::error::Error;

pub(super) struct Admission {
    inner: Arc<Inner>,
}

struct Inner {
    region_limit: u32,
    /// 0: no per-tenant limit.
    tenant_limit: u32,
    retry_after: Duration,
    region: AtomicU32,
    /// In-flight count per tenant; a tenant leaves the map at zero, so it
    /// holds only tenants with requests running.
    tenants: Mutex<HashMap<String, u32>>,
    /// Callers of [`Admission::admit_waiting`] now waiting; a released slot
    /// wakes them only when there are some, so an interactive request's
    /// release costs no lock.
    waiting: AtomicUsize,
    /// Woken when a slot is released while someone waits.
    released: Notify,
}

/// One admitted request; its slots are given back when it is dropped, so
/// a stream holds them for as long as it runs.
pub(crate) struct Permit {
    inner: Arc<Inner>,
    tenant: Option<String>,
}

impl Admission {
    pub(super) fn new(region_limit: u32, tenant_limit: u32, retry_after: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                region_limit,
                tenant_limit,
                retry_after,
                region: AtomicU32::new(0),
                tenants: Mutex::new(HashMap::new()),
                waiting: AtomicUsize::new(0),
                released: Notify::new(),
            }),
        }
    }

    /// Like [`Admission::admit`], but a refusal for lack of a slot is
    /// waited out until a slot of the region and the tenant is free: for
    /// work that was accepted already (a job attempt), which failing would
    /// only put off. Dropping the future stops the wait.
    pub(super) async fn admit_waiting(&self, tenant: &str) -> Permit {
        let inner = &self.inner;
        inner.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(inner);
        loop {
            // Registered before trying, so a release between the refusal
            // and the wait is not missed.
            let released = inner.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Ok(permit) = self.admit(tenant) {
                return permit;
            }
            released.await;
        }
    }

    pub(super) fn admit(&self, tenant: &str) -> Result<Permit, Error> {
        let inner = &self.inner;
        let refused = |scope| Error::Overloaded {
            scope,
            retry_after: inner.retry_after,
        };
        // Increment first, then check: concurrent arrivals cannot all see
        // room for one.
        if inner.region.fetch_add(1, Ordering::AcqRel) >= inner.region_limit {
            inner.region.fetch_sub(1, Ordering::AcqRel);
            return Err(refused("region"));
        }
        let mut counted_tenant = None;
        if inner.tenant_limit > 0 {
            let mut tenants = inner.tenants.lock().expect("admission lock");
            let n = tenants.entry(tenant.to_string()).or_insert(0);
            if *n >= inner.tenant_limit {
                // The region slot goes back without the release a dropped
                // permit announces: it was never used, and waking waiters
                // for it would have a refused waiter wake itself forever.
                inner.region.fetch_sub(1, Ordering::AcqRel);
                return Err(refused("tenant"));
            }
            *n += 1;
            counted_tenant = Some(tenant.to_string());
        }
        Ok(Permit {
            inner: inner.clone(),
            tenant: counted_tenant,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.inner.region.fetch_sub(1, Ordering::AcqRel);
        if let Some(tenant) = self.tenant.take() {
            let mut tenants = self.inner.tenants.lock().expect("admission lock");
            if let Some(n) = tenants.get_mut(&tenant) {
                *n -= 1;
                if *n == 0 {
                    tenants.remove(&tenant);
                }
            }
        }
        if self.inner.waiting.load(Ordering::Acquire) > 0 {
            self.inner.released.notify_waiters();
        }
    }
}

/// Counts one waiter of [`Admission::admit_waiting`] while it waits.
struct Waiting<'a>(&'a Inner);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_and_tenant_bounds_refuse_and_release() {
        let a = Admission::new(3, 2, Duration::from_secs(1));
        let t1 = a.admit("acme").unwrap();
        let _t2 = a.admit("acme").unwrap();
        let e = a.admit("acme").err().unwrap();
        assert!(
            matches!(
                e,
                Error::Overloaded {
                    scope: "tenant",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        let _o = a.admit("other").unwrap();
        let e = a.admit("third").err().unwrap();
        assert!(
            matches!(
                e,
                Error::Overloaded {
                    scope: "region",
                    ..
                }
            ),
            "{e}"
        );
        drop(t1);
        let _t3 = a.admit("acme").unwrap();
        assert_eq!(a.inner.tenants.lock().unwrap()["acme"], 2);
    }

    #[tokio::test]
    async fn a_waiting_admission_gets_the_slot_a_release_frees() {
        let a = Arc::new(Admission::new(1, 1, Duration::from_secs(60)));
        let held = a.admit("acme").unwrap();
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.admit_waiting("acme").await }
        });
        // Refused, and still waiting well past a poll interval.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiter.is_finished());
        assert_eq!(a.inner.waiting.load(Ordering::Relaxed), 1);
        drop(held);
        let permit = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the release")
            .unwrap();
        assert_eq!(a.inner.waiting.load(Ordering::Relaxed), 0);
        assert!(a.admit("acme").is_err(), "the waiter holds the slot");
        drop(permit);
        assert!(a.admit("acme").is_ok());
    }

    #[test]
    fn refused_tenant_gives_its_region_slot_back() {
        let a = Admission::new(2, 1, Duration::from_secs(1));
        let _p = a.admit("acme").unwrap();
        assert!(a.admit("acme").is_err());
        assert_eq!(a.inner.region.load(Ordering::Relaxed), 1);
        let _q = a.admit("other").unwrap();
    }
}
