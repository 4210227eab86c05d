//! Synchronous durability, three regions each with its own Redis and
//! PostgreSQL: conversation turns acknowledged with
//! `x-meridian-durability: sync` are in a surviving region the moment their
//! home is killed (node and PostgreSQL), with no wait for replication to
//! catch up; with every peer down a synchronous turn is answered 503 /
//! UNAVAILABLE (stored here, not confirmed) while an asynchronous one is
//! served; a tenant listed in `replication.sync_tenants` is synchronous
//! without the header; and a region with no peers refuses to pretend.
//!
//! Randomised tests print their seed; `REPLICATION_SEED=<n>` replays one.

use meridian_proto::v1::inference_client::InferenceClient;
use meridian_proto::v1::{ChatMessage, GenerateRequest};
use meridian_tests::replicated::{conversation, seed};
use meridian_tests::{ClusterSandbox, RegionSandbox, TEST_MODEL, init_logging, metric};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const CONVERSATION: &str = "x-meridian-conversation";
const TENANT: &str = "x-meridian-tenant";
const DURABILITY: &str = "x-meridian-durability";

fn turn(content: &str) -> Value {
    json!({ "model": TEST_MODEL, "max_tokens": 6,
            "messages": [{ "role": "user", "content": content }] })
}

/// POSTs `body` to `path` of the region at `url` with `headers`: status,
/// the `x-meridian-durability` answered, and the body.
async fn post(
    url: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, Option<String>, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.expect("the request is answered");
    let status = res.status().as_u16();
    let durability = res
        .headers()
        .get(DURABILITY)
        .map(|v| v.to_str().unwrap().to_string());
    (status, durability, res.json().await.expect("a JSON body"))
}

async fn chat(url: &str, headers: &[(&str, &str)], body: &Value) -> (u16, Option<String>, Value) {
    post(url, "/v1/chat/completions", headers, body).await
}

/// Submits a job of `tenant` to the region at `url`.
async fn submit_job(
    url: &str,
    tenant: &str,
    headers: &[(&str, &str)],
    content: &str,
) -> (u16, Option<String>, Value) {
    let headers: Vec<(&str, &str)> = headers.iter().copied().chain([(TENANT, tenant)]).collect();
    post(url, "/v1/jobs", &headers, &turn(content)).await
}

fn answer(body: &Value) -> String {
    body["choices"][0]["message"]["content"]
        .as_str()
        .expect("an answer")
        .to_string()
}

#[tokio::test]
async fn acknowledged_sync_turns_survive_the_kill_of_their_region() {
    init_logging();
    let seed = seed("REPLICATION_SEED");
    let mut rng = StdRng::seed_from_u64(seed);
    // A generous timeout: this test is about what an acknowledgement
    // means, not about how fast one comes on a loaded machine.
    let mut cluster =
        ClusterSandbox::start_replicated(&REGIONS, "sync_timeout_ms = 30000\n", |_, _| {}).await;
    let home = REGIONS[rng.random_range(0..REGIONS.len())];
    let url = cluster.region(home).url();
    // Several conversations, interleaved, so the waited-for sequence is not
    // always the log's newest.
    let conversations = rng.random_range(1..=3);
    let turns = rng.random_range(2..=6);
    let mut history: Vec<Vec<String>> = vec![Vec::new(); conversations];
    println!("home {home}, {conversations} conversations, {turns} turns");
    for n in 0..turns {
        let c = rng.random_range(0..conversations);
        let id = format!("sync-{c}");
        let content = format!("turn {n} of {id} ({seed})");
        let headers = [
            (CONVERSATION, id.as_str()),
            (DURABILITY, "sync"),
            (TENANT, "default"),
        ];
        let (status, durability, body) = chat(&url, &headers, &turn(&content)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(durability.as_deref(), Some("sync"));
        history[c].push(content);
        history[c].push(answer(&body));
    }

    // Jobs too: a 202 for a synchronous submission means a peer has it.
    let mut jobs = Vec::new();
    for n in 0..rng.random_range(1..=3) {
        let (status, durability, body) = submit_job(
            &url,
            "default",
            &[(DURABILITY, "sync")],
            &format!("job {n} ({seed})"),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(durability.as_deref(), Some("sync"));
        jobs.push(body["id"].as_str().expect("a job id").to_string());
    }

    // Killed right after the last acknowledgement: node and database.
    let dead = cluster.region(home);
    dead.kill_node();
    dead.postgres.kill();

    // No waiting for replication: an acknowledged sync turn is already
    // applied in some survivor. A peer applies each origin's log in order,
    // so the one that confirmed the last turn has every earlier one too.
    let survivors: Vec<String> = cluster
        .regions
        .iter()
        .filter(|r| r.name != home)
        .map(RegionSandbox::url)
        .collect();
    for (c, expected) in history.iter().enumerate() {
        if expected.is_empty() {
            continue;
        }
        let id = format!("sync-{c}");
        let mut found = Vec::new();
        for s in &survivors {
            found.push(conversation(s, "default", &id).await);
        }
        assert!(
            found.iter().any(|f| f.as_ref() == Some(expected)),
            "{id}: acknowledged {expected:?}, survivors have {found:?}"
        );
    }
    let http = reqwest::Client::new();
    for id in &jobs {
        let mut statuses = Vec::new();
        for s in &survivors {
            let res = http
                .get(format!("{s}/v1/jobs/{id}"))
                .header(TENANT, "default")
                .send()
                .await
                .expect("the survivor answers");
            statuses.push(res.status().as_u16());
        }
        assert!(
            statuses.contains(&200),
            "job {id} was acknowledged as sync; survivors answered {statuses:?}"
        );
    }
}

#[tokio::test]
async fn with_every_peer_down_sync_times_out_and_async_is_served() {
    init_logging();
    let mut cluster = ClusterSandbox::start_replicated(
        &REGIONS,
        "sync_timeout_ms = 500\nsync_tenants = [\"acme\"]\n",
        |_, _| {},
    )
    .await;
    let url = cluster.region(REGIONS[0]).url();

    // Peers up: the configured tenant is synchronous without the header,
    // and a survivor has its turn the moment it is acknowledged; other
    // tenants are asynchronous unless they ask.
    let (status, durability, body) = chat(
        &url,
        &[(CONVERSATION, "t-acme"), (TENANT, "acme")],
        &turn("acme asks"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(durability.as_deref(), Some("sync"));
    let acme = vec!["acme asks".to_string(), answer(&body)];
    let mut in_a_peer = false;
    for r in &cluster.regions[1..] {
        in_a_peer |= conversation(&r.url(), "acme", "t-acme").await.as_ref() == Some(&acme);
    }
    assert!(in_a_peer, "no peer had acme's acknowledged sync turn");
    let (status, durability, body) = chat(
        &url,
        &[(CONVERSATION, "t-default"), (TENANT, "default")],
        &turn("default asks"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(durability.as_deref(), Some("async"));

    for name in &REGIONS[1..] {
        cluster.region(name).stop_node().await;
    }
    let metrics = format!("{url}/metrics");
    let sync_timeouts = || metric(&metrics, "meridian_replication_sync_timeouts_total", &[]);
    let before = sync_timeouts().await;

    // Sync by header: 503, stored here, not confirmed, and said so.
    let (status, durability, body) = chat(
        &url,
        &[
            (CONVERSATION, "t-down"),
            (TENANT, "default"),
            (DURABILITY, "sync"),
        ],
        &turn("nobody confirms this"),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(durability.as_deref(), Some("local"));
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("stored in this region")
            && message.contains("no peer region confirmed it")
            && message.contains("may still replicate"),
        "{message}"
    );
    let here = conversation(&url, "default", "t-down")
        .await
        .expect("stored here");
    assert_eq!(here[0], "nobody confirms this");
    assert_eq!(sync_timeouts().await, before + 1.0);

    // A synchronous job submission: the same, and the job is stored here
    // (a retry with its idempotency key finds it rather than a second one).
    let (status, durability, body) = submit_job(
        &url,
        "default",
        &[(DURABILITY, "sync"), ("idempotency-key", "down-1")],
        "a job nobody confirms",
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(durability.as_deref(), Some("local"));
    let pool = sqlx::PgPool::connect(&cluster.regions[0].postgres.url())
        .await
        .unwrap();
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE idempotency_key = 'down-1'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored, 1);
    let (status, durability, body) = submit_job(&url, "default", &[], "an asynchronous job").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(durability.as_deref(), Some("async"));

    // Sync by tenant config: the same.
    let (status, _, body) = chat(
        &url,
        &[(CONVERSATION, "t-acme"), (TENANT, "acme")],
        &turn("acme again"),
    )
    .await;
    assert_eq!(status, 503, "{body}");

    // Async, by default or asked for even by a sync tenant: served.
    for (tenant, headers) in [("default", vec![]), ("acme", vec![(DURABILITY, "async")])] {
        let id = format!("t-async-{tenant}");
        let mut headers = headers;
        headers.push((CONVERSATION, &id));
        headers.push((TENANT, tenant));
        let (status, durability, body) = chat(&url, &headers, &turn("async")).await;
        assert_eq!(status, 200, "{tenant}: {body}");
        assert_eq!(durability.as_deref(), Some("async"));
    }

    // gRPC: UNAVAILABLE with the reason.
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut request = tonic::Request::new(GenerateRequest {
        model: TEST_MODEL.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "over grpc".into(),
            ..Default::default()
        }],
        max_tokens: Some(6),
        conversation_id: "t-grpc".into(),
        ..Default::default()
    });
    let metadata = request.metadata_mut();
    metadata.insert(TENANT, "default".parse().unwrap());
    metadata.insert(DURABILITY, "sync".parse().unwrap());
    let status = InferenceClient::new(channel)
        .generate(request)
        .await
        .expect_err("no peer confirms it");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("no peer region confirmed it"),
        "{status:?}"
    );
    let detail = meridian_proto::error_detail(&status).expect("a detail");
    assert_eq!(detail.reason, "SYNC_NOT_CONFIRMED");
}

#[tokio::test]
async fn a_region_without_peers_refuses_sync() {
    init_logging();
    let region = RegionSandbox::start("solo").await;
    let (status, _, body) = chat(
        &region.url(),
        &[
            (CONVERSATION, "c"),
            (TENANT, "default"),
            (DURABILITY, "sync"),
        ],
        &turn("hello"),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("replication.peers"), "{message}");
    // Refused before anything was stored.
    assert_eq!(conversation(&region.url(), "default", "c").await, None);
    let (status, _, body) = chat(
        &region.url(),
        &[(TENANT, "default"), (DURABILITY, "maybe")],
        &turn("hello"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn a_key_made_with_sync_is_in_a_peer_when_the_wait_returns() {
    use meridian_regional::tenancy::{self, TenantLimits};
    init_logging();
    let mut cluster = ClusterSandbox::start_replicated(&REGIONS, "", |_, _| {}).await;
    let pool = tenancy::connect(&cluster.regions[0].postgres.url())
        .await
        .unwrap();
    tenancy::create_tenant(&pool, "keyed", TenantLimits::default())
        .await
        .unwrap();
    let key = tenancy::create_api_key(&pool, "keyed").await.unwrap();
    tenancy::wait_replicated(&pool, std::time::Duration::from_secs(30))
        .await
        .expect("a peer applies the key");
    // No waiting for replication: the wait returned only once a peer had
    // applied the key (a peer applies an origin's log in order).
    let prefix = &key[..9];
    let mut in_a_peer = false;
    for r in &cluster.regions[1..] {
        let peer = tenancy::connect(&r.postgres.url()).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE prefix = $1")
            .bind(prefix)
            .fetch_one(&peer)
            .await
            .unwrap();
        in_a_peer |= n == 1;
    }
    assert!(in_a_peer, "the wait returned before any peer had the key");

    // With every peer down the wait says so, and the key is still made here.
    for name in &REGIONS[1..] {
        cluster.region(name).stop_node().await;
    }
    let later = tenancy::create_api_key(&pool, "keyed").await.unwrap();
    let e = tenancy::wait_replicated(&pool, std::time::Duration::from_millis(500))
        .await
        .expect_err("no peer can apply it");
    assert!(
        e.to_string()
            .contains("no peer region applied the change within 500 ms"),
        "{e}"
    );
    let here: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE prefix = $1")
        .bind(&later[..9])
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(here, 1);
}
