//! What the HTTP inference routes share beyond the body (deadline and
//! routing hint headers, the served-model header, stream error events).

use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::response::sse::Event;
use tokio::time::Instant;

use super::{AppState, Tenant};
use crate::answer::{Ask, TurnOptions};
use crate::cache::Directives;
use crate::conversation::{
    CONVERSATION_HEADER, ConversationId, IDEMPOTENCY_HEADER, idempotency_key,
};
use crate::error::Error;
use crate::inference::{Fallback, Hints, SizeHint, parse_timeout_ms};
use crate::replication::{DURABILITY_HEADER, Durability};

/// Request header: the client's deadline for this request, in milliseconds.
pub(crate) const TIMEOUT_HEADER: &str = meridian_proto::header::TIMEOUT_MS;
/// Request header: `small` or `large`, for aliases that route by size.
pub(crate) const ROUTING_HINT_HEADER: &str = meridian_proto::header::ROUTING_HINT;
/// Response header: the model that served the request (an alias resolved).
pub(crate) const MODEL_HEADER: &str = meridian_proto::header::MODEL;

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

impl RequestFacts {
    /// `x-meridian-durability` as asked, for a write outside a conversation.
    pub(super) fn durability(&self) -> Option<Durability> {
        self.durability
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
