//! OpenAI conformance: OpenAI's published API description drives schemathesis
//! against a deployment (gateway, region, built-in models, a moderation model
//! served by the simulator) over every
//! operation in `tests/conformance/operations.txt`; a run against a server
//! that leaves out a required key shows the check can fail; and streamed
//! chat completions, which schemathesis does not read, are checked chunk by
//! chunk against the description's stream schema.

use std::process::Command;
use std::time::{Duration, Instant};

use meridian_gateway::AuthConfig;
use meridian_regional::tenancy::TenantLimits;
use meridian_tests::conformance::{self, Run};
use meridian_tests::keys::{key_pool, tenant_with_key};
use meridian_tests::{
    ClusterSandbox, OpenAiUpstream, SimServer, TEST_MODEL, embedding_model_dir, init_logging,
    instant_sim,
};
use serde_json::Value;

/// Cases per operation and phase in `make test`: about two minutes on two
/// busy cores, above the 1,500 cases the run must reach.
const DEFAULT_EXAMPLES: u32 = 100;
const MIN_GENERATED: u64 = 1_500;
/// A chat model that answers ten tokens a second.
const SLOW_MODEL: &str = "slow";

/// The built-in embedding model, and OpenAI's default moderation model
/// served by `moderations`.
fn models(moderations: &SimServer) -> String {
    format!(
        "[embeddings]\nmodel_dir = {:?}\n\
         [[models]]\nid = \"omni-moderation-latest\"\ntask = \"moderations\"\n\
         backend = {{ kind = \"openai\", upstreams = [{{ base_url = \"{}\" }}] }}\n",
        embedding_model_dir(),
        moderations.base_url()
    )
}

/// One region with the built-in chat and embedding models and a moderation
/// model behind a gateway that asks for API keys, and a key of a tenant
/// whose limits the run cannot reach: a 429 would be a finding of the
/// harness, not of conformance.
async fn keyed_deployment() -> (ClusterSandbox, SimServer, String) {
    let moderations = SimServer::start(instant_sim()).await;
    let extra = models(&moderations);
    let sandbox = ClusterSandbox::start_configured(
        &["eu-west"],
        |_| extra.clone(),
        |regions, config| {
            config.auth = Some(AuthConfig {
                reload_interval_ms: 100,
                ..AuthConfig::new(regions[0].postgres.url())
            });
        },
    )
    .await;
    let limits = TenantLimits {
        requests_per_second: Some(1_000_000),
        tokens_per_minute: Some(1 << 40),
    };
    let key = tenant_with_key(&key_pool(&sandbox).await, "conformance", limits).await;
    let client = reqwest::Client::new();
    let models = format!("{}/v1/models", sandbox.gateway_url());
    let started = Instant::now();
    loop {
        let status = client
            .get(&models)
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status();
        if status != 401 {
            assert_eq!(status, 200, "GET /v1/models with the new key");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the gateway did not load the new key within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (sandbox, moderations, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_served_openai_operation_conforms_to_the_description() {
    init_logging();
    let (sandbox, _moderations, key) = keyed_deployment().await;
    let run = Run::from_env(DEFAULT_EXAMPLES);
    let outcome = conformance::run(run, format!("{}/v1", sandbox.gateway_url()), Some(key)).await;
    eprintln!("{}", outcome.output);
    let failures = outcome.failures();
    assert!(
        outcome.success && failures.is_empty(),
        "schemathesis reports failures:\n  {}\nper operation: {:#}",
        failures.join("\n  "),
        outcome.summary
    );
    let refused = outcome.refused_where_all_must_be_served();
    assert!(
        refused.is_empty(),
        "operations that must serve every valid case refused some:\n  {}",
        refused.join("\n  ")
    );
    assert!(
        outcome.generated() >= MIN_GENERATED,
        "schemathesis generated {} cases, fewer than {MIN_GENERATED}",
        outcome.generated()
    );
}

/// The harness against a server whose chat completions lack
/// `choices[].message.refusal`. Run directly, not behind a region: a region
/// rebuilds each answer from the upstream's stream, so no key an upstream
/// drops reaches the client. The same run against the same server with the
/// key present passes, so the failure is the missing key and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_required_key_fails_the_conformance_run() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let operations = dir.path().join("operations.txt");
    std::fs::write(&operations, "POST /v1/chat/completions\n").unwrap();
    let run = Run {
        seed: conformance::DEFAULT_SEED,
        max_examples: 10,
        mode: "positive",
        phases: "fuzzing",
        operations: Some(operations),
    };

    let whole = OpenAiUpstream::start(None).await;
    let outcome = conformance::run(run.clone(), whole.base_url(), None).await;
    assert!(
        outcome.success && outcome.failures().is_empty(),
        "the run fails even with every key present:\n{}",
        outcome.output
    );
    assert!(outcome.generated() > 0, "{}", outcome.output);

    let without_refusal = OpenAiUpstream::start(Some("refusal")).await;
    let outcome = conformance::run(run, without_refusal.base_url(), None).await;
    eprintln!("{}", outcome.output);
    assert!(!outcome.success, "the run passed without `refusal`");
    let failures = outcome.failures();
    assert!(
        failures
            .iter()
            .any(|f| f.contains("Response violates schema")),
        "no schema violation reported: {failures:?}"
    );
    let messages = outcome.summary["POST /v1/chat/completions"]["failures"].to_string();
    assert!(
        messages.contains("refusal"),
        "the failure does not name `refusal`: {messages}"
    );
}

/// Every chunk of streamed chat completions, with and without the usage
/// chunk, validates against `CreateChatCompletionStreamResponse`; a stream
/// cut by its deadline ends with one event that is OpenAI's error object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chat_chunks_conform_to_the_stream_schema() {
    init_logging();
    // Ten tokens a second: 24 take longer than the cut scenario's 500 ms.
    let slow = format!(
        "[[models]]\nid = \"{SLOW_MODEL}\"\n\
         backend = {{ kind = \"sim\", ttft_ms = 10, per_token_ms = 100, prefill_us_per_token = 0 }}\n"
    );
    let sandbox = ClusterSandbox::start_configured(&["eu-west"], |_| slow.clone(), |_, _| {}).await;
    let script = conformance::harness_dir().join("stream_check.py");
    let description = conformance::description_path();
    let base_url = format!("{}/v1", sandbox.gateway_url());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(base_url)
            .arg(description)
            .arg(TEST_MODEL)
            .arg(SLOW_MODEL)
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "stream_check.py failed (jsonschema, referencing and yaml come with schemathesis; \
         run infra/scripts/setup.sh):\n{stderr}"
    );
    let seen: Value = serde_json::from_slice(&out.stdout).expect("stream_check.py prints JSON");
    for (scenario, result) in seen.as_object().unwrap() {
        let chunks = result["chunks"].as_u64().unwrap();
        eprintln!("stream {scenario}: {chunks} chunks");
        assert!(chunks > 1, "{scenario}: {chunks} chunk(s) only: {result:#}");
        assert!(
            result["errors"].as_array().unwrap().is_empty(),
            "{scenario}: chunks violate the stream schema: {:#}",
            result["errors"]
        );
        let error_events = u64::from(scenario == "cut");
        assert_eq!(
            result["error_events"], error_events,
            "{scenario}: error events: {result:#}"
        );
    }
    let usage = &seen["include_usage"]["usage_chunk"];
    assert!(
        usage["usage"]["total_tokens"]
            .as_u64()
            .is_some_and(|t| t > 0),
        "no validated usage chunk with stream_options.include_usage: {usage}"
    );
    assert!(
        seen["plain"]["usage_chunk"].is_null(),
        "a usage chunk without stream_options.include_usage"
    );
}
