//! rustls configurations for the mesh, and a connector that gives tonic
//! channels mTLS with the certificate current at each connect.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::files::Loaded;
use crate::identity::Identity;

/// The crypto provider of every mesh config: ring, as in the rest of the
/// workspace, named explicitly so no process-wide default is needed.
pub fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A server config that demands a client certificate chaining to the mesh
/// CA and offers HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_config(loaded: &Loaded) -> Result<ServerConfig, String> {
    let provider = Arc::new(provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(loaded.roots.clone(), provider.clone())
            .build()
            .map_err(|e| format!("client verifier: {e}"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(loaded.chain.clone(), loaded.key.clone_key())
        .map_err(|e| format!("certificate: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A client config that presents this service's certificate and trusts
/// only the mesh CA; ALPN `h2` (gRPC).
pub fn client_config(loaded: &Loaded) -> Result<ClientConfig, String> {
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(loaded.roots.clone())
        .with_client_auth_cert(loaded.chain.clone(), loaded.key.clone_key())
        .map_err(|e| format!("certificate: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The identity in the certificate a TLS peer presented, if any.
pub fn peer_identity(
    certs: Option<&[rustls::pki_types::CertificateDer<'_>]>,
) -> Result<Identity, String> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or("the peer presented no certificate")?;
    Identity::from_cert_der(leaf)
}

/// Where a connector gets the client config current at connect time.
pub type ConfigSource = Arc<dyn Fn() -> Arc<ClientConfig> + Send + Sync>;

/// A tonic connector (`Endpoint::connect_with_connector_lazy`): TCP, then
/// TLS with the client config current at that moment (so a reconnect after
/// a rotation presents the new certificate), verifying the server's DNS
/// name and, when `expect` is set, that its URI SAN is exactly that
/// identity.
#[derive(Clone)]
pub struct MeshConnector {
    tls: ConfigSource,
    server_name: ServerName<'static>,
    expect: Option<Identity>,
}

impl std::fmt::Debug for MeshConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshConnector")
            .field("server_name", &self.server_name)
            .field("expect", &self.expect)
            .finish()
    }
}

impl MeshConnector {
    /// A connector to servers named `server_name` (a DNS name or IP);
    /// `tls` gives the client config to use for each new connection.
    pub fn new(
        tls: ConfigSource,
        server_name: &str,
        expect: Option<Identity>,
    ) -> Result<Self, String> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("{server_name:?}: {e}"))?;
        Ok(Self {
            tls,
            server_name,
            expect,
        })
    }
}

impl tower::Service<http::Uri> for MeshConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = (self.tls)();
        let name = self.server_name.clone();
        let expect = self.expect.clone();
        Box::pin(async move {
            let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("{uri}: no host")))?;
            let port = uri
                .port_u16()
                .ok_or_else(|| invalid(format!("{uri}: no port")))?;
            let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            if let Some(expect) = expect {
                let found = peer_identity(tls.get_ref().1.peer_certificates())
                    .map_err(std::io::Error::other)?;
                if found != expect {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!("server is {found}, expected {expect}"),
                    ));
                }
            }
            Ok(TokioIo::new(tls))
        })
    }
}
