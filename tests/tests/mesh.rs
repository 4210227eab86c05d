//! The service mesh against real regions: mutual TLS on the region's port,
//! the default authorisation table in both directions, the tenant header
//! reserved to gateways, certificate rotation without restart, and the
//! gateway proxying and health-checking over mTLS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_gateway::RegionConfig;
use meridian_mesh::rustls::ClientConfig;
use meridian_mesh::{Identity, region_server_name};
use meridian_proto::v1::admin_client::AdminClient;
use meridian_proto::v1::inference_client::InferenceClient;
use meridian_proto::v1::replication_client::ReplicationClient;
use meridian_proto::v1::{
    AckRequest, ChatMessage, DrainRequest, GenerateRequest, ListModelsRequest, RegionStatusRequest,
};
use meridian_tests::{
    ClusterSandbox, RegionSandbox, TEST_MODEL, TestPki, init_logging, mesh_channel,
};
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const TENANT: &str = "x-meridian-tenant";

fn gateway() -> Identity {
    Identity::gateway("edge-1").unwrap()
}
fn operator() -> Identity {
    Identity::operator("alice").unwrap()
}

/// A channel to `region` as `config`'s identity, checking the region's
/// name and identity as the gateway does.
fn channel(region: &RegionSandbox, config: Arc<ClientConfig>) -> Channel {
    mesh_channel(
        region.addr(),
        config,
        &region_server_name(&region.name),
        Some(Identity::region(&region.name).unwrap()),
    )
}

fn https(config: Arc<ClientConfig>) -> reqwest::Client {
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .build()
        .unwrap()
}

async fn health(ch: Channel) -> Result<i32, tonic::Status> {
    HealthClient::new(ch)
        .check(HealthCheckRequest::default())
        .await
        .map(|r| r.into_inner().status)
}

async fn list_models(ch: Channel) -> Code {
    code(
        InferenceClient::new(ch)
            .list_models(ListModelsRequest {})
            .await,
    )
}
async fn region_status(ch: Channel) -> Code {
    code(
        AdminClient::new(ch)
            .region_status(RegionStatusRequest {})
            .await,
    )
}
async fn drain(ch: Channel, drain: bool) -> Code {
    code(AdminClient::new(ch).drain(DrainRequest { drain }).await)
}
/// An Ack on behalf of `us-east`.
async fn replicate(ch: Channel) -> Code {
    replicate_as(ch, "us-east").await
}

async fn replicate_as(ch: Channel, peer_region: &str) -> Code {
    let ack = AckRequest {
        peer_region: peer_region.into(),
        applied_sequence: 0,
    };
    code(ReplicationClient::new(ch).ack(ack).await)
}

fn assert_transport_refusal(e: &tonic::Status) {
    assert!(
        matches!(
            e.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ) && std::error::Error::source(e).is_some(),
        "expected a refused connection, got {e:?}"
    );
}

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused() {
    init_logging();
    let pki = TestPki::new();
    let region = RegionSandbox::start_with_config("eu-west", &pki.region_toml("eu-west")).await;
    let ok = pki.client(&gateway(), &[b"h2"]);
    assert_eq!(health(channel(&region, ok.clone())).await.unwrap(), 1);

    // No client certificate: the handshake is refused. In TLS 1.3 the
    // client finishes first and learns it at its first read, from the
    // server's alert or the closed connection (whichever it reads first),
    // so the error is a transport one, never an answer.
    let e = health(channel(&region, pki.anonymous_client()))
        .await
        .unwrap_err();
    assert_transport_refusal(&e);
    // A certificate from another CA, naming a gateway: refused too.
    let other = pki.client_issued_by(&TestPki::new(), &gateway(), &[b"h2"]);
    let e = health(channel(&region, other)).await.unwrap_err();
    assert_transport_refusal(&e);
    // Plain text on the TLS port: nothing is served.
    let plain = tonic::transport::Endpoint::from_shared(region.url())
        .unwrap()
        .connect_lazy();
    assert!(health(plain).await.is_err());
    // reqwest's default client needs a process-wide provider.
    let _ = meridian_mesh::provider().install_default();
    assert!(
        reqwest::get(format!("{}/v1/models", region.url()))
            .await
            .is_err()
    );

    // The right CA and a known identity, but not allowed: PERMISSION_DENIED
    // for gRPC, 403 in OpenAI's shape for HTTP.
    let op = pki.client(&operator(), &[b"h2"]);
    assert_eq!(
        list_models(channel(&region, op.clone())).await,
        Code::PermissionDenied
    );
    let res = https(op)
        .get(format!(
            "https://localhost:{}/v1/models",
            region.addr().port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["type"], "permission_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("spiffe://meridian/operator/alice")
    );

    // The client side checks the server's identity: eu-west is not us-east.
    let impostor = mesh_channel(
        region.addr(),
        ok,
        &region_server_name("eu-west"),
        Some(Identity::region("us-east").unwrap()),
    );
    assert!(health(impostor).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_policy_both_ways() {
    init_logging();
    let pki = TestPki::new();
    let region = RegionSandbox::start_with_config("eu-west", &pki.region_toml("eu-west")).await;
    let gw = channel(&region, pki.client(&gateway(), &[b"h2"]));
    let peer = channel(
        &region,
        pki.client(&Identity::region("us-east").unwrap(), &[b"h2"]),
    );
    let op = channel(&region, pki.client(&operator(), &[b"h2"]));

    // Gateways: client traffic and RegionStatus, not replication or Drain.
    assert_eq!(list_models(gw.clone()).await, Code::Ok);
    assert_eq!(region_status(gw.clone()).await, Code::Ok);
    assert_eq!(drain(gw.clone(), true).await, Code::PermissionDenied);
    assert_eq!(replicate(gw.clone()).await, Code::PermissionDenied);
    let res = https(pki.client(&gateway(), &[]))
        .post(format!(
            "https://localhost:{}/v1/chat/completions",
            region.addr().port()
        ))
        .json(&json!({ "model": TEST_MODEL, "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // Regions: replication, for themselves only; not inference or admin.
    assert_eq!(replicate(peer.clone()).await, Code::Ok);
    assert_eq!(
        replicate_as(peer.clone(), "ap-south").await,
        Code::PermissionDenied
    );
    assert_eq!(list_models(peer.clone()).await, Code::PermissionDenied);
    assert_eq!(region_status(peer.clone()).await, Code::PermissionDenied);

    // Operators: admin, including Drain; not inference or replication.
    assert_eq!(list_models(op.clone()).await, Code::PermissionDenied);
    assert_eq!(replicate(op.clone()).await, Code::PermissionDenied);
    assert_eq!(drain(op.clone(), true).await, Code::Ok);
    assert_eq!(drain(op.clone(), false).await, Code::Ok);

    // Health is open to every authenticated peer.
    for ch in [gw, peer, op] {
        assert_eq!(health(ch).await.unwrap(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_gateways_name_tenants() {
    init_logging();
    let pki = TestPki::new();
    // Operators may use the HTTP API here, so the tenant header is the only
    // difference between the two callers.
    let policy = "[mesh.policy]\nallow = [\n\
        { identity = \"spiffe://meridian/gateway/*\", services = [\"http\", \"meridian.v1.Inference\"] },\n\
        { identity = \"spiffe://meridian/operator/*\", services = [\"http\", \"meridian.v1.Inference\"] },\n]\n";
    let region = RegionSandbox::start_with_config(
        "eu-west",
        &format!("{}{policy}", pki.region_toml("eu-west")),
    )
    .await;
    let url = format!("https://localhost:{}/v1/models", region.addr().port());
    let get = |client: reqwest::Client, tenant: Option<&'static str>| {
        let url = url.clone();
        async move {
            let mut req = client.get(url);
            if let Some(t) = tenant {
                req = req.header(TENANT, t);
            }
            req.send().await.unwrap()
        }
    };
    let gw = https(pki.client(&gateway(), &[]));
    let op = https(pki.client(&operator(), &[]));
    assert_eq!(get(gw.clone(), Some("acme")).await.status(), 200);
    assert_eq!(get(op.clone(), None).await.status(), 200);
    let forged = get(op, Some("acme")).await;
    assert_eq!(forged.status(), 403);
    let body: Value = forged.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("may not name a tenant"),
        "{body}"
    );

    // The same over gRPC metadata.
    let mut req = tonic::Request::new(ListModelsRequest {});
    req.metadata_mut().insert(TENANT, "acme".parse().unwrap());
    let op = channel(&region, pki.client(&operator(), &[b"h2"]));
    let e = InferenceClient::new(op).list_models(req).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let mut req = tonic::Request::new(ListModelsRequest {});
    req.metadata_mut().insert(TENANT, "acme".parse().unwrap());
    let gw = channel(&region, pki.client(&gateway(), &[b"h2"]));
    InferenceClient::new(gw).list_models(req).await.unwrap();
}

/// The serial of the certificate the region presents to a new connection.
async fn served_serial(region: &RegionSandbox, config: Arc<ClientConfig>) -> String {
    let tcp = tokio::net::TcpStream::connect(region.addr()).await.unwrap();
    let name = meridian_mesh::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = meridian_mesh::tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    let certs = tls.get_ref().1.peer_certificates().unwrap();
    meridian_mesh::serial_of(&certs[0]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_restart() {
    init_logging();
    let pki = TestPki::new();
    let region = RegionSandbox::start_with_config("eu-west", &pki.region_toml("eu-west")).await;
    let config = pki.client(&gateway(), &[b"h2"]);
    let before = served_serial(&region, config.clone()).await;
    // A connection made before the rotation.
    let old = channel(&region, config.clone());
    assert_eq!(list_models(old.clone()).await, Code::Ok);

    pki.write(&Identity::region("eu-west").unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let serial = served_serial(&region, config.clone()).await;
        if serial != before {
            break serial;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(after, before);
    // The old connection goes on; new ones are served with the new certificate.
    assert_eq!(list_models(old).await, Code::Ok);
    assert_eq!(list_models(channel(&region, config)).await, Code::Ok);
}

async fn routing(sandbox: &ClusterSandbox, name: &str) -> Value {
    let all: Value = reqwest::get(format!("{}/routing", sandbox.admin_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    all["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap()
        .clone()
}

/// Waits until `check` holds for region `name` in the gateway's table.
async fn until(sandbox: &ClusterSandbox, name: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = routing(sandbox, name).await;
        if check(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "{name}: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_proxies_and_checks_health_over_mtls() {
    init_logging();
    let pki = TestPki::new();
    let sandbox = ClusterSandbox::start_configured(
        &["eu-west"],
        |name| pki.region_toml(name),
        |regions, c| {
            c.mesh = pki.gateway_mesh("edge-1");
            // An impostor: eu-west's address under another region's name.
            // The gateway must refuse it (its certificate names eu-west).
            c.regions
                .push(RegionConfig::new("us-east", regions[0].addr()));
        },
    )
    .await;

    // Health checks pass over mTLS (latency is measured by checks only),
    // and the impostor is ejected.
    until(&sandbox, "eu-west", |r| {
        r["ewma_latency_ms"].as_f64().unwrap() > 0.0
    })
    .await;
    until(&sandbox, "us-east", |r| r["healthy"] == false).await;

    let client = reqwest::Client::new();
    for (pin, status) in [("eu-west", 200), ("us-east", 502)] {
        let res = client
            .post(format!("{}/v1/chat/completions", sandbox.gateway_url()))
            .header("x-meridian-region", pin)
            .json(
                &json!({ "model": TEST_MODEL, "messages": [{ "role": "user", "content": "hi" }] }),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status, "pinned to {pin}");
        if status == 200 {
            assert_eq!(res.headers()["x-meridian-served-by"], "eu-west");
        }
    }

    // gRPC through the gateway: h2c from the client, mTLS h2 upstream.
    let ch = tonic::transport::Endpoint::from_shared(sandbox.gateway_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut req = tonic::Request::new(GenerateRequest {
        model: TEST_MODEL.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "hi".into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-meridian-region", "eu-west".parse().unwrap());
    let res = InferenceClient::new(ch.clone())
        .generate(req)
        .await
        .unwrap();
    assert_eq!(
        res.metadata().get("x-meridian-served-by").unwrap(),
        "eu-west"
    );
    let mut req = tonic::Request::new(ListModelsRequest {});
    req.metadata_mut()
        .insert("x-meridian-region", "eu-west".parse().unwrap());
    InferenceClient::new(ch).list_models(req).await.unwrap();

    // RegionStatus, which the gateway may call, carries a drain set by an
    // operator, who may.
    let op = channel(&sandbox.regions[0], pki.client(&operator(), &[b"h2"]));
    assert_eq!(drain(op, true).await, Code::Ok);
    until(&sandbox, "eu-west", |r| r["draining"] == true).await;
}

/// Operator tokens stand in for an operator's certificate on the
/// management API, over any mesh connection (a gateway passes operators'
/// calls on): an admin token writes and is audited by name, a read-only
/// one only reads, and an unknown, revoked or API-key bearer is refused
/// with 401 / `UNAUTHENTICATED`. Without a token the policy holds as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_tokens_stand_in_for_an_operator_certificate() {
    init_logging();
    let pki = TestPki::new();
    let region = RegionSandbox::start_with_config("eu-west", &pki.region_toml("eu-west")).await;
    let base = format!("https://localhost:{}/admin/v1", region.addr().port());
    let op = https(pki.client(&operator(), &[]));
    let gw = https(pki.client(&gateway(), &[]));
    let make = |role: &'static str, name: &'static str| {
        let (op, base) = (op.clone(), base.clone());
        async move {
            let res = op
                .post(format!("{base}/operator-tokens"))
                .json(&json!({ "name": name, "role": role }))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 201);
            res.json::<Value>().await.unwrap()
        }
    };
    let admin = make("admin", "terraform").await;
    let viewer = make("read-only", "dashboards").await;
    let admin_token = admin["token"].as_str().unwrap().to_string();
    let viewer_token = viewer["token"].as_str().unwrap().to_string();
    assert!(
        admin_token.starts_with("mop-")
            && admin_token.starts_with(admin["prefix"].as_str().unwrap())
    );
    let put = |bearer: Option<String>| {
        let (gw, base) = (gw.clone(), base.clone());
        async move {
            let mut req = gw
                .put(format!("{base}/tenants/acme"))
                .json(&json!({ "display_name": "Acme" }));
            if let Some(b) = bearer {
                req = req.bearer_auth(b);
            }
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };

    // The gateway's identity alone may not call the management API.
    let (status, body) = put(None).await;
    assert_eq!(status, 403, "{body}");
    // With an admin token it may, and the audit log names the token.
    let (status, body) = put(Some(admin_token.clone())).await;
    assert_eq!(status, 201, "{body}");
    let audit: Value = op
        .get(format!("{base}/audit?limit=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        audit["data"][0]["actor"], "token:terraform via spiffe://meridian/gateway/edge-1",
        "{audit}"
    );
    // A read-only token reads and may not write.
    let res = gw
        .get(format!("{base}/tenants/acme"))
        .bearer_auth(&viewer_token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (status, body) = put(Some(viewer_token.clone())).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("may only read"),
        "{body}"
    );
    // Unknown tokens and API keys are 401s naming the problem.
    // The token with its last character changed (to one it is not).
    let (kept, last) = admin_token.split_at(admin_token.len() - 1);
    let other = if last == "x" { "y" } else { "x" };
    let (status, body) = put(Some(format!("{kept}{other}"))).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (401, &json!("invalid_operator_token")),
        "{body}"
    );
    let (status, body) = put(Some("mk-not-an-operator-token".into())).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("API keys may not"),
        "{body}"
    );

    // The same over gRPC: the token as metadata.
    let grpc = |token: &str| {
        let mut req = tonic::Request::new(meridian_proto::v1::PutTenantRequest {
            id: "globex".into(),
            ..Default::default()
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        req
    };
    let admin_client = || AdminClient::new(channel(&region, pki.client(&gateway(), &[b"h2"])));
    admin_client().put_tenant(grpc(&admin_token)).await.unwrap();
    let e = admin_client()
        .put_tenant(grpc(&viewer_token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = admin_client()
        .put_tenant(grpc("mop-unknown"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");

    // Revoked, a token stops at once in the region that checks it.
    let id = admin["id"].as_str().unwrap();
    let res = op
        .delete(format!("{base}/operator-tokens/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (status, body) = put(Some(admin_token)).await;
    assert_eq!(status, 401, "{body}");
    let listed: Value = op
        .get(format!("{base}/operator-tokens"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<(&str, bool)> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["revoked_at"].is_string()))
        .collect();
    assert_eq!(names, [("dashboards", false), ("terraform", true)]);
    assert!(!listed.to_string().contains(&viewer_token), "{listed}");
}
