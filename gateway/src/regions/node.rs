//! One node of a region: its health as checks and requests have seen it,
//! and the requests this gateway has in flight to it. All atomics: it is
//! read on every request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};

use super::Transition;
use crate::config::HealthConfig;

#[derive(Debug)]
pub(crate) struct Node {
    pub address: SocketAddr,
    /// SRV priority (lower first); 0 for a static address.
    priority: AtomicU32,
    /// SRV weight among nodes of one priority.
    weight: AtomicU32,
    healthy: AtomicBool,
    draining: AtomicBool,
    failures: AtomicU32,
    successes: AtomicU32,
    /// In-flight over capacity as reported by the node, in thousandths.
    load_permille: AtomicU32,
    /// Requests this gateway has sent to the node and not finished.
    outstanding: AtomicU32,
    /// The region's stores this node reported down ([`Stores`] bits).
    stores_down: AtomicU8,
}

/// Stores a request needs, or a node reported down, as bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Stores(pub u8);

impl Stores {
    pub(crate) const NONE: Self = Self(0);
    pub(crate) const POSTGRES: Self = Self(1);
    pub(crate) const REDIS: Self = Self(2);

    /// From the names `Admin.RegionStatus` lists; unknown names are not
    /// needed by anything this gateway routes.
    pub(crate) fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        Self(names.into_iter().fold(0, |bits, name| {
            bits | match name {
                "postgres" => Self::POSTGRES.0,
                "redis" => Self::REDIS.0,
                _ => 0,
            }
        }))
    }
}

impl Node {
    pub(crate) fn new(address: SocketAddr, priority: u16, weight: u16, healthy: bool) -> Self {
        Self {
            address,
            priority: AtomicU32::new(u32::from(priority)),
            weight: AtomicU32::new(u32::from(weight)),
            healthy: AtomicBool::new(healthy),
            draining: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            successes: AtomicU32::new(0),
            load_permille: AtomicU32::new(0),
            outstanding: AtomicU32::new(0),
            stores_down: AtomicU8::new(0),
        }
    }

    pub(crate) fn set_srv(&self, priority: u16, weight: u16) {
        self.priority.store(u32::from(priority), Ordering::Relaxed);
        self.weight.store(u32::from(weight), Ordering::Relaxed);
    }

    pub(crate) fn priority(&self) -> u32 {
        self.priority.load(Ordering::Relaxed)
    }

    pub(crate) fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
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

    pub(crate) fn load_permille(&self) -> u32 {
        self.load_permille.load(Ordering::Relaxed)
    }

    pub(crate) fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Whether the node has every store `needs` up, as it last reported.
    pub(crate) fn serves(&self, needs: Stores) -> bool {
        self.stores_down.load(Ordering::Relaxed) & needs.0 == 0
    }

    pub(crate) fn report(&self, draining: bool, in_flight: u32, capacity: u32, down: Stores) {
        self.draining.store(draining, Ordering::Relaxed);
        self.stores_down.store(down.0, Ordering::Relaxed);
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

    /// A request the node answered well: failures are no longer consecutive.
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

/// A request's hold on the node it was sent to: counts as outstanding until
/// dropped (the request ended, or a retry chose another node). It also keeps
/// a node that DNS removed alive until its last request is done.
#[derive(Debug)]
pub(crate) struct Lease(Arc<Node>);

impl Lease {
    pub(crate) fn new(node: Arc<Node>) -> Self {
        node.outstanding.fetch_add(1, Ordering::Relaxed);
        Self(node)
    }
}

impl std::ops::Deref for Lease {
    type Target = Node;

    fn deref(&self) -> &Node {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}
