//! The live region table: what health checks, requests and the regions' own
//! status reports have taught the gateway. Read on every request, so all of it
//! is atomics: no lock on the request path.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::config::{Config, HealthConfig};
use crate::geo::LatLon;

/// One region as the gateway sees it.
#[derive(Debug)]
pub(crate) struct Region {
    pub name: String,
    pub address: SocketAddr,
    pub location: Option<LatLon>,
    healthy: AtomicBool,
    draining: AtomicBool,
    failures: AtomicU32,
    successes: AtomicU32,
    /// Observed latency to first byte, microseconds, exponentially weighted.
    ewma_us: AtomicU64,
    /// In-flight over capacity as reported by the region, in thousandths.
    load_permille: AtomicU32,
}

/// Weight of a new latency sample in the moving average (1/8, as TCP's SRTT).
const EWMA_SHIFT: u32 = 3;

/// What a change did to a region's health; the caller logs and counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    None,
    Ejected,
    Recovered,
}

impl Region {
    fn new(name: String, address: SocketAddr, location: Option<LatLon>) -> Self {
        Self {
            name,
            address,
            location,
            // Optimistic until the first checks say otherwise, so a gateway
            // that starts with its regions serves at once.
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            successes: AtomicU32::new(0),
            ewma_us: AtomicU64::new(0),
            load_permille: AtomicU32::new(0),
        }
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Healthy and not draining: may take new work.
    pub(crate) fn is_available(&self) -> bool {
        self.is_healthy() && !self.is_draining()
    }

    pub(crate) fn ewma_ms(&self) -> f64 {
        self.ewma_us.load(Ordering::Relaxed) as f64 / 1000.0
    }

    pub(crate) fn load(&self) -> f64 {
        f64::from(self.load_permille.load(Ordering::Relaxed)) / 1000.0
    }

    pub(crate) fn observe_latency(&self, micros: u64) {
        // A lost race between two updates loses one sample: harmless for an
        // average, and cheaper than a CAS loop on the hot path.
        let old = self.ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            micros
        } else {
            old - (old >> EWMA_SHIFT) + (micros >> EWMA_SHIFT)
        };
        self.ewma_us.store(new, Ordering::Relaxed);
    }

    pub(crate) fn report(&self, draining: bool, in_flight: u32, capacity: u32) {
        self.draining.store(draining, Ordering::Relaxed);
        let permille = if capacity == 0 {
            1000
        } else {
            (u64::from(in_flight) * 1000 / u64::from(capacity)).min(1000) as u32
        };
        self.load_permille.store(permille, Ordering::Relaxed);
    }

    /// A failed check or request; ejects after `failures_to_eject` in a row.
    pub(crate) fn failure(&self, health: &HealthConfig) -> Transition {
        self.successes.store(0, Ordering::Relaxed);
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= health.failures_to_eject && self.healthy.swap(false, Ordering::Relaxed) {
            return Transition::Ejected;
        }
        Transition::None
    }

    /// A request the region answered well: failures are no longer consecutive.
    pub(crate) fn request_ok(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// A successful active check; recovers after `successes_to_recover` in a row.
    pub(crate) fn success(&self, health: &HealthConfig) -> Transition {
        self.failures.store(0, Ordering::Relaxed);
        let successes = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
        if successes >= health.successes_to_recover && !self.healthy.swap(true, Ordering::Relaxed) {
            return Transition::Recovered;
        }
        Transition::None
    }
}

/// All regions, in config order.
#[derive(Debug)]
pub(crate) struct Regions {
    pub list: Vec<Region>,
}

impl Regions {
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            list: config
                .regions
                .iter()
                .map(|r| Region::new(r.name.clone(), r.address, r.location()))
                .collect(),
        }
    }

    pub(crate) fn position(&self, name: &str) -> Option<usize> {
        self.list
            .iter()
            .position(|r| r.name.eq_ignore_ascii_case(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region() -> Region {
        Region::new("r".into(), ([127, 0, 0, 1], 1).into(), None)
    }

    #[test]
    fn ejection_and_recovery_follow_thresholds() {
        let h = HealthConfig {
            failures_to_eject: 2,
            successes_to_recover: 3,
            ..HealthConfig::default()
        };
        let r = region();
        assert_eq!(r.failure(&h), Transition::None);
        assert!(r.is_healthy());
        assert_eq!(r.failure(&h), Transition::Ejected);
        assert!(!r.is_healthy());
        assert_eq!(r.failure(&h), Transition::None);
        assert_eq!(r.success(&h), Transition::None);
        assert_eq!(r.success(&h), Transition::None);
        // A failure in between restarts the count.
        assert_eq!(r.failure(&h), Transition::None);
        for _ in 0..2 {
            assert_eq!(r.success(&h), Transition::None);
        }
        assert_eq!(r.success(&h), Transition::Recovered);
        assert!(r.is_healthy());
    }

    #[test]
    fn load_and_latency_are_tracked() {
        let r = region();
        r.report(true, 50, 100);
        assert!((r.load() - 0.5).abs() < 1e-9);
        assert!(!r.is_available());
        r.observe_latency(8_000);
        assert_eq!(r.ewma_ms(), 8.0);
        r.observe_latency(16_000);
        assert_eq!(r.ewma_ms(), 9.0);
    }
}
