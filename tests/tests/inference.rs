//! Inference in one region: pools of real OpenAI-compatible HTTP upstreams
//! (the simulator served by `serve_sim`), streaming, failover, prefix
//! affinity, deadlines, aliases and reload, admission control, bad input.

use std::time::{Duration, Instant};

use futures::StreamExt;
use meridian_proto::v1::inference_client::InferenceClient;
use meridian_proto::v1::{ChatMessage, GenerateRequest};
use meridian_regional::SimConfig;
use meridian_tests::{
    RegionSandbox, SimServer, TEST_SLOW_MODEL, init_logging, instant_sim, metric,
};
use serde_json::{Value, json};

fn slow_sim() -> SimConfig {
    SimConfig {
        prefill_us_per_token: 0,
        ttft_ms: 50,
        per_token_ms: 100,
        ..SimConfig::default()
    }
}

/// A `[[models]]` table for a pool of `upstreams`, with `options` added.
fn pool_model(id: &str, upstreams: &[&SimServer], options: &str) -> String {
    let list = upstreams
        .iter()
        .map(|u| format!("{{ base_url = \"{}\" }}", u.base_url()))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[[models]]\nid = \"{id}\"\n\
         backend = {{ kind = \"openai\", upstreams = [{list}]{options} }}\n"
    )
}

fn chat(model: &str, content: &str, max_tokens: u32) -> Value {
    json!({ "model": model, "max_tokens": max_tokens, "seed": 1,
        "messages": [{ "role": "user", "content": content }] })
}

/// reqwest is built with TLS but no crypto provider in this crate, and the
/// region's upstream client is the same reqwest: install one before any
/// client (the test's or the region's) is made.
fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn grpc(region: &RegionSandbox) -> InferenceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(region.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    InferenceClient::new(channel)
}

fn generate(model: &str, content: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: content.into(),
            ..Default::default()
        }],
        max_tokens: Some(max_tokens),
        seed: Some(1),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_passes_through_token_by_token_and_deadlines_cut() {
    init_logging();
    let client = http();
    let (a, b) = (
        SimServer::start(slow_sim()).await,
        SimServer::start(slow_sim()).await,
    );
    let region = RegionSandbox::start_with_config(
        "eu-west",
        &pool_model("pool", &[&a, &b], ", health_interval_ms = 100"),
    )
    .await;
    let url = format!("{}/v1/chat/completions", region.url());

    // 8 tokens 100 ms apart: the first must arrive long before the last.
    let mut body = chat("pool", "stream to me", 8);
    body["stream"] = true.into();
    let started = Instant::now();
    let res = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-meridian-model"], "pool");
    let mut events = res.bytes_stream();
    let (mut first, mut last, mut text, mut done) = (None, None, String::new(), false);
    let mut buf = String::new();
    while let Some(bytes) = events.next().await {
        buf.push_str(std::str::from_utf8(&bytes.unwrap()).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data = event.trim().strip_prefix("data: ").unwrap_or("");
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            assert_eq!(v["model"], "pool");
            if let Some(delta) = v["choices"][0]["delta"]["content"].as_str()
                && !delta.is_empty()
            {
                first.get_or_insert(started.elapsed());
                last = Some(started.elapsed());
                text.push_str(delta);
            }
        }
    }
    let (first, last) = (first.unwrap(), last.unwrap());
    println!("first token after {first:?}, last after {last:?}");
    assert!(done && !text.is_empty());
    assert!(
        last >= first + Duration::from_millis(300),
        "tokens arrived together: first {first:?}, last {last:?}"
    );

    // 30 tokens take over 3 s; a 300 ms deadline answers 504 long before.
    let started = Instant::now();
    let res = client
        .post(&url)
        .header("x-meridian-timeout-ms", "300")
        .json(&chat("pool", "a long answer please", 30))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(res.status(), 504);
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["error"]["type"], "timeout_error");
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // gRPC. tonic's client enforces `grpc-timeout` itself and would win the
    // race against the region, so the deadline goes in the header the
    // region also reads on gRPC (`grpc-timeout` parsing is unit-tested).
    let mut grpc = grpc(&region).await;
    let mut req = tonic::Request::new(generate("pool", "a long answer please", 30));
    req.metadata_mut()
        .insert("x-meridian-timeout-ms", "300".parse().unwrap());
    let started = Instant::now();
    let status = grpc.generate(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("deadline"), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // A stream cut mid-way ends with an error event, not [DONE].
    let mut body = chat("pool", "stream a long one", 30);
    body["stream"] = true.into();
    let res = client
        .post(&url)
        .header("x-meridian-timeout-ms", "400")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(
        text.contains("timeout_error") && !text.contains("[DONE]"),
        "{text}"
    );

    // The region still serves.
    let res = client
        .post(&url)
        .json(&chat("pool", "short", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_upstream_is_ejected_and_traffic_moves_without_errors() {
    init_logging();
    let client = http();
    let (mut a, b) = (
        SimServer::start(instant_sim()).await,
        SimServer::start(instant_sim()).await,
    );
    let (mut c, d) = (
        SimServer::start(instant_sim()).await,
        SimServer::start(instant_sim()).await,
    );
    // `pool` checks health only at start, so what ejects `a` below is the
    // breaker, fed by requests; `checked` sees no requests, so what ejects
    // `c` is the health check.
    let extra = pool_model("pool", &[&a, &b], ", health_interval_ms = 600000")
        + &pool_model("checked", &[&c, &d], ", health_interval_ms = 100");
    let region = RegionSandbox::start_with_config("eu-west", &extra).await;
    let url = format!("{}/v1/chat/completions", region.url());
    let send = |i: usize| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .post(&url)
                .json(&chat("pool", &format!("question {i}"), 4))
                .send()
                .await
                .unwrap()
        }
    };
    for i in 0..20 {
        assert_eq!(send(i).await.status(), 200);
    }
    let queries = "meridian_sim_prefix_cache_queries_total";
    assert!(
        a.metric(queries).await > 0.0 && b.metric(queries).await > 0.0,
        "both upstreams serve"
    );

    a.kill().await;
    // Requests that start after the kill never see it: a connect error
    // before the first byte is retried on the other upstream.
    let before = b.metric("meridian_sim_prefix_cache_queries_total").await;
    for i in 0..30 {
        let res = send(100 + i).await;
        assert_eq!(res.status(), 200, "request {i} after the kill");
    }
    assert!(b.metric("meridian_sim_prefix_cache_queries_total").await > before);

    // The breaker opened after `breaker_failures` (3) failed attempts, each
    // retried on `b`, and keeps `a` out.
    let metrics = format!("{}/metrics", region.url());
    let label = format!("upstream=\"{}\"", a.base_url());
    let failed = metric(
        &metrics,
        "meridian_upstream_attempts_total",
        &[&label, "outcome=\"failed\""],
    )
    .await;
    println!("attempts on the killed upstream that failed and were retried: {failed}");
    assert!(failed >= 3.0, "{failed}");
    assert_eq!(
        metric(&metrics, "meridian_upstream_up", &[&label]).await,
        0.0
    );

    // The health check ejects an upstream that no request has touched.
    let label = format!("upstream=\"{}\"", c.base_url());
    assert_eq!(
        metric(&metrics, "meridian_upstream_up", &[&label]).await,
        1.0
    );
    c.kill().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&metrics, "meridian_upstream_up", &[&label]).await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the health check never ejects it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let res = client
        .post(&url)
        .json(&chat("checked", "still there?", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(d.metric(queries).await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_affinity_raises_the_prefix_cache_hit_rate() {
    init_logging();
    let client = http();
    // Each simulator's cache holds 5 of the 8 shared prefixes (10 blocks
    // each): enough for the half that affinity sends it, too few for all
    // eight, which is what least-load spreading makes every upstream see.
    // Expected: affinity 11/12 of the prefix tokens after the first round
    // (about 0.86), least-load about 0.45 (at most 0.67 in 20 000 simulated
    // runs of this workload).
    let sim = SimConfig {
        prefill_us_per_token: 0,
        // Long enough that a round's 8 requests are all in flight at once,
        // so least-outstanding spreads the first round 4 and 4.
        ttft_ms: 200,
        per_token_ms: 0,
        prefix_cache_blocks: 50,
        prefix_block_tokens: 16,
        ..SimConfig::default()
    };
    let mut sims = Vec::new();
    for _ in 0..4 {
        sims.push(SimServer::start(sim.clone()).await);
    }
    // The factor leaves room for a round's requests reaching the region in
    // another order than the last round's.
    let extra = pool_model(
        "affine",
        &[&sims[0], &sims[1]],
        ", affinity_overload_factor = 3.0",
    ) + &pool_model(
        "least-load",
        &[&sims[2], &sims[3]],
        ", affinity_prefix_bytes = 0",
    );
    let region = RegionSandbox::start_with_config("eu-west", &extra).await;
    let url = format!("{}/v1/chat/completions", region.url());
    let prefixes: Vec<String> = (0..8)
        .map(|p| {
            (0..160)
                .map(|w| format!("p{p}w{w}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let workload = |model: &'static str| {
        let (client, url, prefixes) = (client.clone(), url.clone(), prefixes.clone());
        async move {
            // Rounds of 8 concurrent requests, one per prefix.
            for round in 0..12 {
                let requests = prefixes.iter().enumerate().map(|(p, prefix)| {
                    let body = json!({ "model": model, "max_tokens": 1,
                        "messages": [{ "role": "user",
                            "content": format!("{prefix} question {round} {p}") }] });
                    let (client, url) = (&client, &url);
                    async move { client.post(url).json(&body).send().await.unwrap().status() }
                });
                for status in futures::future::join_all(requests).await {
                    assert_eq!(status, 200);
                }
            }
        }
    };
    tokio::join!(workload("affine"), workload("least-load"));
    let mut rates = Vec::new();
    for pair in sims.chunks(2) {
        let (mut hits, mut queries) = (0.0, 0.0);
        for s in pair {
            hits += s.metric("meridian_sim_prefix_cache_hits_total").await;
            queries += s.metric("meridian_sim_prefix_cache_queries_total").await;
        }
        rates.push(hits / queries);
    }
    println!(
        "prefix cache hit rate: affinity {:.3}, least-load {:.3}",
        rates[0], rates[1]
    );
    assert!(
        rates[0] > rates[1] + 0.15,
        "affinity {:.3} is not clearly above least-load {:.3}",
        rates[0],
        rates[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_openai_errors_and_the_region_keeps_serving() {
    init_logging();
    let extra = "[[models]]\nid = \"tiny\"\ncontext_window_tokens = 40\n\
                 backend = { kind = \"sim\", ttft_ms = 0, per_token_ms = 0 }\n";
    let region = RegionSandbox::start_with_config("eu-west", extra).await;
    let client = http();
    let url = format!("{}/v1/chat/completions", region.url());
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str, Value)> = vec![
        (
            "malformed JSON",
            client
                .post(&url)
                .body("{\"model\": ")
                .header("content-type", "application/json"),
            400,
            "invalid_request_error",
            Value::Null,
        ),
        (
            "unknown model",
            client.post(&url).json(&chat("no-such-model", "hi", 4)),
            404,
            "not_found_error",
            json!("model_not_found"),
        ),
        (
            "empty messages",
            client
                .post(&url)
                .json(&json!({ "model": "tiny", "messages": [] })),
            400,
            "invalid_request_error",
            Value::Null,
        ),
        (
            "oversized prompt",
            client
                .post(&url)
                .json(&chat("tiny", &"word ".repeat(100), 4)),
            400,
            "invalid_request_error",
            json!("context_length_exceeded"),
        ),
        (
            "negative max_tokens",
            client
                .post(&url)
                .json(&json!({ "model": "tiny", "max_tokens": -5,
                "messages": [{ "role": "user", "content": "hi" }] })),
            400,
            "invalid_request_error",
            Value::Null,
        ),
        (
            "legacy completion, several prompts",
            client
                .post(format!("{}/v1/completions", region.url()))
                .json(&json!({ "model": "tiny", "prompt": ["one", "two"] })),
            400,
            "invalid_request_error",
            Value::Null,
        ),
    ];
    for (what, request, status, kind, code) in cases {
        let res = request.send().await.unwrap();
        assert_eq!(res.status(), status, "{what}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"]["type"], kind, "{what}: {body}");
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().len() > 5,
            "{what}"
        );
    }
    let res: Value = client
        .post(&url)
        .json(&json!({ "model": "tiny", "max_tokens": -5,
            "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(res["error"]["param"], "max_tokens");

    let mut grpc = grpc(&region).await;
    for (what, req, code) in [
        (
            "unknown model",
            generate("no-such-model", "hi", 4),
            tonic::Code::NotFound,
        ),
        (
            "empty messages",
            GenerateRequest {
                messages: vec![],
                ..generate("tiny", "hi", 4)
            },
            tonic::Code::InvalidArgument,
        ),
        (
            "oversized prompt",
            generate("tiny", &"word ".repeat(100), 4),
            tonic::Code::InvalidArgument,
        ),
        (
            "zero max_tokens",
            generate("tiny", "hi", 0),
            tonic::Code::InvalidArgument,
        ),
    ] {
        let status = grpc.generate(req).await.unwrap_err();
        assert_eq!(status.code(), code, "{what}: {status:?}");
    }

    // Still serving, on every surface.
    let res = client
        .post(&url)
        .json(&chat("tiny", "hi", 4))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let done = grpc
        .generate(generate("tiny", "hi", 4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.model, "tiny");
    let legacy: Value = client
        .post(format!("{}/v1/completions", region.url()))
        .json(&json!({ "model": "tiny", "prompt": ["once upon a time"], "max_tokens": 3 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(legacy["object"], "text_completion");
    assert!(!legacy["choices"][0]["text"].as_str().unwrap().is_empty());
    assert!(legacy["usage"]["completion_tokens"].as_u64().unwrap() <= 3);
    let streamed = client
        .post(format!("{}/v1/completions", region.url()))
        .json(&json!({ "model": "tiny", "prompt": "once", "max_tokens": 3, "stream": true }))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        streamed.contains("\"text_completion\"") && streamed.contains("[DONE]"),
        "{streamed}"
    );
}

const ALIASES: &str = "\
[[models]]\nid = \"small-m\"\nbackend = { kind = \"sim\", ttft_ms = 0, per_token_ms = 0 }\n\
[[models]]\nid = \"large-m\"\nbackend = { kind = \"sim\", ttft_ms = 0, per_token_ms = 0 }\n\
[[models]]\nid = \"sim-v1\"\nbackend = { kind = \"sim\", ttft_ms = 0, per_token_ms = 0 }\n\
[[models]]\nid = \"sim-v2\"\nbackend = { kind = \"sim\", ttft_ms = 0, per_token_ms = 0 }\n\
[[aliases]]\nid = \"auto\"\nsmall = \"small-m\"\nlarge = \"large-m\"\nlarge_above_prompt_tokens = 64\n";

fn split(v1: u32, v2: u32) -> String {
    format!(
        "{ALIASES}[[aliases]]\nid = \"sim\"\nweights = {{ \"sim-v1\" = {v1}, \"sim-v2\" = {v2} }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_route_by_size_and_weight_and_reload_flips_the_split() {
    init_logging();
    let mut region = RegionSandbox::start_with_config("eu-west", &split(90, 10)).await;
    let client = http();
    let url = format!("{}/v1/chat/completions", region.url());
    let served = |body: Value, hint: Option<&'static str>| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let mut req = client.post(&url).json(&body);
            if let Some(h) = hint {
                req = req.header("x-meridian-routing-hint", h);
            }
            let res = req.send().await.unwrap();
            assert_eq!(res.status(), 200);
            let header = res.headers()["x-meridian-model"]
                .to_str()
                .unwrap()
                .to_string();
            let body: Value = res.json().await.unwrap();
            assert_eq!(body["model"], header.as_str(), "body and header agree");
            header
        }
    };
    let long = "word ".repeat(200);
    assert_eq!(served(chat("auto", "hi", 2), None).await, "small-m");
    assert_eq!(served(chat("auto", &long, 2), None).await, "large-m");
    let mut tools = chat("auto", "hi", 2);
    tools["tools"] = json!([{ "type": "function", "function": { "name": "f", "parameters": {} } }]);
    assert_eq!(served(tools, None).await, "large-m");
    assert_eq!(
        served(chat("auto", "hi", 2), Some("large")).await,
        "large-m"
    );
    assert_eq!(
        served(chat("auto", &long, 2), Some("small")).await,
        "small-m"
    );
    let mut grpc = grpc(&region).await;
    let hinted = GenerateRequest {
        routing_hint: "large".into(),
        ..generate("auto", "hi", 2)
    };
    let res = grpc.generate(hinted).await.unwrap();
    assert_eq!(res.metadata().get("x-meridian-model").unwrap(), "large-m");
    assert_eq!(res.into_inner().model, "large-m");

    // The listing carries the aliases.
    let models: Value = client
        .get(format!("{}/v1/models", region.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"auto") && ids.contains(&"sim") && ids.contains(&"sim-v1"));

    // Seeded requests pick their version by hash: the split is the same in
    // every run, so these bounds hold without flaking.
    let count_v2 = || async {
        let mut v2 = 0;
        for seed in 0..200 {
            let mut body = chat("sim", "hello", 1);
            body["seed"] = seed.into();
            if served(body, None).await == "sim-v2" {
                v2 += 1;
            }
        }
        v2
    };
    let before = count_v2().await;
    println!("sim-v2 share at 90/10: {before}/200");
    assert!((5..=45).contains(&before), "{before}");

    region.rewrite_config(&split(10, 90));
    let res = client
        .post(format!("{}/admin/reload", region.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let after = count_v2().await;
    println!("sim-v2 share at 10/90: {after}/200");
    assert!((155..=195).contains(&after), "{after}");

    // A broken file is refused and the table stays as it was.
    std::fs::write(region.config_path(), "region = ").unwrap();
    let res = client
        .post(format!("{}/admin/reload", region.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(count_v2().await, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_refuses_past_the_tenant_limit_at_once() {
    init_logging();
    let region = RegionSandbox::start_with_config(
        "eu-west",
        "[inference]\nmax_in_flight_per_tenant = 2\nretry_after_ms = 2000\n",
    )
    .await;
    let client = http();
    let url = format!("{}/v1/chat/completions", region.url());
    let stream_body = {
        let mut b = chat(TEST_SLOW_MODEL, "keep going", 40);
        b["stream"] = true.into();
        b
    };
    let as_tenant = |tenant: &'static str, body: &Value| {
        client
            .post(&url)
            .header("x-meridian-tenant", tenant)
            .json(body)
            .send()
    };
    // Two long streams hold acme's two slots (their responses stay unread).
    let held = vec![
        as_tenant("acme", &stream_body).await.unwrap(),
        as_tenant("acme", &stream_body).await.unwrap(),
    ];
    assert!(held.iter().all(|r| r.status() == 200));

    let started = Instant::now();
    let res = as_tenant("acme", &chat(TEST_SLOW_MODEL, "one more", 1))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "2");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");

    let mut grpc = grpc(&region).await;
    let mut req = tonic::Request::new(generate(TEST_SLOW_MODEL, "one more", 1));
    req.metadata_mut()
        .insert("x-meridian-tenant", "acme".parse().unwrap());
    let status = grpc.generate(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    let detail = meridian_proto::error_detail(&status).expect("an ErrorDetail");
    assert!(
        detail.retryable && detail.retry_after_ms == 2000,
        "{detail:?}"
    );

    // Another tenant is not affected.
    let res = as_tenant("other", &chat(TEST_SLOW_MODEL, "hi", 1))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // Closing the streams gives the slots back.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let res = as_tenant("acme", &chat(TEST_SLOW_MODEL, "again", 1))
            .await
            .unwrap();
        if res.status() == 200 {
            break;
        }
        assert_eq!(res.status(), 429);
        assert!(Instant::now() < deadline, "slots never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_ten_times_slower_than_its_peers_stops_getting_traffic() {
    init_logging();
    let client = http();
    let [a, b, slow] = SimServer::one_slow_of_three().await;
    // No affinity: upstreams are chosen by load alone, so the slow one gets
    // its share until its breaker opens; a long cooldown keeps it out.
    let extra = pool_model(
        "pool",
        &[&a, &b, &slow],
        ", affinity_prefix_bytes = 0, breaker_cooldown_ms = 600000",
    );
    let region = RegionSandbox::start_with_config("eu-west", &extra).await;
    let url = format!("{}/v1/chat/completions", region.url());
    let metrics = format!("{}/metrics", region.url());
    let label = format!("upstream=\"{}\"", slow.base_url());
    let send = |i: usize| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let res = client
                .post(&url)
                .json(&chat("pool", &format!("question {i}"), 2))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200, "request {i}");
        }
    };
    let mut sent = 0;
    while metric(&metrics, "meridian_upstream_up", &[&label]).await != 0.0 {
        assert!(sent < 200, "the slow upstream is never taken out");
        send(sent).await;
        sent += 1;
    }
    let slow_answers = metric(
        &metrics,
        "meridian_upstream_attempts_total",
        &[&label, "outcome=\"slow\""],
    )
    .await;
    println!("taken out after {sent} requests, {slow_answers} of its answers slow");
    assert!(slow_answers >= 3.0, "{slow_answers}");
    // Readiness says what the model has left.
    let ready: Value = client
        .get(format!("{}/readyz", region.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        ready["models"]["pool"],
        json!({ "healthy_backends": 2, "total_backends": 3, "serving": true }),
        "{ready}"
    );

    // Out of the pool: what follows goes to its peers only.
    let queries = "meridian_sim_prefix_cache_queries_total";
    let before = slow.metric(queries).await;
    for i in 0..30 {
        send(1000 + i).await;
    }
    assert_eq!(
        slow.metric(queries).await,
        before,
        "the slow upstream got traffic"
    );
    assert!(a.metric(queries).await > 0.0 && b.metric(queries).await > 0.0);
}
