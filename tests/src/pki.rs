//! Certificates for mTLS tests: a CA of the test's own, service
//! certificates written where a region or gateway config can point, and
//! client configs to call a region as any identity.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meridian_mesh::rustls::ClientConfig;
use meridian_mesh::{Ca, CertFiles, Identity, Loaded, MeshConnector};
use tonic::transport::{Channel, Endpoint};

/// A CA and a directory of certificates it issued, removed on drop.
pub struct TestPki {
    ca: Ca,
    dir: tempfile::TempDir,
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    /// A fresh CA.
    pub fn new() -> Self {
        Self {
            ca: Ca::generate("Meridian test CA").expect("a CA"),
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    /// Issues a certificate for `identity` and writes it (replacing any
    /// earlier one, as a rotation does); returns the files.
    pub fn write(&self, identity: &Identity) -> CertFiles {
        let stem = meridian_mesh::file_stem(identity);
        let issued = self
            .ca
            .issue(identity, Duration::from_secs(3600))
            .expect("a certificate");
        let ca_path = self.dir.path().join("ca.pem");
        std::fs::write(&ca_path, self.ca.cert_pem()).expect("CA written");
        let (cert_path, key_path) = issued
            .write(self.dir.path(), &stem)
            .expect("certificate written");
        CertFiles {
            ca_path,
            cert_path,
            key_path,
        }
    }

    /// A `[mesh]` section for region `name`, reloading every 100 ms.
    pub fn region_toml(&self, name: &str) -> String {
        let files = self.write(&Identity::region(name).expect("a region identity"));
        format!(
            "[mesh]\nca_path = {:?}\ncert_path = {:?}\nkey_path = {:?}\nreload_interval_ms = 100\n",
            files.ca_path.display().to_string(),
            files.cert_path.display().to_string(),
            files.key_path.display().to_string(),
        )
    }

    /// The gateway's mesh config, with a certificate for `spiffe://meridian/gateway/<name>`.
    pub fn gateway_mesh(&self, name: &str) -> meridian_gateway::MeshConfig {
        let mut mesh = meridian_gateway::MeshConfig::tls(
            self.write(&Identity::gateway(name).expect("a gateway identity")),
        );
        mesh.reload_interval_ms = 100;
        mesh
    }

    /// A client config presenting a fresh certificate for `identity` and
    /// trusting this CA, offering `alpn`.
    pub fn client(&self, identity: &Identity, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        self.client_issued_by(self, identity, alpn)
    }

    /// Like [`TestPki::client`], with the certificate issued by another CA
    /// (still trusting this one, so the server is the one to refuse).
    pub fn client_issued_by(
        &self,
        issuer: &TestPki,
        identity: &Identity,
        alpn: &[&[u8]],
    ) -> Arc<ClientConfig> {
        let issued = issuer
            .ca
            .issue(identity, Duration::from_secs(3600))
            .expect("a certificate");
        let loaded = Loaded::from_pem(
            self.ca.cert_pem().as_bytes(),
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
        )
        .expect("a certificate that loads");
        let mut config = meridian_mesh::client_config(&loaded).expect("a client config");
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(config)
    }

    /// A client config trusting this CA that presents no certificate.
    pub fn anonymous_client(&self) -> Arc<ClientConfig> {
        let mut roots = meridian_mesh::rustls::RootCertStore::empty();
        use meridian_mesh::rustls::pki_types::{CertificateDer, pem::PemObject};
        for der in CertificateDer::pem_slice_iter(self.ca.cert_pem().as_bytes()) {
            roots
                .add(der.expect("a PEM certificate"))
                .expect("the CA certificate");
        }
        let mut config = ClientConfig::builder_with_provider(Arc::new(meridian_mesh::provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }
}

/// A gRPC channel to `addr` over mTLS with `config`, verifying the server
/// as `server_name` (and as `expect`, when given).
pub fn mesh_channel(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    server_name: &str,
    expect: Option<Identity>,
) -> Channel {
    let connector = MeshConnector::new(Arc::new(move || config.clone()), server_name, expect)
        .expect("a valid server name");
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(connector)
}
