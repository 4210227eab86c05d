//! `[discovery]`: resolving the regions given by `srv`.

use std::net::SocketAddr;
use std::time::Duration;

use meridian_mesh::{DiscoveryConfig, SrvResolver};
use meridian_proto::config::Problems;
use serde::Deserialize;

use super::RegionConfig;

/// `[discovery]`: resolving the regions given by `srv`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawDiscovery {
    /// Name servers (`ip:port`) asked for SRV, A and AAAA records; empty
    /// means the system's, from `/etc/resolv.conf`.
    pub(super) nameservers: Vec<SocketAddr>,
    /// Shortest time between two resolutions of one name, whatever the TTL
    /// says; also the retry interval after a failed resolution.
    pub(super) min_refresh_ms: u64,
    /// Longest time an answer is used before asking again, whatever the TTL.
    pub(super) max_refresh_ms: u64,
    /// Time one query may take before the next name server is asked.
    pub(super) timeout_ms: u64,
}

impl Default for RawDiscovery {
    fn default() -> Self {
        let d = DiscoveryConfig::default();
        Self {
            nameservers: d.nameservers,
            min_refresh_ms: d.min_refresh.as_millis() as u64,
            max_refresh_ms: d.max_refresh.as_millis() as u64,
            timeout_ms: d.timeout.as_millis() as u64,
        }
    }
}

impl RawDiscovery {
    pub(super) fn config(&self) -> DiscoveryConfig {
        DiscoveryConfig {
            nameservers: self.nameservers.clone(),
            min_refresh: Duration::from_millis(self.min_refresh_ms),
            max_refresh: Duration::from_millis(self.max_refresh_ms),
            timeout: Duration::from_millis(self.timeout_ms),
        }
    }
}

/// Checks the section and, when a region is given by `srv`, builds the
/// resolver as the gateway does at start (it reads `/etc/resolv.conf` when
/// no name servers are given).
pub(super) fn check(config: &DiscoveryConfig, regions: &[RegionConfig], problems: &mut Problems) {
    if config.min_refresh.is_zero() || config.timeout.is_zero() {
        problems.push("`discovery.min_refresh_ms` and `discovery.timeout_ms` must be at least 1");
    }
    if config.max_refresh < config.min_refresh {
        problems.push("`discovery.max_refresh_ms` must be at least `discovery.min_refresh_ms`");
    }
    if regions.iter().any(|r| r.srv.is_some())
        && let Err(e) = SrvResolver::new(config.clone())
    {
        problems.push(format!("`discovery.nameservers`: {e}"));
    }
}
