//! What an answer carries beyond its text, in OpenAI's own shapes: tool
//! calls (whole, and as the indexed fragments a stream sends), a refusal,
//! log probabilities, and the answer's top-level and usage fields Meridian
//! does not set itself. Backends produce these, the cache keeps them, and
//! both APIs hand them back, so nothing an upstream said is lost on the
//! way to the client.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A call of one of the request's tools, as `message.tool_calls[]` carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FunctionCall {
    pub name: String,
    /// JSON text, as the model wrote it (a client parses it).
    pub arguments: String,
}

/// A fragment of a tool call in a stream, as `delta.tool_calls[]` carries
/// it: the first fragment of a call has its id, type and name, the rest
/// only pieces of the arguments; `index` says which call a fragment is of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ToolCallDelta {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionDelta>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FunctionDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// One piece of a streamed answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Delta {
    /// Text; empty when the piece carries something else.
    pub content: String,
    pub tool_calls: Vec<ToolCallDelta>,
    pub refusal: Option<String>,
    /// `choices[].logprobs` of this piece, as the upstream sent it.
    pub logprobs: Option<Value>,
}

impl Delta {
    pub(crate) fn text(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            ..Self::default()
        }
    }
}

/// Fields of an answer that no Meridian type names: kept as sent, so a
/// field an upstream adds tomorrow reaches the client today.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Meta {
    /// Top-level fields besides the ones Meridian sets (`id`, `object`,
    /// `created`, `model`, `choices`, `usage`): `system_fingerprint`,
    /// `service_tier`, and ones not yet invented.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub fields: Map<String, Value>,
    /// Usage fields besides the three counts: `prompt_tokens_details`,
    /// `completion_tokens_details`.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub usage: Map<String, Value>,
}

/// The top-level fields of an answer (or of a stream chunk) that Meridian
/// writes itself; everything else is the upstream's to pass on.
const OWN_FIELDS: &[&str] = &["id", "object", "created", "model", "choices", "usage"];
/// Fields of a stream chunk that belong to that chunk alone: OpenAI pads
/// each with random `obfuscation` text, which means nothing once re-chunked.
const CHUNK_ONLY_FIELDS: &[&str] = &["obfuscation"];
const COUNTS: &[&str] = &["prompt_tokens", "completion_tokens", "total_tokens"];

impl Meta {
    /// Takes the fields of one answer or chunk `event` that are not yet
    /// known; the first value of a field wins, as every chunk repeats it.
    pub(crate) fn absorb(&mut self, event: &Map<String, Value>) {
        for (k, v) in event {
            if !OWN_FIELDS.contains(&k.as_str())
                && !CHUNK_ONLY_FIELDS.contains(&k.as_str())
                && !v.is_null()
            {
                self.fields.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        if let Some(usage) = event.get("usage").and_then(Value::as_object) {
            for (k, v) in usage {
                if !COUNTS.contains(&k.as_str()) {
                    self.usage.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.fields.is_empty() && self.usage.is_empty()
    }
}

/// What an answer carries beyond its text, finish reason and counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Extras {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Value>,
    #[serde(default, skip_serializing_if = "Meta::is_empty")]
    pub meta: Meta,
}

impl Extras {
    /// The answer as deltas after its text: each tool call whole, under its
    /// index, then the refusal. How a cached or stored answer is streamed.
    pub(crate) fn deltas(&self) -> Vec<Delta> {
        let calls = self.tool_calls.iter().enumerate().map(|(i, c)| Delta {
            tool_calls: vec![ToolCallDelta {
                index: i as u32,
                id: Some(c.id.clone()),
                kind: Some(c.kind.clone()),
                function: Some(FunctionDelta {
                    name: Some(c.function.name.clone()),
                    arguments: Some(c.function.arguments.clone()),
                }),
            }],
            ..Delta::default()
        });
        let refusal = self.refusal.iter().map(|r| Delta {
            refusal: Some(r.clone()),
            ..Delta::default()
        });
        calls.chain(refusal).collect()
    }
}

/// Puts a streamed answer back together: text and refusal concatenated,
/// tool-call fragments joined by index, log probabilities appended.
#[derive(Debug, Default)]
pub(crate) struct Assembly {
    pub text: String,
    extras: Extras,
}

impl Assembly {
    pub(crate) fn push(&mut self, d: &Delta) {
        self.text.push_str(&d.content);
        if let Some(r) = &d.refusal {
            self.extras
                .refusal
                .get_or_insert_with(String::new)
                .push_str(r);
        }
        for f in &d.tool_calls {
            let calls = &mut self.extras.tool_calls;
            let i = f.index as usize;
            // Indexes arrive in order; a gap (never seen from a sane
            // upstream) gets empty calls rather than a panic.
            while calls.len() <= i {
                calls.push(ToolCall {
                    id: String::new(),
                    kind: "function".into(),
                    function: FunctionCall {
                        name: String::new(),
                        arguments: String::new(),
                    },
                });
            }
            let call = &mut calls[i];
            if let Some(id) = &f.id {
                call.id.clone_from(id);
            }
            if let Some(kind) = &f.kind {
                call.kind.clone_from(kind);
            }
            if let Some(function) = &f.function {
                if let Some(name) = &function.name {
                    call.function.name.push_str(name);
                }
                if let Some(arguments) = &function.arguments {
                    call.function.arguments.push_str(arguments);
                }
            }
        }
        if let Some(lp) = &d.logprobs {
            append_logprobs(&mut self.extras.logprobs, lp);
        }
    }

    /// The text and the extras, with the answer's `meta` from its end.
    pub(crate) fn finish(self, meta: Meta) -> (String, Extras) {
        let mut extras = self.extras;
        extras.meta = meta;
        (self.text, extras)
    }
}

/// Joins the `logprobs` of two pieces: `{content: [...], refusal: [...]}`
/// with each list appended; anything else the latest wins.
fn append_logprobs(into: &mut Option<Value>, piece: &Value) {
    match (into.as_mut(), piece) {
        (Some(Value::Object(acc)), Value::Object(piece)) => {
            for (k, v) in piece {
                match (acc.get_mut(k), v) {
                    (Some(Value::Array(a)), Value::Array(b)) => a.extend(b.iter().cloned()),
                    (Some(_), Value::Null) => {}
                    _ => {
                        acc.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (_, Value::Null) => {}
        _ => *into = Some(piece.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fragment(v: Value) -> Delta {
        Delta {
            tool_calls: serde_json::from_value(v).unwrap(),
            ..Delta::default()
        }
    }

    #[test]
    fn streamed_tool_calls_are_joined_by_index() {
        let mut a = Assembly::default();
        a.push(&fragment(json!([
            {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
        ])));
        a.push(&fragment(json!([
            {"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{\"tz\""}}
        ])));
        a.push(&fragment(
            json!([{"index": 0, "function": {"arguments": "{\"city\": \"Paris\"}"}}]),
        ));
        a.push(&fragment(
            json!([{"index": 1, "function": {"arguments": ": \"UTC\"}"}}]),
        ));
        let (text, extras) = a.finish(Meta::default());
        assert_eq!(text, "");
        let calls = serde_json::to_value(&extras.tool_calls).unwrap();
        assert_eq!(
            calls,
            json!([
                {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{\"tz\": \"UTC\"}"}},
            ])
        );
        // Replayed whole, they assemble to the same calls.
        let mut again = Assembly::default();
        for d in extras.deltas() {
            again.push(&d);
        }
        assert_eq!(
            again.finish(Meta::default()).1.tool_calls,
            extras.tool_calls
        );
    }

    #[test]
    fn logprobs_of_pieces_are_appended() {
        let mut a = Assembly::default();
        for token in ["Hel", "lo"] {
            a.push(&Delta {
                content: token.into(),
                logprobs: Some(
                    json!({"content": [{"token": token, "logprob": -0.1}], "refusal": null}),
                ),
                ..Delta::default()
            });
        }
        let (text, extras) = a.finish(Meta::default());
        assert_eq!(text, "Hello");
        let lp = extras.logprobs.unwrap();
        assert_eq!(lp["content"].as_array().unwrap().len(), 2);
        assert_eq!(lp["content"][1]["token"], "lo");
    }

    #[test]
    fn meta_keeps_unknown_fields_but_not_its_own_or_per_chunk_ones() {
        let mut meta = Meta::default();
        let event = json!({
            "id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [], "system_fingerprint": "fp_1", "obfuscation": "abc",
            "brand_new": {"a": 1},
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
                      "completion_tokens_details": {"reasoning_tokens": 1}},
        });
        meta.absorb(event.as_object().unwrap());
        meta.absorb(json!({"system_fingerprint": "fp_2"}).as_object().unwrap());
        assert_eq!(
            serde_json::to_value(&meta).unwrap(),
            json!({
                "fields": {"system_fingerprint": "fp_1", "brand_new": {"a": 1}},
                "usage": {"completion_tokens_details": {"reasoning_tokens": 1}},
            })
        );
    }
}
