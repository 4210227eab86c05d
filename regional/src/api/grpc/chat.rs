//! `GenerateRequest` into the inference request and answers back into
//! protos: the typed fields (tools, tool choice, response format, tool
//! calls on messages) become the OpenAI fields an upstream reads, and
//! `extra_json` carries the rest as sent, so a gRPC client reaches every
//! field an HTTP client does.

use std::sync::Arc;

use meridian_proto::v1::response_format::Type as FormatType;
use meridian_proto::v1::{ChatMessage, GenerateRequest, ResponseFormat, Tool, ToolCallDelta};
use serde_json::{Map, Value, json};

use crate::error::Error;
use crate::inference::{ChatRequest, Message, ToolCall};

/// Fields `GenerateRequest` types or Meridian sets: `extra_json` may not
/// carry them, so one field never has two values.
const TYPED: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "user",
    "tools",
    "tool_choice",
    "response_format",
    "stream",
    "stream_options",
    "n",
    "conversation_id",
];

pub(crate) fn chat_request(req: GenerateRequest) -> Result<ChatRequest, Error> {
    if req.model.is_empty() {
        return Err(Error::invalid("`model` must not be empty", Some("model")));
    }
    if req.messages.is_empty() {
        return Err(Error::invalid(
            "`messages` must contain at least one message",
            Some("messages"),
        ));
    }
    if req.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(Error::invalid(
            "`temperature` must be between 0 and 2",
            Some("temperature"),
        ));
    }
    if req.max_tokens == Some(0) {
        return Err(Error::invalid(
            "`max_tokens` must be at least 1",
            Some("max_tokens"),
        ));
    }
    let mut extra = extra_json(&req.extra_json)?;
    // The typed fields that have an OpenAI name go to the upstream under it.
    if let Some(top_p) = req.top_p {
        extra.insert("top_p".into(), crate::inference::json_f32(top_p));
    }
    if !req.user.is_empty() {
        extra.insert("user".into(), req.user.into());
    }
    if !req.tools.is_empty() {
        extra.insert("tools".into(), tools(&req.tools)?);
    }
    if !req.tool_choice.is_empty() {
        extra.insert(
            "tool_choice".into(),
            tool_choice(&req.tool_choice, &req.tools)?,
        );
    }
    if let Some(format) = response_format(req.response_format.as_ref())? {
        extra.insert("response_format".into(), format);
    }
    Ok(ChatRequest {
        model: req.model,
        messages: req
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| message(i, m))
            .collect::<Result<_, _>>()?,
        max_tokens: req.max_tokens,
        max_completion_tokens: false,
        seed: req.seed,
        stop: req.stop,
        temperature: req.temperature,
        extra: Arc::new(extra),
    })
}

fn extra_json(text: &str) -> Result<Map<String, Value>, Error> {
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    let invalid = |m: String| Error::invalid(m, Some("extra_json"));
    let Value::Object(map) = serde_json::from_str(text)
        .map_err(|e| invalid(format!("`extra_json` is not JSON: {e}")))?
    else {
        return Err(invalid("`extra_json` must be a JSON object".into()));
    };
    if let Some(typed) = map.keys().find(|k| TYPED.contains(&k.as_str())) {
        return Err(invalid(format!(
            "`extra_json` may not carry `{typed}`: set it in its own field of the request"
        )));
    }
    Ok(map)
}

/// JSON text of a typed field, named in the error.
fn json_text(text: &str, field: &str) -> Result<Value, Error> {
    serde_json::from_str(text)
        .map_err(|e| Error::invalid(format!("`{field}` is not JSON: {e}"), Some("tools")))
}

fn tools(tools: &[Tool]) -> Result<Value, Error> {
    let all = tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if t.name.is_empty() {
                return Err(Error::invalid(
                    format!("`tools[{i}].name` must not be empty"),
                    Some("tools"),
                ));
            }
            let mut function = json!({ "name": t.name });
            if !t.description.is_empty() {
                function["description"] = t.description.clone().into();
            }
            if !t.parameters_json.trim().is_empty() {
                function["parameters"] =
                    json_text(&t.parameters_json, &format!("tools[{i}].parameters_json"))?;
            }
            if t.strict {
                function["strict"] = true.into();
            }
            Ok(json!({ "type": "function", "function": function }))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Value::Array(all))
}

fn tool_choice(choice: &str, tools: &[Tool]) -> Result<Value, Error> {
    match choice {
        "auto" | "none" | "required" => Ok(choice.into()),
        name if tools.iter().any(|t| t.name == name) => {
            Ok(json!({ "type": "function", "function": { "name": name } }))
        }
        other => Err(Error::invalid(
            format!(
                "`tool_choice` must be \"auto\", \"none\", \"required\" or the name of one of \
                 `tools`, got {other:?}"
            ),
            Some("tool_choice"),
        )),
    }
}

fn response_format(format: Option<&ResponseFormat>) -> Result<Option<Value>, Error> {
    let Some(f) = format else {
        return Ok(None);
    };
    let invalid = |m: &str| Error::invalid(m, Some("response_format"));
    Ok(match f.r#type() {
        FormatType::Unspecified => None,
        FormatType::Text => Some(json!({ "type": "text" })),
        FormatType::JsonObject => Some(json!({ "type": "json_object" })),
        FormatType::JsonSchema => {
            if f.name.is_empty() || f.schema_json.trim().is_empty() {
                return Err(invalid(
                    "`response_format` of TYPE_JSON_SCHEMA needs `name` and `schema_json`",
                ));
            }
            let schema = serde_json::from_str::<Value>(&f.schema_json)
                .map_err(|e| invalid(&format!("`response_format.schema_json` is not JSON: {e}")))?;
            Some(json!({ "type": "json_schema",
                "json_schema": { "name": f.name, "schema": schema, "strict": f.strict } }))
        }
    })
}

/// A gRPC message as the OpenAI message it stands for; the whole object is
/// kept when it has more than a role and a text.
fn message(i: usize, m: ChatMessage) -> Result<Message, Error> {
    if m.name.is_empty() && m.tool_calls.is_empty() && m.tool_call_id.is_empty() {
        return Ok(Message::text(m.role, m.content));
    }
    let mut raw = Map::new();
    raw.insert("role".into(), m.role.clone().into());
    // An assistant turn that only called tools has no text, as OpenAI sends it.
    let content = if m.content.is_empty() && !m.tool_calls.is_empty() {
        Value::Null
    } else {
        m.content.clone().into()
    };
    raw.insert("content".into(), content);
    if !m.name.is_empty() {
        raw.insert("name".into(), m.name.into());
    }
    if !m.tool_call_id.is_empty() {
        raw.insert("tool_call_id".into(), m.tool_call_id.into());
    }
    if !m.tool_calls.is_empty() {
        let calls = m
            .tool_calls
            .into_iter()
            .enumerate()
            .map(|(j, c)| {
                if c.id.is_empty() || c.name.is_empty() {
                    return Err(Error::invalid(
                        format!("`messages[{i}].tool_calls[{j}]` needs an `id` and a `name`"),
                        Some("messages"),
                    ));
                }
                Ok(json!({ "id": c.id, "type": "function",
                    "function": { "name": c.name, "arguments": c.arguments_json } }))
            })
            .collect::<Result<Vec<_>, _>>()?;
        raw.insert("tool_calls".into(), calls.into());
    }
    Ok(Message {
        raw: Some(Arc::new(raw)),
        ..Message::text(m.role, m.content)
    })
}

/// The proto of a stored or answered message: its text, and what its OpenAI
/// object says beyond (name, tool calls, the call it answers).
pub(crate) fn pb_message(
    role: &str,
    content: &str,
    raw: Option<&Map<String, Value>>,
    calls: &[ToolCall],
) -> ChatMessage {
    let field = |k: &str| {
        raw.and_then(|r| r.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let mut tool_calls: Vec<_> = calls.iter().map(pb_call).collect();
    if let Some(listed) = raw
        .and_then(|r| r.get("tool_calls"))
        .and_then(|c| serde_json::from_value::<Vec<ToolCall>>(c.clone()).ok())
    {
        tool_calls.extend(listed.iter().map(pb_call));
    }
    ChatMessage {
        role: role.to_string(),
        content: content.to_string(),
        name: field("name"),
        tool_calls,
        tool_call_id: field("tool_call_id"),
    }
}

fn pb_call(c: &ToolCall) -> meridian_proto::v1::ToolCall {
    meridian_proto::v1::ToolCall {
        id: c.id.clone(),
        name: c.function.name.clone(),
        arguments_json: c.function.arguments.clone(),
    }
}

/// The tool-call fragments of a stream piece.
pub(crate) fn pb_deltas(fragments: &[crate::inference::ToolCallDelta]) -> Vec<ToolCallDelta> {
    fragments
        .iter()
        .map(|f| {
            let function = f.function.as_ref();
            ToolCallDelta {
                index: f.index,
                id: f.id.clone().unwrap_or_default(),
                name: function.and_then(|x| x.name.clone()).unwrap_or_default(),
                arguments_delta: function
                    .and_then(|x| x.arguments.clone())
                    .unwrap_or_default(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_proto::v1::ToolCall as PbCall;

    fn request() -> GenerateRequest {
        GenerateRequest {
            model: "m".into(),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "weather?".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn typed_fields_become_the_openai_fields() {
        let mut req = request();
        req.tools = vec![Tool {
            name: "get_weather".into(),
            description: "the weather".into(),
            parameters_json: r#"{"type":"object","properties":{"city":{"type":"string"}}}"#.into(),
            strict: true,
        }];
        req.tool_choice = "get_weather".into();
        req.response_format = Some(ResponseFormat {
            r#type: FormatType::JsonSchema.into(),
            name: "w".into(),
            schema_json: r#"{"type":"object"}"#.into(),
            strict: true,
        });
        req.extra_json = r#"{"parallel_tool_calls": false, "x_new": [1]}"#.into();
        req.messages.push(ChatMessage {
            role: "assistant".into(),
            tool_calls: vec![PbCall {
                id: "call_1".into(),
                name: "get_weather".into(),
                arguments_json: r#"{"city":"Oslo"}"#.into(),
            }],
            ..Default::default()
        });
        req.messages.push(ChatMessage {
            role: "tool".into(),
            content: "sunny".into(),
            tool_call_id: "call_1".into(),
            ..Default::default()
        });
        let chat = chat_request(req).unwrap();
        let extra = Value::Object((*chat.extra).clone());
        assert_eq!(
            extra,
            json!({
                "tools": [{"type": "function", "function": {"name": "get_weather",
                    "description": "the weather", "strict": true,
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                "response_format": {"type": "json_schema",
                    "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": true}},
                "parallel_tool_calls": false,
                "x_new": [1],
            })
        );
        let assistant = chat.messages[1].raw.as_deref().unwrap();
        assert_eq!(assistant["content"], Value::Null);
        assert_eq!(
            assistant["tool_calls"][0]["function"]["arguments"],
            r#"{"city":"Oslo"}"#
        );
        assert_eq!(
            chat.messages[2].raw.as_deref().unwrap()["tool_call_id"],
            "call_1"
        );
        assert!(chat.messages[0].raw.is_none());
    }

    #[test]
    fn bad_typed_fields_are_named() {
        type Change = Box<dyn Fn(&mut GenerateRequest)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|r| r.extra_json = "[1]".into()),
                "`extra_json` must be a JSON object",
            ),
            (
                Box::new(|r| r.extra_json = r#"{"tools": []}"#.into()),
                "may not carry `tools`",
            ),
            (
                Box::new(|r| r.tool_choice = "nope".into()),
                "`tool_choice` must be",
            ),
            (
                Box::new(|r| {
                    r.tools = vec![Tool {
                        name: "t".into(),
                        parameters_json: "{".into(),
                        ..Default::default()
                    }]
                }),
                "`tools[0].parameters_json` is not JSON",
            ),
            (
                Box::new(|r| {
                    r.response_format = Some(ResponseFormat {
                        r#type: FormatType::JsonSchema.into(),
                        ..Default::default()
                    })
                }),
                "needs `name` and `schema_json`",
            ),
        ];
        for (change, expected) in cases {
            let mut req = request();
            change(&mut req);
            let e = chat_request(req).unwrap_err().to_string();
            assert!(e.contains(expected), "{e} (expected {expected})");
        }
    }
}
