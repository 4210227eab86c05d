//! The gateway's one error type.

use std::net::SocketAddr;

/// What can stop the gateway from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration could not be read or is invalid.
    #[error("invalid config {origin}: {message}")]
    Config { origin: String, message: String },
    /// The client-facing address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The proxy thread could not be started.
    #[error("cannot start the proxy thread: {0}")]
    Thread(#[from] std::io::Error),
    /// The proxy did not start accepting connections in time.
    #[error("gateway did not start listening on {0} in time")]
    NotReady(SocketAddr),
}

impl From<meridian_proto::config::ConfigError> for Error {
    fn from(e: meridian_proto::config::ConfigError) -> Self {
        Self::Config {
            message: e.message(),
            origin: e.origin,
        }
    }
}
