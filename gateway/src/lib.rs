//! The Meridian edge gateway.
//!
//! One endpoint for every client: it accepts HTTP/1.1 and HTTP/2 (cleartext
//! h2c for gRPC), picks the region that serves each request (pin, session
//! affinity, nearest healthy region), proxies to it over pooled HTTP/2
//! connections, and fails over to the next region when a try fails before the
//! client has seen a byte. Built on Pingora.
//!
//! Start one with [`Gateway::start`] from a [`Config`].

mod admin;
pub mod auth;
mod budget;
mod config;
mod discovery;
mod error;
mod geo;
mod health;
mod mesh;
mod metrics;
mod proxy;
mod ratelimit;
mod regions;
mod route;
mod server;

pub use self::auth::{
    AuthConfig, TENANT_HEADER, TenantLimits, create_api_key, create_tenant, revoke_api_key,
};
pub use self::config::{
    CidrLocation, Config, ConfigBuilder, DiscoveryConfig, FailoverConfig, GeoConfig, HealthConfig,
    RegionConfig, TlsConfig, UpstreamProtocol,
};
pub use self::error::Error;
pub use self::geo::{COUNTRY_HEADER, LATLON_HEADER, LatLon};
pub use self::mesh::MeshConfig;
pub use self::ratelimit::{RateLimitConfig, USAGE_TOKENS_HEADER};
pub use self::server::Gateway;

/// Request header (or gRPC metadata) that pins a request to a region, and the
/// response header that names the region the gateway chose.
pub const REGION_HEADER: &str = "x-meridian-region";
/// Response header that says why the region was chosen: `pin`, `affinity`,
/// `nearest`, `default` or `failover`.
pub const ROUTE_HEADER: &str = "x-meridian-route";
/// Request header (or gRPC metadata) naming a session: requests of one
/// session go to the same region while it is healthy.
pub const SESSION_HEADER: &str = "x-meridian-session";
/// Request header (or gRPC metadata) naming a conversation: an affinity key
/// like [`SESSION_HEADER`] (and preferred to it), so a conversation's turns
/// go to the region that stores them while it is healthy. The region reads
/// the same header to load and store the conversation's history.
pub const CONVERSATION_HEADER: &str = "x-meridian-conversation";
