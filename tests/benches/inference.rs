//! The region's own overhead on an inference request: the same requests,
//! at the same fixed rate, sent straight to a simulator's HTTP server and
//! through a region whose model is a pool holding only that server.
//! Reports p50/p99 latency of both and their difference. The simulator
//! answers at once (no TTFT, no per-token time), so the latency is the
//! HTTP hops and the region's work. Run with `make bench` (or `cargo bench
//! -p meridian-tests --bench inference`); `BENCH_RPS` and `BENCH_SECONDS`
//! set the rate and duration.

use std::time::Duration;

use meridian_regional::{SimConfig, serve_sim};
use meridian_tests::load::{env_or, ms, percentile, service_times};
use meridian_tests::{RegionSandbox, instant_sim};
use serde_json::json;

/// `n` requests to `model` at `rps`; each latency, sorted.
async fn run(client: &reqwest::Client, url: &str, model: &str, rps: u64, n: u64) -> Vec<Duration> {
    let mut latencies = service_times(client, url, rps, n, |i| {
        json!({ "model": model, "max_tokens": 8, "seed": i,
            "messages": [{ "role": "user", "content": format!("benchmark request {i}") }] })
    })
    .await;
    latencies.sort();
    latencies
}

#[tokio::main]
async fn main() {
    // reqwest is built with TLS but without a provider in this crate; the
    // region's upstream client is the same reqwest, so install one first.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rps = env_or("BENCH_RPS", 200);
    let n = rps * env_or("BENCH_SECONDS", 5);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let sim_addr = listener.local_addr().expect("addr");
    let sim = SimConfig {
        max_concurrency: 1024,
        ..instant_sim()
    };
    tokio::spawn(serve_sim(sim, listener, std::future::pending()));
    let extra = format!(
        "[[models]]\nid = \"pool\"\n\
         backend = {{ kind = \"openai\", upstreams = [{{ base_url = \"http://{sim_addr}/v1\" }}] }}\n"
    );
    let region = RegionSandbox::start_with_config("eu-west", &extra).await;
    let client = reqwest::Client::new();
    let direct = format!("http://{sim_addr}/v1/chat/completions");
    let via = format!("{}/v1/chat/completions", region.url());

    // Warm both paths' connection pools.
    run(&client, &direct, "pool", rps, rps / 2).await;
    run(&client, &via, "pool", rps, rps / 2).await;
    let d = run(&client, &direct, "pool", rps, n).await;
    let r = run(&client, &via, "pool", rps, n).await;
    println!("inference overhead, {n} requests at {rps}/s, non-streamed, 8 tokens:");
    println!(
        "  direct to the sim:  p50 {:.3} ms  p99 {:.3} ms",
        ms(percentile(&d, 0.5)),
        ms(percentile(&d, 0.99))
    );
    println!(
        "  through the region: p50 {:.3} ms  p99 {:.3} ms",
        ms(percentile(&r, 0.5)),
        ms(percentile(&r, 0.99))
    );
    println!(
        "  region overhead:    p50 {:.3} ms  p99 {:.3} ms",
        ms(percentile(&r, 0.5)) - ms(percentile(&d, 0.5)),
        ms(percentile(&r, 0.99)) - ms(percentile(&d, 0.99))
    );
}
