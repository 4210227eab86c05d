//! A Responses API request read and turned into what the answer pipeline
//! serves: its input items (and a chain's stored ones) become chat messages,
//! its function tools, `tool_choice`, `text.format` and `reasoning` the chat
//! protocol's fields. Every backend then serves it as it serves chat (the
//! simulator, OpenAI-protocol and Anthropic upstreams), and a field or item
//! that chat cannot carry is refused with a 400 naming it, never dropped
//! without a word.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::api::openai::{integer, max_tokens};
use crate::error::Error;
use crate::inference::{ChatRequest, Message, json_f32};
use crate::responses::items::append_messages;

/// `POST /v1/responses` as sent. Fields Meridian reads are typed; the
/// rest are checked against the lists below.
#[derive(Debug, Deserialize)]
pub(super) struct CreateBody {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    input: Option<Input>,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub background: Option<bool>,
    #[serde(default)]
    conversation: Option<Value>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub text: Option<Value>,
    #[serde(default)]
    pub reasoning: Option<Value>,
    #[serde(default, deserialize_with = "integer")]
    pub max_output_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default, deserialize_with = "integer")]
    pub top_logprobs: Option<i64>,
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default)]
    pub truncation: Option<String>,
    #[serde(default)]
    include: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Items(Vec<Value>),
}

/// Fields that mean the same in chat and are passed to the model as sent.
const PASSED: &[&str] = &[
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
];
/// Fields about what Meridian's models never produce (built-in tools'
/// calls, stream obfuscation, hosted prompt caching): nothing to do, so
/// taken and ignored, as OpenAI ignores them where they do not apply.
const IGNORED: &[&str] = &["max_tool_calls", "prompt_cache_retention", "stream_options"];
/// Fields of OpenAI's that Meridian does not serve: refused by name.
const REFUSED: &[(&str, &str)] = &[
    (
        "prompt",
        "stored prompt templates are OpenAI's; send `instructions` and `input` instead",
    ),
    (
        "moderation",
        "moderated responses are not served; call /v1/moderations",
    ),
    (
        "context_management",
        "server-side compaction is not served; use `truncation`",
    ),
];
/// `include` values Meridian can honour (the others name output of
/// built-in tools or of reasoning, which its models do not produce).
const INCLUDE_LOGPROBS: &str = "message.output_text.logprobs";

/// The request, checked: what goes to the model and what is stored.
pub(super) struct Checked {
    pub body: CreateBody,
    /// The conversation the response reads and appends to.
    pub conversation: Option<String>,
    /// This request's input items, each with an id, as stored and listed.
    pub input_items: Vec<Value>,
    /// Fields for the chat request beyond messages.
    pub chat_extra: Map<String, Value>,
    pub max_tokens: Option<u32>,
    pub logprobs: bool,
}

impl CreateBody {
    pub(super) fn parse(bytes: &[u8]) -> Result<Self, Error> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::invalid(format!("invalid request body: {e}"), None))
    }

    /// Checks every field and translates what chat needs.
    pub(super) fn check(mut self) -> Result<Checked, Error> {
        if self.model.as_deref().is_none_or(str::is_empty) {
            return Err(Error::invalid("`model` is required", Some("model")));
        }
        if self.background == Some(true) {
            if self.store == Some(false) {
                return Err(Error::invalid(
                    "a `background` response is stored: it cannot have `store: false`",
                    Some("background"),
                ));
            }
            if self.stream == Some(true) {
                return Err(Error::invalid(
                    "a `background` response cannot be streamed yet: create it without `stream` \
                     and poll GET /v1/responses/{id}",
                    Some("stream"),
                ));
            }
            if self.conversation.as_ref().is_some_and(|c| !c.is_null()) {
                return Err(Error::invalid(
                    "a `background` response cannot append to a `conversation` yet: chain it \
                     with `previous_response_id`",
                    Some("conversation"),
                ));
            }
        }
        let conversation = match self.conversation.take() {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) => Some(id),
            Some(Value::Object(o)) => match o.get("id") {
                Some(Value::String(id)) => Some(id.clone()),
                _ => {
                    return Err(Error::invalid(
                        "`conversation.id` must name the conversation",
                        Some("conversation"),
                    ));
                }
            },
            Some(_) => {
                return Err(Error::invalid(
                    "`conversation` must be an id or an object with an `id`",
                    Some("conversation"),
                ));
            }
        };
        if conversation.is_some() && self.previous_response_id.is_some() {
            return Err(Error::invalid(
                "`conversation` and `previous_response_id` cannot be used together",
                Some("conversation"),
            ));
        }
        if self.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            return Err(Error::invalid(
                "`temperature` must be between 0 and 2",
                Some("temperature"),
            ));
        }
        if self.top_p.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
            return Err(Error::invalid(
                "`top_p` must be between 0 and 1",
                Some("top_p"),
            ));
        }
        if let Some(t) = &self.truncation
            && t != "auto"
            && t != "disabled"
        {
            return Err(Error::invalid(
                format!("`truncation` must be `auto` or `disabled`, got {t:?}"),
                Some("truncation"),
            ));
        }
        if let Some(m) = &self.metadata {
            check_metadata(m)?;
        }
        let max_tokens = max_tokens(self.max_output_tokens).map_err(|_| {
            Error::invalid(
                format!("`max_output_tokens` must be between 1 and {}", u32::MAX),
                Some("max_output_tokens"),
            )
        })?;
        let mut chat_extra = Map::new();
        for (key, value) in std::mem::take(&mut self.extra) {
            if let Some((_, why)) = REFUSED.iter().find(|(k, _)| *k == key) {
                if value.is_null() {
                    continue;
                }
                return Err(Error::invalid(format!("`{key}`: {why}"), None));
            }
            if PASSED.contains(&key.as_str()) {
                if !value.is_null() {
                    chat_extra.insert(key, value);
                }
            } else if !IGNORED.contains(&key.as_str()) {
                return Err(Error::invalid(format!("unknown parameter `{key}`"), None));
            }
        }
        if let Some(p) = self.top_p {
            chat_extra.insert("top_p".into(), json_f32(p));
        }
        if let Some(p) = self.parallel_tool_calls {
            chat_extra.insert("parallel_tool_calls".into(), json!(p));
        }
        if let Some(tools) = &self.tools
            && !tools.is_empty()
        {
            chat_extra.insert("tools".into(), Value::Array(chat_tools(tools)?));
        }
        if let Some(choice) = self.tool_choice.as_ref().filter(|c| !c.is_null()) {
            chat_extra.insert("tool_choice".into(), chat_tool_choice(choice)?);
        }
        if let Some(text) = self.text.as_ref().filter(|t| !t.is_null()) {
            text_config(text, &mut chat_extra)?;
        }
        if let Some(effort) = self
            .reasoning
            .as_ref()
            .and_then(|r| r.get("effort"))
            .filter(|e| !e.is_null())
        {
            chat_extra.insert("reasoning_effort".into(), effort.clone());
        }
        let logprobs = self.include.iter().flatten().any(|i| i == INCLUDE_LOGPROBS)
            || self.top_logprobs.is_some_and(|n| n > 0);
        if let Some(n) = self.top_logprobs {
            if !(0..=20).contains(&n) {
                return Err(Error::invalid(
                    "`top_logprobs` must be between 0 and 20",
                    Some("top_logprobs"),
                ));
            }
            chat_extra.insert("top_logprobs".into(), json!(n));
        }
        if logprobs {
            chat_extra.insert("logprobs".into(), json!(true));
        }
        let input_items = match self.input.take() {
            None => Vec::new(),
            Some(Input::Text(text)) => vec![json!({
                "id": item_id("msg"),
                "type": "message",
                "role": "user",
                "status": "completed",
                "content": [{"type": "input_text", "text": text}],
            })],
            Some(Input::Items(items)) => check_items(items, "input")?,
        };
        if input_items.is_empty() && self.previous_response_id.is_none() && conversation.is_none() {
            return Err(Error::invalid(
                "`input` must hold at least one item",
                Some("input"),
            ));
        }
        Ok(Checked {
            body: self,
            conversation,
            input_items,
            chat_extra,
            max_tokens,
            logprobs,
        })
    }
}

impl Checked {
    /// The chat request: `instructions`, then the chain's items (oldest
    /// first), then this request's input.
    pub(super) fn chat_request(&self, chain: &[Value]) -> Result<ChatRequest, Error> {
        let mut messages = Vec::new();
        if let Some(instructions) = self.body.instructions.as_deref().filter(|i| !i.is_empty()) {
            messages.push(Message::text("system", instructions));
        }
        append_messages(&mut messages, chain.iter().chain(&self.input_items));
        Ok(ChatRequest {
            model: self.body.model.clone().unwrap_or_default(),
            messages,
            max_tokens: self.max_tokens,
            max_completion_tokens: self.max_tokens.is_some(),
            seed: None,
            stop: vec![],
            temperature: self.body.temperature,
            extra: Arc::new(self.chat_extra.clone()),
        })
    }
}

/// An id for an item Meridian makes: `msg_…`, `fc_…`.
pub(super) fn item_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// Items of `field` checked and given the shape they are stored in.
pub(in crate::api) fn check_items(
    items: Vec<Value>,
    field: &'static str,
) -> Result<Vec<Value>, Error> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| input_item(field, i, item))
        .collect()
}

/// OpenAI's metadata rule: up to 16 pairs, keys up to 64 characters,
/// string values up to 512.
pub(in crate::api) fn check_metadata(m: &Map<String, Value>) -> Result<(), Error> {
    let bad = |what: String| Error::invalid(what, Some("metadata"));
    if m.len() > 16 {
        return Err(bad(format!(
            "`metadata` holds at most 16 pairs, got {}",
            m.len()
        )));
    }
    for (k, v) in m {
        if k.chars().count() > 64 {
            return Err(bad(format!("`metadata` key {k:?} is over 64 characters")));
        }
        match v {
            Value::String(s) if s.chars().count() <= 512 => {}
            Value::String(_) => {
                return Err(bad(format!("`metadata.{k}` is over 512 characters")));
            }
            _ => return Err(bad(format!("`metadata.{k}` must be a string"))),
        }
    }
    Ok(())
}

/// Responses function tools (`{type, name, parameters, strict}`) as chat
/// tools (`{type, function: {...}}`).
fn chat_tools(tools: &[Value]) -> Result<Vec<Value>, Error> {
    tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            let bad = |what: String| Error::invalid(what, Some("tools"));
            let kind = tool.get("type").and_then(Value::as_str);
            match kind {
                Some("function") => {}
                Some(other) => {
                    return Err(bad(format!(
                        "`tools[{i}].type` {other:?} is not served: Meridian runs function tools, \
                         which the caller executes"
                    )));
                }
                None => return Err(bad(format!("`tools[{i}].type` is required"))),
            }
            let Some(name) = tool.get("name").and_then(Value::as_str) else {
                return Err(bad(format!("`tools[{i}].name` must be a string")));
            };
            let mut function = Map::new();
            function.insert("name".into(), json!(name));
            for key in ["description", "parameters", "strict"] {
                if let Some(v) = tool.get(key).filter(|v| !v.is_null()) {
                    function.insert(key.into(), v.clone());
                }
            }
            Ok(json!({"type": "function", "function": function}))
        })
        .collect()
}

fn chat_tool_choice(choice: &Value) -> Result<Value, Error> {
    let bad = |what: String| Error::invalid(what, Some("tool_choice"));
    match choice {
        Value::String(s) if matches!(s.as_str(), "none" | "auto" | "required") => {
            Ok(choice.clone())
        }
        Value::String(s) => Err(bad(format!(
            "`tool_choice` must be none, auto, required or a function, got {s:?}"
        ))),
        Value::Object(o) => match o.get("type").and_then(Value::as_str) {
            Some("function") => match o.get("name").and_then(Value::as_str) {
                Some(name) => Ok(json!({"type": "function", "function": {"name": name}})),
                None => Err(bad("`tool_choice.name` must name the function".into())),
            },
            Some("allowed_tools") => {
                let mode = o.get("mode").cloned().unwrap_or(json!("auto"));
                let tools: Vec<Value> = o
                    .get("tools")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(
                        |t| match (t.get("type").and_then(Value::as_str), t.get("name")) {
                            (Some("function"), Some(name)) => {
                                Ok(json!({"type": "function", "function": {"name": name}}))
                            }
                            _ => Err(bad(
                                "`tool_choice.tools` may name function tools only".into()
                            )),
                        },
                    )
                    .collect::<Result<_, _>>()?;
                Ok(
                    json!({"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": tools}}),
                )
            }
            other => Err(bad(format!(
                "`tool_choice.type` {} is not served: Meridian runs function tools",
                other.map_or("(missing)".to_string(), |t| format!("{t:?}"))
            ))),
        },
        _ => Err(bad("`tool_choice` must be a string or an object".into())),
    }
}

/// `text.format` as chat's `response_format`; `text.verbosity` as chat's
/// `verbosity`.
fn text_config(text: &Value, extra: &mut Map<String, Value>) -> Result<(), Error> {
    let bad = |what: String| Error::invalid(what, Some("text"));
    let Value::Object(text) = text else {
        return Err(bad("`text` must be an object".into()));
    };
    if let Some(v) = text.get("verbosity").filter(|v| !v.is_null()) {
        extra.insert("verbosity".into(), v.clone());
    }
    let Some(format) = text.get("format").filter(|f| !f.is_null()) else {
        return Ok(());
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(()),
        Some("json_object") => {
            extra.insert("response_format".into(), json!({"type": "json_object"}));
            Ok(())
        }
        Some("json_schema") => {
            let Some(name) = format.get("name").and_then(Value::as_str) else {
                return Err(bad("`text.format.name` must be a string".into()));
            };
            let Some(schema) = format.get("schema").filter(|s| s.is_object()) else {
                return Err(bad(
                    "`text.format.schema` must be a JSON schema object".into()
                ));
            };
            let mut spec = Map::new();
            spec.insert("name".into(), json!(name));
            spec.insert("schema".into(), schema.clone());
            for key in ["description", "strict"] {
                if let Some(v) = format.get(key).filter(|v| !v.is_null()) {
                    spec.insert(key.into(), v.clone());
                }
            }
            extra.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": spec}),
            );
            Ok(())
        }
        other => Err(bad(format!(
            "`text.format.type` must be text, json_object or json_schema, got {}",
            other.map_or("nothing".to_string(), |t| format!("{t:?}"))
        ))),
    }
}

const MESSAGE_ROLES: &[&str] = &["user", "assistant", "system", "developer"];

/// `input[i]` checked and given the shape it is stored and listed in: an
/// id, a type, a status, and a message's string content as a part.
fn input_item(field: &'static str, i: usize, item: Value) -> Result<Value, Error> {
    let bad = |what: String| Error::invalid(what, Some(field));
    let Value::Object(mut item) = item else {
        return Err(bad(format!("`{field}[{i}]` must be an object")));
    };
    let kind = match item.get("type") {
        None | Some(Value::Null) if item.contains_key("role") => "message".to_string(),
        Some(Value::String(t)) => t.clone(),
        _ => {
            return Err(bad(format!(
                "`{field}[{i}].type` must name the item's type"
            )));
        }
    };
    match kind.as_str() {
        "message" => {
            let role = match item.get("role").and_then(Value::as_str) {
                Some(r) if MESSAGE_ROLES.contains(&r) => r.to_string(),
                other => {
                    return Err(bad(format!(
                        "`{field}[{i}].role` must be one of {}, got {}",
                        MESSAGE_ROLES.join(", "),
                        other.map_or("nothing".to_string(), |r| format!("{r:?}"))
                    )));
                }
            };
            let part = if role == "assistant" {
                "output_text"
            } else {
                "input_text"
            };
            let content = match item.remove("content") {
                Some(Value::String(text)) => {
                    vec![if part == "output_text" {
                        json!({"type": part, "text": text, "annotations": []})
                    } else {
                        json!({"type": part, "text": text})
                    }]
                }
                Some(Value::Array(parts)) => parts,
                _ => {
                    return Err(bad(format!(
                        "`{field}[{i}].content` must be a string or a list of content parts"
                    )));
                }
            };
            for (j, p) in content.iter().enumerate() {
                check_part(field, i, j, p)?;
            }
            item.insert("content".into(), Value::Array(content));
            item.insert("role".into(), json!(role));
            item.entry("id").or_insert_with(|| json!(item_id("msg")));
        }
        "function_call" => {
            for key in ["call_id", "name", "arguments"] {
                if !item.get(key).is_some_and(Value::is_string) {
                    return Err(bad(format!("`{field}[{i}].{key}` must be a string")));
                }
            }
            item.entry("id").or_insert_with(|| json!(item_id("fc")));
        }
        "function_call_output" => {
            if !item.get("call_id").is_some_and(Value::is_string) {
                return Err(bad(format!("`{field}[{i}].call_id` must be a string")));
            }
            match item.get("output") {
                Some(Value::String(_)) => {}
                Some(Value::Array(parts)) => {
                    for (j, p) in parts.iter().enumerate() {
                        check_part(field, i, j, p)?;
                    }
                }
                _ => {
                    return Err(bad(format!(
                        "`{field}[{i}].output` must be a string or a list of content parts"
                    )));
                }
            }
            item.entry("id").or_insert_with(|| json!(item_id("fco")));
        }
        // The model's own reasoning from an earlier turn: chat has no place
        // for it, and a chat model reasons afresh. Kept for the listing.
        "reasoning" => {
            item.entry("id").or_insert_with(|| json!(item_id("rs")));
        }
        "item_reference" => {
            return Err(bad(format!(
                "`{field}[{i}]`: item references are not served; send the item, or chain with \
                 `previous_response_id`"
            )));
        }
        other => {
            return Err(bad(format!(
                "`{field}[{i}].type` {other:?} is not served: Meridian takes messages, \
                 function calls and their outputs"
            )));
        }
    }
    item.insert("type".into(), json!(kind));
    item.entry("status").or_insert_with(|| json!("completed"));
    Ok(Value::Object(item))
}

fn check_part(field: &'static str, i: usize, j: usize, part: &Value) -> Result<(), Error> {
    let bad = |what: String| Error::invalid(what, Some(field));
    match part.get("type").and_then(Value::as_str) {
        Some("input_text" | "output_text") => {
            if !part.get("text").is_some_and(Value::is_string) {
                return Err(bad(format!(
                    "`{field}[{i}].content[{j}].text` must be a string"
                )));
            }
        }
        Some("refusal") => {
            if !part.get("refusal").is_some_and(Value::is_string) {
                return Err(bad(format!(
                    "`{field}[{i}].content[{j}].refusal` must be a string"
                )));
            }
        }
        Some("input_image" | "input_file" | "input_audio") => {
            if part.get("file_id").is_some_and(|f| !f.is_null()) {
                return Err(bad(format!(
                    "`{field}[{i}].content[{j}].file_id`: files are not served yet; send the \
                     content inline (`image_url` as a URL or data URL, `file_data`)"
                )));
            }
        }
        Some(other) => {
            return Err(bad(format!(
                "`{field}[{i}].content[{j}].type` {other:?} is not a content part Meridian takes"
            )));
        }
        None => {
            return Err(bad(format!(
                "`{field}[{i}].content[{j}].type` must name the part"
            )));
        }
    }
    Ok(())
}
