//! Responses items (messages, function calls and their outputs) as the
//! chat messages every backend takes: shared by the Responses API and by
//! conversations, whose stored items go to the model the same way.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::inference::Message;

/// Appends `items` (stored or checked, so well formed) as chat messages:
/// a message as a message; function calls joined to the assistant message
/// before them (a chat assistant message carries its calls); a call's
/// output as a `tool` message; reasoning left out.
pub(crate) fn append_messages<'a>(
    messages: &mut Vec<Message>,
    items: impl Iterator<Item = &'a Value>,
) {
    // Whether the last message is an assistant's that calls can join.
    let mut open_assistant = false;
    for item in items {
        match item.get("type").and_then(Value::as_str) {
            Some("message") => {
                let role = item["role"].as_str().unwrap_or("user");
                let message = chat_message(role, item.get("content"));
                open_assistant = role == "assistant";
                messages.push(message);
            }
            Some("function_call") => {
                let call = json!({
                    "id": item["call_id"],
                    "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]},
                });
                if !open_assistant {
                    messages.push(Message {
                        role: "assistant".into(),
                        content: String::new(),
                        raw: Some(Arc::new(
                            json!({"role": "assistant", "content": null})
                                .as_object()
                                .cloned()
                                .unwrap_or_default(),
                        )),
                    });
                    open_assistant = true;
                }
                let last = messages
                    .last_mut()
                    .expect("an assistant message was pushed");
                let mut raw = last.raw.as_deref().cloned().unwrap_or_else(|| {
                    let mut m = Map::new();
                    m.insert("role".into(), json!("assistant"));
                    m.insert("content".into(), json!(last.content));
                    m
                });
                if raw.get("content").is_some_and(|c| c.as_str() == Some("")) {
                    raw.insert("content".into(), Value::Null);
                }
                match raw.get_mut("tool_calls") {
                    Some(Value::Array(calls)) => calls.push(call),
                    _ => {
                        raw.insert("tool_calls".into(), json!([call]));
                    }
                }
                last.raw = Some(Arc::new(raw));
            }
            Some("function_call_output") => {
                let output = match &item["output"] {
                    Value::String(s) => s.clone(),
                    Value::Array(parts) => texts(parts).join("\n"),
                    _ => String::new(),
                };
                let mut raw = Map::new();
                raw.insert("role".into(), json!("tool"));
                raw.insert("tool_call_id".into(), item["call_id"].clone());
                raw.insert("content".into(), json!(output));
                messages.push(Message {
                    role: "tool".into(),
                    content: output,
                    raw: Some(Arc::new(raw)),
                });
                open_assistant = false;
            }
            _ => {}
        }
    }
}

pub(crate) fn texts(parts: &[Value]) -> Vec<&str> {
    parts
        .iter()
        .filter(|p| matches!(p["type"].as_str(), Some("input_text" | "output_text")))
        .filter_map(|p| p["text"].as_str())
        .collect()
}

/// A message item's content as a chat message: plain text when it is only
/// text, else chat's content parts (images, files, audio) with the text.
fn chat_message(role: &str, content: Option<&Value>) -> Message {
    let parts: &[Value] = content.and_then(Value::as_array).map_or(&[], Vec::as_slice);
    let text = texts(parts).join("\n");
    let refusal: Option<String> = parts
        .iter()
        .filter_map(|p| {
            (p["type"] == "refusal")
                .then(|| p["refusal"].as_str())
                .flatten()
        })
        .reduce(|a, _| a)
        .map(str::to_string);
    let media: Vec<Value> = parts.iter().filter_map(chat_part).collect();
    if media.is_empty() && refusal.is_none() {
        return Message::text(role, text);
    }
    let mut raw = Map::new();
    raw.insert("role".into(), json!(role));
    if media.is_empty() {
        raw.insert("content".into(), json!(text));
    } else {
        let mut chat_parts: Vec<Value> = texts(parts)
            .into_iter()
            .map(|t| json!({"type": "text", "text": t}))
            .collect();
        chat_parts.extend(media);
        raw.insert("content".into(), Value::Array(chat_parts));
    }
    if let Some(r) = refusal {
        raw.insert("refusal".into(), json!(r));
    }
    Message {
        role: role.into(),
        content: text,
        raw: Some(Arc::new(raw)),
    }
}

/// An image, file or audio part in chat's shape.
fn chat_part(part: &Value) -> Option<Value> {
    match part["type"].as_str()? {
        "input_image" => {
            let mut image = Map::new();
            image.insert("url".into(), part.get("image_url")?.clone());
            if let Some(d) = part.get("detail").filter(|d| !d.is_null()) {
                image.insert("detail".into(), d.clone());
            }
            Some(json!({"type": "image_url", "image_url": image}))
        }
        "input_file" => {
            let mut file = Map::new();
            for key in ["file_data", "filename"] {
                if let Some(v) = part.get(key).filter(|v| !v.is_null()) {
                    file.insert(key.into(), v.clone());
                }
            }
            Some(json!({"type": "file", "file": file}))
        }
        "input_audio" => {
            Some(json!({"type": "input_audio", "input_audio": part.get("input_audio")?}))
        }
        _ => None,
    }
}
