//! Three regions, each with its own Redis and PostgreSQL, behind the gateway:
//! HTTP and gRPC requests reach the region the gateway names.

use futures::StreamExt;
use meridian_proto::v1::inference_client::InferenceClient;
use meridian_proto::v1::{ChatMessage, GenerateRequest};
use meridian_tests::{ClusterSandbox, init_logging};
use serde_json::{Value, json};

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const MODEL: &str = "sim-fast";

fn chat_body(content: &str) -> Value {
    json!({ "model": MODEL, "messages": [{ "role": "user", "content": content }], "seed": 7 })
}

fn header<'a>(res: &'a reqwest::Response, name: &str) -> &'a str {
    res.headers()
        .get(name)
        .unwrap_or_else(|| panic!("response has no {name} header"))
        .to_str()
        .expect("ascii header")
}

fn generate_request(content: &str) -> GenerateRequest {
    GenerateRequest {
        model: MODEL.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: content.into(),
            ..Default::default()
        }],
        max_tokens: Some(12),
        seed: Some(7),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_behind_the_gateway() {
    init_logging();
    let sandbox = ClusterSandbox::start(&REGIONS).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", sandbox.gateway_url());

    // No pin: the default region (the first) serves it.
    let res = http
        .post(&url)
        .json(&chat_body("hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-meridian-region"), "us-east");
    assert_eq!(header(&res, "x-meridian-route"), "default");
    assert_eq!(header(&res, "x-meridian-served-by"), "us-east");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL);
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty());
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    assert!(["stop", "length"].contains(&body["choices"][0]["finish_reason"].as_str().unwrap()));

    // A pin reaches each region, and that region is the one that answers.
    for region in REGIONS {
        let res = http
            .post(&url)
            .header("x-meridian-region", region)
            .json(&chat_body("hello"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "region {region}");
        assert_eq!(header(&res, "x-meridian-region"), region);
        assert_eq!(header(&res, "x-meridian-route"), "pin");
        assert_eq!(header(&res, "x-meridian-served-by"), region);
        let pinned: Value = res.json().await.unwrap();
        // Same request and seed: same deterministic answer in every region.
        assert_eq!(pinned["choices"][0]["message"]["content"], text);
    }

    // gRPC through the gateway, pinned with metadata.
    let channel = tonic::transport::Endpoint::from_shared(sandbox.gateway_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = InferenceClient::new(channel);
    for region in REGIONS {
        let mut req = tonic::Request::new(generate_request("hello over grpc"));
        req.metadata_mut()
            .insert("x-meridian-region", region.parse().unwrap());
        let res = client.generate(req).await.unwrap();
        assert_eq!(
            res.metadata()
                .get("x-meridian-region")
                .unwrap()
                .to_str()
                .unwrap(),
            region
        );
        let res = res.into_inner();
        assert_eq!(res.region, region);
        assert_eq!(res.model, MODEL);
        let usage = res.usage.unwrap();
        assert!(usage.completion_tokens >= 1 && usage.completion_tokens <= 12);
        assert!(!res.message.unwrap().content.is_empty());
    }

    // Server streaming keeps its trailers through the gateway: the stream ends
    // cleanly with the usage on the last chunk.
    let mut req = tonic::Request::new(generate_request("stream please"));
    req.metadata_mut()
        .insert("x-meridian-region", "ap-south".parse().unwrap());
    let chunks: Vec<_> = client
        .generate_stream(req)
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    let chunks: Vec<_> = chunks.into_iter().map(|c| c.unwrap()).collect();
    let last = chunks.last().unwrap();
    let usage = last.usage.unwrap();
    assert_eq!(usage.completion_tokens as usize, chunks.len() - 1);
    assert!(chunks.iter().all(|c| c.region == "ap-south"));
    let unary = client
        .generate(generate_request("stream please"))
        .await
        .unwrap()
        .into_inner();
    let streamed: String = chunks.iter().map(|c| c.delta.as_str()).collect();
    assert_eq!(streamed, unary.message.unwrap().content);
}

/// POSTs `body` as JSON: the status and the JSON answer.
async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let res = http.post(url).json(body).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap())
}

/// `error.message` of an OpenAI error body.
fn error_message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_the_service_keeps_running() {
    init_logging();
    let sandbox = ClusterSandbox::start(&REGIONS[..2]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", sandbox.gateway_url());

    let res = http
        .post(&url)
        .header("content-type", "application/json")
        .body("{\"model\": \"sim-fast\", \"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(error_message(&body).contains("invalid request body"));

    let (status, body) = post_json(&http, &url, &json!({ "model": MODEL })).await;
    assert_eq!(status, 400);
    assert!(error_message(&body).contains("missing field `messages`"));

    // A route asked with a method it does not take: OpenAI's error object.
    let res = http.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 405);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        error_message(&body).contains("GET is not a method of /v1/chat/completions"),
        "{body}"
    );

    let wizard = json!({ "model": MODEL, "messages": [{ "role": "wizard", "content": "hi" }] });
    let (status, body) = post_json(&http, &url, &wizard).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "messages");

    // What OpenAI's description allows is served: an integer written
    // `3.0`, a negative seed, `stream: null`, the deprecated `function` role.
    let allowed = json!({ "model": MODEL, "max_tokens": 3.0, "seed": -7, "stream": null,
        "messages": [{ "role": "function", "name": "f", "content": "{}" },
                     { "role": "user", "content": "hi" }] });
    let (status, body) = post_json(&http, &url, &allowed).await;
    assert_eq!(status, 200, "{body}");
    // A text completion without a prompt, or with an empty one, starts a
    // document, as OpenAI's default prompt does.
    let completions = format!("{}/v1/completions", sandbox.gateway_url());
    for prompt in [Value::Null, json!("")] {
        let body = json!({ "model": MODEL, "prompt": prompt, "max_tokens": 3 });
        let (status, body) = post_json(&http, &completions, &body).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty()),
            "{body}"
        );
    }
    // What is refused is refused by name: a token-id prompt, a fractional
    // token count.
    let token_ids = json!({ "model": MODEL, "prompt": [[1, 2, 3]] });
    let (status, body) = post_json(&http, &completions, &token_ids).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "prompt");
    assert!(error_message(&body).contains("token ids"), "{body}");
    let fractional = json!({ "model": MODEL, "max_tokens": 3.5,
        "messages": [{ "role": "user", "content": "hi" }] });
    let (status, body) = post_json(&http, &url, &fractional).await;
    assert_eq!(status, 400);
    assert!(
        error_message(&body).contains("expected an integer"),
        "{body}"
    );

    let unknown =
        json!({ "model": "gpt-nonexistent", "messages": [{ "role": "user", "content": "hi" }] });
    let (status, body) = post_json(&http, &url, &unknown).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found");

    let res = http
        .post(&url)
        .header("x-meridian-region", "mars")
        .json(&chat_body("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    let message = error_message(&body);
    assert!(
        message.contains("mars") && message.contains("eu-west"),
        "{message}"
    );

    // Operator endpoints of regions are not reachable through the edge.
    let res = http
        .post(format!("{}/admin/reload", sandbox.gateway_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);

    let res = http
        .get(format!("{}/v1/nothing-here", sandbox.gateway_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["type"], "not_found_error");

    // gRPC: an invalid request is INVALID_ARGUMENT, an unknown region too.
    let channel = tonic::transport::Endpoint::from_shared(sandbox.gateway_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = InferenceClient::new(channel);
    let status = client
        .generate(GenerateRequest {
            model: MODEL.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("messages"));
    let mut req = tonic::Request::new(GenerateRequest::default());
    req.metadata_mut()
        .insert("x-meridian-region", "mars".parse().unwrap());
    let status = client.generate(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("mars"));

    // After all that, both regions still serve.
    for region in &REGIONS[..2] {
        let res = http
            .post(&url)
            .header("x-meridian-region", *region)
            .json(&chat_body("still there?"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
}
