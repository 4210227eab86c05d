//! The Meridian edge gateway.
//!
//! One endpoint for every client: it accepts HTTP/1.1 and HTTP/2 (cleartext
//! h2c for gRPC), picks the region that serves each request, and proxies to it
//! over pooled HTTP/2 connections. Built on Pingora.
//!
//! Start one with [`Gateway::start`] from a [`Config`].

mod config;
mod error;
mod proxy;
mod route;
mod server;

pub use self::config::{Config, RegionConfig};
pub use self::error::Error;
pub use self::server::Gateway;

/// Request header (or gRPC metadata) that pins a request to a region, and the
/// response header that names the region the gateway chose.
pub const REGION_HEADER: &str = "x-meridian-region";
/// Response header that says why the region was chosen.
pub const ROUTE_HEADER: &str = "x-meridian-route";
