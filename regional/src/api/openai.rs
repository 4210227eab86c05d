//! OpenAI wire types for `/v1/chat/completions` and `/v1/models`. Requests
//! accept and ignore fields Meridian does not use, as OpenAI's SDKs send many.

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::inference::{ChatRequest, Finish, Message, Usage};

#[derive(Debug, Deserialize)]
pub(super) struct ChatCompletionBody {
    model: String,
    messages: Vec<MessageBody>,
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
    /// Only its presence matters: an alias routes requests with tools to
    /// its large model.
    #[serde(default)]
    tools: Option<serde_json::Value>,
    /// Meridian's own field (OpenAI's SDKs send it through `extra_body`):
    /// the conversation this request continues, as `x-meridian-conversation`.
    #[serde(default)]
    pub conversation_id: Option<String>,
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

#[derive(Debug, Deserialize)]
struct MessageBody {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
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

    /// Whether the request offers the model tools.
    pub(super) fn has_tools(&self) -> bool {
        self.tools
            .as_ref()
            .is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()))
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
        if self.n.is_some_and(|n| n != 1) {
            return Err(Error::invalid("only `n` = 1 is supported", Some("n")));
        }
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
            .map(|(i, m)| {
                if !ROLES.contains(&m.role.as_str()) {
                    return Err(Error::invalid(
                        format!(
                            "`messages[{i}].role` must be one of {}, got {:?}",
                            ROLES.join(", "),
                            m.role
                        ),
                        Some("messages"),
                    ));
                }
                let content = match m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t,
                    Some(Content::Parts(parts)) => parts
                        .into_iter()
                        .filter(|p| p.kind == "text")
                        .filter_map(|p| p.text)
                        .collect::<Vec<_>>()
                        .join("\n"),
                };
                Ok(Message {
                    role: m.role,
                    content,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ChatRequest {
            model: self.model,
            messages,
            max_tokens,
            seed: self.seed.map(seed_bits),
            stop: match self.stop {
                None => vec![],
                Some(Stop::One(s)) => vec![s],
                Some(Stop::Many(v)) => v,
            },
            temperature: self.temperature,
        })
    }
}

/// A client's seed as the backends take it: the same bits, so each of the
/// 2^64 values still names its own seed.
pub(super) fn seed_bits(seed: i64) -> u64 {
    seed as u64
}

/// Checks `max_tokens`: at least 1, and within u32.
pub(super) fn max_tokens(value: Option<i64>) -> Result<Option<u32>, Error> {
    match value {
        None => Ok(None),
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| *n >= 1)
            .map(Some)
            .ok_or_else(|| {
                Error::invalid(
                    format!("`max_tokens` must be at least 1, got {n}"),
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
}

#[derive(Debug, Serialize)]
pub(super) struct Choice<'a> {
    pub index: u32,
    pub message: MessageOut<'a>,
    pub finish_reason: &'static str,
    /// Always present, `null` when not asked for: OpenAI's description
    /// requires the key, and typed clients generated from it reject an
    /// answer without it.
    pub logprobs: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub(super) struct MessageOut<'a> {
    pub role: &'static str,
    pub content: &'a str,
    /// Required by the description like `logprobs`; `null` unless a model
    /// refused.
    pub refusal: Option<&'a str>,
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
}

#[derive(Debug, Serialize)]
pub(super) struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub finish_reason: Option<&'static str>,
    /// `null`, as OpenAI sends it in every chunk.
    pub logprobs: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub(super) struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub(super) struct UsageBody {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl From<Usage> for UsageBody {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

pub(super) fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
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
