//! What mutual TLS on the gateway → region hop costs: the same chat
//! completion through a gateway that talks plain text to its region and
//! through one that talks mTLS (pooled connections, so mostly the cost of
//! encryption, plus handshakes as the pool grows), side by side in one run.
//! Reports latency at a fixed rate and saturation throughput, as the
//! `gateway` bench does.
//!
//! Run with `make bench` or `cargo bench -p meridian-tests --bench mesh`;
//! `BENCH_RATE` (default 2000 req/s), `BENCH_SECONDS` (default 5) and
//! `BENCH_CONCURRENCY` (default 32) tune it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_gateway::{Config as GatewayConfig, RegionConfig};
use meridian_tests::{ClusterSandbox, TEST_MODEL, TestPki, start_gateway};
use serde_json::json;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn body() -> String {
    json!({ "model": TEST_MODEL, "messages": [{ "role": "user", "content": "bench" }], "max_tokens": 8 })
        .to_string()
}

async fn one(client: &reqwest::Client, url: &str, body: &str) -> bool {
    match client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
    {
        Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
        Err(_) => false,
    }
}

/// Open loop: latency counts from when each request was due.
async fn fixed_rate(url: &str, rate: u64, seconds: u64) -> (Vec<Duration>, usize) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let (body, url) = (Arc::new(body()), Arc::new(url.to_string()));
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..rate * seconds {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            (one(&client, &url, &body).await, due.elapsed())
        }));
    }
    let (mut latencies, mut failures) = (Vec::new(), 0);
    for t in tasks {
        match t.await.unwrap() {
            (true, l) => latencies.push(l),
            (false, _) => failures += 1,
        }
    }
    latencies.sort();
    (latencies, failures)
}

/// Closed loop with `concurrency` clients: requests per second.
async fn saturation(url: &str, concurrency: u64, seconds: u64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let body = Arc::new(body());
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (url, body) = (url.to_string(), body.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut done = 0u64;
            while Instant::now() < deadline {
                if one(&client, &url, &body).await {
                    done += 1;
                }
            }
            done
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.unwrap();
    }
    done as f64 / seconds as f64
}

#[tokio::main]
async fn main() {
    // reqwest's plain clients need a process-wide provider.
    let _ = meridian_mesh::provider().install_default();
    let rate = env_or("BENCH_RATE", 2000);
    let seconds = env_or("BENCH_SECONDS", 5);
    let concurrency = env_or("BENCH_CONCURRENCY", 32);
    let pki = TestPki::new();
    // Two identical regions, one plain and one mTLS; the sandbox's gateway
    // (one thread) talks mTLS to eu-west, a second one plain to us-east.
    let sandbox = ClusterSandbox::start_configured(
        &["us-east", "eu-west"],
        |name| match name {
            "eu-west" => pki.region_toml(name),
            _ => String::new(),
        },
        |regions, c| {
            c.threads = 1;
            c.regions.retain(|r| r.name == "eu-west");
            c.mesh = pki.gateway_mesh("bench");
            let _ = regions;
        },
    )
    .await;
    let mut plain = GatewayConfig::new(
        ([127, 0, 0, 1], 0).into(),
        vec![RegionConfig::new("us-east", sandbox.regions[0].addr())],
    )
    .unwrap();
    plain.threads = 1;
    plain.shutdown_grace = Duration::ZERO;
    let plain = start_gateway(plain).await;

    let path = "/v1/chat/completions";
    let targets = [
        ("direct", format!("{}{path}", sandbox.regions[0].url())),
        ("plain", format!("http://{}{path}", plain.local_addr())),
        ("mtls", format!("{}{path}", sandbox.gateway_url())),
    ];
    for (_, url) in &targets {
        saturation(url, 4, 1).await;
    }
    println!(
        "fixed rate {rate} req/s for {seconds} s each (sim at zero latency, 1 proxy thread, HTTP/1.1 upstream)"
    );
    println!(
        "{:<7} {:>9} {:>9} {:>12} {:>12} {:>7}",
        "target", "p50 ms", "p99 ms", "vs plain p50", "vs plain p99", "failed"
    );
    let mut rows = Vec::new();
    for (name, url) in &targets {
        let (lat, failed) = fixed_rate(url, rate, seconds).await;
        rows.push((name, percentile(&lat, 0.5), percentile(&lat, 0.99), failed));
    }
    let (b50, b99) = (rows[1].1, rows[1].2);
    for (name, p50, p99, failed) in rows {
        println!(
            "{name:<7} {:>9.3} {:>9.3} {:>+12.3} {:>+12.3} {failed:>7}",
            ms(p50),
            ms(p99),
            ms(p50) - ms(b50),
            ms(p99) - ms(b99),
        );
    }
    println!("saturation, {concurrency} concurrent clients, {seconds} s each");
    let mut results = Vec::new();
    for (name, url) in &targets {
        results.push((name, saturation(url, concurrency, seconds).await));
    }
    let plain_rps = results[1].1;
    for (name, rps) in results {
        println!(
            "{name:<7} {rps:>9.0} req/s ({:.2} of plain gateway)",
            rps / plain_rps
        );
    }
}
