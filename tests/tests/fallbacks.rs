//! Fallbacks between models within a region: a model whose upstreams
//! answer 429 or 5xx, cannot be reached, or send nothing before the
//! first-byte timeout hands the request to its next fallback; one too small
//! for a prompt hands it to its first context fallback that fits. The
//! answer names the model that served and says why in
//! `x-meridian-fallback`, and the usage row records the model that served.

use meridian_tests::{
    ClusterSandbox, FaultyUpstream, RegionSandbox, SimServer, TEST_MODEL, init_logging,
    instant_sim, metric,
};
use serde_json::{Value, json};
use sqlx::PgPool;

const BACKUP: &str = "backup";
const BIG: &str = "big";

/// A pooled model at `base_url` that falls back to `backup`; no retries on
/// its one upstream, so the fallback comes at once.
fn pooled(id: &str, base_url: &str, options: &str) -> String {
    format!(
        "[[models]]\nid = \"{id}\"\nfallbacks = [\"{BACKUP}\"]\n\
         backend = {{ kind = \"openai\", retries = 0, upstreams = [{{ base_url = \"{base_url}\" }}]{options} }}\n"
    )
}

fn sim(id: &str, window: u32, extra: &str) -> String {
    format!(
        "[[models]]\nid = \"{id}\"\ncontext_window_tokens = {window}\n{extra}\
         backend = {{ kind = \"sim\", ttft_ms = 0, per_token_ms = 0, prefill_us_per_token = 0 }}\n"
    )
}

/// A port nothing listens on.
async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/v1")
}

async fn chat(url: &str, model: &str, content: &str, stream: bool) -> (u16, Value, Value) {
    let res = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .header("x-meridian-tenant", "acme")
        .json(&json!({"model": model, "stream": stream, "max_tokens": 8,
            "messages": [{"role": "user", "content": content}]}))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let header = |name: &str| {
        res.headers()
            .get(name)
            .map_or(Value::Null, |v| v.to_str().unwrap().into())
    };
    let headers =
        json!({"model": header("x-meridian-model"), "fallback": header("x-meridian-fallback")});
    let text = res.text().await.unwrap();
    let body = if stream {
        let model = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find_map(|c| c["model"].as_str().map(str::to_string));
        json!({"model": model})
    } else {
        serde_json::from_str(&text).unwrap_or(json!({"raw": text}))
    };
    (status, headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_trigger_hands_the_request_to_the_next_model_and_says_so() {
    init_logging();
    let (overloaded, broken, silent) = tokio::join!(
        FaultyUpstream::answering(429),
        FaultyUpstream::answering(502),
        FaultyUpstream::silent()
    );
    let config = [
        pooled("rate-limited", &overloaded.base_url(), ""),
        pooled("broken", &broken.base_url(), ""),
        pooled("unreachable", &closed_port().await, ""),
        pooled(
            "wedged",
            &silent.base_url(),
            ", first_byte_timeout_ms = 300",
        ),
        // Too small for a long prompt: the first context fallback that
        // fits serves it (`big`; `tiny` is skipped, being smaller still).
        sim("small", 64, "context_fallbacks = [\"tiny\", \"big\"]\n"),
        sim("tiny", 32, ""),
        sim(BIG, 8192, ""),
        sim(BACKUP, 8192, ""),
        // The alias's own list wins over its model's.
        "[[aliases]]\nid = \"auto\"\nweights = { \"broken\" = 1 }\nfallbacks = [\"big\"]\n".into(),
    ]
    .concat();
    let region = RegionSandbox::start_with_config("eu-west", &config).await;
    let url = region.url();

    for (model, upstream) in [
        ("rate-limited", Some(&overloaded)),
        ("broken", Some(&broken)),
        ("unreachable", None),
        ("wedged", Some(&silent)),
    ] {
        for stream in [false, true] {
            let (status, headers, body) = chat(&url, model, "hello", stream).await;
            assert_eq!(status, 200, "{model} (stream {stream}): {body}");
            assert_eq!(headers["model"], BACKUP, "{model}");
            assert_eq!(
                headers["fallback"],
                format!("from={model}; reason=unavailable"),
                "{model}"
            );
            assert_eq!(body["model"], BACKUP, "{model}");
        }
        if let Some(upstream) = upstream {
            assert!(upstream.chats() > 0, "{model}'s upstream was tried first");
        }
    }

    let long = "word ".repeat(100);
    let (status, headers, body) = chat(&url, "small", &long, false).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["model"], BIG);
    assert_eq!(headers["fallback"], "from=small; reason=context_window");
    // A prompt that fits needs no fallback.
    let (_, headers, _) = chat(&url, "small", "hello", false).await;
    assert_eq!(headers["model"], "small");
    assert_eq!(headers["fallback"], Value::Null);

    let (status, headers, _) = chat(&url, "auto", "hello", false).await;
    assert_eq!(status, 200);
    assert_eq!(headers["model"], BIG);
    assert_eq!(headers["fallback"], "from=broken; reason=unavailable");

    // Usage rows name the model that served.
    let pool = PgPool::connect(&region.postgres.url()).await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let served: Vec<(String, i64)> = loop {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT model, count(*) FROM inference_usage WHERE tenant = 'acme' \
             AND status = 'ok' GROUP BY model ORDER BY model",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        if rows.iter().map(|(_, n)| n).sum::<i64>() >= 11 || tokio::time::Instant::now() > deadline
        {
            break rows;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(
        served,
        [(BACKUP.into(), 8), (BIG.into(), 2), ("small".into(), 1)],
        "usage rows by the model that served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_fitting_fallback_the_request_gets_the_first_models_error() {
    init_logging();
    let broken = FaultyUpstream::answering(500).await;
    let config = [
        // Its fallback is too small for the prompt: not tried.
        format!(
            "[[models]]\nid = \"broken\"\nfallbacks = [\"tiny\"]\n\
             backend = {{ kind = \"openai\", retries = 0, upstreams = [{{ base_url = \"{}\" }}] }}\n",
            broken.base_url()
        ),
        sim("tiny", 32, ""),
        sim("small", 64, "context_fallbacks = [\"tiny\"]\n"),
    ]
    .concat();
    let region = RegionSandbox::start_with_config("eu-west", &config).await;
    let long = "word ".repeat(70);
    let (status, headers, body) = chat(&region.url(), "broken", &long, false).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers["fallback"], Value::Null);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&broken.base_url()),
        "{body}"
    );
    let (status, _, body) = chat(&region.url(), "small", &long, false).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
}

/// A model whose upstreams are all down in one region is that model's
/// failure, not the region's: the region says so (`x-meridian-model-failed`),
/// the gateway replays the request in another region where the model
/// answers (within its retry budget), and keeps the region for everything
/// else instead of ejecting it after a run of 503s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_failing_in_one_region_does_not_eject_the_region() {
    init_logging();
    let working = SimServer::start(instant_sim()).await;
    let dead = closed_port().await;
    let upstream = |region: &str| {
        let base_url = if region == "eu-west" {
            dead.clone()
        } else {
            working.base_url()
        };
        format!(
            "[[models]]\nid = \"hosted\"\n\
             backend = {{ kind = \"openai\", retries = 0, upstreams = [{{ base_url = \"{base_url}\" }}] }}\n"
        )
    };
    let sandbox =
        ClusterSandbox::start_configured(&["eu-west", "us-east"], upstream, |_, _| {}).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", sandbox.gateway_url());
    let ask = |model: &str, session: &str| {
        let request = http
            .post(&url)
            .header("x-meridian-session", session)
            .json(&json!({"model": model, "max_tokens": 4,
                "messages": [{"role": "user", "content": "hi"}]}));
        async move {
            let res = request.send().await.unwrap();
            let served_by = res.headers()["x-meridian-served-by"]
                .to_str()
                .unwrap()
                .to_string();
            (res.status().as_u16(), served_by)
        }
    };
    // A session the gateway homes in eu-west.
    let mut session = None;
    for i in 0..200 {
        let id = format!("model-failed-{i}");
        if ask(TEST_MODEL, &id).await == (200, "eu-west".to_string()) {
            session = Some(id);
            break;
        }
    }
    let session = session.expect("no session homes in eu-west");

    // Far more 503s from eu-west than ejection takes. Each is replayed in
    // us-east while the gateway's retry budget lasts; past it, the client
    // gets eu-west's 503.
    let mut replayed = 0;
    for i in 0..30 {
        match ask("hosted", &session).await {
            (200, region) if region == "us-east" => replayed += 1,
            (503, region) if region == "eu-west" => {}
            other => panic!("request {i}: {other:?}"),
        }
    }
    assert!(
        replayed >= 1,
        "no request was served where the model answers"
    );
    let metrics = format!("{}/metrics", sandbox.admin_url());
    let ejections = metric(
        &metrics,
        "meridian_gateway_region_ejections_total",
        &["region=\"eu-west\""],
    )
    .await;
    assert_eq!(
        ejections, 0.0,
        "eu-west was ejected for its model's upstreams"
    );
    let healthy = metric(
        &metrics,
        "meridian_gateway_region_healthy",
        &["region=\"eu-west\""],
    )
    .await;
    assert_eq!(healthy, 1.0, "eu-west is not in service");
    assert_eq!(
        ask(TEST_MODEL, &session).await,
        (200, "eu-west".to_string()),
        "the session's other models are still served at home"
    );
}
