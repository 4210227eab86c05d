//! The simulator as an Anthropic Messages server: `POST /v1/messages`
//! (JSON, or the SSE event sequence with `ping`) and `GET /v1/models`. A
//! request is read into the same [`ChatRequest`] the OpenAI side makes,
//! so text and tool calls come from the same deterministic engine, and the
//! answer is written back as Messages content blocks and events.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Map, Value, json};

use super::server::Sim;
use crate::inference::anthropic::stop_reason;
use crate::inference::{ChatRequest, Chunk, Message, ToolCall, Usage};

fn error(status: StatusCode, kind: &str, message: String) -> Response {
    let body = json!({ "type": "error", "error": { "type": kind, "message": message } });
    (status, axum::Json(body)).into_response()
}

pub(super) async fn messages(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    let read = serde_json::from_slice::<Value>(&body)
        .map_err(|e| e.to_string())
        .and_then(|body| chat_request(&body, &sim).map(|req| (req, body["stream"] == true)));
    let (req, stream) = match read {
        Ok(read) => read,
        Err(why) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", why),
    };
    let id = format!("msg_sim_{}", uuid::Uuid::now_v7().simple());
    if !stream {
        return match sim.backend.complete(&req).await {
            Ok(done) => {
                let mut content = Vec::new();
                if !done.text.is_empty() || done.extras.tool_calls.is_empty() {
                    content.push(json!({ "type": "text", "text": done.text }));
                }
                content.extend(done.extras.tool_calls.iter().map(tool_use));
                axum::Json(json!({
                    "id": id, "type": "message", "role": "assistant", "model": req.model,
                    "content": content, "stop_reason": stop_reason(done.finish),
                    "stop_sequence": null, "usage": usage(done.usage),
                }))
                .into_response()
            }
            Err(e) => error(
                StatusCode::from_u16(529).expect("a status"),
                "overloaded_error",
                e.to_string(),
            ),
        };
    }
    let start = json!({ "type": "message_start", "message": {
        "id": id, "type": "message", "role": "assistant", "model": req.model, "content": [],
        "stop_reason": null, "stop_sequence": null,
        "usage": { "input_tokens": req.prompt_tokens(), "output_tokens": 0 } } });
    let chunks = sim.backend.stream(req);
    let events = async_stream::stream! {
        yield start;
        yield json!({ "type": "ping" });
        let mut chunks = chunks;
        // The open block: its index, and whether it holds text.
        let mut open: Option<(u32, bool)> = None;
        let mut next = 0u32;
        while let Some(c) = chunks.next().await {
            match c {
                Chunk::Delta(piece) if piece.tool_calls.is_empty() => {
                    if open.is_none_or(|(_, text)| !text) {
                        if let Some((index, _)) = open {
                            yield json!({ "type": "content_block_stop", "index": index });
                        }
                        open = Some((next, true));
                        yield json!({ "type": "content_block_start", "index": next,
                            "content_block": { "type": "text", "text": "" } });
                        next += 1;
                    }
                    let index = open.map_or(0, |(i, _)| i);
                    yield json!({ "type": "content_block_delta", "index": index,
                        "delta": { "type": "text_delta", "text": piece.content } });
                }
                Chunk::Delta(piece) => for f in piece.tool_calls {
                    let function = f.function.unwrap_or_default();
                    if let Some(id) = f.id {
                        if let Some((index, _)) = open {
                            yield json!({ "type": "content_block_stop", "index": index });
                        }
                        open = Some((next, false));
                        yield json!({ "type": "content_block_start", "index": next,
                            "content_block": { "type": "tool_use", "id": id,
                                "name": function.name.unwrap_or_default(), "input": {} } });
                        next += 1;
                    }
                    let index = open.map_or(0, |(i, _)| i);
                    if let Some(json) = function.arguments.filter(|a| !a.is_empty()) {
                        yield json!({ "type": "content_block_delta", "index": index,
                            "delta": { "type": "input_json_delta", "partial_json": json } });
                    }
                },
                Chunk::Done { finish, usage: u, .. } => {
                    if let Some((index, _)) = open.take() {
                        yield json!({ "type": "content_block_stop", "index": index });
                    }
                    yield json!({ "type": "message_delta",
                        "delta": { "stop_reason": stop_reason(finish), "stop_sequence": null },
                        "usage": { "output_tokens": u.completion_tokens } });
                    yield json!({ "type": "message_stop" });
                }
            }
        }
    };
    let events = events.map(|v| {
        let kind = v["type"].as_str().unwrap_or_default().to_string();
        Ok::<_, Infallible>(Event::default().event(kind).data(v.to_string()))
    });
    Sse::new(events).into_response()
}

fn tool_use(call: &ToolCall) -> Value {
    let input: Value = serde_json::from_str(&call.function.arguments).unwrap_or(json!({}));
    json!({ "type": "tool_use", "id": call.id, "name": call.function.name, "input": input })
}

fn usage(u: Usage) -> Value {
    json!({ "input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens })
}

pub(super) async fn models() -> Response {
    axum::Json(
        json!({ "data": [{ "type": "model", "id": super::server::MODEL,
        "display_name": "Meridian simulator", "created_at": "2025-01-01T00:00:00Z" }],
        "has_more": false, "first_id": super::server::MODEL, "last_id": super::server::MODEL }),
    )
    .into_response()
}

/// A Messages body as the request the engine answers: the system prompt
/// as a system message, tool results as tool messages, tools and the tool
/// choice in OpenAI's shape, which the engine reads.
fn chat_request(body: &Value, sim: &Sim) -> Result<ChatRequest, String> {
    let model = body["model"].as_str().ok_or("`model` is required")?;
    let max_tokens = body["max_tokens"]
        .as_u64()
        .filter(|n| *n > 0)
        .ok_or("`max_tokens` is required and at least 1")?;
    let mut messages = Vec::new();
    match &body["system"] {
        Value::Null => {}
        Value::String(s) => messages.push(Message::text("system", s.clone())),
        Value::Array(blocks) => messages.push(Message::text("system", texts(blocks))),
        _ => return Err("`system` must be a string or text blocks".into()),
    }
    let turns = body["messages"]
        .as_array()
        .ok_or("`messages` is required")?;
    for (i, turn) in turns.iter().enumerate() {
        let role = turn["role"].as_str().unwrap_or_default();
        let blocks = match &turn["content"] {
            Value::String(s) => vec![json!({ "type": "text", "text": s })],
            Value::Array(blocks) => blocks.clone(),
            _ => return Err(format!("`messages.{i}.content` must be a string or blocks")),
        };
        match role {
            "user" => user(&blocks, i, sim, &mut messages)?,
            "assistant" => messages.push(assistant(&blocks)),
            _ => return Err(format!("`messages.{i}.role` must be user or assistant")),
        }
    }
    let mut extra = Map::new();
    if let Some(tools) = body["tools"].as_array() {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| {
                json!({ "type": "function", "function": { "name": t["name"],
                "description": t["description"], "parameters": t["input_schema"] } })
            })
            .collect();
        extra.insert("tools".into(), tools.into());
    }
    let choice = &body["tool_choice"];
    if let Some(kind) = choice["type"].as_str() {
        let choice = match kind {
            "any" => json!("required"),
            "tool" => json!({ "type": "function", "function": { "name": choice["name"] } }),
            other => json!(other),
        };
        extra.insert("tool_choice".into(), choice);
    }
    if body["tool_choice"]["disable_parallel_tool_use"] == true {
        extra.insert("parallel_tool_calls".into(), false.into());
    }
    Ok(ChatRequest {
        model: model.into(),
        messages,
        max_tokens: Some(u32::try_from(max_tokens).unwrap_or(u32::MAX)),
        max_completion_tokens: false,
        seed: None,
        stop: body["stop_sequences"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect(),
        temperature: body["temperature"].as_f64().map(|t| t as f32),
        extra: Arc::new(extra),
    })
}

fn texts(blocks: &[Value]) -> String {
    blocks
        .iter()
        .filter_map(|b| b["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A user turn: its tool results as tool messages first, then its text and
/// images as one user message. Images are checked as the API checks them
/// and counted by source, so a test can see what reached the upstream.
fn user(blocks: &[Value], i: usize, sim: &Sim, messages: &mut Vec<Message>) -> Result<(), String> {
    let mut parts = Vec::new();
    let mut text = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let at = format!("messages.{i}.content.{j}");
        match block["type"].as_str() {
            Some("text") => {
                let t = block["text"]
                    .as_str()
                    .ok_or(format!("`{at}.text` is required"))?;
                text.push(t.to_string());
                parts.push(json!({ "type": "text", "text": t }));
            }
            Some("image") => {
                let source = &block["source"];
                let counter = match source["type"].as_str() {
                    Some("base64")
                        if source["media_type"]
                            .as_str()
                            .is_some_and(|m| m.starts_with("image/"))
                            && source["data"].as_str().is_some_and(|d| !d.is_empty()) =>
                    {
                        &sim.images[0]
                    }
                    Some("url")
                        if source["url"]
                            .as_str()
                            .is_some_and(|u| u.starts_with("http")) =>
                    {
                        &sim.images[1]
                    }
                    _ => return Err(format!("`{at}.source` is not a base64 or url image source")),
                };
                counter.fetch_add(1, Ordering::Relaxed);
                parts.push(json!({ "type": "image_url", "image_url": { "url": "image" } }));
            }
            Some("tool_result") => {
                let content = match &block["content"] {
                    Value::String(s) => s.clone(),
                    Value::Array(b) => texts(b),
                    _ => String::new(),
                };
                let mut raw = Map::new();
                raw.insert("role".into(), "tool".into());
                raw.insert("tool_call_id".into(), block["tool_use_id"].clone());
                raw.insert("content".into(), content.clone().into());
                messages.push(Message {
                    role: "tool".into(),
                    content,
                    raw: Some(Arc::new(raw)),
                });
            }
            _ => return Err(format!("`{at}.type` is not one the simulator reads")),
        }
    }
    if !parts.is_empty() {
        let mut raw = Map::new();
        raw.insert("role".into(), "user".into());
        raw.insert("content".into(), parts.into());
        messages.push(Message {
            role: "user".into(),
            content: text.join("\n"),
            raw: Some(Arc::new(raw)),
        });
    }
    Ok(())
}

fn assistant(blocks: &[Value]) -> Message {
    let text = texts(blocks);
    let calls: Vec<Value> = blocks
        .iter()
        .filter(|b| b["type"] == "tool_use")
        .map(|b| {
            json!({ "id": b["id"], "type": "function",
            "function": { "name": b["name"], "arguments": b["input"].to_string() } })
        })
        .collect();
    let mut raw = Map::new();
    raw.insert("role".into(), "assistant".into());
    raw.insert("content".into(), text.clone().into());
    if !calls.is_empty() {
        raw.insert("tool_calls".into(), calls.into());
    }
    Message {
        role: "assistant".into(),
        content: text,
        raw: Some(Arc::new(raw)),
    }
}
