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

use std::time::Duration;

use meridian_gateway::{Config as GatewayConfig, RegionConfig};
use meridian_tests::load::{Load, env_or, ms, percentile};
use meridian_tests::{ClusterSandbox, TestPki, start_gateway};

#[tokio::main]
async fn main() {
    let load = Load::new();
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
    let mut plain = GatewayConfig::builder(
        ([127, 0, 0, 1], 0).into(),
        vec![RegionConfig::new("us-east", sandbox.regions[0].addr())],
    );
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
        load.saturation(url, 4, 1).await;
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
        let (lat, failed) = load.fixed_rate(url, rate, seconds).await;
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
        results.push((name, load.saturation(url, concurrency, seconds).await));
    }
    let plain_rps = results[1].1;
    for (name, rps) in results {
        println!(
            "{name:<7} {rps:>9.0} req/s ({:.2} of plain gateway)",
            rps / plain_rps
        );
    }
}
