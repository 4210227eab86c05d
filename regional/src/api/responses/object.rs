//! The Response object: the request's settings echoed as OpenAI echoes
//! them, and an answer's text, refusal and tool calls as output items.

use serde_json::{Map, Value, json};

use super::request::Checked;
use crate::cache::Answer;
use meridian_proto::ErrorClass;

use crate::error::Error;
use crate::inference::{Extras, Finish, Meta, Usage, json_f32};

/// What every state of one response shares: its id, its creation time, the
/// model that serves it, and the request's settings.
pub(super) struct Shell {
    pub id: String,
    pub created_at: i64,
    pub model: String,
    echo: Map<String, Value>,
}

impl Shell {
    pub(super) fn new(checked: &Checked, model: &str) -> Self {
        let b = &checked.body;
        let or = |v: Option<Value>, default: Value| v.filter(|v| !v.is_null()).unwrap_or(default);
        let mut echo = Map::new();
        echo.insert("background".into(), json!(false));
        echo.insert(
            "conversation".into(),
            checked
                .conversation
                .as_ref()
                .map_or(Value::Null, |id| json!({"id": id})),
        );
        echo.insert("instructions".into(), json!(b.instructions));
        echo.insert("max_output_tokens".into(), json!(b.max_output_tokens));
        echo.insert(
            "metadata".into(),
            json!(b.metadata.clone().unwrap_or_default()),
        );
        echo.insert(
            "parallel_tool_calls".into(),
            json!(b.parallel_tool_calls.unwrap_or(true)),
        );
        echo.insert("previous_response_id".into(), json!(b.previous_response_id));
        echo.insert(
            "reasoning".into(),
            or(
                b.reasoning.clone(),
                json!({"effort": null, "summary": null}),
            ),
        );
        echo.insert("store".into(), json!(b.store.unwrap_or(true)));
        echo.insert("temperature".into(), json_f32(b.temperature.unwrap_or(1.0)));
        echo.insert(
            "text".into(),
            or(b.text.clone(), json!({"format": {"type": "text"}})),
        );
        echo.insert(
            "tool_choice".into(),
            or(b.tool_choice.clone(), json!("auto")),
        );
        echo.insert("tools".into(), json!(b.tools.clone().unwrap_or_default()));
        echo.insert("top_logprobs".into(), json!(b.top_logprobs.unwrap_or(0)));
        echo.insert("top_p".into(), json_f32(b.top_p.unwrap_or(1.0)));
        echo.insert(
            "truncation".into(),
            json!(b.truncation.as_deref().unwrap_or("disabled")),
        );
        for key in [
            "user",
            "safety_identifier",
            "prompt_cache_key",
            "service_tier",
        ] {
            if let Some(v) = checked.chat_extra.get(key) {
                echo.insert(key.into(), v.clone());
            }
        }
        Self {
            id: format!("resp_{}", uuid::Uuid::now_v7().simple()),
            created_at: chrono::Utc::now().timestamp(),
            model: model.to_string(),
            echo,
        }
    }

    /// The Response object in `state`.
    pub(super) fn object(&self, state: State<'_>) -> Value {
        let mut o = Map::new();
        o.insert("id".into(), json!(self.id));
        o.insert("object".into(), json!("response"));
        o.insert("created_at".into(), json!(self.created_at));
        o.insert("model".into(), json!(self.model));
        for (k, v) in &self.echo {
            o.insert(k.clone(), v.clone());
        }
        let mut o = Value::Object(o);
        state.apply(&mut o);
        o
    }

    /// Marks the object as run in the background.
    pub(super) fn background(&mut self) {
        self.echo.insert("background".into(), json!(true));
    }
}

/// A response's state at one moment.
pub(super) struct State<'a> {
    pub status: &'static str,
    pub output: &'a [Value],
    pub usage: Option<Value>,
    pub incomplete: Option<&'static str>,
    pub error: Option<Value>,
}

impl<'a> State<'a> {
    /// Nothing produced yet: `queued` or `in_progress`, or `cancelled`.
    pub(super) fn pending(status: &'static str) -> Self {
        Self {
            status,
            output: &[],
            usage: None,
            incomplete: None,
            error: None,
        }
    }

    pub(super) fn in_progress() -> Self {
        Self::pending("in_progress")
    }

    /// Writes this state's fields into a Response object.
    pub(super) fn apply(self, object: &mut Value) {
        object["status"] = json!(self.status);
        object["completed_at"] = if self.status == "completed" {
            json!(chrono::Utc::now().timestamp())
        } else {
            Value::Null
        };
        object["error"] = self.error.unwrap_or(Value::Null);
        object["incomplete_details"] = self
            .incomplete
            .map_or(Value::Null, |reason| json!({"reason": reason}));
        object["output"] = Value::Array(self.output.to_vec());
        object["usage"] = self.usage.unwrap_or(Value::Null);
    }

    /// The end of an answer that finished with `finish`.
    pub(super) fn finished(output: &'a [Value], finish: Finish, usage: Usage, meta: &Meta) -> Self {
        let incomplete = incomplete(finish);
        Self {
            status: if incomplete.is_some() {
                "incomplete"
            } else {
                "completed"
            },
            output,
            usage: Some(usage_object(usage, meta)),
            incomplete,
            error: None,
        }
    }

    pub(super) fn failed(output: &'a [Value], e: &Error) -> Self {
        Self {
            status: "failed",
            output,
            usage: None,
            incomplete: None,
            error: Some(error_object(e)),
        }
    }
}

/// Why an answer that ended with `finish` is incomplete, if it is.
fn incomplete(finish: Finish) -> Option<&'static str> {
    match finish {
        Finish::Length => Some("max_output_tokens"),
        Finish::ContentFilter => Some("content_filter"),
        _ => None,
    }
}

/// The `error` of a failed response: the codes the description allows.
pub(super) fn error_object(e: &Error) -> Value {
    let code = match e.class() {
        ErrorClass::RateLimited
        | ErrorClass::RequestsLimitExceeded
        | ErrorClass::TokensLimitExceeded => "rate_limit_exceeded",
        ErrorClass::InvalidRequest => "invalid_prompt",
        _ => "server_error",
    };
    json!({"code": code, "message": e.to_string()})
}

/// Usage as the Responses API reports it: input and output tokens, with
/// the cached and reasoning tokens an upstream reported (0 otherwise).
pub(super) fn usage_object(usage: Usage, meta: &Meta) -> Value {
    let detail = |group: &str, key: &str| {
        meta.usage
            .get(group)
            .and_then(|g| g.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    json!({
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": detail("prompt_tokens_details", "cached_tokens"),
            "cache_write_tokens": 0,
        },
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {
            "reasoning_tokens": detail("completion_tokens_details", "reasoning_tokens"),
        },
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    })
}

/// A whole answer as output items: a message with its text (or refusal)
/// unless the model only called tools, then each call.
pub(super) fn output_items(
    answer: &Answer,
    logprobs: bool,
    ids: &mut dyn FnMut(&'static str) -> String,
) -> Vec<Value> {
    let extras = &answer.extras;
    let mut items = Vec::new();
    let status = if incomplete(answer.finish).is_some() {
        "incomplete"
    } else {
        "completed"
    };
    if !answer.text.is_empty() || extras.refusal.is_some() || extras.tool_calls.is_empty() {
        let mut content = Vec::new();
        if !answer.text.is_empty() || extras.refusal.is_none() {
            content.push(text_part(&answer.text, logprobs_of(extras, logprobs)));
        }
        if let Some(r) = &extras.refusal {
            content.push(json!({"type": "refusal", "refusal": r}));
        }
        items.push(json!({
            "id": ids("msg"),
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }));
    }
    for call in &extras.tool_calls {
        items.push(json!({
            "id": ids("fc"),
            "type": "function_call",
            "status": "completed",
            "call_id": call.id,
            "name": call.function.name,
            "arguments": call.function.arguments,
        }));
    }
    items
}

/// An `output_text` part.
pub(super) fn text_part(text: &str, logprobs: Vec<Value>) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs})
}

/// The per-token log probabilities of chat's `logprobs.content`, which
/// have the Responses shape already; none unless asked for.
pub(super) fn logprobs_of(extras: &Extras, asked: bool) -> Vec<Value> {
    chat_logprobs(extras.logprobs.as_ref(), asked)
}

pub(super) fn chat_logprobs(logprobs: Option<&Value>, asked: bool) -> Vec<Value> {
    if !asked {
        return Vec::new();
    }
    logprobs
        .and_then(|l| l.get("content"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}
