//! Time from a region's crash to the first successful answer for the
//! clients it served, through the gateway: detection plus failover. Clients
//! near Dublin (eu-west) send one request after another; the region's node
//! is killed (every socket closed at once, as a crash does); the figure is
//! the time from the kill to the first 200 answered by another region for
//! a request sent after it. Repeated `BENCH_ROUNDS` times, restarting the
//! node between rounds; the baseline is the same clients' request latency
//! before any kill, measured in the same run. Also counts requests that
//! failed across all kills (the gateway retries those that reached no one).
//! Run with `make bench` or `cargo bench -p meridian-tests --bench failover`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use meridian_tests::load::{env_or, ms, percentile};
use meridian_tests::{ClusterSandbox, TEST_MODEL};
use serde_json::{Value, json};

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

/// One answer: when it was sent and answered, its status and region.
struct Outcome {
    sent: Instant,
    done: Instant,
    status: u16,
    region: String,
}

async fn send(client: &reqwest::Client, url: &str) -> Outcome {
    let sent = Instant::now();
    let body = json!({ "model": TEST_MODEL, "max_tokens": 4,
        "messages": [{ "role": "user", "content": "failover" }] });
    let res = client
        .post(format!("{url}/v1/chat/completions"))
        .header("x-meridian-client-country", "IE")
        .json(&body)
        .send()
        .await;
    let (status, region) = match res {
        Ok(r) => {
            let region = r
                .headers()
                .get("x-meridian-region")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let status = r.status().as_u16();
            let _ = r.bytes().await;
            (status, region)
        }
        Err(_) => (0, String::new()),
    };
    Outcome {
        sent,
        done: Instant::now(),
        status,
        region,
    }
}

async fn healthy(admin: &str, region: &str) -> bool {
    let routing: Value = reqwest::get(format!("{admin}/routing"))
        .await
        .expect("routing")
        .json()
        .await
        .expect("routing json");
    routing["regions"]
        .as_array()
        .expect("regions")
        .iter()
        .any(|r| r["name"] == region && r["healthy"] == true)
}

#[tokio::main]
async fn main() {
    let rounds = env_or("BENCH_ROUNDS", 10);
    let mut sandbox = ClusterSandbox::start_with(&REGIONS, |c| {
        c.geo.trusted_proxies = vec!["127.0.0.1/32".parse().expect("cidr")];
    })
    .await;
    let (url, admin) = (sandbox.gateway_url(), sandbox.admin_url());
    let client = reqwest::Client::new();

    let mut base = Vec::new();
    for _ in 0..300 {
        let o = send(&client, &url).await;
        assert_eq!((o.status, o.region.as_str()), (200, "eu-west"));
        base.push(o.done - o.sent);
    }
    base.sort();

    let mut failovers = Vec::new();
    let mut failed = 0usize;
    let mut total = 0usize;
    for _ in 0..rounds {
        while !healthy(&admin, "eu-west").await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        out.push(send(&client, &url).await);
                    }
                    out
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let killed = Instant::now();
        sandbox.region("eu-west").kill_node();
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        let mut first = None::<Duration>;
        for c in clients {
            for o in c.await.expect("client task") {
                total += 1;
                if o.status != 200 {
                    failed += 1;
                }
                if o.sent >= killed && o.status == 200 && o.region != "eu-west" {
                    let t = o.done - killed;
                    first = Some(first.map_or(t, |f| f.min(t)));
                }
            }
        }
        failovers.push(first.expect("some request succeeded elsewhere after the kill"));
        sandbox.region("eu-west").start_node().await;
    }
    failovers.sort();
    let (b50, b99) = (percentile(&base, 0.5), percentile(&base, 0.99));
    let (f50, f99) = (percentile(&failovers, 0.5), percentile(&failovers, 0.99));
    println!(
        "region kill to first success elsewhere, {rounds} kills of eu-west, 4 clients near it:"
    );
    println!(
        "  baseline request  p50 {:7.3} ms  p99 {:7.3} ms",
        ms(b50),
        ms(b99)
    );
    println!(
        "  failover          p50 {:7.3} ms  p99 {:7.3} ms   ratio to baseline: p50 {:.1}  p99 {:.1}",
        ms(f50),
        ms(f99),
        f50.as_secs_f64() / b50.as_secs_f64(),
        f99.as_secs_f64() / b99.as_secs_f64()
    );
    println!("  requests across the kills: {total}, failed: {failed}");
}
