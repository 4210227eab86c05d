//! `[server]`: the client-facing listeners, timeouts and how HTTP reaches regions.

use std::net::SocketAddr;
use std::path::Path;

use meridian_mesh::rustls;
use meridian_mesh::rustls::pki_types::pem::PemObject;
use meridian_mesh::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use meridian_proto::config::Problems;
use serde::Deserialize;

/// How the gateway talks HTTP to regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// Pooled HTTP/1.1 keep-alive connections: the cheapest per request in
    /// Pingora for small JSON requests (see `make bench`).
    H1,
    /// HTTP/2 with prior knowledge, multiplexed: fewer connections.
    H2,
}

/// The client-facing TLS listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Address of the TLS listener, e.g. `0.0.0.0:443`.
    pub listen: SocketAddr,
    /// PEM certificate chain.
    pub cert_path: std::path::PathBuf,
    /// PEM private key.
    pub key_path: std::path::PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawServer {
    /// Client-facing address.
    pub(super) listen: SocketAddr,
    /// Proxy worker threads.
    pub(super) threads: usize,
    /// Time allowed to connect to a region, in milliseconds.
    pub(super) connect_timeout_ms: u64,
    /// Longest wait for a region to start answering, in milliseconds.
    pub(super) read_timeout_ms: u64,
    /// Grace period for in-flight requests at shutdown, in milliseconds.
    pub(super) shutdown_grace_ms: u64,
    /// Address of the admin endpoints; off when absent.
    pub(super) admin_listen: Option<SocketAddr>,
    /// A file holding the bearer token the admin endpoints ask for (all
    /// but `/healthz` and `/readyz`); required when `admin_listen` is not a
    /// loopback address.
    pub(super) admin_token_file: Option<std::path::PathBuf>,
    /// A TLS listener; off when absent.
    pub(super) tls: Option<TlsConfig>,
    /// `h1` (default) or `h2` for HTTP requests to regions.
    pub(super) http_upstream: UpstreamProtocol,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            threads: 2,
            connect_timeout_ms: 1_000,
            read_timeout_ms: 60_000,
            shutdown_grace_ms: 10_000,
            admin_listen: None,
            admin_token_file: None,
            tls: None,
            http_upstream: UpstreamProtocol::H1,
        }
    }
}

/// The admin token from `path`: its first line, trimmed, at least 16 bytes.
pub(super) fn read_admin_token(path: &Path, problems: &mut Problems) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.lines().next().unwrap_or("").trim().to_string();
            if token.len() < 16 {
                problems.push(format!(
                    "`server.admin_token_file` {} must hold a token of at least 16 characters",
                    path.display()
                ));
                return None;
            }
            Some(token)
        }
        Err(e) => {
            problems.push(format!(
                "`server.admin_token_file` {} cannot be read: {e}",
                path.display()
            ));
            None
        }
    }
}

/// Pingora loads the listener's files only on its own thread, where a bad
/// file is a panic: they are parsed and paired here instead.
pub(super) fn check_tls(tls: &TlsConfig, problems: &mut Problems) {
    let read = |key: &str, path: &Path| {
        std::fs::read(path).map_err(|_| {
            format!(
                "`server.tls.{key}` {} is not a readable file",
                path.display()
            )
        })
    };
    let (chain, key) = match (
        read("cert_path", &tls.cert_path),
        read("key_path", &tls.key_path),
    ) {
        (Ok(chain), Ok(key)) => (chain, key),
        (chain, key) => {
            problems.check(chain.map(drop));
            problems.check(key.map(drop));
            return;
        }
    };
    let chain = match CertificateDer::pem_slice_iter(&chain).collect::<Result<Vec<_>, _>>() {
        Ok(chain) if !chain.is_empty() => chain,
        Ok(_) => {
            return problems.push(format!(
                "`server.tls.cert_path` {}: no certificate in the file",
                tls.cert_path.display()
            ));
        }
        Err(e) => {
            return problems.push(format!(
                "`server.tls.cert_path` {}: {e}",
                tls.cert_path.display()
            ));
        }
    };
    let key = match PrivateKeyDer::from_pem_slice(&key) {
        Ok(key) => key,
        Err(e) => {
            return problems.push(format!(
                "`server.tls.key_path` {}: {e}",
                tls.key_path.display()
            ));
        }
    };
    if let Err(e) = rustls::sign::CertifiedKey::from_der(chain, key, &meridian_mesh::provider()) {
        problems.push(format!(
            "`server.tls.key_path` does not belong to `server.tls.cert_path`: {e}"
        ));
    }
}
