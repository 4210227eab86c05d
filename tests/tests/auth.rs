//! Tenants, API keys and rate limits at the gateway, against real regions,
//! PostgreSQL (the keys) and Redis (the shared limits): 401s in both
//! protocols, the tenant reaching the region (and a client unable to claim
//! one), quick revocation, limits shared by two gateways, limits kept while
//! Redis is down, and the 429 contract.

use std::time::{Duration, Instant};

use meridian_gateway::RegionConfig;
use meridian_proto::v1::inference_client::InferenceClient;
use meridian_proto::v1::{ChatMessage, GenerateRequest};
use meridian_regional::tenancy::{self, TenantLimits};
use meridian_tests::keys::{key_pool as pool, keyed_cluster, tenant_with_key};
use meridian_tests::{ClusterSandbox, TEST_MODEL, init_logging, start_gateway};
use serde_json::{Value, json};

const REGIONS: [&str; 2] = ["us-east", "eu-west"];

async fn sandbox(reload_ms: u64, shared_limits: bool) -> ClusterSandbox {
    keyed_cluster(&REGIONS, reload_ms, shared_limits).await
}

fn chat_body(max_tokens: u32) -> Value {
    json!({
        "model": TEST_MODEL,
        "messages": [{ "role": "user", "content": "who am I" }],
        "max_tokens": max_tokens,
    })
}

async fn chat(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut req = client.post(format!("{url}/v1/chat/completions")).json(body);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    req.send().await.expect("the gateway answers")
}

/// Polls `check` every 20 ms until it holds or `limit` passes; returns the
/// time it took.
async fn within<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// Waits until the gateway at `url` accepts `key` (its next reload).
async fn key_works(client: &reqwest::Client, url: &str, key: &str) {
    within(Duration::from_secs(5), "the new key working", || async {
        chat(client, url, Some(key), &chat_body(4)).await.status() != 401
    })
    .await;
}

fn assert_openai_error(body: &Value, kind: &str, code: &str) {
    let e = &body["error"];
    assert_eq!(e["type"], kind, "{body}");
    assert_eq!(e["code"], code, "{body}");
    assert!(e["param"].is_null(), "{body}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

fn generate_request(key: Option<&str>) -> tonic::Request<GenerateRequest> {
    let mut req = tonic::Request::new(GenerateRequest {
        model: TEST_MODEL.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "hi".into(),
            ..Default::default()
        }],
        max_tokens: Some(4),
        ..Default::default()
    });
    if let Some(key) = key {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    req
}

async fn submit_job(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    tenant_claim: Option<&str>,
) -> String {
    let mut req = client
        .post(format!("{url}/v1/jobs"))
        .bearer_auth(key)
        .json(&chat_body(4));
    if let Some(t) = tenant_claim {
        req = req.header("x-meridian-tenant", t);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 202);
    res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn job_status(
    client: &reqwest::Client,
    url: &str,
    id: &str,
    headers: &[(&str, &str)],
) -> u16 {
    let mut req = client.get(format!("{url}/v1/jobs/{id}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_name_the_tenant_and_revocation_takes_effect_quickly() {
    init_logging();
    // The default reload interval: what operators get.
    let sandbox = sandbox(1_000, false).await;
    let pool = pool(&sandbox).await;
    let acme = tenant_with_key(&pool, "acme", TenantLimits::default()).await;
    let globex = tenant_with_key(&pool, "globex", TenantLimits::default()).await;
    assert!(acme.starts_with("mk-") && acme.len() == 43, "{acme}");
    let client = reqwest::Client::new();
    let url = sandbox.gateway_url();
    key_works(&client, &url, &globex).await;

    // Missing, malformed and wrong keys: 401 with OpenAI's error body.
    let res = chat(&client, &url, None, &chat_body(4)).await;
    assert_eq!(res.status(), 401);
    assert_openai_error(
        &res.json().await.unwrap(),
        "invalid_request_error",
        "invalid_api_key",
    );
    let wrong = format!("mk-{}", "x".repeat(40));
    let res = chat(&client, &url, Some(&wrong), &chat_body(4)).await;
    assert_eq!(res.status(), 401);
    assert_openai_error(
        &res.json().await.unwrap(),
        "invalid_request_error",
        "invalid_api_key",
    );
    let res = client
        .post(format!("{url}/v1/chat/completions"))
        .header("authorization", format!("Basic {acme}"))
        .json(&chat_body(4))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401, "only the Bearer scheme carries a key");

    // A valid key is served, by the region the gateway chose.
    let res = chat(&client, &url, Some(&acme), &chat_body(4)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["x-meridian-served-by"],
        res.headers()["x-meridian-region"]
    );
    assert!(
        res.headers().get("x-meridian-usage-tokens").is_none(),
        "the internal usage header stays between region and gateway"
    );

    // gRPC: UNAUTHENTICATED without or with a wrong key, served with one;
    // health checks need no key.
    let mut grpc = InferenceClient::connect(url.clone()).await.unwrap();
    let status = grpc.generate(generate_request(None)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let status = grpc
        .generate(generate_request(Some(&wrong)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    grpc.generate(generate_request(Some(&acme))).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // The region sees the tenant: jobs are tenant-scoped, so acme's job is
    // found with acme's key only, and globex cannot claim to be acme.
    let job = submit_job(&client, &url, &acme, None).await;
    let as_acme = format!("Bearer {acme}");
    let as_globex = format!("Bearer {globex}");
    assert_eq!(
        job_status(&client, &url, &job, &[("authorization", &as_acme)]).await,
        200
    );
    assert_eq!(
        job_status(&client, &url, &job, &[("authorization", &as_globex)]).await,
        404
    );
    assert_eq!(
        job_status(
            &client,
            &url,
            &job,
            &[("authorization", &as_globex), ("x-meridian-tenant", "acme")]
        )
        .await,
        404,
        "a client-sent x-meridian-tenant is replaced by the key's tenant"
    );
    // Nor can globex plant a job under acme's name.
    let planted = submit_job(&client, &url, &globex, Some("acme")).await;
    assert_eq!(
        job_status(&client, &url, &planted, &[("authorization", &as_acme)]).await,
        404
    );
    assert_eq!(
        job_status(&client, &url, &planted, &[("authorization", &as_globex)]).await,
        200
    );
    // The region itself (behind the gateway) has acme's job under "acme".
    let region_url = sandbox.regions[0].url();
    assert_eq!(
        job_status(&client, &region_url, &job, &[("x-meridian-tenant", "acme")]).await,
        200
    );

    // Without [auth] every request is the default tenant, whatever it claims.
    let mut open_config = meridian_gateway::Config::builder(
        "127.0.0.1:0".parse().unwrap(),
        sandbox
            .regions
            .iter()
            .map(|r| RegionConfig::new(r.name.clone(), r.addr()))
            .collect(),
    );
    open_config.threads = 1;
    open_config.shutdown_grace = Duration::ZERO;
    let open = start_gateway(open_config).await;
    let open_url = format!("http://{}", open.local_addr());
    let res = client
        .post(format!("{open_url}/v1/jobs"))
        .header("x-meridian-tenant", "acme")
        .json(&chat_body(4))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let claimed: Value = res.json().await.unwrap();
    let claimed = claimed["id"].as_str().unwrap();
    assert_eq!(
        job_status(
            &client,
            &region_url,
            claimed,
            &[("x-meridian-tenant", "acme")]
        )
        .await,
        404
    );
    assert_eq!(job_status(&client, &region_url, claimed, &[]).await, 200);

    // Revocation reaches the running gateway within two seconds.
    assert!(tenancy::revoke_api_key(&pool, &acme).await.unwrap());
    assert!(
        !tenancy::revoke_api_key(&pool, &acme).await.unwrap(),
        "revoked once"
    );
    let took = within(
        Duration::from_secs(2),
        "the revoked key failing",
        || async {
            chat(&client, &url, Some(&acme), &chat_body(4))
                .await
                .status()
                == 401
        },
    )
    .await;
    eprintln!("revocation took effect after {took:?}");
    assert_eq!(
        chat(&client, &url, Some(&globex), &chat_body(4))
            .await
            .status(),
        200
    );
    let failures = reqwest::get(format!("{}/metrics", sandbox.admin_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        failures.contains("meridian_gateway_auth_failures_total{reason=\"invalid\"}"),
        "{failures}"
    );
}

/// Sends requests from `workers` concurrent loops to each URL until
/// `window` has passed; returns (allowed, refused, elapsed).
async fn hammer(
    urls: &[String],
    key: &str,
    workers: usize,
    window: Duration,
) -> (usize, usize, Duration) {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let deadline = started + window;
    let tasks = urls.iter().flat_map(|url| {
        (0..workers).map(|_| {
            let (client, url, key) = (client.clone(), url.clone(), key.to_string());
            tokio::spawn(async move {
                let (mut ok, mut refused) = (0, 0);
                while Instant::now() < deadline {
                    match chat(&client, &url, Some(&key), &chat_body(4))
                        .await
                        .status()
                        .as_u16()
                    {
                        200 => ok += 1,
                        429 => refused += 1,
                        other => panic!("unexpected status {other}"),
                    }
                }
                (ok, refused)
            })
        })
    });
    let mut totals = (0, 0);
    for t in futures::future::join_all(tasks.collect::<Vec<_>>()).await {
        let (ok, refused) = t.unwrap();
        totals.0 += ok;
        totals.1 += refused;
    }
    (totals.0, totals.1, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_shared_by_two_gateways_and_429_says_when() {
    init_logging();
    let sandbox = sandbox(100, true).await;
    let other = sandbox.start_another_gateway().await;
    let pool = pool(&sandbox).await;
    let five = tenant_with_key(
        &pool,
        "five",
        TenantLimits {
            requests_per_second: Some(5),
            tokens_per_minute: None,
        },
    )
    .await;
    let one = tenant_with_key(
        &pool,
        "one",
        TenantLimits {
            requests_per_second: Some(1),
            tokens_per_minute: None,
        },
    )
    .await;
    let thrifty = tenant_with_key(
        &pool,
        "thrifty",
        TenantLimits {
            requests_per_second: None,
            tokens_per_minute: Some(1_500),
        },
    )
    .await;
    // Created last: a gateway that knows this key knows the others.
    let probe = tenant_with_key(&pool, "probe", TenantLimits::default()).await;
    let client = reqwest::Client::new();
    let urls = [
        sandbox.gateway_url(),
        format!("http://{}", other.local_addr()),
    ];
    for url in &urls {
        key_works(&client, url, &probe).await;
    }

    // 5 per second with a burst of 5: over about a second, two gateways
    // together allow about 10, not the 20 two separate limits would.
    let (allowed, refused, elapsed) = hammer(&urls, &five, 3, Duration::from_secs(1)).await;
    eprintln!("two gateways allowed {allowed}, refused {refused} in {elapsed:?}");
    let ceiling = 5 + (elapsed.as_secs_f64() * 5.0).ceil() as usize + 1;
    assert!(
        (6..=ceiling).contains(&allowed),
        "allowed {allowed} in {elapsed:?}; the shared limit allows 5 + 5/s (at most {ceiling})"
    );
    assert!(refused > 0);

    // Successes carry the x-ratelimit headers; the 429 adds OpenAI's body
    // and Retry-After. Tenant "one" may send 1 per second.
    let started = Instant::now();
    let mut seen_ok = false;
    let res = loop {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "no 200 then 429 within 3 s"
        );
        let res = chat(&client, &urls[0], Some(&one), &chat_body(4)).await;
        match res.status().as_u16() {
            200 => {
                let h = res.headers();
                assert_eq!(h["x-ratelimit-limit-requests"], "1");
                assert_eq!(h["x-ratelimit-remaining-requests"], "0");
                assert!(h.contains_key("x-ratelimit-reset-requests"));
                seen_ok = true;
            }
            429 if seen_ok => break res,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let h = res.headers().clone();
    let body: Value = res.json().await.unwrap();
    assert_openai_error(&body, "requests", "rate_limit_exceeded");
    let retry_after: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(retry_after, 1, "seconds, rounded up");
    assert_eq!(h["x-ratelimit-limit-requests"], "1");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    let reset = h["x-ratelimit-reset-requests"].to_str().unwrap();
    assert!(
        reset.ends_with("ms") || reset == "1s",
        "reset {reset:?} is a duration like 1s or 120ms"
    );
    assert!(
        !h.contains_key("x-ratelimit-limit-tokens"),
        "no tokens limit, no tokens headers"
    );

    // gRPC: RESOURCE_EXHAUSTED once the budget is spent.
    let grpc = InferenceClient::connect(urls[0].clone()).await.unwrap();
    within(Duration::from_secs(3), "RESOURCE_EXHAUSTED", || {
        let mut grpc = grpc.clone();
        let one = one.clone();
        async move {
            matches!(grpc.generate(generate_request(Some(&one))).await,
                Err(s) if s.code() == tonic::Code::ResourceExhausted)
        }
    })
    .await;

    // Tokens per minute: a request whose budget exceeds the whole minute's
    // can never be admitted, so it is a 400 saying what to lower, not a 429
    // to retry; it is charged nothing.
    let res = chat(&client, &urls[0], Some(&thrifty), &chat_body(5_000)).await;
    assert_eq!(res.status(), 400);
    assert!(!res.headers().contains_key("retry-after"));
    assert_openai_error(
        &res.json().await.unwrap(),
        "invalid_request_error",
        "request_too_large",
    );
    // Estimates are corrected by what the region used: two requests that
    // may each use 900 tokens fit in 1 500 a minute when they use few (a
    // stop sequence ends them at once). Without the correction the second
    // would wait about 15 s.
    let small_use = json!({
        "model": TEST_MODEL,
        "messages": [{ "role": "user", "content": "be brief" }],
        "max_tokens": 900,
        "stop": [" "],
    });
    let res = chat(&client, &urls[0], Some(&thrifty), &small_use).await;
    assert_eq!(res.status(), 200);
    let remaining: u64 = res.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        remaining < 1_500 - 900,
        "the estimate was charged: {remaining} left"
    );
    within(
        Duration::from_secs(2),
        "the second large-budget request passing",
        || {
            let (client, url, key, body) = (
                client.clone(),
                urls[1].clone(),
                thrifty.clone(),
                small_use.clone(),
            );
            async move { chat(&client, &url, Some(&key), &body).await.status() == 200 }
        },
    )
    .await;
    let metrics = reqwest::get(format!("{}/metrics", sandbox.admin_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("meridian_gateway_rate_limited_total{kind=\"requests\",tenant=\"five\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_while_redis_is_down() {
    init_logging();
    let mut sandbox = sandbox(100, true).await;
    let pool = pool(&sandbox).await;
    let five = tenant_with_key(
        &pool,
        "five",
        TenantLimits {
            requests_per_second: Some(5),
            tokens_per_minute: None,
        },
    )
    .await;
    let probe = tenant_with_key(&pool, "probe", TenantLimits::default()).await;
    let client = reqwest::Client::new();
    let url = sandbox.gateway_url();
    key_works(&client, &url, &probe).await;

    // Redis works: the limit is kept there.
    let res = chat(&client, &url, Some(&five), &chat_body(4)).await;
    assert_eq!(res.status(), 200);
    let mut redis = redis::Client::open(sandbox.regions[1].redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let stored: Option<String> = redis::cmd("GET")
        .arg("meridian:rl:{five}:requests")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(stored.is_some(), "the decision was made in Redis");

    sandbox.regions[1].redis.kill();
    // Still limited, locally: about 5 + 5/s pass, the rest get 429 (and
    // fast: each request waits for Redis at most once a second).
    let started = Instant::now();
    let (mut allowed, mut refused, mut slowest) = (0, 0, Duration::ZERO);
    while started.elapsed() < Duration::from_secs(1) {
        let sent = Instant::now();
        match chat(&client, &url, Some(&five), &chat_body(4))
            .await
            .status()
            .as_u16()
        {
            200 => allowed += 1,
            429 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
        slowest = slowest.max(sent.elapsed());
    }
    let elapsed = started.elapsed();
    eprintln!("Redis down: allowed {allowed}, refused {refused}, slowest {slowest:?}");
    let ceiling = 5 + (elapsed.as_secs_f64() * 5.0).ceil() as usize + 1;
    assert!(
        (3..=ceiling).contains(&allowed),
        "allowed {allowed} in {elapsed:?}"
    );
    assert!(
        refused >= 10,
        "refused {refused}: requests are not slowed down"
    );
    assert!(
        slowest < Duration::from_millis(500),
        "slowest request {slowest:?}"
    );
    let errors = reqwest::get(format!("{}/metrics", sandbox.admin_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        errors.lines().any(
            |l| l.starts_with("meridian_gateway_rate_limit_redis_errors_total ")
                && !l.ends_with(" 0")
        ),
        "{errors}"
    );
}
