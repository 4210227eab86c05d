//! The limiter's own per-tenant state: the GCRA arrival times this gateway
//! keeps (its whole state without Redis, a mirror of Redis' with it) and the
//! tenant's Redis keys, built once.
//!
//! Read on every request, written only when a tenant is first seen: a
//! copy-on-write map behind an [`ArcSwap`], so lookups take no lock. A
//! tenant whose limits are fully replenished holds nothing a fresh state
//! would not, so such entries are swept when the map has doubled since the
//! last sweep, which keeps tenants that left (revoked keys) from piling up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::scripts::redis_keys;

/// Smallest map that is swept at all.
const SWEEP_FLOOR: usize = 64;

/// One tenant's state in this gateway.
pub(super) struct TenantState {
    /// Theoretical arrival time of each limit, in microseconds since the
    /// limiter started. One small mutex per tenant, never held across an
    /// await.
    pub(super) tats: Mutex<[f64; 2]>,
    /// Its limits' keys in the shared Redis.
    pub(super) redis_keys: [String; 2],
}

impl TenantState {
    fn new(tenant: &str) -> Self {
        Self {
            tats: Mutex::new([0.0; 2]),
            redis_keys: redis_keys(tenant),
        }
    }

    /// Whether a limit still remembers a recent request at `now`.
    fn busy(&self, now: f64) -> bool {
        self.tats
            .lock()
            .expect("limiter state lock")
            .iter()
            .any(|tat| *tat > now)
    }
}

type Map = HashMap<Arc<str>, Arc<TenantState>>;

#[derive(Default)]
pub(super) struct States {
    map: ArcSwap<Map>,
    /// Entries left by the last sweep; held while the map is replaced.
    swept: Mutex<usize>,
}

impl States {
    /// The state of `tenant`, created on first sight; `now` is the limiter's
    /// clock, for the sweep.
    pub(super) fn get(&self, tenant: &Arc<str>, now: f64) -> Arc<TenantState> {
        if let Some(state) = self.map.load().get(&**tenant) {
            return state.clone();
        }
        let mut swept = self.swept.lock().expect("limiter states lock");
        let current = self.map.load_full();
        if let Some(state) = current.get(&**tenant) {
            return state.clone();
        }
        let mut next = (*current).clone();
        if next.len() >= (*swept).max(SWEEP_FLOOR) * 2 {
            next.retain(|_, state| state.busy(now));
            *swept = next.len();
        }
        let state = Arc::new(TenantState::new(tenant));
        next.insert(tenant.clone(), state.clone());
        self.map.store(Arc::new(next));
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_keeps_its_state_and_idle_ones_are_swept() {
        let states = States::default();
        let acme: Arc<str> = Arc::from("acme");
        let first = states.get(&acme, 0.0);
        *first.tats.lock().unwrap() = [5e6, 0.0];
        assert!(Arc::ptr_eq(&first, &states.get(&acme, 1.0)));
        assert_eq!(first.redis_keys, redis_keys("acme"));
        for i in 0..SWEEP_FLOOR * 2 {
            states.get(&Arc::from(format!("t{i}")), 1.0);
        }
        let map = states.map.load();
        assert!(map.contains_key("acme"), "a busy tenant survives the sweep");
        assert!(
            map.len() < SWEEP_FLOOR,
            "idle tenants were swept: {}",
            map.len()
        );
    }
}
