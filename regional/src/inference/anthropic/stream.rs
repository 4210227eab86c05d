//! A Messages API event stream read into chunks: text deltas as content,
//! each `tool_use` block as a tool call under the next call index (blocks
//! are numbered with the text ones, calls are not), its `partial_json` as
//! argument fragments; the stop reason and usage at the end.

use std::collections::HashMap;

use futures::StreamExt;
use serde_json::{Value, json};

use crate::error::Error;
use crate::inference::{
    Chunk, ChunkStream, Delta, Finish, FunctionDelta, Meta, ToolCallDelta, Usage,
};

/// What one event changes.
enum Step {
    Piece(Delta),
    Nothing,
    End,
}

/// What the stream has said so far.
#[derive(Default)]
struct Reading {
    /// Content block index → tool-call index, for `tool_use` blocks.
    calls: HashMap<u64, u32>,
    finish: Option<Finish>,
    input_tokens: u64,
    cache_read: u64,
    cache_creation: u64,
    output_tokens: Option<u64>,
    pieces: u32,
}

pub(crate) fn chunks(
    response: reqwest::Response,
    prompt_tokens: u32,
    origin: String,
) -> ChunkStream {
    async_stream::stream! {
        // `event:` lines repeat the data's own `type`: the data is enough.
        let mut events = crate::inference::sse::data(response, &origin);
        let mut reading = Reading::default();
        let mut ended = false;
        while let Some(data) = events.next().await {
            let data = match data {
                Ok(d) => d,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            };
            let Ok(event) = serde_json::from_str::<Value>(&data) else {
                yield Err(Error::Unavailable(format!("upstream {origin} sent an unreadable event")));
                return;
            };
            match reading.step(&event) {
                Ok(Step::Piece(d)) => {
                    reading.pieces += 1;
                    yield Ok(Chunk::Delta(d));
                }
                Ok(Step::Nothing) => {}
                Ok(Step::End) => {
                    ended = true;
                    break;
                }
                Err(why) => {
                    yield Err(Error::Unavailable(format!("upstream {origin}: {why}")));
                    return;
                }
            }
        }
        let (true, Some(finish)) = (ended, reading.finish) else {
            yield Err(Error::Unavailable(format!("upstream {origin} ended the stream early")));
            return;
        };
        yield Ok(reading.done(finish, prompt_tokens));
    }
    .boxed()
}

impl Reading {
    fn step(&mut self, event: &Value) -> Result<Step, String> {
        let index = event["index"].as_u64().unwrap_or(0);
        Ok(match event["type"].as_str().unwrap_or_default() {
            "message_start" => {
                self.usage(&event["message"]["usage"]);
                Step::Nothing
            }
            "content_block_start" => {
                let block = &event["content_block"];
                match block["type"].as_str() {
                    Some("text") => match block["text"].as_str() {
                        Some(text) if !text.is_empty() => Step::Piece(Delta::text(text)),
                        _ => Step::Nothing,
                    },
                    Some("tool_use") => {
                        let call = self.calls.len() as u32;
                        self.calls.insert(index, call);
                        let id = block["id"].as_str().unwrap_or_default();
                        let name = block["name"].as_str().unwrap_or_default();
                        Step::Piece(call_piece(call, Some((id, name)), ""))
                    }
                    // Thinking and server-tool blocks come only when asked
                    // for, which Meridian never does.
                    _ => Step::Nothing,
                }
            }
            "content_block_delta" => {
                let delta = &event["delta"];
                match delta["type"].as_str() {
                    Some("text_delta") => {
                        Step::Piece(Delta::text(delta["text"].as_str().unwrap_or_default()))
                    }
                    Some("input_json_delta") => {
                        let Some(call) = self.calls.get(&index) else {
                            return Err(format!("input for block {index}, which is no tool_use"));
                        };
                        let json = delta["partial_json"].as_str().unwrap_or_default();
                        if json.is_empty() {
                            Step::Nothing
                        } else {
                            Step::Piece(call_piece(*call, None, json))
                        }
                    }
                    _ => Step::Nothing,
                }
            }
            "message_delta" => {
                if let Some(reason) = event["delta"]["stop_reason"].as_str() {
                    self.finish = Some(super::finish(reason));
                }
                self.usage(&event["usage"]);
                Step::Nothing
            }
            "message_stop" => Step::End,
            "error" => {
                let e = &event["error"];
                return Err(format!(
                    "{}: {}",
                    e["type"].as_str().unwrap_or("error"),
                    e["message"].as_str().unwrap_or_default()
                ));
            }
            // `ping`, `content_block_stop`, and events not invented yet.
            _ => Step::Nothing,
        })
    }

    /// Takes the counts of a `usage` object; `output_tokens` is a running
    /// total, so the latest wins.
    fn usage(&mut self, usage: &Value) {
        let count = |k: &str| usage[k].as_u64();
        if let Some(n) = count("input_tokens") {
            self.input_tokens = n;
        }
        if let Some(n) = count("cache_read_input_tokens") {
            self.cache_read = n;
        }
        if let Some(n) = count("cache_creation_input_tokens") {
            self.cache_creation = n;
        }
        if let Some(n) = count("output_tokens") {
            self.output_tokens = Some(n);
        }
    }

    /// The end. OpenAI's prompt tokens include cached ones, Anthropic's
    /// `input_tokens` neither the cache reads nor the cache writes: all
    /// three are the prompt, the reads its `cached_tokens`.
    fn done(&self, finish: Finish, prompt_estimate: u32) -> Chunk {
        let prompt = self.input_tokens + self.cache_read + self.cache_creation;
        let mut meta = Meta::default();
        if self.cache_read > 0 || self.cache_creation > 0 {
            meta.usage.insert(
                "prompt_tokens_details".into(),
                json!({ "cached_tokens": self.cache_read }),
            );
            meta.usage.insert(
                "cache_creation_input_tokens".into(),
                self.cache_creation.into(),
            );
        }
        let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        Chunk::Done {
            finish,
            usage: Usage {
                prompt_tokens: if prompt > 0 {
                    clamp(prompt)
                } else {
                    prompt_estimate
                },
                completion_tokens: self.output_tokens.map_or(self.pieces, clamp),
            },
            meta,
        }
    }
}

/// A tool-call fragment: the first of a call carries its id and name.
fn call_piece(index: u32, head: Option<(&str, &str)>, arguments: &str) -> Delta {
    Delta {
        tool_calls: vec![ToolCallDelta {
            index,
            id: head.map(|(id, _)| id.to_string()),
            kind: head.map(|_| "function".to_string()),
            function: Some(FunctionDelta {
                name: head.map(|(_, name)| name.to_string()),
                arguments: Some(arguments.to_string()),
            }),
        }],
        ..Delta::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::Assembly;

    #[test]
    fn events_become_text_calls_finish_and_usage() {
        let events = [
            json!({"type": "message_start", "message": {"usage": {"input_tokens": 10,
                "cache_read_input_tokens": 5, "cache_creation_input_tokens": 2, "output_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "ping"}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me"}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\":"}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": " \"Oslo\"}"}}),
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}}}),
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 7}}),
        ];
        let mut reading = Reading::default();
        let mut assembly = Assembly::default();
        for e in &events {
            if let Step::Piece(d) = reading.step(e).unwrap() {
                assembly.push(&d);
            }
        }
        assert!(matches!(
            reading.step(&json!({"type": "message_stop"})),
            Ok(Step::End)
        ));
        let Chunk::Done {
            finish,
            usage,
            meta,
        } = reading.done(reading.finish.unwrap(), 0)
        else {
            panic!("an end");
        };
        let (text, extras) = assembly.finish(meta);
        assert_eq!(text, "Let me");
        assert_eq!(finish, Finish::ToolCalls);
        assert_eq!(
            usage,
            Usage {
                prompt_tokens: 17,
                completion_tokens: 7
            }
        );
        assert_eq!(
            extras.meta.usage["prompt_tokens_details"],
            json!({"cached_tokens": 5})
        );
        let calls = serde_json::to_value(&extras.tool_calls).unwrap();
        assert_eq!(
            calls,
            json!([
                {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}},
                {"id": "toolu_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ])
        );
        let e = Reading::default()
            .step(&json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
            .err()
            .unwrap();
        assert_eq!(e, "overloaded_error: Overloaded");
    }
}
