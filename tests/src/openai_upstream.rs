//! A minimal OpenAI-protocol server whose chat completions carry every key
//! OpenAI's description requires, with a switch to leave one out: the
//! conformance harness is run against it to show that a missing required
//! key fails the run, independently of what Meridian's own answers carry.

use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::served::Served;

/// The one model the upstream lists.
pub const OPENAI_UPSTREAM_MODEL: &str = "conformance-chat";

/// An OpenAI-protocol server on a free port, stopped on drop.
pub struct OpenAiUpstream {
    served: Served,
}

impl OpenAiUpstream {
    /// Serves `GET /v1/models` and `POST /v1/chat/completions`; each answer's
    /// `choices[].message` lacks `dropped_message_key` when one is given.
    pub async fn start(dropped_message_key: Option<&'static str>) -> Self {
        let app = Router::new().route("/v1/models", get(models)).route(
            "/v1/chat/completions",
            post(move |Json(request): Json<Value>| async move {
                Json(completion(&request, dropped_message_key))
            }),
        );
        Self {
            served: Served::start(app).await,
        }
    }

    /// The OpenAI base URL clients are given.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.served.addr())
    }
}

async fn models() -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{ "id": OPENAI_UPSTREAM_MODEL, "object": "model", "created": 0, "owned_by": "tests" }],
    }))
}

/// A complete chat completion as OpenAI sends it: nullable keys present as
/// `null`, one choice per `n`.
fn completion(request: &Value, dropped_message_key: Option<&str>) -> Value {
    let n = request["n"].as_u64().unwrap_or(1).clamp(1, 8);
    let choices: Vec<Value> = (0..n)
        .map(|index| {
            let mut message = json!({
                "role": "assistant",
                "content": "conformance",
                "refusal": null,
                "annotations": [],
            });
            if let Some(key) = dropped_message_key {
                message.as_object_mut().unwrap().remove(key);
            }
            json!({ "index": index, "message": message, "logprobs": null, "finish_reason": "stop" })
        })
        .collect();
    json!({
        "id": "chatcmpl-conformance",
        "object": "chat.completion",
        "created": 0,
        "model": request["model"].as_str().unwrap_or(OPENAI_UPSTREAM_MODEL),
        "choices": choices,
        "usage": { "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2 },
    })
}
