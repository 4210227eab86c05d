//! Embedding models served by OpenAI-compatible upstreams (`task =
//! "embeddings"`): `/v1/embeddings` (floats and base64) and gRPC `Embed`
//! answer with the upstream's vectors under the model id the client asked
//! for, every field the client sent reaches the upstream, concurrent small
//! requests share upstream calls and each caller still gets the vectors of
//! its own inputs, the official OpenAI SDK works through the gateway, and a
//! wrong key is a 502 naming the upstream.

use base64::Engine as _;
use meridian_proto::v1::inference_client::InferenceClient;
use meridian_proto::v1::{EmbedRequest, ListModelsRequest, ModelKind};
use meridian_tests::{
    ClusterSandbox, EMBEDDING_UPSTREAM_NOTE, EmbeddingUpstream, RegionSandbox, TEST_MODEL,
    expected_vector, init_logging, run_data_script,
};
use serde_json::{Value, json};

const MODEL: &str = "embed-small";
const UPSTREAM_MODEL: &str = "text-embedding-3-small";

/// A model served by the upstream at `base_url`, with `extra` upstream
/// settings; a long batching window so concurrent requests meet.
fn model(base_url: &str, extra: &str) -> String {
    format!(
        "[[models]]\nid = \"{MODEL}\"\ntask = \"embeddings\"\n\
         embeddings = {{ max_wait_ms = 100, max_batch = 64 }}\n\
         backend = {{ kind = \"openai\", upstream_model = \"{UPSTREAM_MODEL}\", \
         upstreams = [{{ base_url = \"{base_url}\"{extra} }}] }}\n"
    )
}

async fn post(url: &str, path: &str, body: &Value) -> (u16, Value) {
    let res = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn from_base64(v: &Value) -> Vec<f32> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_model_answers_http_floats_and_base64_and_grpc() {
    init_logging();
    let upstream = EmbeddingUpstream::start().await;
    let region = RegionSandbox::start_with_config("emb-up", &model(&upstream.base_url(), "")).await;
    let url = region.url();

    let sent = json!({"model": MODEL, "input": ["first text", "second"], "dimensions": 4,
        "user": "u-1", "x_future": {"a": 1}});
    let (status, body) = post(&url, "/v1/embeddings", &sent).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], MODEL, "the model id the client asked for");
    assert_eq!(
        body[EMBEDDING_UPSTREAM_NOTE], "kept",
        "the upstream's own field"
    );
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "total_tokens": 3})
    );
    for (i, text) in ["first text", "second"].into_iter().enumerate() {
        assert_eq!(body["data"][i]["index"], i);
        assert_eq!(
            floats(&body["data"][i]["embedding"]),
            expected_vector(&json!(text), Some(4))
        );
    }
    let got = &upstream.bodies()[0];
    assert_eq!(got["model"], UPSTREAM_MODEL);
    for field in ["input", "dimensions", "user", "x_future"] {
        assert_eq!(got[field], sent[field], "`{field}` reached the upstream");
    }

    let (status, body) = post(
        &url,
        "/v1/embeddings",
        &json!({"model": MODEL, "input": "solo", "encoding_format": "base64"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        from_base64(&body["data"][0]["embedding"]),
        expected_vector(&json!("solo"), None)
    );

    // Token ids are valid OpenAI input: they reach the upstream as sent.
    let (status, body) = post(
        &url,
        "/v1/embeddings",
        &json!({"model": MODEL, "input": [[1, 2], [3]]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        floats(&body["data"][1]["embedding"]),
        expected_vector(&json!([3]), None)
    );

    let mut grpc = InferenceClient::connect(url.clone()).await.unwrap();
    let answer = grpc
        .embed(EmbedRequest {
            model: MODEL.into(),
            inputs: vec!["by grpc".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.model, MODEL);
    assert_eq!(
        answer.embeddings[0].values,
        expected_vector(&json!("by grpc"), None)
    );
    assert_eq!(answer.usage.unwrap().prompt_tokens, 2);
    let listed = grpc
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let entry = listed.models.iter().find(|m| m.id == MODEL).unwrap();
    assert_eq!(entry.kind, i32::from(ModelKind::Embedding));
    let models: Value = reqwest::get(format!("{url}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == MODEL),
        "{models}"
    );

    // Each API with the other's model: a 400 naming the model and its task.
    let (status, body) = post(
        &url,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(MODEL) && message.contains("serves embeddings"),
        "{message}"
    );
    let (status, body) = post(
        &url,
        "/v1/embeddings",
        &json!({"model": TEST_MODEL, "input": "x"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(TEST_MODEL) && message.contains("serves chat"),
        "{message}"
    );
    let (status, _) = post(
        &url,
        "/v1/embeddings",
        &json!({"model": MODEL, "input": []}),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = post(
        &url,
        "/v1/embeddings",
        &json!({"model": MODEL, "input": [""]}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        upstream.bodies().len(),
        4,
        "refusals never reach the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_small_requests_share_upstream_calls_and_get_their_own_vectors() {
    init_logging();
    let upstream = EmbeddingUpstream::start().await;
    let region =
        RegionSandbox::start_with_config("emb-batch", &model(&upstream.base_url(), "")).await;
    let url = region.url();
    let texts: Vec<String> = (0..20).map(|i| format!("text number {i}")).collect();
    let answers = futures::future::join_all(texts.iter().map(|text| {
        let url = url.clone();
        async move {
            post(
                &url,
                "/v1/embeddings",
                &json!({"model": MODEL, "input": text}),
            )
            .await
        }
    }))
    .await;
    for (text, (status, body)) in texts.iter().zip(&answers) {
        assert_eq!(*status, 200, "{body}");
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), 1, "{body}");
        assert_eq!(data[0]["index"], 0);
        assert_eq!(
            floats(&data[0]["embedding"]),
            expected_vector(&json!(text), None),
            "{text}"
        );
        assert_eq!(body["model"], MODEL);
    }
    let calls = upstream.bodies();
    let sent: usize = calls
        .iter()
        .map(|b| b["input"].as_array().unwrap().len())
        .sum();
    assert_eq!(sent, 20, "every input reached the upstream once");
    assert!(
        calls.len() < 20,
        "20 requests took {} upstream calls",
        calls.len()
    );
    // Each text is three words: the upstream's count, split fairly.
    let tokens: u64 = answers
        .iter()
        .map(|(_, b)| b["usage"]["prompt_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(tokens, 60);
    let metrics = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let merged = metrics
        .lines()
        .find(|l| l.starts_with("meridian_upstream_embedding_requests_merged_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no merged counter in {metrics}"));
    assert!(merged > 0, "{merged}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_a_502_naming_the_upstream_without_the_key() {
    init_logging();
    let upstream = EmbeddingUpstream::start_with_key(Some("sk-right-key")).await;
    let region = RegionSandbox::start_with_config(
        "emb-key",
        &model(&upstream.base_url(), ", api_key = \"sk-wrong-key-123\""),
    )
    .await;
    let (status, body) = post(
        &region.url(),
        "/v1/embeddings",
        &json!({"model": MODEL, "input": "x"}),
    )
    .await;
    assert_eq!(status, 502, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&upstream.base_url()), "{message}");
    assert!(!message.contains("sk-wrong-key-123"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdk_gets_the_upstream_vectors_through_the_gateway() {
    init_logging();
    let upstream = EmbeddingUpstream::start().await;
    let config = model(&upstream.base_url(), "");
    let sandbox =
        ClusterSandbox::start_configured(&["eu-west"], |_| config.clone(), |_, _| {}).await;
    let inputs = json!(["the sdk asks base64", "and decodes it"]);
    let seen = run_data_script(
        "openai_sdk_embeddings.py",
        vec![
            ("OPENAI_BASE_URL", format!("{}/v1", sandbox.gateway_url())),
            ("OPENAI_API_KEY", "sk-unused".into()),
            ("MODEL", MODEL.into()),
            ("INPUTS", inputs.to_string()),
        ],
    )
    .await;
    assert_eq!(seen["model"], MODEL);
    assert_eq!(seen["indexes"], json!([0, 1]));
    for (i, input) in inputs.as_array().unwrap().iter().enumerate() {
        assert_eq!(floats(&seen["vectors"][i]), expected_vector(input, None));
    }
    assert_eq!(
        floats(&seen["float_vector"]),
        expected_vector(&inputs[0], None)
    );
    let asked = upstream.bodies();
    assert_eq!(
        asked[0]["encoding_format"], "base64",
        "the SDK's default reached the upstream"
    );
}
