//! The client side of the OpenAI chat API: the body sent upstream, and the
//! upstream's server-sent events read back into [`Chunk`]s as they arrive.

use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ChatRequest, Chunk, ChunkStream, Delta, Finish, Meta, ToolCallDelta, Usage};
use crate::error::Error;

/// The upstream request: the client's own fields Meridian does not act on
/// (`tools`, `response_format`, ...) as they came, then Meridian's. Always
/// streamed, so time to first token is known and a whole completion is the
/// same stream collected; usage asked for in the last chunk.
pub(super) fn request_body(req: &ChatRequest, upstream_model: &str) -> Value {
    let messages: Vec<Value> = req
        .messages
        .iter()
        .map(|m| match &m.raw {
            Some(raw) => Value::Object((**raw).clone()),
            None => json!({ "role": m.role, "content": m.content }),
        })
        .collect();
    let mut body = (*req.extra).clone();
    body.insert("model".into(), upstream_model.into());
    body.insert("messages".into(), messages.into());
    body.insert("stream".into(), true.into());
    body.insert("stream_options".into(), json!({ "include_usage": true }));
    if let Some(n) = req.max_tokens {
        let name = if req.max_completion_tokens {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        body.insert(name.into(), n.into());
    }
    if let Some(seed) = req.seed {
        // The client's int64 back: the same bits the backends take as u64.
        body.insert("seed".into(), (seed as i64).into());
    }
    if !req.stop.is_empty() {
        body.insert("stop".into(), req.stop.clone().into());
    }
    if let Some(t) = req.temperature {
        body.insert("temperature".into(), json_f32(t));
    }
    Value::Object(body)
}

/// An f32 as JSON in its shortest decimal form: `0.7`, not the
/// `0.699999988079071` of its widening to f64, which an upstream would take
/// for another value than the client sent.
pub(crate) fn json_f32(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .map_or(Value::Null, Value::from)
}

/// The message of an OpenAI error body, or the body itself.
pub(super) fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.chars().take(200).collect())
}

/// Reads an upstream's SSE body. Usage comes from the upstream when it
/// reports it, else the prompt estimate and one token per delta.
pub(super) fn chunks(
    response: reqwest::Response,
    prompt_tokens: u32,
    origin: String,
) -> ChunkStream {
    async_stream::stream! {
        let mut events = super::sse::data(response, &origin);
        let mut finish = None;
        let mut usage = None;
        let mut deltas = 0u32;
        let mut done = false;
        let mut meta = Meta::default();
        while let Some(data) = events.next().await {
            let data = match data {
                Ok(d) => d,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            };
            if data == "[DONE]" {
                done = true;
                break;
            }
            let Ok(event) = serde_json::from_str::<Value>(&data) else {
                yield Err(Error::Unavailable(format!("upstream {origin} sent an unreadable event")));
                return;
            };
            if let Some(message) = event["error"]["message"].as_str() {
                yield Err(Error::Unavailable(format!("upstream {origin}: {message}")));
                return;
            }
            let Some(event) = event.as_object() else {
                yield Err(Error::Unavailable(format!("upstream {origin} sent an event that is not an object")));
                return;
            };
            meta.absorb(event);
            if let Some(choice) = event.get("choices").and_then(|c| c.get(0)) {
                match delta(choice) {
                    Ok(Some(d)) => {
                        deltas += 1;
                        yield Ok(Chunk::Delta(d));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        yield Err(Error::Unavailable(format!("upstream {origin} sent an unreadable event: {e}")));
                        return;
                    }
                }
                if let Some(reason) = choice["finish_reason"].as_str() {
                    finish = Some(Finish::parse(reason));
                }
            }
            if let Some(u) = event.get("usage")
                && let (Some(p), Some(c)) = (u["prompt_tokens"].as_u64(), u["completion_tokens"].as_u64())
            {
                usage = Some(Usage {
                    prompt_tokens: u32::try_from(p).unwrap_or(u32::MAX),
                    completion_tokens: u32::try_from(c).unwrap_or(u32::MAX),
                });
            }
        }
        let Some(finish) = finish.or(done.then_some(Finish::Stop)) else {
            yield Err(Error::Unavailable(format!("upstream {origin} ended the stream early")));
            return;
        };
        yield Ok(Chunk::Done {
            finish,
            usage: usage.unwrap_or(Usage { prompt_tokens, completion_tokens: deltas }),
            meta,
        });
    }
    .boxed()
}

/// The piece of the answer in one streamed `choices[0]`; `None` when it
/// carries nothing (the role-only first chunk, the finish chunk).
fn delta(choice: &Value) -> Result<Option<Delta>, serde_json::Error> {
    let d = &choice["delta"];
    let piece = Delta {
        content: d["content"].as_str().unwrap_or_default().to_string(),
        tool_calls: match d.get("tool_calls") {
            Some(calls) if !calls.is_null() => Vec::<ToolCallDelta>::deserialize(calls)?,
            _ => Vec::new(),
        },
        refusal: d["refusal"].as_str().map(str::to_string),
        logprobs: choice.get("logprobs").filter(|l| !l.is_null()).cloned(),
    };
    let empty = piece.content.is_empty()
        && piece.tool_calls.is_empty()
        && piece.refusal.is_none()
        && piece.logprobs.is_none();
    Ok((!empty).then_some(piece))
}
