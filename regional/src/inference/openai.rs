//! The client side of the OpenAI chat API: the body sent upstream, and the
//! upstream's server-sent events read back into [`Chunk`]s as they arrive.

use futures::StreamExt;
use serde_json::{Value, json};

use super::{ChatRequest, Chunk, ChunkStream, Finish, Usage};
use crate::error::Error;

/// The upstream request: always streamed, so time to first token is known
/// and a whole completion is the same stream collected; usage asked for in
/// the last chunk.
pub(super) fn request_body(req: &ChatRequest, upstream_model: &str) -> Value {
    let messages: Vec<Value> = req
        .messages
        .iter()
        .map(|m| json!({ "role": m.role, "content": m.content }))
        .collect();
    let mut body = json!({
        "model": upstream_model,
        "messages": messages,
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    if let Some(n) = req.max_tokens {
        body["max_tokens"] = n.into();
    }
    if let Some(seed) = req.seed {
        body["seed"] = seed.into();
    }
    if !req.stop.is_empty() {
        body["stop"] = req.stop.clone().into();
    }
    if let Some(t) = req.temperature {
        body["temperature"] = t.into();
    }
    body
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
        let mut body = response.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut finish = None;
        let mut usage = None;
        let mut deltas = 0u32;
        let mut done = false;
        'read: while let Some(bytes) = body.next().await {
            let bytes = match bytes {
                Ok(b) => b,
                Err(e) => {
                    yield Err(Error::Unavailable(format!("upstream {origin} broke off: {e}")));
                    return;
                }
            };
            buf.extend_from_slice(&bytes);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let Some(data) = line.trim_end().strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim_start();
                if data == "[DONE]" {
                    done = true;
                    break 'read;
                }
                let Ok(event) = serde_json::from_str::<Value>(data) else {
                    yield Err(Error::Unavailable(format!("upstream {origin} sent an unreadable event")));
                    return;
                };
                if let Some(message) = event["error"]["message"].as_str() {
                    yield Err(Error::Unavailable(format!("upstream {origin}: {message}")));
                    return;
                }
                let choice = &event["choices"][0];
                if let Some(text) = choice["delta"]["content"].as_str()
                    && !text.is_empty()
                {
                    deltas += 1;
                    yield Ok(Chunk::Delta(text.to_string()));
                }
                if let Some(reason) = choice["finish_reason"].as_str() {
                    finish = Some(if reason == "length" { Finish::Length } else { Finish::Stop });
                }
                if let (Some(p), Some(c)) = (
                    event["usage"]["prompt_tokens"].as_u64(),
                    event["usage"]["completion_tokens"].as_u64(),
                ) {
                    usage = Some(Usage {
                        prompt_tokens: p as u32,
                        completion_tokens: c as u32,
                    });
                }
            }
        }
        let Some(finish) = finish.or(done.then_some(Finish::Stop)) else {
            yield Err(Error::Unavailable(format!("upstream {origin} ended the stream early")));
            return;
        };
        yield Ok(Chunk::Done {
            finish,
            usage: usage.unwrap_or(Usage { prompt_tokens, completion_tokens: deltas }),
        });
    }
    .boxed()
}
