//! The gateway's side of the service mesh: mutual TLS on every connection
//! to a region (proxied requests through Pingora, health checks through
//! tonic), with the gateway's certificate reloaded when its files change.
//!
//! How each hop checks the region:
//! - Pingora verifies a server by DNS name only, so proxied connections use
//!   the region's DNS SAN `<region>.region.meridian` as SNI and verify
//!   name, against the mesh CA only (`peer.options.ca`). The CA issues that
//!   name together with the URI `spiffe://meridian/region/<region>/regional`.
//! - Health checks verify the same DNS name, then the URI SAN exactly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meridian_mesh::rustls::ClientConfig;
use meridian_mesh::{ArcSwap, CertFiles, Identity, Loaded, MeshConnector, Role};
use pingora_core::protocols::tls::CaType;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::utils::tls::{CertKey, WrappedX509, parse_x509};
use serde::Deserialize;
use tonic::transport::{Channel, Endpoint};

/// `[mesh]`: the gateway's certificate and the CA regions must chain to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// PEM bundle of the CA certificates regions' certificates must chain to.
    pub ca_path: Option<PathBuf>,
    /// PEM chain of this gateway, leaf first; its URI SAN must be
    /// `spiffe://meridian/gateway/<name>`.
    pub cert_path: Option<PathBuf>,
    /// PEM private key of `cert_path`.
    pub key_path: Option<PathBuf>,
    /// Talk to regions in plain text (h2c and HTTP/1.1), without
    /// certificates: for local debugging only, logged as a warning at start.
    pub plaintext: bool,
    /// How often the three files are checked for change, in milliseconds.
    pub reload_interval_ms: u64,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            ca_path: None,
            cert_path: None,
            key_path: None,
            plaintext: false,
            reload_interval_ms: 1_000,
        }
    }
}

impl MeshConfig {
    /// Plain text to regions (what [`crate::Config::new`] starts from).
    pub fn plaintext() -> Self {
        Self {
            plaintext: true,
            ..Self::default()
        }
    }

    /// Mutual TLS with these files.
    pub fn tls(files: CertFiles) -> Self {
        Self {
            ca_path: Some(files.ca_path),
            cert_path: Some(files.cert_path),
            key_path: Some(files.key_path),
            ..Self::default()
        }
    }

    /// The files, or `None` in plaintext mode; errors name the key.
    pub(crate) fn files(&self) -> Result<Option<CertFiles>, String> {
        if self.plaintext {
            return Ok(None);
        }
        if self.reload_interval_ms == 0 {
            return Err("`mesh.reload_interval_ms` must be at least 1".into());
        }
        let need = |key: &str, p: &Option<PathBuf>| -> Result<PathBuf, String> {
            let p = p.clone().ok_or_else(|| {
                format!(
                    "`mesh.{key}` is required: the gateway talks to regions over mutual TLS (make \
                     development certificates with `meridian certs`, or set \
                     `mesh.plaintext = true` for local debugging only)"
                )
            })?;
            if !p.is_file() {
                return Err(format!(
                    "`mesh.{key}` {} is not a readable file",
                    p.display()
                ));
            }
            Ok(p)
        };
        Ok(Some(CertFiles {
            ca_path: need("ca_path", &self.ca_path)?,
            cert_path: need("cert_path", &self.cert_path)?,
            key_path: need("key_path", &self.key_path)?,
        }))
    }
}

impl MeshConfig {
    /// Loads the files as [`Upstream::start`] does; errors name the key.
    pub(crate) fn check(&self) -> Result<(), String> {
        let Some(files) = self.files()? else {
            return Ok(());
        };
        let loaded = files.check("mesh")?;
        Material::build(&loaded)
            .map(drop)
            .map_err(|e| format!("`mesh.cert_path` {}: {e}", files.cert_path.display()))
    }
}

/// What one load of the files gives each kind of connection.
struct Material {
    /// The gateway's chain and key, as Pingora takes them.
    cert_key: Arc<CertKey>,
    /// The mesh CA, as Pingora takes it.
    ca: Arc<CaType>,
    /// For tonic (health checks).
    client: Arc<ClientConfig>,
}

impl Material {
    fn build(loaded: &Loaded) -> Result<Self, String> {
        if loaded.identity.role() != Role::Gateway {
            return Err(format!(
                "the certificate names {}, not a gateway (spiffe://meridian/gateway/<name>)",
                loaded.identity
            ));
        }
        let chain = loaded.chain.iter().map(|c| c.to_vec()).collect();
        let ca: Vec<WrappedX509> = loaded
            .ca_ders
            .iter()
            .map(|c| WrappedX509::new(c.to_vec(), parse_x509))
            .collect();
        Ok(Self {
            cert_key: Arc::new(CertKey::new(chain, loaded.key.secret_der().to_vec())),
            ca: ca.into(),
            client: Arc::new(meridian_mesh::client_config(loaded)?),
        })
    }
}

/// mTLS to regions, with the certificate current at each connect.
#[derive(Clone)]
pub(crate) struct Upstream {
    material: Arc<ArcSwap<Material>>,
}

impl Upstream {
    /// Loads the certificate and watches its files; `None` (announced
    /// loudly) in plaintext mode.
    pub(crate) fn start(config: &MeshConfig) -> Result<Option<Self>, String> {
        let Some(files) = config.files()? else {
            tracing::warn!(
                "mesh.plaintext = true: requests and health checks go to regions in plain text, \
                 unauthenticated; for local debugging only"
            );
            return Ok(None);
        };
        let interval = Duration::from_millis(config.reload_interval_ms);
        let material = meridian_mesh::watch(files, interval, Material::build)?;
        Ok(Some(Self { material }))
    }

    /// A TLS peer for `region`. Pingora's connector takes the client
    /// certificate and CA from the peer, so building them here on every
    /// try (two `Arc` clones) is what makes a rotated certificate reach new
    /// connections; the pool keys connections by certificate serial, so
    /// pooled ones made with the old certificate are still reused.
    pub(crate) fn peer(&self, address: SocketAddr, region: &str) -> HttpPeer {
        let material = self.material.load();
        let sni = meridian_mesh::region_server_name(region);
        let mut peer = HttpPeer::new(address, true, sni);
        peer.client_cert_key = Some(material.cert_key.clone());
        peer.options.ca = Some(material.ca.clone());
        peer.options.verify_cert = true;
        peer.options.verify_hostname = true;
        peer
    }

    /// A lazily connecting health-check channel to `region` that verifies
    /// its DNS name and its identity URI.
    pub(crate) fn channel(
        &self,
        region: &str,
        address: SocketAddr,
        timeout: Duration,
    ) -> Result<Channel, String> {
        let material = self.material.clone();
        let connector = MeshConnector::new(
            Arc::new(move || material.load().client.clone()),
            &meridian_mesh::region_server_name(region),
            Some(Identity::region(region)?),
        )?;
        Ok(Endpoint::from_shared(format!("http://{address}"))
            .expect("socket addresses make valid URIs")
            .connect_timeout(timeout)
            .connect_with_connector_lazy(connector))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const ONE: &str = "[[regions]]\nname = \"eu-west\"\naddress = \"127.0.0.1:7101\"\n";

    #[test]
    fn mtls_unless_plaintext() {
        let e = Config::from_toml(ONE, "g").unwrap_err().to_string();
        assert!(e.contains("`mesh.ca_path` is required"), "{e}");
        let e = Config::from_toml(&format!("{ONE}[mesh]\nca_path = \"/nope\"\n"), "g")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`mesh.ca_path` /nope is not a readable file"),
            "{e}"
        );
        let c = Config::from_toml(&format!("{ONE}[mesh]\nplaintext = true\n"), "g").unwrap();
        assert!(c.mesh.plaintext);
    }
}
