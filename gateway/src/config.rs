//! Gateway configuration: a serde shape read from TOML ([`validation`]),
//! checked section by section into the read-only [`Config`] the gateway runs
//! with. Code (tests, `meridian up`) fills a [`ConfigBuilder`] instead, whose
//! `build` runs the same checks. Each file holds one section's shape and its
//! checks.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub use crate::auth::AuthConfig;
use crate::error::Error;
pub use crate::ratelimit::RateLimitConfig;
pub use meridian_mesh::DiscoveryConfig;
use meridian_proto::config::Problems;

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

/// A validated gateway configuration, read-only: it derefs to the
/// [`ConfigBuilder`] it was validated from, and offers no way back to a
/// mutable one but a copy ([`Config::to_builder`]), which must be built
/// (validated) again.
#[derive(Debug, Clone)]
pub struct Config(ConfigBuilder);

impl std::ops::Deref for Config {
    type Target = ConfigBuilder;

    fn deref(&self) -> &ConfigBuilder {
        &self.0
    }
}

/// A gateway configuration being made in code (tests, `meridian up`):
/// every field public, checked by [`ConfigBuilder::build`] as a TOML file is.
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
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
    /// The bearer token the admin endpoints ask for, but for `/healthz`
    /// and `/readyz`; none means they are open to whoever reaches the port,
    /// which must then be a loopback address.
    pub admin_token: Option<String>,
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
    /// `plaintext = true`. [`Config::builder`] starts in plain text.
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

    /// A builder with defaults for everything but the address and regions.
    pub fn builder(listen: SocketAddr, regions: Vec<RegionConfig>) -> ConfigBuilder {
        let server = server::RawServer::default();
        let routing = regions::RawRouting::default();
        ConfigBuilder {
            listen,
            threads: server.threads,
            regions,
            default_region: 0,
            connect_timeout: Duration::from_millis(server.connect_timeout_ms),
            read_timeout: Duration::from_millis(server.read_timeout_ms),
            shutdown_grace: Duration::from_millis(server.shutdown_grace_ms),
            admin_listen: server.admin_listen,
            admin_token: None,
            tls: server.tls,
            http_upstream: server.http_upstream,
            health: HealthConfig::default(),
            failover: FailoverConfig::default(),
            geo: GeoConfig::default(),
            latency_km_per_ms: routing.latency_km_per_ms,
            load_penalty_km: routing.load_penalty_km,
            auth: None,
            rate_limit: RateLimitConfig::default(),
            // Embedders (tests, `meridian up`) set `mesh` themselves;
            // Gateway::start warns while it is plain text.
            mesh: crate::mesh::MeshConfig::plaintext(),
            tracing: meridian_mesh::TraceConfig::default(),
            discovery: DiscoveryConfig::default(),
        }
    }

    /// A configuration with defaults for everything but the address and regions.
    pub fn new(listen: SocketAddr, regions: Vec<RegionConfig>) -> Result<Self, Error> {
        Self::builder(listen, regions).build()
    }

    /// A mutable copy, to build a changed configuration from.
    pub fn to_builder(&self) -> ConfigBuilder {
        self.0.clone()
    }
}

impl ConfigBuilder {
    /// Validates the configuration, as a TOML file is validated.
    pub fn build(self) -> Result<Config, Error> {
        let mut problems = Problems::new();
        if !self.regions.is_empty() && self.default_region >= self.regions.len() {
            problems.push(format!(
                "`routing.default_region` is region {} of {}",
                self.default_region,
                self.regions.len()
            ));
        }
        self.check(&mut problems);
        problems.finish(|| Config(self)).map_err(|problems| {
            meridian_proto::config::ConfigError {
                origin: "gateway config".into(),
                problems,
            }
            .into()
        })
    }

    /// Every check but the default region's name, which only TOML gives.
    fn check(&self, problems: &mut Problems) {
        regions::check(&self.regions, problems);
        self.health.check(problems);
        self.failover.check(problems);
        if self.threads == 0 {
            problems.push("`server.threads` must be at least 1");
        }
        if let Some(addr) = self.admin_listen
            && !addr.ip().is_loopback()
            && self.admin_token.is_none()
        {
            problems.push(format!(
                "`server.admin_listen` {addr} is not a loopback address: set \
                 `server.admin_token_file` so its endpoints ask for a token, or listen on 127.0.0.1"
            ));
        }
        if let Some(tls) = &self.tls {
            server::check_tls(tls, problems);
        }
        self.geo.check(problems);
        if let Some(auth) = &self.auth {
            problems.check(auth.validate());
        }
        problems.check(self.rate_limit.validate());
        problems.check(self.mesh.check());
        problems.check(self.tracing.validate());
        discovery::check(&self.discovery, &self.regions, problems);
    }
}

#[cfg(test)]
mod tests;
