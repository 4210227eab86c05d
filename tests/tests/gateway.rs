//! The gateway's routing rules against three real regions: affinity that two
//! gateways agree on, nearest region by trusted header and by CIDR, ejection
//! of a killed region without failing requests, recovery, drain, the retry
//! budget in a total outage, and streams that are not buffered.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use meridian_gateway::{COUNTRY_HEADER, CidrLocation, LATLON_HEADER};
use meridian_proto::v1::DrainRequest;
use meridian_proto::v1::admin_client::AdminClient;
use meridian_tests::{ClusterSandbox, TEST_MODEL, TEST_SLOW_MODEL, init_logging};
use serde_json::{Value, json};

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

fn body(model: &str) -> Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": "route me" }], "max_tokens": 4 })
}

fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

/// Sends one chat completion; returns (status, region chosen, route reason).
async fn send(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut req = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body(TEST_MODEL));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.expect("the gateway answers");
    let h = |n: &str| {
        res.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let (region, route) = (h("x-meridian-region"), h("x-meridian-route"));
    let status = res.status().as_u16();
    if status == 200 {
        assert_eq!(
            h("x-meridian-served-by"),
            region,
            "the region that served is the one chosen"
        );
    }
    res.bytes().await.expect("body");
    (status, region, route)
}

async fn routing(sandbox: &ClusterSandbox) -> Value {
    reqwest::get(format!("{}/routing", sandbox.admin_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn region_flag(sandbox: &ClusterSandbox, region: &str, flag: &str) -> bool {
    routing(sandbox).await["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == region)
        .unwrap()[flag]
        .as_bool()
        .unwrap()
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

async fn metric(sandbox: &ClusterSandbox, line_prefix: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", sandbox.admin_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_is_shared_by_two_gateways() {
    init_logging();
    let sandbox = ClusterSandbox::start(&REGIONS).await;
    let other = sandbox.start_another_gateway().await;
    let urls = [
        sandbox.gateway_url(),
        format!("http://{}", other.local_addr()),
    ];
    let client = reqwest::Client::new();
    let mut homes = std::collections::HashSet::new();
    for i in 0..24 {
        let session = format!("conversation-{i}");
        let mut seen = Vec::new();
        for url in &urls {
            for _ in 0..2 {
                let (status, region, route) =
                    send(&client, url, &[("x-meridian-session", &session)]).await;
                assert_eq!(status, 200);
                assert_eq!(route, "affinity");
                seen.push(region);
            }
        }
        assert!(
            seen.iter().all(|r| *r == seen[0]),
            "session {session} went to {seen:?}"
        );
        homes.insert(seen[0].clone());
    }
    assert!(homes.len() >= 2, "24 sessions all landed in {homes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nearest_region_by_trusted_header_and_by_cidr() {
    init_logging();
    let sandbox = ClusterSandbox::start_with(&REGIONS, |c| {
        c.geo.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        c.geo.cidr = vec![
            // Mumbai and Paris, for two loopback addresses.
            CidrLocation {
                cidr: "127.0.0.2/32".parse().unwrap(),
                lat: 19.0,
                lon: 72.8,
            },
            CidrLocation {
                cidr: "127.0.0.3/32".parse().unwrap(),
                lat: 48.9,
                lon: 2.3,
            },
        ];
    })
    .await;
    let url = sandbox.gateway_url();
    let trusted = client_from("127.0.0.1");

    let (_, region, route) = send(&trusted, &url, &[(COUNTRY_HEADER, "IE")]).await;
    assert_eq!((region.as_str(), route.as_str()), ("eu-west", "nearest"));
    let (_, region, _) = send(&trusted, &url, &[(COUNTRY_HEADER, "br")]).await;
    assert_eq!(region, "us-east");
    let (_, region, _) = send(&trusted, &url, &[(LATLON_HEADER, "28.6,77.2")]).await;
    assert_eq!(region, "ap-south");

    // 127.0.0.2 is not a trusted proxy: its header is ignored, its address
    // locates it.
    let untrusted = client_from("127.0.0.2");
    let (_, region, route) = send(&untrusted, &url, &[(COUNTRY_HEADER, "US")]).await;
    assert_eq!((region.as_str(), route.as_str()), ("ap-south", "nearest"));
    let (_, region, _) = send(&client_from("127.0.0.3"), &url, &[]).await;
    assert_eq!(region, "eu-west");

    // Unlocated clients go to the default region.
    let (_, region, route) = send(&client_from("127.0.0.4"), &url, &[]).await;
    assert_eq!((region.as_str(), route.as_str()), ("us-east", "default"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_region_is_ejected_without_failing_requests_and_recovers() {
    init_logging();
    let mut sandbox = ClusterSandbox::start_with(&REGIONS, |c| {
        c.geo.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let url = sandbox.gateway_url();

    // Four clients near Dublin keep sending while eu-west dies.
    let stop = tokio_util_like_flag();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (url, stop) = (url.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut outcomes = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let res = client
                    .post(format!("{url}/v1/chat/completions"))
                    .header(COUNTRY_HEADER, "IE")
                    .json(&body(TEST_MODEL))
                    .send()
                    .await;
                outcomes.push(match res {
                    Ok(r) => {
                        let region = r.headers()["x-meridian-region"]
                            .to_str()
                            .unwrap()
                            .to_string();
                        let status = r.status().as_u16();
                        let _ = r.bytes().await;
                        Ok((status, region, Instant::now()))
                    }
                    Err(e) => Err(e.to_string()),
                });
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = Instant::now();
    sandbox.region("eu-west").kill_node();
    let ejected_after = within(Duration::from_secs(3), "ejection of eu-west", || async {
        !region_flag(&sandbox, "eu-west", "healthy").await
    })
    .await;
    assert!(
        ejected_after <= Duration::from_millis(1500),
        "ejected after {ejected_after:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    sandbox.region("eu-west").start_node().await;
    within(Duration::from_secs(5), "recovery of eu-west", || async {
        region_flag(&sandbox, "eu-west", "healthy").await
    })
    .await;
    let recovered_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut total = 0;
    let mut moved = 0;
    let mut back = 0;
    for c in clients {
        for outcome in c.await.unwrap() {
            total += 1;
            let (status, region, at) = outcome.unwrap_or_else(|e| panic!("a request failed: {e}"));
            assert_eq!(status, 200, "a request failed in {region}");
            if at > killed_at && region != "eu-west" {
                moved += 1;
            }
            if at > recovered_at + Duration::from_millis(100) && region == "eu-west" {
                back += 1;
            }
        }
    }
    eprintln!(
        "{total} requests, {moved} served elsewhere after the kill, {back} back in eu-west; ejected {ejected_after:?} after the kill"
    );
    assert!(
        moved > 0,
        "no request moved away from eu-west ({total} sent)"
    );
    assert!(
        back > 0,
        "no request returned to eu-west after recovery ({total} sent)"
    );
}

fn tokio_util_like_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_region_gets_no_new_work_but_serves_what_it_has() {
    init_logging();
    let sandbox = ClusterSandbox::start_with(&REGIONS, |c| {
        c.geo.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let url = sandbox.gateway_url();
    let client = reqwest::Client::new();
    let eu = sandbox.regions[1].url();

    // A slow stream is in flight in eu-west when the drain starts.
    let in_flight = client
        .post(format!("{url}/v1/chat/completions"))
        .header("x-meridian-region", "eu-west")
        .json(&json!({ "model": TEST_SLOW_MODEL, "messages": [{ "role": "user", "content": "long" }], "max_tokens": 8 }))
        .send();
    let in_flight = tokio::spawn(in_flight);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut admin = AdminClient::connect(eu.clone()).await.unwrap();
    admin.drain(DrainRequest { drain: true }).await.unwrap();
    within(
        Duration::from_secs(3),
        "the gateway seeing the drain",
        || async { region_flag(&sandbox, "eu-west", "draining").await },
    )
    .await;
    let (status, region, _) = send(&client, &url, &[(COUNTRY_HEADER, "IE")]).await;
    assert_eq!((status, region.as_str()), (200, "us-east"));
    // Pinned work still reaches it, and what was in flight finishes.
    let (status, region, _) = send(&client, &url, &[("x-meridian-region", "eu-west")]).await;
    assert_eq!((status, region.as_str()), (200, "eu-west"));
    let res = in_flight.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    let done: Value = res.json().await.unwrap();
    assert!(done["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    admin.drain(DrainRequest { drain: false }).await.unwrap();
    within(
        Duration::from_secs(3),
        "the gateway seeing the end of the drain",
        || async { !region_flag(&sandbox, "eu-west", "draining").await },
    )
    .await;
    let (_, region, _) = send(&client, &url, &[(COUNTRY_HEADER, "IE")]).await;
    assert_eq!(region, "eu-west");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_retries_in_a_total_outage() {
    init_logging();
    let mut sandbox = ClusterSandbox::start_with(&REGIONS, |c| {
        c.failover.retry_budget_ratio = 0.1;
        c.failover.retry_budget_min_per_second = 0;
    })
    .await;
    for r in &mut sandbox.regions {
        r.kill_node();
    }
    let client = reqwest::Client::new();
    let url = sandbox.gateway_url();
    let requests = 100;
    for _ in 0..requests {
        let (status, _, _) = send(&client, &url, &[]).await;
        assert_eq!(status, 502, "no region can answer");
    }
    let allowed = metric(
        &sandbox,
        "meridian_gateway_retries_total{outcome=\"allowed\"}",
    )
    .await;
    let denied = metric(
        &sandbox,
        "meridian_gateway_retries_total{outcome=\"denied\"}",
    )
    .await;
    // One retry per ten requests at most; without the budget every request
    // would have been tried in all three regions (200 retries).
    assert!(allowed <= requests / 10, "{allowed} retries allowed");
    assert!(allowed > 0, "the budget allowed no retry at all");
    assert!(denied >= requests - allowed, "{denied} retries denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pass_through_unbuffered() {
    init_logging();
    let sandbox = ClusterSandbox::start(&REGIONS[..1]).await;
    let started = Instant::now();
    let res = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", sandbox.gateway_url()))
        .json(&json!({
            "model": TEST_SLOW_MODEL,
            "messages": [{ "role": "user", "content": "stream slowly" }],
            "max_tokens": 12, "seed": 1, "stream": true
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut stream = res.bytes_stream();
    let mut first_token = None;
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = String::from_utf8(chunk.unwrap().to_vec()).unwrap();
        if first_token.is_none()
            && chunk.contains("\"content\":\"")
            && !chunk.contains("\"content\":\"\"")
        {
            first_token = Some(started.elapsed());
        }
        text.push_str(&chunk);
    }
    let total = started.elapsed();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let tokens = text.matches("\"content\":\"").count() - 1;
    assert!(tokens >= 2, "{text}");
    // The simulator spaces tokens 150 ms apart; a buffered stream would
    // deliver the first token together with the last.
    let first = first_token.expect("a token arrived");
    assert!(
        total - first >= Duration::from_millis(150 * (tokens as u64 - 1) / 2),
        "first token at {first:?}, end at {total:?} for {tokens} tokens"
    );
}
