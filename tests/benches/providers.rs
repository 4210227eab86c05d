//! What a provider's protocol costs on the way through a region: the same
//! requests, at the same fixed rate, to three models of one region, each a
//! pool of one simulator: plain HTTP speaking OpenAI's protocol (the
//! baseline), HTTPS (HTTP/2, a test CA) in front of the same simulator,
//! and a simulator speaking Anthropic's Messages API, which the region
//! translates both ways. The simulators answer at once, so the latency is
//! the hops and the region's work. Rounds alternate between the models so
//! a noisy neighbour hurts all three alike. Reports p50 and p99 of each and
//! their ratio to the baseline. Run with `make bench` (or `cargo bench -p
//! meridian-tests --bench providers`); `BENCH_RPS`, `BENCH_SECONDS` set the
//! rate and the duration per model.

use std::time::Duration;

use meridian_regional::{SimConfig, SimProtocol, serve_sim_as};
use meridian_tests::load::{env_or, ms, percentile, service_times};
use meridian_tests::{RegionSandbox, TestPki, TlsUpstream, instant_sim};
use serde_json::json;

/// `n` requests to `model` at `rps`; each latency added to `into`.
async fn run(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    rps: u64,
    n: u64,
    into: &mut Vec<Duration>,
) {
    let times = service_times(client, url, rps, n, |i| {
        json!({ "model": model, "max_tokens": 8,
            "messages": [{ "role": "system", "content": "Be brief." },
                         { "role": "user", "content": format!("benchmark request {i}") }] })
    })
    .await;
    into.extend(times);
}

async fn sim(protocol: SimProtocol) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = SimConfig {
        max_concurrency: 1024,
        ..instant_sim()
    };
    tokio::spawn(serve_sim_as(
        protocol,
        config,
        listener,
        std::future::pending(),
        meridian_mesh::Tracer::disabled(),
        Vec::new(),
    ));
    addr
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rps = env_or("BENCH_RPS", 200);
    let n = rps * env_or("BENCH_SECONDS", 5);
    let (openai, anthropic) = tokio::join!(sim(SimProtocol::OpenAi), sim(SimProtocol::Anthropic));
    let pki = TestPki::new();
    let tls = TlsUpstream::start(&pki, openai, false).await;
    let pool = |id: &str, kind: &str, base_url: &str, extra: &str| {
        format!(
            "[[models]]\nid = \"{id}\"\n\
             backend = {{ kind = \"{kind}\", upstreams = [{{ base_url = \"{base_url}\" }}]{extra} }}\n"
        )
    };
    let config = [
        pool("plain", "openai", &format!("http://{openai}/v1"), ""),
        pool(
            "https",
            "openai",
            &tls.base_url(),
            &format!(", ca_file = {:?}", tls.ca_file()),
        ),
        pool(
            "anthropic",
            "anthropic",
            &format!("http://{anthropic}/v1"),
            "",
        ),
    ]
    .concat();
    let region = RegionSandbox::start_with_config("eu-west", &config).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", region.url());
    let models = ["plain", "https", "anthropic"];

    // Warm every pool's connections.
    for m in models {
        run(&client, &url, m, rps, rps / 2, &mut Vec::new()).await;
    }
    let rounds = 10;
    let mut latencies = vec![Vec::new(); models.len()];
    for _ in 0..rounds {
        for (i, m) in models.iter().enumerate() {
            run(&client, &url, m, rps, n / rounds, &mut latencies[i]).await;
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
        "providers through a region, {} requests each at {rps}/s, non-streamed, 8 tokens:",
        latencies[0].len()
    );
    for (m, l) in models.iter().zip(&latencies) {
        let (p50, p99) = (ms(percentile(l, 0.5)), ms(percentile(l, 0.99)));
        println!(
            "  {m:<10} p50 {p50:.3} ms ({:.2}x)  p99 {p99:.3} ms ({:.2}x)",
            p50 / base50,
            p99 / base99
        );
    }
    println!("  (ratios against `plain`: OpenAI's protocol over plain HTTP, same run)");
}
