//! Tokens per minute cannot be dodged: whatever the gateway could read of a
//! request before sending it (a chunked body, a gRPC message), the tenant
//! is charged the request's real shape from the region's count at the head
//! of the answer, and streamed answers (SSE and `GenerateStream`) are
//! corrected from their usage in a trailer. Against real regions,
//! PostgreSQL (the keys) and the gateway.

use std::time::{Duration, Instant};

use futures::StreamExt;
use meridian_proto::v1::inference_client::InferenceClient;
use meridian_proto::v1::{ChatMessage, GenerateRequest};
use meridian_regional::tenancy::TenantLimits;
use meridian_tests::keys::{key_pool, keyed_cluster, tenant_with_key};
use meridian_tests::{ClusterSandbox, TEST_MODEL, init_logging};
use serde_json::{Value, json};

/// A minute's budget smaller than one large prompt.
const TOKENS_PER_MINUTE: u64 = 1_500;

/// About 2,000 prompt tokens: more than the whole minute's budget.
fn large_prompt() -> String {
    "lorem ".repeat(2_000)
}

fn thrifty() -> TenantLimits {
    TenantLimits {
        requests_per_second: None,
        tokens_per_minute: Some(TOKENS_PER_MINUTE),
    }
}

/// Tenants named `names`, each with its own key, known to the gateway.
async fn tenants(sandbox: &ClusterSandbox, names: &[&str]) -> Vec<String> {
    let pool = key_pool(sandbox).await;
    let mut keys = Vec::new();
    for name in names {
        keys.push(tenant_with_key(&pool, name, thrifty()).await);
    }
    let client = reqwest::Client::new();
    let last = keys.last().expect("at least one tenant").clone();
    let started = Instant::now();
    while small_chat(&client, sandbox, &last).await.status() == 401 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the gateway never loaded the new keys"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    keys
}

async fn small_chat(
    client: &reqwest::Client,
    sandbox: &ClusterSandbox,
    key: &str,
) -> reqwest::Response {
    client
        .post(format!("{}/v1/chat/completions", sandbox.gateway_url()))
        .bearer_auth(key)
        .json(&json!({
            "model": TEST_MODEL,
            "messages": [{ "role": "user", "content": "hi" }],
            "max_tokens": 4,
        }))
        .send()
        .await
        .expect("the gateway answers")
}

/// Asserts the tenant of `key` is out of tokens: a small request is refused
/// with a tokens 429.
async fn assert_out_of_tokens(client: &reqwest::Client, sandbox: &ClusterSandbox, key: &str) {
    let res = small_chat(client, sandbox, key).await;
    let status = res.status();
    let body: Value = res.json().await.unwrap_or_default();
    assert_eq!(
        status, 429,
        "the tenant should owe more than its minute's budget: {body}"
    );
    assert_eq!(body["error"]["type"], "tokens", "{body}");
}

/// A body sent with `Transfer-Encoding: chunked`: the gateway cannot read
/// it before it decides.
fn chunked(body: &Value) -> reqwest::Body {
    let bytes = serde_json::to_vec(body).unwrap();
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(1_000).map(|c| Ok(c.to_vec())).collect();
    reqwest::Body::wrap_stream(futures::stream::iter(pieces))
}

/// Reads a whole SSE answer and returns its events' data.
async fn read_events(res: reqwest::Response) -> Vec<String> {
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

fn generate(
    prompt: &str,
    max_tokens: u32,
    stop: &[&str],
    key: &str,
) -> tonic::Request<GenerateRequest> {
    let mut req = tonic::Request::new(GenerateRequest {
        model: TEST_MODEL.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: prompt.into(),
            ..Default::default()
        }],
        max_tokens: Some(max_tokens),
        stop: stop.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_gateway_cannot_read_are_charged_their_real_shape() {
    init_logging();
    let sandbox = keyed_cluster(&["us-east"], 100, false).await;
    let keys = tenants(
        &sandbox,
        &["chunked-stream", "grpc-stream", "chunked-job", "too-large"],
    )
    .await;
    let client = reqwest::Client::new();

    // A request the gateway reads, asking for more tokens than the whole
    // minute's budget: no wait would let it through, so it is a 400 naming
    // what to lower rather than a 429 to retry, and it costs nothing.
    let res = client
        .post(format!("{}/v1/chat/completions", sandbox.gateway_url()))
        .bearer_auth(&keys[3])
        .json(&json!({
            "model": TEST_MODEL,
            "messages": [{ "role": "user", "content": "hi" }],
            "max_tokens": 10_000_000_000_000_000_u64,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert!(!res.headers().contains_key("retry-after"));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_too_large", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("`max_tokens`") && message.contains("1500 tokens per minute"),
        "{message}"
    );
    assert_eq!(small_chat(&client, &sandbox, &keys[3]).await.status(), 200);

    // A streamed chat whose chunked body holds a prompt larger than the
    // minute's budget: admitted on the default estimate, then charged the
    // prompt the region counted.
    let res = client
        .post(format!("{}/v1/chat/completions", sandbox.gateway_url()))
        .bearer_auth(&keys[0])
        .header("content-type", "application/json")
        .body(chunked(&json!({
            "model": TEST_MODEL,
            "messages": [{ "role": "user", "content": large_prompt() }],
            "max_tokens": 4,
            "stream": true,
        })))
        .send()
        .await
        .unwrap();
    assert!(
        !res.headers().contains_key("x-meridian-prompt-tokens"),
        "the region's report is for the gateway, not the client"
    );
    let events = read_events(res).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_out_of_tokens(&client, &sandbox, &keys[0]).await;

    // The same through GenerateStream, whose message the gateway never reads.
    let mut grpc = InferenceClient::connect(sandbox.gateway_url())
        .await
        .unwrap();
    let mut stream = grpc
        .generate_stream(generate(&large_prompt(), 4, &[], &keys[1]))
        .await
        .unwrap()
        .into_inner();
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        chunk.unwrap();
        chunks += 1;
    }
    assert!(chunks > 0);
    assert_out_of_tokens(&client, &sandbox, &keys[1]).await;

    // A job, whose usage comes long after its submission is answered.
    let res = client
        .post(format!("{}/v1/jobs", sandbox.gateway_url()))
        .bearer_auth(&keys[2])
        .header("content-type", "application/json")
        .body(chunked(&json!({
            "model": TEST_MODEL,
            "messages": [{ "role": "user", "content": large_prompt() }],
            "max_tokens": 4,
        })))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    assert!(!res.headers().contains_key("x-meridian-prompt-tokens"));
    assert_out_of_tokens(&client, &sandbox, &keys[2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_answers_are_corrected_from_their_usage() {
    init_logging();
    let sandbox = keyed_cluster(&["us-east"], 100, false).await;
    let keys = tenants(&sandbox, &["sse", "grpc"]).await;
    let client = reqwest::Client::new();

    // Each request may use 900 tokens and is charged so at its head; a stop
    // sequence ends it at once. Two fit in 1,500 a minute only when the end
    // of the first gave back what it did not use.
    let brief = json!({
        "model": TEST_MODEL,
        "messages": [{ "role": "user", "content": "be brief" }],
        "max_tokens": 900,
        "stop": [" "],
        "stream": true,
    });
    for attempt in 0..2 {
        let res = client
            .post(format!("{}/v1/chat/completions", sandbox.gateway_url()))
            .bearer_auth(&keys[0])
            .json(&brief)
            .send()
            .await
            .unwrap();
        let status = res.status();
        assert_eq!(
            status,
            200,
            "streamed request {attempt}: {}",
            res.text().await.unwrap_or_default()
        );
        let events = read_events(res).await;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    }

    // gRPC messages are not read: each is admitted on the default estimate,
    // then charged 1,400 at its head. The second fits only if the first's
    // trailer gave back what it did not use.
    let mut grpc = InferenceClient::connect(sandbox.gateway_url())
        .await
        .unwrap();
    for attempt in 0..2 {
        let mut stream = match grpc
            .generate_stream(generate("be brief", 1_400, &[" "], &keys[1]))
            .await
        {
            Ok(res) => res.into_inner(),
            Err(status) => panic!("GenerateStream {attempt} refused: {status:?}"),
        };
        let mut finished = false;
        while let Some(chunk) = stream.next().await {
            finished |= chunk.unwrap().finish_reason != 0;
        }
        assert!(
            finished,
            "GenerateStream {attempt} ended with a finish reason"
        );
    }
}
