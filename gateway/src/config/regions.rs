//! `[[regions]]` and `[routing]`: where requests can go, and how regions are
//! ranked for a client.

use std::net::SocketAddr;

use meridian_proto::config::Problems;
use serde::Deserialize;

use crate::geo::LatLon;

/// One region the gateway can send requests to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// Region name, as clients pin it in `x-meridian-region`.
    pub name: String,
    /// `host:port` of the region's API (HTTP and gRPC on one port), for a
    /// region of one node at a fixed address. Exactly one of `address` and
    /// `srv` is given.
    #[serde(default)]
    pub address: Option<SocketAddr>,
    /// DNS SRV name of the region's nodes, e.g.
    /// `_meridian._tcp.us-east.meridian.internal.`: each record's target
    /// (A/AAAA) and port is a node, re-resolved when the TTL runs out (see
    /// `[discovery]`).
    #[serde(default)]
    pub srv: Option<String>,
    /// Latitude of the region in degrees; regions without coordinates rank
    /// after those with, for located clients.
    #[serde(default)]
    pub lat: Option<f64>,
    /// Longitude of the region in degrees.
    #[serde(default)]
    pub lon: Option<f64>,
}

impl RegionConfig {
    /// A region of one node at `address`, without coordinates.
    pub fn new(name: impl Into<String>, address: SocketAddr) -> Self {
        Self {
            name: name.into(),
            address: Some(address),
            srv: None,
            lat: None,
            lon: None,
        }
    }

    /// A region whose nodes DNS SRV records under `srv` name, without
    /// coordinates.
    pub fn srv(name: impl Into<String>, srv: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            address: None,
            srv: Some(srv.into()),
            lat: None,
            lon: None,
        }
    }

    /// The same region placed at `lat`, `lon`.
    pub fn at(mut self, lat: f64, lon: f64) -> Self {
        self.lat = Some(lat);
        self.lon = Some(lon);
        self
    }

    pub(crate) fn location(&self) -> Option<LatLon> {
        Some(LatLon {
            lat: self.lat?,
            lon: self.lon?,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRouting {
    /// Region used when nothing else decides; the first region when absent.
    pub(super) default_region: Option<String>,
    /// Kilometres one millisecond of observed latency is worth in ranking.
    pub(super) latency_km_per_ms: f64,
    /// Kilometres a fully loaded region is penalised by.
    pub(super) load_penalty_km: f64,
}

impl Default for RawRouting {
    fn default() -> Self {
        Self {
            default_region: None,
            latency_km_per_ms: 50.0,
            load_penalty_km: 3_000.0,
        }
    }
}

/// Checks the regions: names, addresses, coordinates.
pub(super) fn check(regions: &[RegionConfig], problems: &mut Problems) {
    if regions.is_empty() {
        problems.push("`regions` must list at least one region");
    }
    for (i, r) in regions.iter().enumerate() {
        if r.name.is_empty() {
            problems.push(format!("`regions[{i}].name` must not be empty"));
        }
        if regions[..i].iter().any(|o| o.name == r.name) {
            problems.push(format!("`regions[{i}].name` repeats region {:?}", r.name));
        }
        match (&r.address, &r.srv) {
            (Some(_), None) => {}
            (None, Some(srv)) if valid_srv_name(srv) => {}
            (None, Some(srv)) => problems.push(format!(
                "`regions[{i}].srv` {srv:?} is not a DNS name (e.g. \"_meridian._tcp.{}.example.\")",
                r.name
            )),
            _ => problems.push(format!(
                "`regions[{i}]` needs exactly one of `address` and `srv`"
            )),
        }
        match (r.lat, r.lon) {
            (None, None) => {}
            (Some(lat), Some(lon))
                if (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon) => {}
            (Some(_), Some(_)) => {
                problems.push(format!("`regions[{i}]` coordinates are off the globe"));
            }
            _ => problems.push(format!(
                "`regions[{i}]` needs both `lat` and `lon`, or neither"
            )),
        }
    }
}

/// The index of the region `[routing]` names as the default (the first
/// when it names none; 0 with a problem when it names an unknown one).
pub(super) fn default_region(
    regions: &[RegionConfig],
    routing: &RawRouting,
    problems: &mut Problems,
) -> usize {
    match &routing.default_region {
        None => 0,
        Some(name) => regions
            .iter()
            .position(|r| &r.name == name)
            .unwrap_or_else(|| {
                problems.push(format!(
                    "`routing.default_region` names unknown region {name:?}"
                ));
                0
            }),
    }
}

/// Labels of letters, digits, `-` and `_` (SRV names start with `_service`),
/// at most 63 bytes each, 253 in all, a final dot allowed.
fn valid_srv_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}
