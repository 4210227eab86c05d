//! The live region table: what health checks, requests, DNS and the nodes'
//! own status reports have taught the gateway. Read on every request, so all
//! of it is atomics and one `ArcSwap` per region for its node list: no lock
//! on the request path.
//!
//! A region is one or more nodes: one static `address`, or whatever its SRV
//! name resolves to. The region's own health, drain and load are derived
//! from its nodes' whenever one of them changes ([`Region::refresh`]): a
//! region is healthy while any node is, draining while every healthy node
//! is.

mod node;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use meridian_mesh::SrvNode;
use rand::Rng;

pub(crate) use self::node::{Lease, Node, Stores};
use crate::config::{Config, HealthConfig};
use crate::geo::LatLon;

/// One region as the gateway sees it.
#[derive(Debug)]
pub(crate) struct Region {
    pub name: String,
    pub location: Option<LatLon>,
    /// The SRV name the nodes come from; none for a static address.
    pub srv: Option<String>,
    nodes: ArcSwap<Vec<Arc<Node>>>,
    healthy: AtomicBool,
    draining: AtomicBool,
    /// Drained by an operator (`region_controls`), whatever its nodes say.
    held: AtomicBool,
    /// The share of traffic, 0 to 100, it takes when it comes first
    /// (`region_controls`); 100 unless an operator set less.
    weight: AtomicU32,
    /// Mean reported load of the available nodes, in thousandths.
    load_permille: AtomicU32,
    /// Observed latency of health checks, microseconds, exponentially weighted.
    ewma_us: AtomicU64,
    /// Milliseconds after `born` of the last good DNS answer; 0 for none.
    refreshed_ms: AtomicU64,
    born: Instant,
    /// Spreads ties among equally idle nodes.
    cursor: AtomicUsize,
}

/// Weight of a new latency sample in the moving average (1/8, as TCP's SRTT).
const EWMA_SHIFT: u32 = 3;

/// What a change did to a node's or a region's health; the caller logs and
/// counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    None,
    Ejected,
    Recovered,
}

impl Region {
    fn new(name: String, location: Option<LatLon>, srv: Option<String>, nodes: Vec<Node>) -> Self {
        let region = Self {
            name,
            location,
            srv,
            nodes: ArcSwap::from_pointee(nodes.into_iter().map(Arc::new).collect()),
            healthy: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            held: AtomicBool::new(false),
            weight: AtomicU32::new(100),
            load_permille: AtomicU32::new(0),
            ewma_us: AtomicU64::new(0),
            refreshed_ms: AtomicU64::new(0),
            born: Instant::now(),
            cursor: AtomicUsize::new(0),
        };
        region.refresh();
        region
    }

    /// The current nodes, sorted by priority then address.
    pub(crate) fn nodes(&self) -> arc_swap::Guard<Arc<Vec<Arc<Node>>>> {
        self.nodes.load()
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Healthy, and drained neither by its nodes nor by an operator: may
    /// take new work.
    pub(crate) fn is_available(&self) -> bool {
        self.is_healthy() && !self.is_draining() && !self.is_held()
    }

    /// Drained by an operator.
    pub(crate) fn is_held(&self) -> bool {
        self.held.load(Ordering::Relaxed)
    }

    /// The share of traffic, 0 to 100, it takes when it comes first.
    pub(crate) fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Applies an operator's control; whether it changed anything.
    pub(crate) fn control(&self, drained: bool, weight: u32) -> bool {
        let was_held = self.held.swap(drained, Ordering::Relaxed);
        let was_weight = self.weight.swap(weight.min(100), Ordering::Relaxed);
        was_held != drained || was_weight != weight.min(100)
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

    /// Recomputes the region's health, drain and load from its nodes. Two
    /// refreshes racing may publish from different moments; the next check
    /// (one interval later) settles it, which is cheaper than a lock.
    pub(crate) fn refresh(&self) -> Transition {
        let nodes = self.nodes.load();
        let healthy = nodes.iter().any(|n| n.is_healthy());
        let (mut available, mut load) = (0u32, 0u32);
        for n in nodes.iter().filter(|n| n.is_available()) {
            available += 1;
            load += n.load_permille();
        }
        self.draining
            .store(healthy && available == 0, Ordering::Relaxed);
        self.load_permille
            .store(load.checked_div(available).unwrap_or(0), Ordering::Relaxed);
        match (self.healthy.swap(healthy, Ordering::Relaxed), healthy) {
            (true, false) => Transition::Ejected,
            (false, true) => Transition::Recovered,
            _ => Transition::None,
        }
    }

    /// Replaces the node list with what DNS answered. Nodes that stay keep
    /// their health and outstanding requests; removed nodes take no new
    /// requests, and those in flight finish (their [`Lease`]s hold them).
    /// Nodes of the first answer start healthy, as a static address does, so
    /// a starting gateway serves at once; nodes added later wait for their
    /// health checks to pass, so a node that is not up yet takes no traffic.
    pub(crate) fn set_nodes(&self, found: &[SrvNode], health: &HealthConfig) -> Transition {
        let first = self.refreshed_ms.load(Ordering::Relaxed) == 0;
        let old = self.nodes.load_full();
        let new = found
            .iter()
            .map(|s| match old.iter().find(|n| n.address == s.addr) {
                Some(n) => {
                    n.set_srv(s.priority, s.weight);
                    n.clone()
                }
                None => {
                    let node = Node::new(s.addr, s.priority, s.weight, first);
                    if !first {
                        // Fails until `successes_to_recover` checks pass.
                        for _ in 0..health.failures_to_eject {
                            node.failure(health);
                        }
                    }
                    Arc::new(node)
                }
            })
            .collect();
        self.nodes.store(Arc::new(new));
        self.refresh()
    }

    /// Notes a good DNS answer.
    pub(crate) fn refreshed(&self, at: Instant) {
        let ms = at.saturating_duration_since(self.born).as_millis() as u64;
        self.refreshed_ms.store(ms.max(1), Ordering::Relaxed);
    }

    /// Time since the last good DNS answer; none before the first.
    pub(crate) fn refresh_age(&self) -> Option<Duration> {
        match self.refreshed_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.born
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms)),
            ),
        }
    }

    /// The node for a new request: among the available nodes of the best
    /// SRV priority, the less busy (outstanding over weight) of two drawn at
    /// random in proportion to their weights. A region with no available
    /// node still offers a healthy (draining) one, then any: it is only
    /// tried when the plan has nothing better, as before nodes existed.
    pub(crate) fn pick(&self) -> Option<Lease> {
        let nodes = self.nodes.load();
        if nodes.len() <= 1 {
            return nodes.first().cloned().map(Lease::new);
        }
        let tiers: [fn(&Node) -> bool; 3] = [Node::is_available, Node::is_healthy, |_| true];
        for tier in tiers {
            let Some(best) = nodes.iter().filter(|n| tier(n)).map(|n| n.priority()).min() else {
                continue;
            };
            let candidate = |n: &&Arc<Node>| tier(n) && n.priority() == best;
            let total: u32 = nodes.iter().filter(candidate).map(|n| n.weight()).sum();
            // RFC 2782: weight 0 only when nothing weightier is there; all
            // zero means all equal.
            let weight = |n: &Node| if total == 0 { 1 } else { n.weight() };
            let total = if total == 0 {
                nodes.iter().filter(candidate).count() as u32
            } else {
                total
            };
            let draw = |mut r: u32| {
                nodes
                    .iter()
                    .filter(candidate)
                    .find(|n| {
                        let w = weight(n);
                        if r < w {
                            return true;
                        }
                        r -= w;
                        false
                    })
                    .expect("a draw below the total weight lands on a node")
            };
            let mut rng = rand::rng();
            let a = draw(rng.random_range(0..total));
            let b = draw(rng.random_range(0..total));
            // (outstanding + 1) / weight, compared without dividing; the
            // cursor breaks ties so idle nodes share sequential traffic.
            let (wa, wb) = (u64::from(weight(a).max(1)), u64::from(weight(b).max(1)));
            let cost_a = u64::from(a.outstanding() + 1) * wb;
            let cost_b = u64::from(b.outstanding() + 1) * wa;
            let chosen = match cost_a.cmp(&cost_b) {
                std::cmp::Ordering::Less => a,
                std::cmp::Ordering::Greater => b,
                std::cmp::Ordering::Equal => {
                    if self
                        .cursor
                        .fetch_add(1, Ordering::Relaxed)
                        .is_multiple_of(2)
                    {
                        a
                    } else {
                        b
                    }
                }
            };
            return Some(Lease::new(chosen.clone()));
        }
        None
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
                .map(|r| {
                    let nodes = match r.address {
                        // Optimistic until the first checks say otherwise,
                        // so a gateway that starts with its regions serves
                        // at once.
                        Some(address) => vec![Node::new(address, 0, 1, true)],
                        // Filled by discovery.
                        None => Vec::new(),
                    };
                    Region::new(r.name.clone(), r.location(), r.srv.clone(), nodes)
                })
                .collect(),
        }
    }

    pub(crate) fn position(&self, name: &str) -> Option<usize> {
        self.list
            .iter()
            .position(|r| r.name.eq_ignore_ascii_case(name))
    }
}
