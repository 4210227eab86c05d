//! The response cache's latency per layer and its hit rate on a replayed
//! workload. Latencies (one request at a time, `BENCH_REQUESTS` each) are
//! reported beside a baseline measured in the same run: the same request
//! with the cache bypassed, answered by a simulator that takes no time, so
//! the ratio is the cost of a hit against the cheapest possible model call.
//! The workload replays questions of `tests/data/semantic_pairs.jsonl`
//! with repeats (seeded, `BENCH_SEED`), and reports how each was answered.
//! Run with `make bench` or `cargo bench -p meridian-tests --bench cache`.

use std::time::{Duration, Instant};

use meridian_tests::load::{env_or, ms, percentile};
use meridian_tests::{RegionSandbox, SimServer, embedding_model_dir, instant_sim};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

fn body(content: &str, cached: bool) -> Value {
    let temperature = if cached { 0.0 } else { 0.7 };
    json!({ "model": "pooled", "temperature": temperature, "max_tokens": 16,
        "messages": [{ "role": "user", "content": content }] })
}

async fn ask(client: &reqwest::Client, url: &str, body: &Value) -> (Duration, String) {
    let started = Instant::now();
    let res = client
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 200);
    let cache = res.headers()["x-meridian-cache"]
        .to_str()
        .unwrap()
        .to_string();
    res.bytes().await.expect("body");
    (started.elapsed(), cache)
}

/// `n` sequential requests, the `i`-th with `body(i)`, each expected to be
/// answered `how`.
async fn measure(
    client: &reqwest::Client,
    url: &str,
    body: impl Fn(u64) -> Value,
    how: &str,
    n: u64,
) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let (d, cache) = ask(client, url, &body(i)).await;
        assert_eq!(cache, how, "expected {how}");
        out.push(d);
    }
    out.sort();
    out
}

/// Waits until the node at `url` holds at least `n` semantic entries.
async fn wait_for_entries(url: &str, n: u64) {
    let metrics = format!("{url}/metrics");
    loop {
        let have =
            meridian_tests::metric(&metrics, "meridian_cache_semantic_entries", &[]).await as u64;
        if have >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn report(name: &str, sorted: &[Duration], base: &[Duration]) {
    let (p50, p99) = (percentile(sorted, 0.5), percentile(sorted, 0.99));
    let (b50, b99) = (percentile(base, 0.5), percentile(base, 0.99));
    println!(
        "{name:<22} p50 {:7.3} ms  p99 {:7.3} ms   ratio to baseline: p50 {:.2}  p99 {:.2}",
        ms(p50),
        ms(p99),
        p50.as_secs_f64() / b50.as_secs_f64(),
        p99.as_secs_f64() / b99.as_secs_f64()
    );
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n = env_or("BENCH_REQUESTS", 400);
    let upstream = SimServer::start(meridian_regional::SimConfig {
        max_concurrency: 1024,
        ..instant_sim()
    })
    .await;
    let extra = format!(
        "[[models]]\nid = \"pooled\"\n\
         backend = {{ kind = \"openai\", upstreams = [{{ base_url = \"{}\" }}] }}\n\
         [embeddings]\nmodel_dir = {:?}\nmax_wait_ms = 0\n",
        upstream.base_url(),
        embedding_model_dir()
    );
    let region = RegionSandbox::start_with_config("bench-cache", &extra).await;
    let client = reqwest::Client::new();
    let url = region.url();

    let question = |i: u64| format!("How do I reverse list {i} in Python?");
    let paraphrase = |i: u64| format!("How can I reverse list {i} in Python?");
    let base = measure(&client, &url, |i| body(&question(i), false), "bypass", n).await;
    // Misses store n questions (the model takes no time here: the figure is
    // the cache's own cost, the embedding included), then L1 hits.
    let miss = measure(&client, &url, |i| body(&question(i), true), "miss", n).await;
    let l1 = measure(&client, &url, |i| body(&question(i), true), "hit-l1", n).await;
    // Another node of the region: empty L1, so the same questions come from
    // Redis, and their paraphrases from its semantic index, which it loads
    // from Redis when it starts.
    let other = region.start_extra_node().await;
    wait_for_entries(&other.url(), n).await;
    let l2 = measure(
        &client,
        &other.url(),
        |i| body(&question(i), true),
        "hit-l2",
        n,
    )
    .await;
    let semantic = measure(
        &client,
        &other.url(),
        |i| body(&paraphrase(i), true),
        "hit-semantic",
        n,
    )
    .await;
    println!("cache latency, {n} sequential requests each (one region, loopback):");
    report("baseline (bypass)", &base, &base);
    report("miss (model: 0 ms)", &miss, &base);
    report("hit-l1", &l1, &base);
    report("hit-l2", &l2, &base);
    report("hit-semantic", &semantic, &base);

    // The replayed workload: questions drawn with a skew (a few asked
    // often, most rarely), each asked as itself or as its pair's other half.
    let seed = env_or("BENCH_SEED", 7);
    let mut rng = StdRng::seed_from_u64(seed);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/semantic_pairs.jsonl");
    let pairs: Vec<Value> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let requests = env_or("BENCH_WORKLOAD", 1000);
    let mut counts = std::collections::BTreeMap::<String, u64>::new();
    for _ in 0..requests {
        // Squaring a uniform draw favours low indexes: a long tail.
        let i = ((rng.random::<f64>().powi(2)) * pairs.len() as f64) as usize;
        let side = if rng.random_bool(0.5) { "a" } else { "b" };
        let text = pairs[i][side].as_str().unwrap();
        let (_, cache) = ask(&client, &url, &body(text, true)).await;
        *counts.entry(cache).or_default() += 1;
    }
    println!(
        "replayed workload: {requests} requests over {} question pairs, seed {seed}:",
        pairs.len()
    );
    for (how, count) in &counts {
        println!(
            "  {how:<13} {count:5}  {:.3}",
            *count as f64 / requests as f64
        );
    }
    let hits: u64 = counts
        .iter()
        .filter(|(k, _)| k.starts_with("hit"))
        .map(|(_, v)| v)
        .sum();
    println!("  hit rate      {:.3}", hits as f64 / requests as f64);
}
