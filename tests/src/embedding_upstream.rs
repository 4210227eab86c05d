//! An OpenAI-compatible embedding server for tests: `POST /v1/embeddings`
//! answers each input with a vector derived from a hash of the input alone
//! ([`expected_vector`]), as floats or base64 as asked, and records every
//! call's body, so a test can tell how many upstream calls its requests
//! took and check that each caller got the vectors of its own inputs.
//! With a key set, it refuses any other with OpenAI's 401.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::served::Served;

/// Length of every vector it answers.
pub const EMBEDDING_UPSTREAM_DIMENSIONS: usize = 8;

/// The top-level field every answer carries, unknown to any SDK.
pub const EMBEDDING_UPSTREAM_NOTE: &str = "x_embedding_note";

#[derive(Clone, Default)]
struct Shared {
    bodies: Arc<Mutex<Vec<Value>>>,
    key: Option<String>,
}

pub struct EmbeddingUpstream {
    served: Served,
    shared: Shared,
}

/// The vector the upstream answers for `input` (a string, or token ids as
/// JSON): 8 floats from FNV-1a hashes of its JSON text, so inputs differ
/// and the same input always gets the same vector. `dimensions` shortens it.
pub fn expected_vector(input: &Value, dimensions: Option<usize>) -> Vec<f32> {
    let text = input.to_string();
    let n = dimensions.unwrap_or(EMBEDDING_UPSTREAM_DIMENSIONS);
    (0..n as u64)
        .map(|i| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ i;
            for b in text.bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            // Exactly representable in f32 and JSON: k / 1024.
            ((h % 2048) as f32 - 1024.0) / 1024.0
        })
        .collect()
}

impl EmbeddingUpstream {
    /// A server taking any key, or none.
    pub async fn start() -> Self {
        Self::start_with_key(None).await
    }

    /// A server that answers only `Authorization: Bearer {key}` when a key
    /// is given.
    pub async fn start_with_key(key: Option<&str>) -> Self {
        let shared = Shared {
            bodies: Arc::default(),
            key: key.map(str::to_string),
        };
        let app = Router::new()
            .route("/v1/models", get(models))
            .route("/v1/embeddings", post(embeddings))
            .with_state(shared.clone());
        Self {
            served: Served::start(app).await,
            shared,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.served.addr())
    }

    /// Every embeddings body received, oldest first.
    pub fn bodies(&self) -> Vec<Value> {
        self.shared.bodies.lock().unwrap().clone()
    }
}

fn refused(headers: &HeaderMap, shared: &Shared) -> Option<Response> {
    let key = shared.key.as_ref()?;
    let sent = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    (sent != format!("Bearer {key}")).then(|| {
        let body = json!({"error": {"message": format!("Incorrect API key provided: {sent}"),
            "type": "invalid_request_error", "code": "invalid_api_key"}});
        (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
    })
}

async fn models(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refused(&headers, &shared) {
        return refusal;
    }
    axum::Json(json!({"object": "list", "data": []})).into_response()
}

async fn embeddings(
    State(shared): State<Shared>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if let Some(refusal) = refused(&headers, &shared) {
        return refusal;
    }
    shared.bodies.lock().unwrap().push(body.clone());
    let inputs = match &body["input"] {
        Value::Array(items) if items.iter().all(Value::is_number) => vec![body["input"].clone()],
        Value::Array(items) => items.clone(),
        one => vec![one.clone()],
    };
    let dimensions = body["dimensions"].as_u64().map(|d| d as usize);
    let base64 = body["encoding_format"] == "base64";
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let v = expected_vector(input, dimensions);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    // One token per whitespace-separated word, or per token id.
    let tokens: usize = inputs
        .iter()
        .map(|i| match i {
            Value::String(s) => s.split_whitespace().count(),
            Value::Array(ids) => ids.len(),
            _ => 1,
        })
        .sum();
    axum::Json(json!({
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        EMBEDDING_UPSTREAM_NOTE: "kept",
    }))
    .into_response()
}
