//! Retries that do not duplicate writes. Two regions behind a gateway whose
//! way to the first goes through a [`FaultProxy`]: the region receives a
//! job submission or a conversation turn and stores it, its answer is held
//! back, then the connection is reset. Without an `Idempotency-Key` the
//! gateway does not replay the write in the second region (one job, one
//! turn, and an error that says so); with one it does, and the second
//! region answers from what the first stored and replicated. A turn
//! repeated under its key in one region is answered from the store without
//! a model call; a connect failure is still retried for any request.
//!
//! The proxies' randomness is unused here (no drop rate); the seed is
//! printed anyway, as for every fault test.
//!
//! [`FaultProxy`]: meridian_tests::FaultProxy

use std::net::SocketAddr;
use std::time::Duration;

use meridian_gateway::{Gateway, RegionConfig};
use meridian_tests::replicated::{pool, seed, until};
use meridian_tests::{
    ClusterSandbox, Direction, FaultProxy, RegionSandbox, TEST_MODEL, init_logging, metric,
    start_gateway,
};
use serde_json::{Value, json};

const REGIONS: [&str; 2] = ["us-east", "eu-west"];
const WAIT: Duration = Duration::from_secs(15);

fn chat(content: &str, conversation: Option<&str>) -> Value {
    let mut body = json!({ "model": TEST_MODEL, "max_tokens": 6,
                           "messages": [{ "role": "user", "content": content }] });
    if let Some(c) = conversation {
        // In the body, where the gateway sees it only by reading it.
        body["conversation_id"] = json!(c);
    }
    body
}

/// A gateway over `first` (reached at `first_addr`) then `second`, with
/// `first` as its default region.
async fn gateway(first: (&str, SocketAddr), second: &RegionSandbox) -> Gateway {
    let mut config = meridian_gateway::Config::builder(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        vec![
            RegionConfig::new(first.0, first.1),
            RegionConfig::new(second.name.clone(), second.addr()),
        ],
    );
    config.threads = 1;
    config.shutdown_grace = Duration::ZERO;
    // Only the request under test goes through the proxy; a failed try
    // still ejects the region passively.
    config.health.interval_ms = 60_000;
    start_gateway(config).await
}

/// Two regions, replicated or not, behind a gateway that reaches the first
/// through a fault proxy; the regions' databases to count rows in.
struct Behind {
    a: sqlx::PgPool,
    b: sqlx::PgPool,
    gateway: Gateway,
    proxy: FaultProxy,
    /// Bound by every test (a pattern's `..` would drop it at once).
    _cluster: ClusterSandbox,
}

impl Behind {
    async fn start(replicated: bool) -> Self {
        let cluster = if replicated {
            ClusterSandbox::start_replicated(&REGIONS, "", |_, _| {}).await
        } else {
            ClusterSandbox::start(&REGIONS).await
        };
        let (first, second) = (&cluster.regions[0], &cluster.regions[1]);
        let proxy = FaultProxy::start(first.addr(), seed("IDEMPOTENT_REPLAY_SEED"))
            .await
            .expect("a fault proxy starts");
        let gateway = gateway((&first.name, proxy.addr()), second).await;
        let (a, b) = (pool(first).await, pool(second).await);
        Self {
            a,
            b,
            gateway,
            proxy,
            _cluster: cluster,
        }
    }
}

async fn count(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .expect("a count")
}

/// What the client got.
struct Reply {
    status: u16,
    replayed: Option<String>,
    body: Value,
}

/// POSTs `body` to `path` of the gateway; once the first region has stored
/// the write (`stored` holds) its connection is reset, before the answer
/// reached the gateway.
async fn reset_after_store<F, Fut>(
    gateway: &Gateway,
    proxy: &FaultProxy,
    path: &str,
    headers: &[(&str, &str)],
    body: Value,
    stored: F,
) -> Reply
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    proxy.heal();
    proxy.cut(Direction::BtoA);
    let mut req = reqwest::Client::new()
        .post(format!("http://{}{path}", gateway.local_addr()))
        .json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let sent = tokio::spawn(async move {
        let res = req.send().await.expect("the gateway answers");
        let status = res.status().as_u16();
        let replayed = res
            .headers()
            .get("x-meridian-replayed")
            .map(|v| v.to_str().unwrap().to_string());
        let body = res.json::<Value>().await.expect("a JSON body");
        Reply {
            status,
            replayed,
            body,
        }
    });
    until(WAIT, "the first region stores the write", stored).await;
    proxy.cut_all();
    let reply = sent.await.expect("the client task does not panic");
    assert!(proxy.stats().cut >= 1, "the proxy reset the connection");
    reply
}

async fn not_replayed_metric(gateway: &Gateway) -> f64 {
    let admin = gateway.admin_addr().expect("an admin port");
    metric(
        &format!("http://{admin}/metrics"),
        "meridian_gateway_retries_total",
        &["outcome=\"not_replayed\""],
    )
    .await
}

#[tokio::test]
async fn a_job_sent_to_a_region_that_reset_is_not_replayed_without_a_key() {
    init_logging();
    let Behind {
        proxy,
        gateway,
        a,
        b,
        _cluster,
        ..
    } = Behind::start(false).await;
    let jobs = "SELECT count(*) FROM jobs";

    let reply = reset_after_store(
        &gateway,
        &proxy,
        "/v1/jobs",
        &[],
        chat("once", None),
        || {
            let a = a.clone();
            async move { count(&a, jobs).await == 1 }
        },
    )
    .await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.replayed.as_deref(), Some("no"));
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("not replayed"), "{message}");
    assert!(message.contains("idempotency-key"), "{message}");
    assert_eq!(count(&a, jobs).await + count(&b, jobs).await, 1);
    assert_eq!(not_replayed_metric(&gateway).await, 1.0);
}

#[tokio::test]
async fn a_keyed_job_is_replayed_and_found_by_its_key_in_the_next_region() {
    init_logging();
    let Behind {
        proxy,
        gateway,
        a,
        b,
        _cluster,
        ..
    } = Behind::start(true).await;
    let keyed = "SELECT count(*) FROM jobs WHERE idempotency_key = 'job-1'";

    // The first region's job reaches the second before the reset, so the
    // replay there can find it.
    let reply = reset_after_store(
        &gateway,
        &proxy,
        "/v1/jobs",
        &[("idempotency-key", "job-1")],
        chat("once", None),
        || {
            let (a, b) = (a.clone(), b.clone());
            async move { count(&a, keyed).await == 1 && count(&b, keyed).await == 1 }
        },
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM jobs WHERE idempotency_key = 'job-1'")
        .fetch_one(&a)
        .await
        .unwrap();
    assert_eq!(reply.body["id"], id.to_string(), "the first region's job");
    assert_eq!(count(&a, "SELECT count(*) FROM jobs").await, 1);
    assert_eq!(count(&b, "SELECT count(*) FROM jobs").await, 1);
    assert_eq!(not_replayed_metric(&gateway).await, 0.0);
}

#[tokio::test]
async fn a_turn_sent_to_a_region_that_reset_is_not_replayed_without_a_key() {
    init_logging();
    let Behind {
        proxy,
        gateway,
        a,
        b,
        _cluster,
        ..
    } = Behind::start(false).await;
    let messages = "SELECT count(*) FROM conversation_messages";

    let body = chat("hello", Some("conv-1"));
    let reply = reset_after_store(&gateway, &proxy, "/v1/chat/completions", &[], body, || {
        let a = a.clone();
        async move { count(&a, messages).await == 2 }
    })
    .await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.replayed.as_deref(), Some("no"));
    assert_eq!(count(&a, messages).await, 2, "the turn, stored once");
    assert_eq!(count(&b, messages).await, 0, "and not again elsewhere");
    assert_eq!(not_replayed_metric(&gateway).await, 1.0);
}

#[tokio::test]
async fn a_chat_that_names_no_conversation_is_replayed_without_a_key() {
    init_logging();
    let Behind {
        proxy,
        gateway,
        _cluster,
        ..
    } = Behind::start(false).await;

    // It stores nothing: once it was sent, a replay is safe.
    let before = proxy.stats().bytes_a_to_b;
    let reply = reset_after_store(
        &gateway,
        &proxy,
        "/v1/chat/completions",
        &[],
        chat("stateless", None),
        || {
            let sent = proxy.stats().bytes_a_to_b > before;
            async move { sent }
        },
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.replayed, None);
    assert_eq!(not_replayed_metric(&gateway).await, 0.0);
}

#[tokio::test]
async fn a_keyed_turn_is_replayed_and_answered_from_the_stored_turn() {
    init_logging();
    let Behind {
        proxy,
        gateway,
        a,
        b,
        _cluster,
        ..
    } = Behind::start(true).await;
    let keyed = "SELECT count(*) FROM conversation_messages WHERE idempotency_key = 'turn-1'";

    let reply = reset_after_store(
        &gateway,
        &proxy,
        "/v1/chat/completions",
        &[("idempotency-key", "turn-1")],
        chat("hello", Some("conv-2")),
        || {
            let (a, b) = (a.clone(), b.clone());
            async move { count(&a, keyed).await == 2 && count(&b, keyed).await == 2 }
        },
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let stored: String = sqlx::query_scalar(
        "SELECT content FROM conversation_messages
          WHERE idempotency_key = 'turn-1' AND role = 'assistant'",
    )
    .fetch_one(&a)
    .await
    .unwrap();
    assert_eq!(reply.body["choices"][0]["message"]["content"], stored);
    let all = "SELECT count(*) FROM conversation_messages";
    assert_eq!(count(&a, all).await, 2);
    assert_eq!(count(&b, all).await, 2, "the replay stored nothing");
}

async fn turn(url: &str, key: &str, content: &str) -> (u16, Value) {
    let res = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .header("x-meridian-tenant", "acme")
        .header("x-meridian-conversation", "conv-3")
        .header("idempotency-key", key)
        .json(&chat(content, None))
        .send()
        .await
        .expect("the region answers");
    (res.status().as_u16(), res.json().await.expect("JSON"))
}

#[tokio::test]
async fn a_turn_repeated_under_its_key_is_answered_from_the_store() {
    init_logging();
    let region = RegionSandbox::start("eu-west").await;
    let db = pool(&region).await;
    let calls = || region.metric("meridian_upstream_attempts_total", &[]);

    let (status, first) = turn(&region.url(), "k-1", "hello").await;
    assert_eq!(status, 200, "{first}");
    let called = calls().await;
    let (status, again) = turn(&region.url(), "k-1", "hello").await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        again["choices"][0]["message"]["content"],
        first["choices"][0]["message"]["content"]
    );
    assert_eq!(calls().await, called, "no model call for a repeat");
    let messages = "SELECT count(*) FROM conversation_messages";
    assert_eq!(count(&db, messages).await, 2, "one turn stored");

    // The key with other messages is a conflict, and stores nothing.
    let (status, reused) = turn(&region.url(), "k-1", "something else").await;
    assert_eq!(status, 409, "{reused}");
    assert_eq!(reused["error"]["type"], "conflict_error");
    assert_eq!(count(&db, messages).await, 2);

    // Another key is another turn.
    let (status, _) = turn(&region.url(), "k-2", "hello").await;
    assert_eq!(status, 200);
    assert_eq!(count(&db, messages).await, 4);

    let (status, long) = turn(&region.url(), &"k".repeat(256), "hello").await;
    assert_eq!(status, 400, "{long}");
}

#[tokio::test]
async fn a_write_whose_region_refused_the_connection_is_still_retried() {
    init_logging();
    let cluster = ClusterSandbox::start(&REGIONS).await;
    let (first, second) = (&cluster.regions[0], &cluster.regions[1]);
    let closed = SocketAddr::from((
        [127, 0, 0, 1],
        meridian_launcher::free_port().expect("a free port"),
    ));
    let gateway = gateway((&first.name, closed), second).await;
    let b = pool(second).await;

    let res = reqwest::Client::new()
        .post(format!("http://{}/v1/jobs", gateway.local_addr()))
        .json(&chat("once", None))
        .send()
        .await
        .expect("the gateway answers");
    assert_eq!(res.status(), 202);
    assert_eq!(res.headers()["x-meridian-region"], second.name.as_str());
    assert_eq!(res.headers()["x-meridian-route"], "failover");
    assert_eq!(count(&b, "SELECT count(*) FROM jobs").await, 1);

    let res = reqwest::Client::new()
        .post(format!(
            "http://{}/v1/chat/completions",
            gateway.local_addr()
        ))
        .header("x-meridian-conversation", "conv-4")
        .json(&chat("hello", None))
        .send()
        .await
        .expect("the gateway answers");
    assert_eq!(res.status(), 200);
    assert_eq!(not_replayed_metric(&gateway).await, 0.0);
}

#[tokio::test]
async fn a_grpc_turn_sent_to_a_region_that_reset_is_not_replayed_without_a_key() {
    use meridian_proto::v1::inference_client::InferenceClient;
    use meridian_proto::v1::{ChatMessage, GenerateRequest};

    init_logging();
    let Behind {
        proxy,
        gateway,
        a,
        b,
        _cluster,
        ..
    } = Behind::start(false).await;
    let messages = "SELECT count(*) FROM conversation_messages";

    proxy.cut(Direction::BtoA);
    let url = format!("http://{}", gateway.local_addr());
    let sent = tokio::spawn(async move {
        let mut client = InferenceClient::connect(url).await.expect("h2c");
        // The conversation is named in the message only: the gateway finds
        // it by decoding the buffered request.
        client
            .generate(GenerateRequest {
                model: TEST_MODEL.into(),
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: "over grpc".into(),
                    ..Default::default()
                }],
                max_tokens: Some(6),
                conversation_id: "conv-grpc".into(),
                ..Default::default()
            })
            .await
    });
    until(WAIT, "the first region stores the turn", || {
        let a = a.clone();
        async move { count(&a, messages).await == 2 }
    })
    .await;
    proxy.cut_all();
    let status = sent
        .await
        .expect("the client task does not panic")
        .expect_err("the turn is not replayed");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get("x-meridian-replayed")
            .map(|v| v.to_str().unwrap()),
        Some("no")
    );
    assert_eq!(count(&a, messages).await, 2);
    assert_eq!(count(&b, messages).await, 0);
    assert_eq!(not_replayed_metric(&gateway).await, 1.0);
}
