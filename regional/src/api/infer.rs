//! What the HTTP inference routes share beyond the body (deadline and
//! routing hint headers, the served-model header, stream error events), the
//! legacy `POST /v1/completions`, and `POST /admin/reload`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use super::body::JsonBody;
use super::charge::{self, Charge};
use super::openai::{UsageBody, max_tokens};
use super::{AppState, Tenant};
use crate::answer::{Ask, TurnOptions};
use crate::cache::{Directives, RESULT_HEADER};
use crate::conversation::{
    CONVERSATION_HEADER, ConversationId, IDEMPOTENCY_HEADER, idempotency_key,
};
use crate::error::Error;
use crate::inference::{ChatRequest, Chunk, Fallback, Hints, Message, SizeHint, parse_timeout_ms};
use crate::replication::{DURABILITY_HEADER, Durability};
use crate::slow_reader::cut_after;

/// Request header: the client's deadline for this request, in milliseconds.
pub(crate) const TIMEOUT_HEADER: &str = meridian_proto::header::TIMEOUT_MS;
/// Request header: `small` or `large`, for aliases that route by size.
pub(crate) const ROUTING_HINT_HEADER: &str = meridian_proto::header::ROUTING_HINT;
/// Response header: the model that served the request (an alias resolved).
pub(crate) const MODEL_HEADER: &str = meridian_proto::header::MODEL;

pub(super) fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .with_state(state)
}

/// The request's deadline and routing hint, read from its headers on
/// arrival (the deadline counts from then).
pub(super) struct RequestFacts {
    arrived: Instant,
    timeout: Option<Duration>,
    size: Option<SizeHint>,
    /// `Cache-Control` and `x-meridian-cache`.
    pub cache: Directives,
    /// `x-meridian-conversation`, as sent.
    conversation: Option<String>,
    /// `x-meridian-durability`, parsed.
    durability: Option<Durability>,
    /// `Idempotency-Key`, checked.
    idempotency_key: Option<String>,
}

impl RequestFacts {
    /// What the request asks of the answer pipeline: these facts, whether
    /// its body carries tools, and the conversation it continues (the
    /// header, or `body_id`, the body's `conversation_id`, which must agree
    /// when both are set).
    pub(super) fn ask<'a>(
        &self,
        state: &AppState,
        tenant: &'a Tenant,
        has_tools: bool,
        body_id: Option<&str>,
    ) -> Result<Ask<'a>, Error> {
        Ok(Ask {
            tenant,
            hints: Hints {
                has_tools,
                size: self.size,
            },
            cache: self.cache,
            deadline: self.arrived + self.timeout.unwrap_or(state.inference.default_timeout),
            turn: TurnOptions {
                conversation: ConversationId::from_request(self.conversation.as_deref(), body_id)?,
                durability: self.durability,
                idempotency_key: self.idempotency_key.clone(),
            },
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestFacts {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Error> {
        let header = |name| {
            parts
                .headers
                .get(name)
                .map(|v| {
                    v.to_str()
                        .map_err(|_| Error::invalid(format!("`{name}` must be ASCII"), None))
                })
                .transpose()
        };
        Ok(Self {
            arrived: Instant::now(),
            timeout: header(TIMEOUT_HEADER)?.map(parse_timeout_ms).transpose()?,
            size: header(ROUTING_HINT_HEADER)?.and_then(SizeHint::parse),
            cache: Directives::parse(|name| parts.headers.get(name).and_then(|v| v.to_str().ok())),
            conversation: header(CONVERSATION_HEADER)?.map(str::to_string),
            durability: header(DURABILITY_HEADER)?
                .map(Durability::parse)
                .transpose()?
                .flatten(),
            idempotency_key: idempotency_key(header(IDEMPOTENCY_HEADER)?)?,
        })
    }
}

/// `x-meridian-model`, and `x-meridian-fallback` when a fallback served.
pub(super) fn model_header(
    model: &str,
    fallback: Option<&Fallback>,
) -> axum::response::AppendHeaders<Vec<(&'static str, String)>> {
    let mut headers = vec![(MODEL_HEADER, model.to_string())];
    if let Some(f) = fallback {
        headers.push((meridian_proto::header::FALLBACK, f.header()));
    }
    axum::response::AppendHeaders(headers)
}

/// `x-meridian-durability` of a stored turn: how it was (or, for a stream,
/// will be by its last chunk) acknowledged; absent when nothing was stored.
pub(super) fn durability_header(
    durability: Option<Durability>,
) -> axum::response::AppendHeaders<Option<(&'static str, &'static str)>> {
    axum::response::AppendHeaders(durability.map(|d| (DURABILITY_HEADER, d.header())))
}

/// An error after the stream started: the OpenAI error object as the last
/// event, as OpenAI's own API does.
pub(super) fn error_event(e: &Error) -> Event {
    Event::default().data(e.openai_body().to_string())
}

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
        max_tokens: max_tokens(body.max_tokens)?,
        max_completion_tokens: false,
        seed: body.seed.map(super::openai::seed_bits),
        stop: match body.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        },
        temperature: body.temperature,
        // The legacy API's other fields (`echo`, `best_of`, `suffix`) mean
        // nothing to the chat upstreams that serve it.
        extra: Default::default(),
    };
    let ask = facts.ask(&state, &tenant, false, None)?;
    let id = format!("cmpl-{}", uuid::Uuid::now_v7().simple());
    let created = chrono::Utc::now().timestamp();
    let model = req.model.clone();
    let object = move |text: &str, finish: Option<&str>, usage: Option<UsageBody>| {
        let mut v = json!({ "id": id, "object": "text_completion", "created": created,
            "model": model, "choices": [{ "text": text, "index": 0, "logprobs": null,
            "finish_reason": finish }] });
        if let Some(u) = usage {
            v["usage"] = json!(u);
        }
        v
    };
    if !body.stream.unwrap_or(false) {
        let done = state.pipeline.answer(&mut req, ask).await?;
        let body = object(
            &done.answer.text,
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
        let mut ttft = None;
        while let Some(chunk) = chunks.next().await {
            match chunk {
                Err(e) => {
                    record.failed(&e);
                    yield error_event(&e);
                    return;
                }
                Ok(Chunk::Delta(piece)) => {
                    ttft.get_or_insert_with(|| record.elapsed());
                    yield Event::default().data(object(&piece.content, None, None).to_string());
                }
                Ok(Chunk::Done { finish, usage, .. }) => {
                    record.completed(usage, ttft.unwrap_or_else(|| record.elapsed()), outcome.label());
                    settle.settle(usage, outcome);
                    let usage = include_usage.then(|| usage.into());
                    yield Event::default().data(object("", Some(finish.as_str()), usage).to_string());
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
