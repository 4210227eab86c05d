//! Clients reach the gateway over TLS (rustls), with HTTP/1.1 or HTTP/2
//! chosen by ALPN, next to the cleartext listener.

use std::sync::Arc;

use meridian_gateway::TlsConfig;
use meridian_tests::{ClusterSandbox, TEST_MODEL, init_logging};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_http1_and_http2() {
    init_logging();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (
        dir.path().join("gateway.pem"),
        dir.path().join("gateway.key"),
    );
    std::fs::write(&cert_path, key.cert.pem()).unwrap();
    std::fs::write(&key_path, key.signing_key.serialize_pem()).unwrap();
    let port = meridian_launcher_port();
    let sandbox = ClusterSandbox::start_with(&["eu-west"], |c| {
        c.tls = Some(TlsConfig {
            listen: ([127, 0, 0, 1], port).into(),
            cert_path: cert_path.clone(),
            key_path: key_path.clone(),
        });
    })
    .await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(key.cert.der().clone()).unwrap();
    for (alpn, version) in [
        (b"h2".to_vec(), http::Version::HTTP_2),
        (b"http/1.1".to_vec(), http::Version::HTTP_11),
    ] {
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        tls.alpn_protocols = vec![alpn];
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .build()
            .unwrap();
        let res = client
            .post(format!("https://localhost:{port}/v1/chat/completions"))
            .json(&json!({ "model": TEST_MODEL, "messages": [{ "role": "user", "content": "secure" }] }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.version(), version);
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-meridian-region"], "eu-west");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion");
    }
    // The cleartext listener still serves.
    let res = reqwest::Client::new()
        .get(format!("{}/v1/models", sandbox.gateway_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

fn meridian_launcher_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
