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
mod respond;
mod route;
mod server;

pub use self::auth::{AuthConfig, TENANT_HEADER};
pub use self::config::{
    CidrLocation, Config, ConfigBuilder, DiscoveryConfig, FailoverConfig, GeoConfig, HealthConfig,
    RegionConfig, TlsConfig, UpstreamProtocol,
};
pub use self::error::Error;
pub use self::geo::{COUNTRY_HEADER, LATLON_HEADER, LatLon};
pub use self::mesh::MeshConfig;
pub use self::ratelimit::RateLimitConfig;
/// The body scan of the rate limiter's estimate, for the fuzz harness.
#[doc(hidden)]
pub use self::ratelimit::scan_max_tokens;
pub use self::server::Gateway;

/// Request header (or gRPC metadata) naming a conversation: an affinity key
/// like [`SESSION_HEADER`] (and preferred to it), so a conversation's turns
/// go to the region that stores them while it is healthy. The region reads
/// the same header to load and store the conversation's history.
pub use meridian_proto::header::CONVERSATION as CONVERSATION_HEADER;
/// Response header with which a region reports that it stored a write; such
/// an answer is never replayed in another region.
pub(crate) use meridian_proto::header::DURABILITY as DURABILITY_HEADER;
/// Request header (or gRPC metadata) that pins a request to a region, and the
/// response header that names the region the gateway chose.
pub use meridian_proto::header::REGION as REGION_HEADER;
/// Response header that says why the region was chosen: `pin`, `affinity`,
/// `nearest`, `default` or `failover`.
pub use meridian_proto::header::ROUTE as ROUTE_HEADER;
/// Request header (or gRPC metadata) naming a session: requests of one
/// session go to the same region while it is healthy.
pub use meridian_proto::header::SESSION as SESSION_HEADER;
/// Response header in which a region reports the tokens a request used;
/// the gateway corrects its rate-limit estimate with it.
pub use meridian_proto::header::USAGE_TOKENS as USAGE_TOKENS_HEADER;
