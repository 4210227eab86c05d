//! Picking the regions for a request, best first: pin, then affinity, then
//! geography adjusted by latency and load, then the default region.

use crate::config::Config;
use crate::geo::LatLon;
use crate::regions::Regions;

/// Why a region was chosen; sent in `x-meridian-route` and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// The request named the region.
    Pin,
    /// The request named a session or conversation; rendezvous hashing
    /// gave its home.
    Affinity,
    /// The client was located; this is the best-ranked region.
    Nearest,
    /// Nothing else decided: the configured default region.
    Default,
    /// An earlier choice failed before answering; this is the next in line.
    Failover,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Pin => "pin",
            Self::Affinity => "affinity",
            Self::Nearest => "nearest",
            Self::Default => "default",
            Self::Failover => "failover",
        }
    }
}

/// A request pinned a region that does not exist.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct UnknownRegion(pub String);

/// The regions to try, best first, and why the first was chosen. At most 8
/// regions are tried for one request: more would be a retry storm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub order: Vec<usize>,
    pub reason: Reason,
}

/// What routing knows about a request.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RequestFacts<'a> {
    pub pin: Option<&'a str>,
    pub session: Option<&'a str>,
    pub location: Option<LatLon>,
}

/// `order` with its first region moved behind the next available one
/// when `draw` (0 to 99) is at or above the first's operator weight: a
/// region of weight w takes w% of the requests it would come first for.
/// Pins and session affinity are kept as they are.
fn weighed(regions: &Regions, mut order: Vec<usize>, draw: u32) -> Vec<usize> {
    let Some(&first) = order.first() else {
        return order;
    };
    if draw < regions.list[first].weight() {
        return order;
    }
    if let Some(next) = order
        .iter()
        .skip(1)
        .position(|&i| regions.list[i].is_available())
    {
        order.remove(0);
        order.insert(next + 1, first);
    }
    order
}

/// Routing policy; stateless apart from the config, so every gateway with the
/// same config and the same view of health decides the same way.
#[derive(Debug)]
pub(crate) struct Router {
    default_region: usize,
    latency_km_per_ms: f64,
    load_penalty_km: f64,
}

impl Router {
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            default_region: config.default_region,
            latency_km_per_ms: config.latency_km_per_ms,
            load_penalty_km: config.load_penalty_km,
        }
    }

    pub(crate) fn plan(
        &self,
        regions: &Regions,
        facts: RequestFacts<'_>,
    ) -> Result<Plan, UnknownRegion> {
        if let Some(name) = facts.pin.map(str::trim).filter(|p| !p.is_empty()) {
            // A pin is an instruction, not a preference: no other region.
            let i = regions
                .position(name)
                .ok_or_else(|| UnknownRegion(name.to_string()))?;
            return Ok(Plan {
                order: vec![i],
                reason: Reason::Pin,
            });
        }
        let ranked = self.rank(regions, facts.location);
        if let Some(session) = facts.session.filter(|s| !s.is_empty()) {
            let available: Vec<usize> = (0..regions.list.len())
                .filter(|&i| regions.list[i].is_available())
                .collect();
            if let Some(home) = rendezvous(session, regions, &available) {
                return Ok(Plan {
                    order: with_first(home, ranked),
                    reason: Reason::Affinity,
                });
            }
        }
        if facts.location.is_some() {
            return Ok(Plan {
                order: weighed(regions, ranked, rand::random_range(0..100)),
                reason: Reason::Nearest,
            });
        }
        let default = self.default_region;
        let order = if regions.list[default].is_available() {
            with_first(default, ranked)
        } else {
            ranked
        };
        Ok(Plan {
            order: weighed(regions, order, rand::random_range(0..100)),
            reason: Reason::Default,
        })
    }

    /// All regions, available ones first, each group by score: distance from
    /// the client (or from the default region when the client is unknown)
    /// plus penalties for observed latency and reported load.
    fn rank(&self, regions: &Regions, client: Option<LatLon>) -> Vec<usize> {
        let origin = client.or(regions.list[self.default_region].location);
        let score = |i: usize| {
            let r = &regions.list[i];
            let distance = match (origin, r.location) {
                (Some(a), Some(b)) => a.distance_km(b),
                // Unplaced regions rank after placed ones at any distance.
                _ => 40_000.0,
            };
            distance + r.ewma_ms() * self.latency_km_per_ms + r.load() * self.load_penalty_km
        };
        let mut order: Vec<(bool, f64, usize)> = (0..regions.list.len())
            .map(|i| (!regions.list[i].is_available(), score(i), i))
            .collect();
        order.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        order.into_iter().map(|(_, _, i)| i).take(8).collect()
    }
}

fn with_first(first: usize, mut rest: Vec<usize>) -> Vec<usize> {
    rest.retain(|&i| i != first);
    rest.insert(0, first);
    rest
}

/// Highest-random-weight hashing: the region whose hash with the session is
/// highest. Removing a region moves only its own sessions; every gateway
/// computes the same answer without talking to the others.
fn rendezvous(session: &str, regions: &Regions, candidates: &[usize]) -> Option<usize> {
    candidates
        .iter()
        .copied()
        .max_by_key(|&i| weight(session, &regions.list[i].name))
}

/// FNV-1a over the pair, then a 64-bit finaliser: stable across builds and
/// machines, unlike std's hasher.
fn weight(session: &str, region: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in session.bytes().chain([0xff]).chain(region.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64's finaliser spreads FNV's weak low bits.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests;
