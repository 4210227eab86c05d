//! The built-in embedding model (all-MiniLM-L6-v2 on candle) behind
//! `POST /v1/embeddings` and gRPC `Inference.Embed`: its vectors match the
//! reference implementation's, requests are batched, bad input is refused.
//!
//! The model files come from `infra/scripts/setup.sh` (`make test` runs it),
//! and so does pgvector, which [`pgvector`] checks in a region's database.

use std::collections::HashMap;

use meridian_proto::v1::inference_client::InferenceClient;
use meridian_proto::v1::{EmbedRequest, ListModelsRequest, ModelKind};
use meridian_regional::{Config, RegionalNode};
use meridian_tests::{RegionSandbox, embedding_model_dir, init_logging};
use serde_json::{Value, json};

#[path = "embeddings/pgvector.rs"]
mod pgvector;

const MODEL: &str = "all-minilm-l6-v2";

/// A long batching window, so concurrent requests certainly meet in one
/// batch; a small `max_inputs`, so the limit is cheap to hit.
fn embeddings_section() -> String {
    format!(
        "[embeddings]\nmodel_dir = {:?}\nmax_wait_ms = 50\nmax_inputs = 20\n",
        embedding_model_dir()
    )
}

fn setup() {
    init_logging();
    // reqwest is built without a default TLS provider in this workspace.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn region(name: &str) -> RegionSandbox {
    RegionSandbox::start_with_config(name, &embeddings_section()).await
}

/// Sentences and vectors computed once by sentence-transformers
/// (`tests/data/minilm_reference.py`).
struct Reference {
    texts: Vec<String>,
    tokens: Vec<u32>,
    vectors: Vec<Vec<f32>>,
}

fn reference() -> Reference {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/minilm_reference.json");
    let data: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let items = data["items"].as_array().unwrap();
    Reference {
        texts: items
            .iter()
            .map(|i| i["text"].as_str().unwrap().to_string())
            .collect(),
        tokens: items
            .iter()
            .map(|i| i["tokens"].as_u64().unwrap() as u32)
            .collect(),
        vectors: items.iter().map(|i| floats(&i["embedding"])).collect(),
    }
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

async fn post(region: &RegionSandbox, body: Value) -> (u16, Value) {
    let res = reqwest::Client::new()
        .post(format!("{}/v1/embeddings", region.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

fn vectors(body: &Value) -> Vec<Vec<f32>> {
    let data = body["data"].as_array().unwrap();
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i, "data is in input order");
    }
    data.iter().map(|d| floats(&d["embedding"])).collect()
}

async fn grpc(region: &RegionSandbox) -> InferenceClient<tonic::transport::Channel> {
    InferenceClient::connect(region.url()).await.unwrap()
}

async fn counter(region: &RegionSandbox, name: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", region.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectors_match_the_reference_over_http_and_grpc() {
    setup();
    let reference = reference();
    let region = region("emb-ref").await;

    let (status, body) = post(&region, json!({ "model": MODEL, "input": reference.texts })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], MODEL);
    let http = vectors(&body);
    assert_eq!(http.len(), reference.texts.len());
    let mut min = f32::MAX;
    for (i, (got, want)) in http.iter().zip(&reference.vectors).enumerate() {
        assert_eq!(got.len(), 384);
        let c = cosine(got, want);
        min = min.min(c);
        assert!(
            c > 0.99,
            "{:?}: cosine {c} to the reference",
            reference.texts[i]
        );
    }
    println!(
        "lowest cosine to the reference over {} sentences: {min:.7}",
        http.len()
    );
    // OpenAI counts the text's tokens, without the model's [CLS] and [SEP].
    let tokens: u32 = reference.tokens.iter().map(|t| t - 2).sum();
    assert_eq!(body["usage"]["prompt_tokens"], tokens);
    assert_eq!(body["usage"]["total_tokens"], tokens);

    // gRPC gives the same vectors, in order, and says who served them.
    let res = grpc(&region)
        .await
        .embed(EmbedRequest {
            model: MODEL.into(),
            inputs: reference.texts.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(res.model, MODEL);
    assert_eq!(res.region, "emb-ref");
    assert_eq!(res.usage.unwrap().prompt_tokens, tokens);
    assert_eq!(res.embeddings.len(), reference.texts.len());
    for (i, (e, h)) in res.embeddings.iter().zip(&http).enumerate() {
        assert_eq!(e.index as usize, i);
        assert!(cosine(&e.values, h) > 0.9999);
    }

    // One string, and base64 (the OpenAI Python SDK's default): the same
    // little-endian floats.
    let (status, body) = post(
        &region,
        json!({ "model": MODEL, "input": reference.texts[0], "encoding_format": "base64", "dimensions": 384 }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let b64 = body["data"][0]["embedding"].as_str().unwrap();
    let bytes = base64_decode(b64);
    let decoded: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert!(cosine(&decoded, &reference.vectors[0]) > 0.99);

    // Both model lists name it, gRPC as an embedding model.
    let list: Value = reqwest::get(format!("{}/v1/models", region.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == MODEL)
    );
    let models = grpc(&region)
        .await
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    let model = models.iter().find(|m| m.id == MODEL).expect("listed");
    assert_eq!(model.kind, ModelKind::Embedding as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_keep_their_order_and_identical_inputs_give_identical_vectors() {
    setup();
    let reference = reference();
    let region = region("emb-order").await;
    // 20 texts (the configured maximum): the reference sentences shuffled
    // and repeated, so order and duplicates both show.
    let picks: Vec<usize> = (0..20)
        .map(|i| (i * 7 + 3) % reference.texts.len())
        .collect();
    let texts: Vec<&str> = picks.iter().map(|&i| reference.texts[i].as_str()).collect();
    let (status, body) = post(&region, json!({ "model": MODEL, "input": texts })).await;
    assert_eq!(status, 200, "{body}");
    let got = vectors(&body);
    let mut first: HashMap<usize, &Vec<f32>> = HashMap::new();
    for (v, &i) in got.iter().zip(&picks) {
        assert!(
            cosine(v, &reference.vectors[i]) > 0.99,
            "out of order at {i}"
        );
        // Same text, same batch: the very same floats.
        if let Some(earlier) = first.insert(i, v) {
            assert_eq!(earlier, v, "{:?} gave two vectors", reference.texts[i]);
        }
    }
    // Same text in another request: the same batch shape gives the same
    // floats; padding to another batch's length may move the last bits only.
    let alone = |text: &str| post(&region, json!({ "model": MODEL, "input": text }));
    let (_, a) = alone(&reference.texts[3]).await;
    let (_, b) = alone(&reference.texts[3]).await;
    assert_eq!(vectors(&a), vectors(&b));
    let in_batch = got[picks.iter().position(|&i| i == 3).unwrap()].clone();
    assert!(cosine(&vectors(&a)[0], &in_batch) > 0.99999);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched() {
    setup();
    let reference = reference();
    let region = region("emb-batch").await;
    let batches_before = counter(&region, "meridian_embedding_batches_total").await;
    const REQUESTS: usize = 16;
    let url = region.url();
    let calls = (0..REQUESTS).map(|i| {
        let (url, text) = (
            url.clone(),
            reference.texts[i % reference.texts.len()].clone(),
        );
        async move {
            // Half over HTTP, half over gRPC: both feed the same batcher.
            if i % 2 == 0 {
                let res = reqwest::Client::new()
                    .post(format!("{url}/v1/embeddings"))
                    .json(&json!({ "model": MODEL, "input": [text] }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 200);
                let body: Value = res.json().await.unwrap();
                floats(&body["data"][0]["embedding"])
            } else {
                let mut client = InferenceClient::connect(url).await.unwrap();
                let res = client
                    .embed(EmbedRequest {
                        model: MODEL.into(),
                        inputs: vec![text],
                    })
                    .await
                    .unwrap();
                res.into_inner().embeddings.remove(0).values
            }
        }
    });
    let results = futures::future::join_all(calls).await;
    for (i, v) in results.iter().enumerate() {
        let want = &reference.vectors[i % reference.texts.len()];
        assert!(
            cosine(v, want) > 0.99,
            "request {i} got another text's vector"
        );
    }
    let batches = counter(&region, "meridian_embedding_batches_total").await - batches_before;
    let requests = counter(&region, "meridian_embedding_requests_total").await;
    println!("{requests} concurrent requests ran in {batches} batches");
    assert_eq!(requests, REQUESTS as u64);
    assert!(
        batches < requests,
        "{requests} concurrent requests took {batches} forward passes: not batched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_refused_and_the_node_keeps_serving() {
    setup();
    let region = region("emb-bad").await;
    let long = "the ".repeat(300);
    let cases = [
        (json!({ "model": MODEL, "input": [] }), 400, "at least one"),
        (
            json!({ "model": MODEL, "input": ["ok", ""] }),
            400,
            "input[1]",
        ),
        (
            json!({ "model": MODEL, "input": ["ok", "fine", long] }),
            400,
            "input[2]",
        ),
        (
            json!({ "model": MODEL, "input": vec!["x"; 21] }),
            400,
            "at most 20",
        ),
        (
            json!({ "model": MODEL, "input": [101, 102] }),
            400,
            "token ids",
        ),
        (
            json!({ "model": MODEL, "input": "a", "dimensions": 64 }),
            400,
            "384",
        ),
        (
            json!({ "model": MODEL, "input": "a", "encoding_format": "int8" }),
            400,
            "encoding_format",
        ),
        (
            json!({ "model": "text-embedding-3-small", "input": "a" }),
            404,
            "model",
        ),
        (json!({ "input": "a" }), 400, "model"),
    ];
    for (body, status, says) in cases {
        let (got, answer) = post(&region, body.clone()).await;
        assert_eq!(got, status, "{body} → {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{body} → {message}");
        if status == 400 {
            assert_eq!(answer["error"]["type"], "invalid_request_error");
        }
    }

    let mut client = grpc(&region).await;
    for (inputs, says) in [
        (vec![], "at least one"),
        (vec!["ok".to_string(), long.clone()], "input[1]"),
    ] {
        let status = client
            .embed(EmbedRequest {
                model: MODEL.into(),
                inputs,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(says), "{}", status.message());
    }
    let status = client
        .embed(EmbedRequest {
            model: "sim-fast".into(),
            inputs: vec!["a".into()],
        })
        .await
        .unwrap_err();
    // A chat model is named, with what it serves.
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("sim-fast") && status.message().contains("serves chat"),
        "{}",
        status.message()
    );

    // Still serving, and a text right at the limit is taken.
    let (status, body) = post(
        &region,
        json!({ "model": MODEL, "input": "the ".repeat(254) }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let res = client
        .embed(EmbedRequest {
            model: MODEL.into(),
            inputs: vec!["still here".into()],
        })
        .await
        .unwrap();
    assert_eq!(res.into_inner().embeddings.len(), 1);
}

#[tokio::test]
async fn a_missing_model_refuses_the_start_and_says_how_to_fix_it() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here");
    // No Redis or PostgreSQL behind these URLs: the node must fail on the
    // model before it tries them.
    let toml = format!(
        "region = \"emb-missing\"\n\
         [server]\nlisten = \"127.0.0.1:0\"\n\
         [redis]\nurl = \"redis://127.0.0.1:1\"\n\
         [postgres]\nurl = \"postgres://nobody@127.0.0.1:1/none\"\n\
         [mesh]\nplaintext = true\n\
         [embeddings]\nmodel_dir = {missing:?}\n"
    );
    let config = Config::from_toml(&toml, "test").unwrap();
    let err = match RegionalNode::start(config).await {
        Ok(_) => panic!("the node started without its model"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("infra/scripts/setup.sh"), "{err}");
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
}

fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = s.bytes().filter(|&c| c != b'=').map(value).collect();
    digits
        .chunks(4)
        .flat_map(|c| {
            let n = c
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &d)| n | u32::from(d) << (18 - 6 * i));
            let bytes = n.to_be_bytes();
            bytes[1..c.len()].to_vec()
        })
        .collect()
}
