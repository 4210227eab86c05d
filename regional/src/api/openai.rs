//! OpenAI wire types for `/v1/chat/completions` and `/v1/models`. A request
//! field Meridian does not act on is kept as sent and passed to the model's
//! upstream (`ChatRequest::extra`); an answer's fields Meridian does not set
//! come back to the client the same way.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::Error;
use crate::inference::{
    ChatRequest, Extras, Finish, Message, Meta, ToolCall, ToolCallDelta, Usage,
};

#[derive(Debug, Deserialize)]
pub(super) struct ChatCompletionBody {
    model: String,
    /// Read one by one ([`message`]), so each keeps what it carries beyond
    /// a role and a text.
    messages: Vec<Value>,
    // Signed, so a negative value gets an error naming the field rather
    // than a serde message about u32.
    #[serde(default, deserialize_with = "integer")]
    max_tokens: Option<i64>,
    #[serde(default, deserialize_with = "integer")]
    max_completion_tokens: Option<i64>,
    /// Any 64-bit integer, negative ones included, as OpenAI takes it.
    #[serde(default, deserialize_with = "integer")]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    /// `null` is "not set", as the description allows.
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, deserialize_with = "integer")]
    n: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    /// Meridian's own field (OpenAI's SDKs send it through `extra_body`):
    /// the conversation this request continues, as `x-meridian-conversation`.
    /// Not passed on.
    #[serde(default)]
    pub conversation_id: Option<String>,
    /// Every other field, for the upstream.
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub(super) struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

impl StreamOptions {
    pub(super) fn include_usage(options: Option<&Self>) -> bool {
        options.and_then(|o| o.include_usage).unwrap_or(false)
    }
}

/// An `integer` field as JSON Schema reads the word, which OpenAI's
/// description uses: `5.0` is the integer 5. `null` is "not set".
pub(super) fn integer<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64> + TryFrom<u64>,
{
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    // Beyond 2^53 a float no longer names one integer.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    let value = match (n.as_u64(), n.as_i64(), n.as_f64()) {
        (Some(u), _, _) => T::try_from(u).ok(),
        (_, Some(i), _) => T::try_from(i).ok(),
        (_, _, Some(f)) if f.fract() == 0.0 && f.abs() <= EXACT => T::try_from(f as i64).ok(),
        _ => None,
    };
    value
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom(format!("expected an integer in range, got {n}")))
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `function` is the deprecated name of `tool`, still in OpenAI's
/// description and still sent by older clients.
const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

impl ChatCompletionBody {
    /// Parses a request body, naming the problem when it is not one.
    pub(super) fn parse(bytes: &[u8]) -> Result<Self, Error> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::invalid(format!("invalid request body: {e}"), None))
    }

    /// Whether the client asked for server-sent events.
    pub(super) fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether the request offers the model tools (or, in the deprecated
    /// form, functions).
    pub(super) fn has_tools(&self) -> bool {
        ["tools", "functions"].iter().any(|k| {
            self.extra
                .get(*k)
                .is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()))
        })
    }

    /// Removes a field that belongs to the route (a job's `priority`), so
    /// it is not passed to the model.
    pub(super) fn take_field(&mut self, name: &str) -> Option<Value> {
        self.extra.remove(name)
    }

    /// Checks the request and turns it into the inference request.
    pub(super) fn into_request(self) -> Result<ChatRequest, Error> {
        if self.model.is_empty() {
            return Err(Error::invalid("`model` must not be empty", Some("model")));
        }
        if self.messages.is_empty() {
            return Err(Error::invalid(
                "`messages` must contain at least one message",
                Some("messages"),
            ));
        }
        one_choice(self.n.map(i64::from))?;
        if self.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            return Err(Error::invalid(
                "`temperature` must be between 0 and 2",
                Some("temperature"),
            ));
        }
        let max_tokens = max_tokens(self.max_completion_tokens.or(self.max_tokens))?;
        let messages = self
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| message(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ChatRequest {
            model: self.model,
            messages,
            max_tokens,
            max_completion_tokens: self.max_completion_tokens.is_some(),
            seed: self.seed.map(seed_bits),
            stop: match self.stop {
                None => vec![],
                Some(Stop::One(s)) => vec![s],
                Some(Stop::Many(v)) => v,
            },
            temperature: self.temperature,
            extra: Arc::new(self.extra),
        })
    }
}

/// Reads `messages[i]`: its role checked, its text gathered from the text
/// parts, and the whole object kept when it carries more than a role and a
/// string (parts, tool calls, a tool call id, a name).
fn message(i: usize, value: Value) -> Result<Message, Error> {
    let invalid = |what: String| Error::invalid(what, Some("messages"));
    let Value::Object(map) = value else {
        return Err(invalid(format!("`messages[{i}]` must be an object")));
    };
    let role = match map.get("role") {
        Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.clone(),
        other => {
            return Err(invalid(format!(
                "`messages[{i}].role` must be one of {}, got {}",
                ROLES.join(", "),
                other.map_or("nothing".to_string(), Value::to_string)
            )));
        }
    };
    let (content, plain) = match map.get("content") {
        None | Some(Value::Null) => (String::new(), true),
        Some(Value::String(t)) => (t.clone(), true),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::new();
            for (j, part) in parts.iter().enumerate() {
                match (part["type"].as_str(), &part["text"]) {
                    (Some("text"), Value::String(t)) => texts.push(t.as_str()),
                    (Some("text"), _) => {
                        return Err(invalid(format!(
                            "`messages[{i}].content[{j}].text` must be a string"
                        )));
                    }
                    (Some(_), _) => {}
                    (None, _) => {
                        return Err(invalid(format!(
                            "`messages[{i}].content[{j}].type` must be a string naming the part \
                             (text, image_url, input_audio, file, ...)"
                        )));
                    }
                }
            }
            (texts.join("\n"), false)
        }
        Some(_) => {
            return Err(invalid(format!(
                "`messages[{i}].content` must be a string or an array of content parts"
            )));
        }
    };
    let plain = plain && map.keys().all(|k| k == "role" || k == "content");
    Ok(Message {
        role,
        content,
        raw: (!plain).then(|| Arc::new(map)),
    })
}

/// A client's seed as the backends take it: the same bits, so each of the
/// 2^64 values still names its own seed.
pub(super) fn seed_bits(seed: i64) -> u64 {
    seed as u64
}

/// Checks `max_tokens`: at least 1, and within u32.
/// Refuses `n` other than 1: chat and completions answer one choice.
pub(super) fn one_choice(n: Option<i64>) -> Result<(), Error> {
    if n.is_some_and(|n| n != 1) {
        return Err(Error::invalid("only `n` = 1 is supported", Some("n")));
    }
    Ok(())
}

pub(super) fn max_tokens(value: Option<i64>) -> Result<Option<u32>, Error> {
    match value {
        None => Ok(None),
        Some(n) if n < 1 => Err(Error::invalid(
            format!("`max_tokens` must be at least 1, got {n}"),
            Some("max_tokens"),
        )),
        // No model's window is that large; said as such rather than as a
        // number the parser could not hold.
        Some(n) => u32::try_from(n).map(Some).map_err(|_| {
            Error::invalid(
                format!("`max_tokens` must be at most {}, got {n}", u32::MAX),
                Some("max_tokens"),
            )
        }),
    }
}

#[derive(Debug, Serialize)]
pub(super) struct ChatCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: i64,
    pub model: &'a str,
    pub choices: [Choice<'a>; 1],
    pub usage: UsageBody,
    /// The upstream's own top-level fields (`system_fingerprint`, ...).
    #[serde(flatten)]
    pub fields: &'a Map<String, Value>,
}

impl<'a> ChatCompletion<'a> {
    /// A `chat.completion` of one choice.
    pub(super) fn new(
        id: &'a str,
        created: i64,
        model: &'a str,
        text: &'a str,
        finish: Finish,
        usage: Usage,
        extras: &'a Extras,
    ) -> Self {
        // OpenAI sends `content: null` when the model only called tools or
        // refused, and SDKs test it for null.
        let silent = text.is_empty() && (!extras.tool_calls.is_empty() || extras.refusal.is_some());
        Self {
            id,
            object: "chat.completion",
            created,
            model,
            choices: [Choice {
                index: 0,
                message: MessageOut {
                    role: "assistant",
                    content: (!silent).then_some(text),
                    refusal: extras.refusal.as_deref(),
                    tool_calls: &extras.tool_calls,
                },
                finish_reason: finish.as_str(),
                logprobs: extras.logprobs.as_ref(),
            }],
            usage: UsageBody::with_details(usage, &extras.meta),
            fields: &extras.meta.fields,
        }
    }
}

#[derive(Debug, Serialize)]
pub(super) struct Choice<'a> {
    pub index: u32,
    pub message: MessageOut<'a>,
    pub finish_reason: &'static str,
    /// Always present, `null` when not asked for: OpenAI's description
    /// requires the key, and typed clients generated from it reject an
    /// answer without it.
    pub logprobs: Option<&'a Value>,
}

#[derive(Debug, Serialize)]
pub(super) struct MessageOut<'a> {
    pub role: &'static str,
    pub content: Option<&'a str>,
    /// Required by the description like `logprobs`; `null` unless a model
    /// refused.
    pub refusal: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub tool_calls: &'a [ToolCall],
}

#[derive(Debug, Serialize)]
pub(super) struct ChatCompletionChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: i64,
    pub model: &'a str,
    pub choices: Vec<ChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageBody>,
    /// The upstream's own top-level fields, once known (they arrive with
    /// the end of the answer).
    #[serde(flatten)]
    pub fields: &'a Map<String, Value>,
}

#[derive(Debug, Serialize)]
pub(super) struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub finish_reason: Option<&'static str>,
    /// `null` unless asked for, as OpenAI sends it in every chunk.
    pub logprobs: Option<&'a Value>,
}

#[derive(Debug, Default, Serialize)]
pub(super) struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub tool_calls: &'a [ToolCallDelta],
}

impl<'a> Delta<'a> {
    /// The wire delta of one piece of an answer.
    pub(super) fn of(d: &'a crate::inference::Delta) -> Self {
        Self {
            role: None,
            content: (!d.content.is_empty() || (d.tool_calls.is_empty() && d.refusal.is_none()))
                .then_some(d.content.as_str()),
            refusal: d.refusal.as_deref(),
            tool_calls: &d.tool_calls,
        }
    }
}

#[derive(Debug, Serialize)]
pub(super) struct UsageBody {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// `prompt_tokens_details`, `completion_tokens_details`, as the
    /// upstream reported them.
    #[serde(flatten)]
    pub details: Map<String, Value>,
}

impl From<Usage> for UsageBody {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            details: Map::new(),
        }
    }
}

impl UsageBody {
    pub(super) fn with_details(u: Usage, meta: &Meta) -> Self {
        Self {
            details: meta.usage.clone(),
            ..u.into()
        }
    }
}

#[derive(Debug, Serialize)]
pub(super) struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelEntry>,
}

#[derive(Debug, Serialize)]
pub(super) struct ModelEntry {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub owned_by: &'static str,
}
