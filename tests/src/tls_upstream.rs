//! An upstream served over HTTPS, as hosted providers are: a TLS terminator
//! with a certificate from a test CA (naming `localhost`), in front of any
//! plain HTTP server (a [`crate::SimServer`]), optionally demanding a client
//! certificate from that CA. It records the protocol each connection
//! negotiated by ALPN.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use meridian_mesh::rustls::ServerConfig;
use meridian_mesh::tokio_rustls::TlsAcceptor;
use meridian_mesh::{CertFiles, Identity, Loaded};

use crate::TestPki;

/// A TLS terminator on a free port; stops accepting when dropped.
pub struct TlsUpstream {
    addr: SocketAddr,
    alpn: Arc<Mutex<Vec<String>>>,
    ca_file: String,
    task: tokio::task::JoinHandle<()>,
}

impl TlsUpstream {
    /// Terminates TLS for `backend` with a certificate `pki` issues; with
    /// `client_auth`, a handshake without a client certificate from `pki`'s
    /// CA fails.
    pub async fn start(pki: &TestPki, backend: SocketAddr, client_auth: bool) -> Self {
        let files = pki.write(&Identity::gateway("tls-upstream").expect("an identity"));
        let config = Arc::new(server_config(&files, client_auth));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let alpn = Arc::new(Mutex::new(Vec::new()));
        let seen = alpn.clone();
        let acceptor = TlsAcceptor::from(config);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let seen = seen.clone();
                // Ends when either side closes; a failed handshake is the
                // client's to see.
                // Small TLS records and HTTP/2 frames would otherwise wait
                // on Nagle's algorithm for the peer's delayed ACK: tens of
                // milliseconds no real provider adds.
                let _ = tcp.set_nodelay(true);
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let protocol = tls.get_ref().1.alpn_protocol().unwrap_or(b"none");
                    seen.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(protocol).into_owned());
                    let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = plain.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Self {
            addr,
            alpn,
            ca_file: files.ca_path.display().to_string(),
            task,
        }
    }

    /// The `base_url` a region's config names: by the name the certificate
    /// carries.
    pub fn base_url(&self) -> String {
        format!("https://localhost:{}/v1", self.addr.port())
    }

    /// The PEM file of the CA that issued its certificate, for `ca_file`.
    pub fn ca_file(&self) -> &str {
        &self.ca_file
    }

    /// The ALPN protocol of each connection that completed its handshake.
    pub fn negotiated(&self) -> Vec<String> {
        self.alpn.lock().unwrap().clone()
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn server_config(files: &CertFiles, client_auth: bool) -> ServerConfig {
    let read = |p: &std::path::Path| std::fs::read(p).expect("a certificate file");
    let loaded = Loaded::from_pem(
        &read(&files.ca_path),
        &read(&files.cert_path),
        &read(&files.key_path),
    )
    .expect("certificates that load");
    if client_auth {
        return meridian_mesh::server_config(&loaded).expect("a server config");
    }
    let mut config = ServerConfig::builder_with_provider(Arc::new(meridian_mesh::provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(loaded.chain, loaded.key)
        .expect("a server certificate");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}
