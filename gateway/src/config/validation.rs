//! The gateway's TOML shape and its validation into [`Config`]: every
//! section is checked, every problem kept with its key, and the files the
//! gateway loads at start (certificates, the GeoIP database) are loaded
//! here first, so a config that validates starts.

use std::time::Duration;

use meridian_proto::config::Problems;
use serde::Deserialize;

use super::discovery::RawDiscovery;
use super::regions::RawRouting;
use super::server::RawServer;
use super::{
    AuthConfig, Config, ConfigBuilder, FailoverConfig, GeoConfig, HealthConfig, RateLimitConfig,
    RegionConfig,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    /// The regions; at least one.
    pub(super) regions: Vec<RegionConfig>,
    #[serde(default)]
    pub(super) routing: RawRouting,
    #[serde(default)]
    pub(super) health: HealthConfig,
    #[serde(default)]
    pub(super) failover: FailoverConfig,
    #[serde(default)]
    pub(super) geo: GeoConfig,
    #[serde(default)]
    pub(super) auth: Option<AuthConfig>,
    #[serde(default)]
    pub(super) rate_limit: RateLimitConfig,
    #[serde(default)]
    pub(super) mesh: crate::mesh::MeshConfig,
    /// OpenTelemetry traces; off unless `otlp_endpoint` is set.
    #[serde(default)]
    pub(super) tracing: meridian_mesh::TraceConfig,
    #[serde(default)]
    pub(super) discovery: RawDiscovery,
}

impl RawConfig {
    pub(super) fn validate(self) -> Result<Config, Vec<String>> {
        let mut problems = Problems::new();
        let default_region =
            super::regions::default_region(&self.regions, &self.routing, &mut problems);
        let builder = ConfigBuilder {
            listen: self.server.listen,
            threads: self.server.threads,
            default_region,
            connect_timeout: Duration::from_millis(self.server.connect_timeout_ms),
            read_timeout: Duration::from_millis(self.server.read_timeout_ms),
            shutdown_grace: Duration::from_millis(self.server.shutdown_grace_ms),
            admin_listen: self.server.admin_listen,
            admin_token: self
                .server
                .admin_token_file
                .as_deref()
                .and_then(|path| super::server::read_admin_token(path, &mut problems)),
            tls: self.server.tls,
            http_upstream: self.server.http_upstream,
            health: self.health,
            failover: self.failover,
            geo: self.geo,
            latency_km_per_ms: self.routing.latency_km_per_ms,
            load_penalty_km: self.routing.load_penalty_km,
            auth: self.auth,
            rate_limit: self.rate_limit,
            mesh: self.mesh,
            tracing: self.tracing,
            discovery: self.discovery.config(),
            regions: self.regions,
        };
        builder.check(&mut problems);
        problems.finish(|| Config(builder))
    }
}
