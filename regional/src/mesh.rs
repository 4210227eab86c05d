//! The node's side of the service mesh: mutual TLS on its one port, the
//! caller's verified identity on every request, and the authorisation
//! table. Identities, certificate files and rustls configs come from
//! `meridian-mesh`, shared with the gateway and the CLI.

mod config;
mod operator;
mod policy;
mod serve;

use std::sync::Arc;

use axum::Router;
use meridian_mesh::{ArcSwap, rustls::ServerConfig};

pub use self::config::{AllowRule, Mesh, MeshConfig, PolicyConfig};
pub(crate) use self::policy::{ADMIN, Peer, classify, is_read};
pub(crate) use self::serve::serve;

use crate::error::Error;

/// Loads the node's certificate and starts watching its files; `None` in
/// plaintext mode, which is announced loudly.
pub(crate) fn server_tls(
    mesh: &Mesh,
    region: &str,
) -> Result<Option<Arc<ArcSwap<ServerConfig>>>, Error> {
    let (files, interval) = match mesh {
        Mesh::Plaintext => {
            tracing::warn!(
                region,
                "mesh.plaintext = true: internal traffic is NOT authenticated or encrypted, the \
                 mesh policy is off and any caller may name a tenant; for local debugging only"
            );
            return Ok(None);
        }
        Mesh::Tls {
            files,
            reload_interval,
            ..
        } => (files.clone(), *reload_interval),
    };
    let config_error = |message: String| Error::Config {
        origin: "mesh".into(),
        message,
    };
    let expected = meridian_mesh::Identity::region(region).map_err(config_error)?;
    let check = files.clone();
    let tls = meridian_mesh::watch(files, interval, move |loaded| {
        // A node must not serve under another service's name: the
        // gateway would trust it as that region.
        if loaded.identity != expected {
            return Err(format!(
                "{} names {}, not {expected}",
                check.cert_path.display(),
                loaded.identity
            ));
        }
        meridian_mesh::server_config(loaded)
    })
    .map_err(config_error)?;
    Ok(Some(tls))
}

/// Puts the authorisation table in front of `app` when identities exist,
/// and in front of that the check of operator tokens (with or without a
/// mesh: a token holder's role holds either way).
pub(crate) fn protect(app: Router, mesh: &Mesh, pool: sqlx::PgPool) -> Router {
    let app = match mesh {
        Mesh::Plaintext => app,
        Mesh::Tls { policy, .. } => app.layer(axum::middleware::from_fn_with_state(
            Arc::new(policy::Policy::new(policy)),
            policy::enforce,
        )),
    };
    app.layer(axum::middleware::from_fn_with_state(
        pool,
        operator::authenticate,
    ))
}
