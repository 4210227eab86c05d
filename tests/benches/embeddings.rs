//! The built-in embedding model through one region's HTTP API: model load
//! time at start, latency of one short text alone (p50/p99 of sequential
//! requests), and throughput of `BENCH_CONCURRENCY` clients sending
//! `BENCH_TEXTS` texts each, `BENCH_ROUNDS` times, which the node batches.
//! The ratio of the two throughputs is what batching buys on this machine.
//! Run with `make bench` or `cargo bench -p meridian-tests --bench embeddings`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use meridian_tests::{RegionSandbox, embedding_model_dir};
use serde_json::{Value, json};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const TEXT: &str = "Meridian routes each request to the nearest healthy region.";

#[tokio::main]
async fn main() {
    // reqwest is built without a default TLS provider in this crate.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let concurrency = env("BENCH_CONCURRENCY", 8);
    let texts = env("BENCH_TEXTS", 8);
    let rounds = env("BENCH_ROUNDS", 10);
    let singles = env("BENCH_SINGLES", 100);
    let extra = format!(
        "[embeddings]\nmodel_dir = {:?}\nmax_batch = 32\nmax_wait_ms = 2\n",
        embedding_model_dir()
    );
    let region = RegionSandbox::start_with_config("eu-west", &extra).await;
    let url = format!("{}/v1/embeddings", region.url());
    let client = reqwest::Client::new();
    let embed = |input: Value| {
        let (client, url) = (&client, &url);
        async move {
            let res = client
                .post(url)
                .json(&json!({ "model": "all-minilm-l6-v2", "input": input }))
                .send()
                .await
                .expect("embed");
            assert_eq!(res.status(), 200);
        }
    };

    let metric = |name: &'static str| {
        let url = format!("{}/metrics", region.url());
        async move {
            let text = reqwest::get(url).await.unwrap().text().await.unwrap();
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no {name} on /metrics"))
        }
    };
    let load = metric("meridian_embedding_load_seconds").await;
    println!("model load at start: {:.0} ms", load * 1e3);

    embed(json!(TEXT)).await;
    let mut latencies = Vec::with_capacity(singles);
    let started = Instant::now();
    for _ in 0..singles {
        let t = Instant::now();
        embed(json!(TEXT)).await;
        latencies.push(t.elapsed());
    }
    let single_rate = singles as f64 / started.elapsed().as_secs_f64();
    // The model's own share, without HTTP and the batching window.
    let forward = metric("meridian_embedding_forward_seconds_sum").await
        / metric("meridian_embedding_forward_seconds_count").await;
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    println!(
        "one text alone: p50 {:?}, p99 {:?} ({single_rate:.0} texts/s sequentially); \
         forward pass {:.1} ms",
        pct(50),
        pct(99),
        forward * 1e3
    );

    let batch: Vec<String> = (0..texts).map(|i| format!("{TEXT} ({i})")).collect();
    let started = Instant::now();
    futures::stream::iter(0..concurrency * rounds)
        .map(|_| embed(json!(batch)))
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
    let elapsed: Duration = started.elapsed();
    let rate = (concurrency * rounds * texts) as f64 / elapsed.as_secs_f64();
    println!(
        "{concurrency} clients × {texts} texts × {rounds} rounds: {rate:.0} texts/s, \
         {:.1}× one-at-a-time",
        rate / single_rate
    );
}
