//! The legacy `POST /v1/completions`: a text completion, served by the chat
//! models with the prompt as one user message. Each field of OpenAI's
//! request is honoured (`echo` by putting the prompt before the text,
//! `logprobs` by asking the chat model for its log probabilities and
//! writing them in the legacy shape), passed to the model (sampling fields,
//! `user`, fields not known yet), or refused by name when the chat models
//! that serve it cannot give it (`suffix`, several choices, the prompt's
//! own log probabilities).

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::body::JsonBody;
use super::charge::{self, Charge};
use super::infer::{RequestFacts, durability_header, error_event, model_header};
use super::openai::{UsageBody, max_tokens};
use super::{AppState, Tenant};
use crate::cache::RESULT_HEADER;
use crate::error::Error;
use crate::inference::{ChatRequest, Chunk, Message};
use crate::slow_reader::cut_after;

pub(super) fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .with_state(state)
}

/// Tokens a text completion that names no `max_tokens` may generate, as at
/// OpenAI.
const DEFAULT_MAX_TOKENS: u32 = 16;

/// OpenAI's default prompt, the separator its models saw between
/// documents: completing it starts a new document.
const DOCUMENT_START: &str = "<|endoftext|>";

#[derive(Deserialize)]
struct CompletionBody {
    model: String,
    /// Missing or `null`: OpenAI's default, [`DOCUMENT_START`].
    prompt: Option<Prompt>,
    #[serde(default, deserialize_with = "super::openai::integer")]
    max_tokens: Option<i64>,
    #[serde(default, deserialize_with = "super::openai::integer")]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    /// `null` is "not set", as the description allows.
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<super::openai::StreamOptions>,
    #[serde(default)]
    temperature: Option<f32>,
    /// Honoured: the prompt comes back before the text.
    #[serde(default)]
    echo: Option<bool>,
    /// Alternatives per token: the chat model is asked for `logprobs` with
    /// this many `top_logprobs`, and its answer rewritten in the legacy
    /// shape.
    #[serde(default, deserialize_with = "super::openai::integer")]
    logprobs: Option<i64>,
    /// Refused unless null or empty: chat models do not insert.
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default, deserialize_with = "super::openai::integer")]
    n: Option<i64>,
    #[serde(default, deserialize_with = "super::openai::integer")]
    best_of: Option<i64>,
    /// Everything else (`top_p`, penalties, `logit_bias`, `user`, fields
    /// not known yet): sent to the model as the client wrote it.
    #[serde(flatten)]
    rest: Map<String, Value>,
}

impl CompletionBody {
    /// Refuses, by name, what the chat models that serve completions cannot
    /// give.
    fn check_unserved(&self) -> Result<(), Error> {
        super::openai::one_choice(self.n)?;
        // 0 is allowed by the description and, like 1, asks for no choice
        // among several.
        if self.best_of.is_some_and(|n| n > 1) {
            return Err(Error::invalid(
                "`best_of` above 1 is not supported: one completion is generated per request",
                Some("best_of"),
            ));
        }
        if let Some(k) = self.logprobs {
            if !(0..=5).contains(&k) {
                return Err(Error::invalid(
                    format!("`logprobs` must be between 0 and 5, got {k}"),
                    Some("logprobs"),
                ));
            }
            if self.echo == Some(true) {
                return Err(Error::invalid(
                    "`logprobs` with `echo` is not supported: the chat models that serve text \
                     completions score the tokens they generate, not the prompt's",
                    Some("logprobs"),
                ));
            }
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(Error::invalid(
                "`suffix` is not supported: the chat models that serve completions do not \
                 insert text before a suffix",
                Some("suffix"),
            ));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
    /// Token ids, or anything else: refused with a message saying which.
    Other(serde_json::Value),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `POST /v1/completions`: a text completion, served by the chat backends
/// with the prompt as one user message.
async fn completions(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    facts: RequestFacts,
    JsonBody(body): JsonBody,
) -> Result<Response, Error> {
    let body: CompletionBody = serde_json::from_slice(&body)
        .map_err(|e| Error::invalid(format!("invalid request body: {e}"), None))?;
    if body.model.is_empty() {
        return Err(Error::invalid("`model` must not be empty", Some("model")));
    }
    body.check_unserved()?;
    let prompt = match body.prompt {
        None => DOCUMENT_START.to_string(),
        Some(Prompt::One(p)) => p,
        Some(Prompt::Many(mut v)) if v.len() == 1 => v.remove(0),
        Some(Prompt::Many(_)) => {
            return Err(Error::invalid(
                "`prompt` must be a string or an array of exactly one string: \
                 one completion per request",
                Some("prompt"),
            ));
        }
        Some(Prompt::Other(v)) if v.is_array() => {
            return Err(Error::invalid(
                "`prompt` as token ids is not supported: models here take text, \
                 so send the prompt as a string",
                Some("prompt"),
            ));
        }
        Some(Prompt::Other(_)) => {
            return Err(Error::invalid(
                "`prompt` must be a string or an array of exactly one string",
                Some("prompt"),
            ));
        }
    };
    if body.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(Error::invalid(
            "`temperature` must be between 0 and 2",
            Some("temperature"),
        ));
    }
    // An empty prompt asks, as a missing one does, for text from the start
    // of a document; the chat upstreams that serve completions take no
    // empty message, so they get OpenAI's marker for that start.
    let prompt = if prompt.is_empty() {
        DOCUMENT_START.to_string()
    } else {
        prompt
    };
    let mut req = ChatRequest {
        model: body.model,
        messages: vec![Message::text("user", prompt)],
        // OpenAI's default for text completions, unlike chat's.
        max_tokens: Some(max_tokens(body.max_tokens)?.unwrap_or(DEFAULT_MAX_TOKENS)),
        max_completion_tokens: false,
        seed: body.seed.map(super::openai::seed_bits),
        stop: match body.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        },
        temperature: body.temperature,
        extra: Arc::new(body.rest),
    };
    if let Some(k) = body.logprobs {
        let extra = Arc::make_mut(&mut req.extra);
        extra.insert("logprobs".into(), Value::Bool(true));
        extra.insert("top_logprobs".into(), k.into());
    }
    let echoed = if body.echo == Some(true) {
        req.messages[0].content.clone()
    } else {
        String::new()
    };
    let ask = facts.ask(&state, &tenant, false, None)?;
    let id = format!("cmpl-{}", uuid::Uuid::now_v7().simple());
    let created = chrono::Utc::now().timestamp();
    let model = req.model.clone();
    let object =
        move |text: &str, logprobs: Value, finish: Option<&str>, usage: Option<UsageBody>| {
            let mut v = json!({ "id": id, "object": "text_completion", "created": created,
            "model": model, "choices": [{ "text": text, "index": 0, "logprobs": logprobs,
            "finish_reason": finish }] });
            if let Some(u) = usage {
                v["usage"] = json!(u);
            }
            v
        };
    if !body.stream.unwrap_or(false) {
        let done = state.pipeline.answer(&mut req, ask).await?;
        let mut offset = echoed.chars().count();
        let logprobs = legacy_logprobs(done.answer.extras.logprobs.as_ref(), &mut offset);
        let body = object(
            &format!("{echoed}{}", done.answer.text),
            logprobs,
            Some(done.answer.finish.as_str()),
            Some(done.answer.usage().into()),
        );
        let total = charge::used(done.answer.usage(), done.outcome);
        let cache = [
            (RESULT_HEADER, done.outcome.header().to_string()),
            (meridian_proto::header::USAGE_TOKENS, total.to_string()),
        ];
        return Ok((
            model_header(&req.model, done.answer.fallback.as_ref()),
            cache,
            durability_header(done.durability),
            axum::Json(body),
        )
            .into_response());
    }
    let include_usage = super::openai::StreamOptions::include_usage(body.stream_options.as_ref());
    let streamed = state.pipeline.answer_stream(&mut req, ask).await?;
    let charge = Charge::of(&req);
    let settle = charge.clone();
    let outcome = streamed.outcome;
    let record = streamed.record;
    let chunks = streamed.chunks;
    let permit = streamed.permit;
    let durability = durability_header(streamed.durability);
    let streamed_fallback = streamed.fallback;
    let events = async_stream::stream! {
        let _permit = permit;
        let mut chunks = chunks;
        let mut offset = echoed.chars().count();
        let mut ttft = None;
        if !echoed.is_empty() {
            yield Event::default().data(object(&echoed, Value::Null, None, None).to_string());
        }
        while let Some(chunk) = chunks.next().await {
            match chunk {
                Err(e) => {
                    record.failed(&e);
                    yield error_event(&e);
                    return;
                }
                Ok(Chunk::Delta(piece)) => {
                    ttft.get_or_insert_with(|| record.elapsed());
                    let logprobs = legacy_logprobs(piece.logprobs.as_ref(), &mut offset);
                    yield Event::default().data(object(&piece.content, logprobs, None, None).to_string());
                }
                Ok(Chunk::Done { finish, usage, .. }) => {
                    record.completed(usage, ttft.unwrap_or_else(|| record.elapsed()), outcome.label());
                    settle.settle(usage, outcome);
                    yield Event::default().data(object("", Value::Null, Some(finish.as_str()), None).to_string());
                    if include_usage {
                        // As OpenAI sends it: a last chunk of its own, with
                        // no choices.
                        let mut last = object("", Value::Null, None, Some(usage.into()));
                        last["choices"] = json!([]);
                        yield Event::default().data(last.to_string());
                    }
                }
            }
        }
        yield Event::default().data("[DONE]");
    };
    let events = cut_after(
        events.map(Ok::<_, Infallible>),
        state.stream_write_timeout,
        "completion stream",
        None,
    );
    let body = Sse::new(events).keep_alive(KeepAlive::default());
    let cache = [(RESULT_HEADER, outcome.header())];
    let head = charge.head_headers(outcome.is_hit());
    let mut response = (
        model_header(&req.model, streamed_fallback.as_ref()),
        cache,
        durability,
        head,
        body,
    )
        .into_response();
    charge.trail(&mut response);
    Ok(response)
}

/// OpenAI's legacy `logprobs` (`tokens`, `token_logprobs`, `top_logprobs`,
/// `text_offset`) from a chat answer's `logprobs.content` entries; `offset`
/// is the characters of text before them, and moves past them. Null when
/// the model gave none.
fn legacy_logprobs(chat: Option<&Value>, offset: &mut usize) -> Value {
    let Some(entries) = chat.and_then(|c| c["content"].as_array()) else {
        return Value::Null;
    };
    let (mut tokens, mut logprobs, mut top, mut offsets) = (vec![], vec![], vec![], vec![]);
    for e in entries {
        let token = e["token"].as_str().unwrap_or_default();
        tokens.push(Value::from(token));
        logprobs.push(e["logprob"].clone());
        let alternatives: Map<String, Value> = e["top_logprobs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| Some((a["token"].as_str()?.to_string(), a["logprob"].clone())))
            .collect();
        top.push(Value::Object(alternatives));
        offsets.push(Value::from(*offset));
        *offset += token.chars().count();
    }
    json!({ "tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top,
        "text_offset": offsets })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_log_probabilities_are_written_in_the_legacy_shape() {
        let chat = json!({ "content": [
            { "token": "Hi", "logprob": -0.5, "bytes": [72, 105],
              "top_logprobs": [{ "token": "Hi", "logprob": -0.5 }, { "token": "Yo", "logprob": -2.0 }] },
            { "token": " there", "logprob": -1.0, "bytes": null, "top_logprobs": [] }
        ]});
        let mut offset = 3;
        let legacy = legacy_logprobs(Some(&chat), &mut offset);
        assert_eq!(
            legacy,
            json!({ "tokens": ["Hi", " there"], "token_logprobs": [-0.5, -1.0],
                "top_logprobs": [{ "Hi": -0.5, "Yo": -2.0 }, {}], "text_offset": [3, 5] })
        );
        assert_eq!(offset, 11);
        assert_eq!(legacy_logprobs(None, &mut offset), Value::Null);
    }
}
