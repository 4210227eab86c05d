//! Gateway configuration: a serde shape read from TOML ([`validation`]),
//! checked section by section into the [`Config`] the gateway runs with.
//! Each file holds one section's shape and its checks.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub use crate::auth::AuthConfig;
use crate::error::Error;
pub use crate::ratelimit::RateLimitConfig;
pub use meridian_mesh::DiscoveryConfig;

mod discovery;
mod geo;
mod health;
mod regions;
mod server;
mod validation;

pub use self::geo::{CidrLocation, GeoConfig};
pub use self::health::{FailoverConfig, HealthConfig};
pub use self::regions::RegionConfig;
pub use self::server::{TlsConfig, UpstreamProtocol};
use self::validation::RawConfig;

/// A validated gateway configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Client-facing address.
    pub listen: SocketAddr,
    /// Worker threads of the proxy.
    pub threads: usize,
    /// The regions, in config order.
    pub regions: Vec<RegionConfig>,
    /// Index into `regions` of the region used when nothing else decides.
    pub default_region: usize,
    /// Time allowed to connect to a region.
    pub connect_timeout: Duration,
    /// Longest wait for a region's response to start, and between reads.
    pub read_timeout: Duration,
    /// Time in-flight requests get to finish at shutdown.
    pub shutdown_grace: Duration,
    /// Address of the admin endpoints (`/healthz`, `/readyz`, `/metrics`,
    /// `/routing`); none when absent.
    pub admin_listen: Option<SocketAddr>,
    /// A TLS listener (HTTP/1.1 and HTTP/2 by ALPN) beside the cleartext one.
    pub tls: Option<TlsConfig>,
    /// Whether HTTP (non-gRPC) requests reach regions over pooled HTTP/1.1
    /// connections or multiplexed HTTP/2; gRPC always uses HTTP/2.
    pub http_upstream: UpstreamProtocol,
    /// Active health checking of regions.
    pub health: HealthConfig,
    /// Retrying failed requests in another region.
    pub failover: FailoverConfig,
    /// Locating clients.
    pub geo: GeoConfig,
    /// Kilometres of distance one millisecond of observed latency (EWMA) is
    /// worth when ranking regions.
    pub latency_km_per_ms: f64,
    /// Kilometres of distance a fully loaded region is penalised by, in
    /// proportion to its reported in-flight over capacity.
    pub load_penalty_km: f64,
    /// API keys and tenants (`[auth]`); when absent every request is the
    /// `default` tenant and no key is asked for.
    pub auth: Option<AuthConfig>,
    /// Per-tenant rate limits (`[rate_limit]`).
    pub rate_limit: RateLimitConfig,
    /// Mutual TLS to regions (`[mesh]`); required in TOML unless
    /// `plaintext = true`. [`Config::new`] starts in plain text.
    pub mesh: crate::mesh::MeshConfig,
    /// Traces exported to an OTLP collector (`[tracing]`); off by default.
    pub tracing: meridian_mesh::TraceConfig,
    /// How regions given by `srv` are resolved (`[discovery]`).
    pub discovery: DiscoveryConfig,
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        Ok(meridian_proto::config::load(path, RawConfig::validate)?)
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, Error> {
        Ok(meridian_proto::config::parse(
            text,
            origin,
            RawConfig::validate,
        )?)
    }

    /// A configuration with defaults for everything but the address and regions.
    pub fn new(listen: SocketAddr, regions: Vec<RegionConfig>) -> Result<Self, Error> {
        RawConfig {
            server: server::RawServer {
                listen,
                ..server::RawServer::default()
            },
            regions,
            routing: regions::RawRouting::default(),
            health: HealthConfig::default(),
            failover: FailoverConfig::default(),
            geo: GeoConfig::default(),
            auth: None,
            rate_limit: RateLimitConfig::default(),
            // Embedders (tests, `meridian up`) set `mesh` themselves;
            // Gateway::start warns while it is plain text.
            mesh: crate::mesh::MeshConfig::plaintext(),
            tracing: meridian_mesh::TraceConfig::default(),
            discovery: discovery::RawDiscovery::default(),
        }
        .validate()
        .map_err(|problems| {
            meridian_proto::config::ConfigError {
                origin: "gateway config".into(),
                problems,
            }
            .into()
        })
    }
}

#[cfg(test)]
mod tests;
