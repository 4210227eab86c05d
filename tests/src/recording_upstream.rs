//! An OpenAI-protocol upstream that keeps every request body it receives
//! and answers in the shapes a hosted provider uses: streamed chunks with a
//! `system_fingerprint`, tool calls in indexed fragments when tools are
//! offered, usage with token details, and a top-level field no client
//! library knows yet. Tests read what reached it, and what came back.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::served::Served;

/// The top-level field every answer carries, unknown to any SDK.
pub const UPSTREAM_ONLY_FIELD: &str = "x_upstream_note";
pub const UPSTREAM_FINGERPRINT: &str = "fp_recorded";
/// The arguments of every tool call the upstream makes, cut in fragments.
pub const RECORDED_ARGUMENTS: &str = r#"{"city": "Paris", "unit": "celsius"}"#;

type Bodies = Arc<Mutex<Vec<Value>>>;

pub struct RecordingUpstream {
    served: Served,
    bodies: Bodies,
}

impl RecordingUpstream {
    pub async fn start() -> Self {
        let bodies = Bodies::default();
        let app = Router::new()
            .route(
                "/v1/models",
                get(|| async { axum::Json(json!({"object": "list", "data": []})) }),
            )
            .route("/v1/chat/completions", post(chat))
            .with_state(bodies.clone());
        Self {
            served: Served::start(app).await,
            bodies,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.served.addr())
    }

    /// Every chat body received, oldest first.
    pub fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }
}

async fn chat(State(bodies): State<Bodies>, axum::Json(body): axum::Json<Value>) -> Response {
    bodies.lock().unwrap().push(body.clone());
    let tools = body["tools"].as_array().cloned().unwrap_or_default();
    let names: Vec<String> = tools
        .iter()
        .filter_map(|t| t["function"]["name"].as_str().map(str::to_string))
        .collect();
    let chunk = |choices: Value, usage: Value| {
        json!({
            "id": "chatcmpl-recorded", "object": "chat.completion.chunk", "created": 1,
            "model": body["model"], "system_fingerprint": UPSTREAM_FINGERPRINT,
            UPSTREAM_ONLY_FIELD: {"kept": true}, "obfuscation": "per-chunk padding",
            "choices": choices, "usage": usage,
        })
    };
    let mut events = vec![chunk(
        json!([{"index": 0, "delta": {"role": "assistant", "content": null}, "finish_reason": null}]),
        Value::Null,
    )];
    let finish = if names.is_empty() {
        for word in ["recorded", " answer"] {
            events.push(chunk(
                json!([{"index": 0, "delta": {"content": word},
                    "logprobs": {"content": [{"token": word, "logprob": -0.5, "bytes": null, "top_logprobs": []}], "refusal": null},
                    "finish_reason": null}]),
                Value::Null,
            ));
        }
        "stop"
    } else {
        for (i, name) in names.iter().enumerate() {
            events.push(chunk(
                json!([{"index": 0, "delta": {"tool_calls": [{"index": i, "id": format!("call_{i}"),
                    "type": "function", "function": {"name": name, "arguments": ""}}]}, "finish_reason": null}]),
                Value::Null,
            ));
            let (a, b) = RECORDED_ARGUMENTS.split_at(RECORDED_ARGUMENTS.len() / 2);
            for piece in [a, b] {
                events.push(chunk(
                    json!([{"index": 0, "delta": {"tool_calls": [{"index": i, "function": {"arguments": piece}}]},
                        "finish_reason": null}]),
                    Value::Null,
                ));
            }
        }
        "tool_calls"
    };
    events.push(chunk(
        json!([{"index": 0, "delta": {}, "finish_reason": finish}]),
        Value::Null,
    ));
    events.push(chunk(
        json!([]),
        json!({"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
            "completion_tokens_details": {"reasoning_tokens": 2},
            "prompt_tokens_details": {"cached_tokens": 0}}),
    ));
    let events = events
        .into_iter()
        .map(|e| Event::default().data(e.to_string()))
        .chain([Event::default().data("[DONE]")])
        .map(Ok::<_, std::convert::Infallible>);
    Sse::new(tokio_stream::iter(events)).into_response()
}
