//! An OpenAI chat request as a Messages API body.
//!
//! System and developer messages at the start become `system`; tool
//! results become `tool_result` blocks of a user turn, and turns of one
//! role in a row are joined, as the API wants roles to alternate; an
//! assistant's calls become `tool_use` blocks. A field or part the API has
//! no counterpart for is refused, naming it.

use serde_json::{Map, Value, json};

use super::PROTOCOL;
use crate::error::Error;
use crate::inference::{ChatRequest, Message, json_f32};

/// Top-level fields that may come with a value that asks for nothing
/// Anthropic would not do anyway: those values pass, any other is refused.
const NEUTRAL: &[(&str, Neutral)] = &[
    ("logprobs", |v| v == &Value::Bool(false)),
    ("store", |v| v == &Value::Bool(false)),
    ("frequency_penalty", |v| v.as_f64() == Some(0.0)),
    ("presence_penalty", |v| v.as_f64() == Some(0.0)),
    ("response_format", |v| v == &json!({"type": "text"})),
    ("modalities", |v| v == &json!(["text"])),
];

/// Whether a value of a field asks for nothing beyond the API's default.
type Neutral = fn(&Value) -> bool;

fn refuse(field: &str, why: &str) -> Error {
    Error::invalid(
        format!(
            "`{field}` cannot be translated for this model's upstreams, which speak {PROTOCOL}: {why}"
        ),
        None,
    )
}

pub(crate) fn request_body(
    req: &ChatRequest,
    upstream_model: &str,
    default_max_tokens: u32,
) -> Result<Value, Error> {
    let mut body = Map::new();
    body.insert("model".into(), upstream_model.into());
    let (system, messages) = messages(&req.messages)?;
    if !system.is_empty() {
        body.insert("system".into(), system.into());
    }
    body.insert("messages".into(), messages.into());
    body.insert(
        "max_tokens".into(),
        req.max_tokens.unwrap_or(default_max_tokens).into(),
    );
    body.insert("stream".into(), true.into());
    if req.seed.is_some() {
        return Err(refuse("seed", "it has no seed"));
    }
    if !req.stop.is_empty() {
        body.insert("stop_sequences".into(), req.stop.clone().into());
    }
    if let Some(t) = req.temperature {
        if t > 1.0 {
            return Err(refuse("temperature", "it takes 0 to 1"));
        }
        body.insert("temperature".into(), json_f32(t));
    }
    let mut tool_choice: Option<Map<String, Value>> = None;
    let mut parallel = true;
    for (field, value) in req.extra.iter() {
        if value.is_null() {
            continue;
        }
        match field.as_str() {
            "tools" => {
                body.insert("tools".into(), tools(value)?.into());
            }
            "tool_choice" => tool_choice = Some(choice(value)?),
            "parallel_tool_calls" => {
                parallel = value
                    .as_bool()
                    .ok_or_else(|| refuse(field, "not a boolean"))?;
            }
            "top_p" => {
                body.insert("top_p".into(), value.clone());
            }
            "user" => {
                body.insert("metadata".into(), json!({ "user_id": value }));
            }
            name => match NEUTRAL.iter().find(|(n, _)| *n == name) {
                Some((_, neutral)) if neutral(value) => {}
                Some(_) => return Err(refuse(name, "it has no such setting")),
                None => return Err(refuse(name, "it has no such field")),
            },
        }
    }
    if !parallel {
        let choice = tool_choice.get_or_insert_with(|| {
            let mut auto = Map::new();
            auto.insert("type".into(), "auto".into());
            auto
        });
        if choice.get("type").and_then(Value::as_str) != Some("none") {
            choice.insert("disable_parallel_tool_use".into(), true.into());
        }
    }
    if let Some(choice) = tool_choice {
        body.insert("tool_choice".into(), choice.into());
    }
    Ok(Value::Object(body))
}

/// OpenAI's `tools` as Anthropic's: a function's name, description and
/// parameters schema.
fn tools(value: &Value) -> Result<Vec<Value>, Error> {
    let tools = value
        .as_array()
        .ok_or_else(|| refuse("tools", "not an array"))?;
    tools
        .iter()
        .map(|t| {
            if t["type"] != "function" {
                return Err(refuse(
                    "tools[].type",
                    "only function tools have a counterpart",
                ));
            }
            let f = &t["function"];
            if f["strict"] == true {
                return Err(refuse(
                    "tools[].function.strict",
                    "it does not guarantee arguments valid against the schema",
                ));
            }
            let mut tool = Map::new();
            tool.insert("name".into(), f["name"].clone());
            if let Some(d) = f.get("description").filter(|d| !d.is_null()) {
                tool.insert("description".into(), d.clone());
            }
            let schema = f
                .get("parameters")
                .filter(|p| !p.is_null())
                .cloned()
                .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
            tool.insert("input_schema".into(), schema);
            Ok(Value::Object(tool))
        })
        .collect()
}

fn choice(value: &Value) -> Result<Map<String, Value>, Error> {
    let mut choice = Map::new();
    match value {
        Value::String(s) => {
            let kind = match s.as_str() {
                "auto" => "auto",
                "none" => "none",
                "required" => "any",
                _ => return Err(refuse("tool_choice", "unknown choice")),
            };
            choice.insert("type".into(), kind.into());
        }
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .filter(|n| n.is_string())
                .ok_or_else(|| refuse("tool_choice.function.name", "missing"))?;
            choice.insert("type".into(), "tool".into());
            choice.insert("name".into(), name.clone());
        }
        _ => {
            return Err(refuse(
                "tool_choice",
                "only auto, none, required and a named function have a counterpart",
            ));
        }
    }
    Ok(choice)
}

/// The leading system and developer messages as `system` blocks, and the
/// conversation as alternating turns.
fn messages(messages: &[Message]) -> Result<(Vec<Value>, Vec<Value>), Error> {
    let mut system = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let at = |key: &str| format!("messages[{i}].{key}");
        if let Some(raw) = &m.raw {
            for (key, value) in raw.iter() {
                let known = matches!(
                    key.as_str(),
                    "role" | "content" | "tool_calls" | "tool_call_id"
                );
                if !known && !value.is_null() {
                    return Err(refuse(&at(key), "its messages have no such field"));
                }
            }
        }
        let (role, blocks) = match m.role.as_str() {
            "system" | "developer" => {
                if !turns.is_empty() {
                    return Err(refuse(
                        &at("role"),
                        "its system prompt comes before the conversation, not within it",
                    ));
                }
                for block in content(m, i)? {
                    if block["type"] != "text" {
                        return Err(refuse(&at("content"), "a system prompt is text only"));
                    }
                    system.push(block);
                }
                continue;
            }
            "user" => ("user", content(m, i)?),
            "assistant" => ("assistant", assistant(m, i)?),
            "tool" => {
                let id = m
                    .raw
                    .as_ref()
                    .and_then(|r| r.get("tool_call_id"))
                    .cloned()
                    .unwrap_or(Value::Null);
                if !id.is_string() {
                    return Err(refuse(&at("tool_call_id"), "a tool result names its call"));
                }
                let result = json!({ "type": "tool_result", "tool_use_id": id,
                    "content": m.content });
                ("user", vec![result])
            }
            _ => return Err(refuse(&at("role"), "it has no such role")),
        };
        match turns.last_mut() {
            Some((last, joined)) if *last == role => joined.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    let turns = turns
        .into_iter()
        .map(|(role, content)| json!({ "role": role, "content": content }))
        .collect();
    Ok((system, turns))
}

/// A user or system message's content as blocks: text, and images given as
/// a data URL (base64) or an http(s) URL.
fn content(m: &Message, i: usize) -> Result<Vec<Value>, Error> {
    let Some(Value::Array(parts)) = m.raw.as_ref().and_then(|r| r.get("content")) else {
        return Ok(text_block(&m.content));
    };
    parts
        .iter()
        .enumerate()
        .map(|(j, part)| {
            let at = format!("messages[{i}].content[{j}]");
            match part["type"].as_str() {
                Some("text") => Ok(json!({ "type": "text", "text": part["text"] })),
                Some("image_url") => image(&part["image_url"]["url"], &at),
                Some(other) => Err(refuse(
                    &format!("{at}.type"),
                    &format!("it takes no {other} part"),
                )),
                None => Err(refuse(&format!("{at}.type"), "a part needs a type")),
            }
        })
        .collect()
}

/// A text as blocks: none when empty, as the API refuses empty text blocks.
fn text_block(text: &str) -> Vec<Value> {
    if text.is_empty() {
        return Vec::new();
    }
    vec![json!({ "type": "text", "text": text })]
}

fn image(url: &Value, at: &str) -> Result<Value, Error> {
    let url = url
        .as_str()
        .ok_or_else(|| refuse(&format!("{at}.image_url.url"), "an image needs a URL"))?;
    if let Some(data) = url.strip_prefix("data:") {
        let Some((media_type, data)) = data.split_once(";base64,") else {
            return Err(refuse(
                &format!("{at}.image_url.url"),
                "it takes data URLs in base64 only",
            ));
        };
        return Ok(json!({ "type": "image", "source":
            { "type": "base64", "media_type": media_type, "data": data } }));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({ "type": "image", "source": { "type": "url", "url": url } }));
    }
    Err(refuse(
        &format!("{at}.image_url.url"),
        "it takes data: and http(s) URLs only",
    ))
}

/// An assistant turn: its text, then a `tool_use` block per call with the
/// arguments parsed.
fn assistant(m: &Message, i: usize) -> Result<Vec<Value>, Error> {
    let mut blocks = text_block(&m.content);
    let calls = m.raw.as_ref().and_then(|r| r.get("tool_calls"));
    for (j, call) in calls
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = format!("messages[{i}].tool_calls[{j}]");
        let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
        let input: Value = serde_json::from_str(arguments).map_err(|_| {
            refuse(
                &format!("{at}.function.arguments"),
                "its tool inputs are JSON objects",
            )
        })?;
        if !input.is_object() {
            return Err(refuse(
                &format!("{at}.function.arguments"),
                "its tool inputs are JSON objects",
            ));
        }
        blocks.push(json!({ "type": "tool_use", "id": call["id"],
            "name": call["function"]["name"], "input": input }));
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn message(v: Value) -> Message {
        let raw = v.as_object().unwrap().clone();
        let content = match &raw["content"] {
            Value::String(s) => s.clone(),
            _ => String::new(),
        };
        Message {
            role: raw["role"].as_str().unwrap().into(),
            content,
            raw: Some(Arc::new(raw)),
        }
    }

    fn request(messages: Vec<Value>, extra: Value) -> ChatRequest {
        let mut req = ChatRequest::asking("m", "");
        req.messages = messages.into_iter().map(message).collect();
        req.extra = Arc::new(extra.as_object().unwrap().clone());
        req
    }

    #[test]
    fn an_agent_turn_becomes_a_messages_body() {
        let mut req = request(
            vec![
                json!({"role": "developer", "content": "Use tools."}),
                json!({"role": "user", "content": [
                    {"type": "text", "text": "Weather here and there?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]}),
                json!({"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{\"city\":\"Lyon\"}"}},
                    {"id": "c2", "type": "function", "function": {"name": "w", "arguments": "{\"city\":\"Oslo\"}"}}]}),
                json!({"role": "tool", "tool_call_id": "c1", "content": "21"}),
                json!({"role": "tool", "tool_call_id": "c2", "content": "3"}),
            ],
            json!({"tools": [{"type": "function", "function": {"name": "w", "description": "weather",
                     "parameters": {"type": "object"}}}],
                   "tool_choice": "required", "parallel_tool_calls": false, "top_p": 0.5,
                   "user": "u-1", "logprobs": false}),
        );
        req.stop = vec!["END".into()];
        req.temperature = Some(0.7);
        let body = request_body(&req, "claude-x", 99).unwrap();
        assert_eq!(
            body,
            json!({
                "model": "claude-x", "max_tokens": 99, "stream": true,
                "system": [{"type": "text", "text": "Use tools."}],
                "messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "Weather here and there?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}}]},
                    {"role": "assistant", "content": [
                        {"type": "tool_use", "id": "c1", "name": "w", "input": {"city": "Lyon"}},
                        {"type": "tool_use", "id": "c2", "name": "w", "input": {"city": "Oslo"}}]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "c1", "content": "21"},
                        {"type": "tool_result", "tool_use_id": "c2", "content": "3"}]},
                ],
                "tools": [{"name": "w", "description": "weather", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
                "stop_sequences": ["END"], "temperature": 0.7, "top_p": 0.5,
                "metadata": {"user_id": "u-1"},
            })
        );
    }

    #[test]
    fn what_has_no_counterpart_is_refused_by_name() {
        let user = || json!({"role": "user", "content": "hi"});
        let refused = |req: ChatRequest, field: &str| {
            let e = request_body(&req, "m", 1).unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}`")), "{e}");
            assert!(e.contains("Anthropic Messages API"), "{e}");
        };
        for (field, value) in [
            ("logprobs", json!(true)),
            ("response_format", json!({"type": "json_object"})),
            ("logit_bias", json!({"1": 2})),
            ("audio", json!({"voice": "x"})),
            ("x_future_field", json!(1)),
        ] {
            refused(request(vec![user()], json!({ field: value })), field);
        }
        let mut seeded = request(vec![user()], json!({}));
        seeded.seed = Some(1);
        refused(seeded, "seed");
        refused(
            request(
                vec![
                    json!({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}),
                ],
                json!({}),
            ),
            "messages[0].content[0].type",
        );
        refused(
            request(
                vec![json!({"role": "user", "name": "ana", "content": "hi"})],
                json!({}),
            ),
            "messages[0].name",
        );
        // Neutral values pass.
        let req = request(
            vec![user()],
            json!({"response_format": {"type": "text"}, "store": false}),
        );
        assert!(request_body(&req, "m", 1).is_ok());
    }
}
