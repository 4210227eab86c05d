//! What the Responses API adds to a request: the same short completions of
//! one region's zero-latency simulator, at the same fixed rate, through
//! `/v1/chat/completions` (the baseline), `/v1/responses` not stored (the
//! translation both ways), stored (a row written before the answer), and
//! chained (the previous response read and the chain rebuilt, then
//! stored). Rounds alternate between the four so a noisy neighbour hurts
//! all alike. Reports p50 and p99 of each and their ratio to the baseline.
//! Run with `make bench` (or `cargo bench -p meridian-tests --bench
//! responses`); `BENCH_RPS`, `BENCH_SECONDS` set the rate and the duration
//! per path.

use std::time::Duration;

use meridian_tests::load::{env_or, ms, percentile, service_times};
use meridian_tests::{RegionSandbox, TEST_MODEL};
use serde_json::{Value, json};

#[derive(Clone, Copy)]
enum Path {
    Chat,
    NotStored,
    Stored,
    Chained,
}

impl Path {
    const ALL: [Path; 4] = [Path::Chat, Path::NotStored, Path::Stored, Path::Chained];

    fn name(self) -> &'static str {
        match self {
            Path::Chat => "chat completions",
            Path::NotStored => "responses, store: false",
            Path::Stored => "responses, stored",
            Path::Chained => "responses, chained",
        }
    }

    fn url(self, base: &str) -> String {
        match self {
            Path::Chat => format!("{base}/v1/chat/completions"),
            _ => format!("{base}/v1/responses"),
        }
    }

    fn body(self, i: u64, previous: &str) -> Value {
        let question = format!("benchmark request {i}");
        match self {
            Path::Chat => json!({ "model": TEST_MODEL, "max_tokens": 8,
                "messages": [{ "role": "system", "content": "Be brief." },
                             { "role": "user", "content": question }] }),
            Path::NotStored => json!({ "model": TEST_MODEL, "max_output_tokens": 8,
                "instructions": "Be brief.", "input": question, "store": false }),
            Path::Stored => json!({ "model": TEST_MODEL, "max_output_tokens": 8,
                "instructions": "Be brief.", "input": question }),
            Path::Chained => json!({ "model": TEST_MODEL, "max_output_tokens": 8,
                "instructions": "Be brief.", "input": question,
                "previous_response_id": previous }),
        }
    }
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rps = env_or("BENCH_RPS", 200);
    let n = rps * env_or("BENCH_SECONDS", 5);
    let region = RegionSandbox::start("eu-west").await;
    let base = region.url();
    let client = reqwest::Client::new();
    // The response every chained request continues: one earlier turn.
    let first: Value = client
        .post(format!("{base}/v1/responses"))
        .json(&json!({"model": TEST_MODEL, "input": "My name is Ada.", "max_output_tokens": 8}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("a response");
    let previous = first["id"].as_str().expect("an id").to_string();
    let run = |path: Path, count: u64, offset: u64| {
        let (client, url, previous) = (client.clone(), path.url(&base), previous.clone());
        async move {
            service_times(&client, &url, rps, count, |i| {
                path.body(offset + i, &previous)
            })
            .await
        }
    };
    for path in Path::ALL {
        run(path, rps / 2, 0).await;
    }
    let rounds = 10;
    let mut latencies: Vec<Vec<Duration>> = vec![Vec::new(); Path::ALL.len()];
    for round in 0..rounds {
        for (i, path) in Path::ALL.into_iter().enumerate() {
            let times = run(path, n / rounds, (round + 1) * n).await;
            latencies[i].extend(times);
        }
    }
    for l in &mut latencies {
        l.sort();
    }
    let (base50, base99) = (
        ms(percentile(&latencies[0], 0.5)),
        ms(percentile(&latencies[0], 0.99)),
    );
    println!(
        "the Responses API through a region, {} requests each at {rps}/s, 8 tokens:",
        latencies[0].len()
    );
    for (path, l) in Path::ALL.iter().zip(&latencies) {
        let (p50, p99) = (ms(percentile(l, 0.5)), ms(percentile(l, 0.99)));
        println!(
            "  {:<24} p50 {p50:.3} ms ({:.2}x)  p99 {p99:.3} ms ({:.2}x)",
            path.name(),
            p50 / base50,
            p99 / base99
        );
    }
    println!("  (ratios against chat completions, same run)");
}
