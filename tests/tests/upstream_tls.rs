//! Upstreams as hosted providers are: HTTPS with a certificate from a CA
//! the region must be told about, a key the region reads from its
//! environment or a file, client certificates, static headers, and an
//! upstream that accepts a request and never answers.

use std::time::{Duration, Instant};

use meridian_mesh::Identity;
use meridian_tests::{
    FaultyUpstream, RegionProcess, RegionSandbox, SimServer, TestPki, TlsUpstream, init_logging,
    instant_sim, metric,
};
use serde_json::{Value, json};

const GOOD_KEY: &str = "sk-meridian-test-good-0123456789";
const WRONG_KEY: &str = "sk-meridian-test-WRONG-9876543210";

/// A sim behind HTTPS that wants `Bearer GOOD_KEY` and any `extra` headers.
async fn hosted(
    pki: &TestPki,
    client_auth: bool,
    extra: &[(&str, &str)],
) -> (SimServer, TlsUpstream) {
    let mut required = vec![("authorization".to_string(), format!("Bearer {GOOD_KEY}"))];
    required.extend(extra.iter().map(|(n, v)| (n.to_string(), v.to_string())));
    let sim = SimServer::start_requiring(instant_sim(), required).await;
    let tls = TlsUpstream::start(pki, sim.addr(), client_auth).await;
    (sim, tls)
}

/// A `[[models]]` table for a pool of one upstream.
fn model(id: &str, upstream: &str, pool: &str) -> String {
    format!(
        "[[models]]\nid = \"{id}\"\n\
         backend = {{ kind = \"openai\", upstreams = [{upstream}]{pool} }}\n"
    )
}

fn chat(model: &str) -> Value {
    json!({ "model": model, "max_tokens": 4, "seed": 1,
        "messages": [{ "role": "user", "content": "hello there" }] })
}

async fn post(url: &str, body: &Value) -> (u16, String) {
    let res = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

/// A file holding `text`, in `dir`.
fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_is_reached_with_its_ca_and_a_key_from_the_environment() {
    init_logging();
    let pki = TestPki::new();
    let (_sim, tls) = hosted(&pki, false, &[]).await;
    let ca = format!(", ca_file = {:?}", tls.ca_file());
    let upstream = |var: &str| {
        format!(
            "{{ base_url = \"{}\", api_key_env = \"{var}\" }}",
            tls.base_url()
        )
    };
    let models = model("hosted", &upstream("MERIDIAN_UPSTREAM_KEY"), &ca)
        + &model("untrusted", &upstream("MERIDIAN_UPSTREAM_KEY"), "")
        + &model("wrong", &upstream("MERIDIAN_WRONG_KEY"), &ca);
    // The in-process node of the sandbox starts without the pools: their
    // keys are in the environment of the region's own process only.
    let mut region = RegionSandbox::start("eu-west").await;
    region.rewrite_config(&models);
    let node = RegionProcess::start_with_env(
        env!("CARGO_BIN_EXE_region-process"),
        &mut region,
        &[
            ("MERIDIAN_UPSTREAM_KEY", GOOD_KEY),
            ("MERIDIAN_WRONG_KEY", WRONG_KEY),
            ("RUST_LOG", "info"),
        ],
    )
    .await;
    let url = node.url();

    let (status, body) = post(&url, &chat("hosted")).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert!(
        !answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    let mut streamed = chat("hosted");
    streamed["stream"] = true.into();
    let (status, body) = post(&url, &streamed).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"delta\"") && body.contains("data: [DONE]"),
        "{body}"
    );
    assert!(
        tls.negotiated().iter().any(|p| p == "h2"),
        "HTTP/2 by ALPN: {:?}",
        tls.negotiated()
    );

    // The test CA is no public root: without `ca_file` nothing gets through.
    let (status, body) = post(&url, &chat("untrusted")).await;
    assert!(status >= 500, "{status} {body}");
    assert!(body.contains(&tls.base_url()), "names the upstream: {body}");

    // The upstream echoes the key it got in its 401, whole.
    let (status, body) = post(&url, &chat("wrong")).await;
    assert_eq!(status, 502, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains(&tls.base_url()), "{message}");
    assert!(
        message.contains("refused Meridian's credentials"),
        "{message}"
    );
    // What it said is passed on, with the key it quoted scrubbed out.
    assert!(
        message.contains("Incorrect API key provided: Bearer <redacted>"),
        "{message}"
    );
    assert!(
        !body.contains(WRONG_KEY) && !body.contains("WRONG-98"),
        "{body}"
    );
    // Out of the pool: its health check, which sends the same key, or the
    // attempt above, counted as failed, took it out.
    let metrics = format!("{url}/metrics");
    let down = Instant::now();
    while metric(&metrics, "meridian_upstream_up", &["model=\"wrong\""]).await != 0.0 {
        assert!(
            down.elapsed() < Duration::from_secs(10),
            "the upstream stays up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still a 502 naming it, not a bare "no healthy backend".
    let (status, body) = post(&url, &chat("wrong")).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains(&tls.base_url()), "{body}");
    let logs = node.logs();
    assert!(
        logs.contains("wrong"),
        "the region logged the failure:\n{logs}"
    );
    for key in [WRONG_KEY, GOOD_KEY] {
        assert!(!logs.contains(key), "a key in the region's logs:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_only_when_configured() {
    init_logging();
    let pki = TestPki::new();
    let (_sim, tls) = hosted(&pki, true, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = file(&dir, "key", &format!("{GOOD_KEY}\n"));
    let cert = pki.write(&Identity::operator("meridian-region").unwrap());
    let upstream = format!(
        "{{ base_url = \"{}\", api_key_file = {key_file:?} }}",
        tls.base_url()
    );
    let ca = format!(", ca_file = {:?}", tls.ca_file());
    let with_cert = format!(
        "{ca}, client_cert_file = {:?}, client_key_file = {:?}",
        cert.cert_path.display().to_string(),
        cert.key_path.display().to_string()
    );
    let models = model("with-cert", &upstream, &with_cert) + &model("no-cert", &upstream, &ca);
    let region = RegionSandbox::start_with_config("eu-west", &models).await;

    let (status, body) = post(&region.url(), &chat("with-cert")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(&region.url(), &chat("no-cert")).await;
    assert!(status >= 500, "{status} {body}");
    assert!(body.contains(&tls.base_url()), "names the upstream: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_headers_reach_the_upstream() {
    init_logging();
    let pki = TestPki::new();
    let (_sim, tls) = hosted(&pki, false, &[("openai-organization", "org-1")]).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = file(&dir, "key", GOOD_KEY);
    let upstream = |headers: &str| {
        format!(
            "{{ base_url = \"{}\", api_key_file = {key_file:?}{headers} }}",
            tls.base_url()
        )
    };
    let ca = format!(", ca_file = {:?}", tls.ca_file());
    let models = model(
        "org",
        &upstream(", headers = { \"OpenAI-Organization\" = \"org-1\" }"),
        &ca,
    ) + &model("no-org", &upstream(""), &ca);
    let region = RegionSandbox::start_with_config("eu-west", &models).await;

    let (status, body) = post(&region.url(), &chat("org")).await;
    assert_eq!(status, 200, "{body}");
    // The same key without the header is refused by the upstream.
    let (status, body) = post(&region.url(), &chat("no-org")).await;
    assert_eq!(status, 502, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_is_left_for_the_other_after_the_first_byte_timeout() {
    init_logging();
    let silent = FaultyUpstream::silent().await;
    let sim = SimServer::start(instant_sim()).await;
    // No affinity: each request picks by load, so the silent upstream gets
    // its share of first attempts.
    let models = format!(
        "[[models]]\nid = \"pool\"\nbackend = {{ kind = \"openai\", upstreams = [\
         {{ base_url = \"{}\" }}, {{ base_url = \"{}\" }}], affinity_prefix_bytes = 0, \
         first_byte_timeout_ms = 300, breaker_failures = 100 }}\n",
        silent.base_url(),
        sim.base_url()
    );
    let region = RegionSandbox::start_with_config("eu-west", &models).await;
    let mut slowest = Duration::ZERO;
    for i in 0..40 {
        if silent.chats() > 0 {
            break;
        }
        let started = Instant::now();
        // Each its own question: a repeated one is answered from the cache.
        let mut body = chat("pool");
        body["messages"][0]["content"] = format!("question {i}").into();
        let (status, body) = post(&region.url(), &body).await;
        assert_eq!(status, 200, "request {i}: {body}");
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        silent.chats() > 0,
        "the silent upstream got a first attempt"
    );
    assert!(
        slowest >= Duration::from_millis(300),
        "that attempt waited for the timeout: {slowest:?}"
    );
    let failed = metric(
        &format!("{}/metrics", region.url()),
        "meridian_upstream_attempts_total",
        &[
            &format!("upstream=\"{}\"", silent.base_url()),
            "outcome=\"failed\"",
        ],
    )
    .await;
    assert!(failed >= 1.0, "counted against the silent upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reads_a_rotated_key_and_names_a_missing_ca_file() {
    init_logging();
    let pki = TestPki::new();
    let (_sim, tls) = hosted(&pki, false, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = file(&dir, "key", WRONG_KEY);
    let upstream = format!(
        "{{ base_url = \"{}\", api_key_file = {key_file:?} }}",
        tls.base_url()
    );
    let with_ca = |ca: &str| model("hosted", &upstream, &format!(", ca_file = {ca:?}"));
    let mut region = RegionSandbox::start_with_config("eu-west", &with_ca(tls.ca_file())).await;
    let reload = |url: String| async move {
        let res = reqwest::Client::new()
            .post(format!("{url}/admin/reload"))
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), res.text().await.unwrap())
    };
    // Each its own question: a repeated one could be answered from the cache.
    let ask = |i: u32| {
        let mut body = chat("hosted");
        body["messages"][0]["content"] = format!("question {i}").into();
        body
    };

    let (status, body) = post(&region.url(), &ask(0)).await;
    assert_eq!(status, 502, "{body}");
    // The config is the same; the file it points at is not.
    std::fs::write(&key_file, GOOD_KEY).unwrap();
    let (status, body) = reload(region.url()).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(&region.url(), &ask(1)).await;
    assert_eq!(status, 200, "{body}");

    region.rewrite_config(&with_ca("/nonexistent/ca.pem"));
    let (status, body) = reload(region.url()).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("backend.ca_file`: cannot read /nonexistent/ca.pem: No such file"),
        "{body}"
    );
    let (status, body) = post(&region.url(), &ask(2)).await;
    assert_eq!(status, 200, "the old pool still serves: {body}");
}
