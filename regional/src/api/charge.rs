//! What the gateway charges against a tenant's tokens per minute, for the
//! answers whose usage is not known when their head leaves: streams (chat
//! and text completions over SSE, `GenerateStream`) and queued jobs.
//!
//! The gateway cannot read every request before it sends it (a chunked or
//! large body, a gRPC message), so the region, which has parsed it, reports
//! its shape at the head of the answer: the prompt's tokens (history
//! included) and `max_tokens`. The gateway charges that at once, before a
//! token is generated. A stream then reports its real usage in a trailer
//! (HTTP/2; the gateway asks for HTTP/2 when it expects one), which replaces
//! the charge. A stream cut short reports nothing and stays charged its
//! shape. A job's usage is known only later, possibly in another region: it
//! stays charged its shape.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::Response;
use http_body::{Frame, SizeHint};
use meridian_proto::header::{MAX_TOKENS, PROMPT_TOKENS, USAGE_TOKENS};

use crate::cache::Outcome;
use crate::inference::{ChatRequest, Usage};

/// No usage reported yet.
const UNSET: u64 = u64::MAX;

/// The charge of one answer: its shape for the head, its usage (once the
/// stream has it) for the trailer.
#[derive(Clone)]
pub(super) struct Charge {
    prompt: u64,
    max_tokens: Option<u32>,
    used: Arc<AtomicU64>,
}

/// The usage of a stream, carried from its handler to [`trailing_usage`]
/// in the response's extensions.
#[derive(Clone)]
struct Trailing(Arc<AtomicU64>);

impl Charge {
    /// The shape of `req` as it goes to the model (history included).
    pub(super) fn of(req: &ChatRequest) -> Self {
        Self {
            prompt: u64::from(req.prompt_tokens()),
            max_tokens: req.max_tokens,
            used: Arc::new(AtomicU64::new(UNSET)),
        }
    }

    /// The head's report, as header names and values: the shape, or no
    /// tokens at all when nothing is generated (a cache hit, as a whole
    /// answer from the cache reports; a repeated job submission).
    pub(super) fn head(&self, free: bool) -> Vec<(&'static str, u64)> {
        if free {
            return vec![(USAGE_TOKENS, 0)];
        }
        let mut head = vec![(PROMPT_TOKENS, self.prompt)];
        head.extend(self.max_tokens.map(|max| (MAX_TOKENS, u64::from(max))));
        head
    }

    /// [`Charge::head`] as HTTP headers.
    pub(super) fn head_headers(&self, free: bool) -> HeaderMap {
        self.head(free)
            .into_iter()
            .map(|(name, value)| (HeaderName::from_static(name), HeaderValue::from(value)))
            .collect()
    }

    /// Records the usage of the finished stream, for its trailer.
    pub(super) fn settle(&self, usage: Usage, outcome: Outcome) {
        self.used.store(used(usage, outcome), Ordering::Relaxed);
    }

    /// Marks `response` (HTTP or gRPC) to carry the usage in its trailers.
    pub(super) fn trail<B>(&self, response: &mut axum::http::Response<B>) {
        response
            .extensions_mut()
            .insert(Trailing(self.used.clone()));
    }

    /// [`Charge::trail`] for a gRPC response.
    pub(super) fn trail_grpc<T>(&self, response: &mut tonic::Response<T>) {
        response
            .extensions_mut()
            .insert(Trailing(self.used.clone()));
    }
}

/// The tokens an answer used, as the gateway charges them: prompt and
/// completion, or none when the cache answered.
pub(super) fn used(usage: Usage, outcome: Outcome) -> u64 {
    if outcome.is_hit() {
        0
    } else {
        u64::from(usage.prompt_tokens) + u64::from(usage.completion_tokens)
    }
}

/// Middleware: a response marked by [`Charge::trail`] ends with the usage
/// in a trailer (added to gRPC's own trailers, or a trailer frame of its
/// own after an SSE stream). HTTP/1.1 drops trailers its response did not
/// announce, so a client talking to the region directly sees nothing.
pub(crate) async fn trailing_usage(mut response: Response) -> Response {
    match response.extensions_mut().remove::<Trailing>() {
        None => response,
        Some(Trailing(used)) => response.map(|inner| {
            Body::new(WithUsage {
                inner,
                used,
                trailed: false,
            })
        }),
    }
}

struct WithUsage {
    inner: Body,
    used: Arc<AtomicU64>,
    /// A trailer frame went out (the inner one, or ours).
    trailed: bool,
}

impl WithUsage {
    fn add_usage(&self, trailers: &mut HeaderMap) {
        let used = self.used.load(Ordering::Relaxed);
        if used != UNSET {
            trailers.insert(HeaderName::from_static(USAGE_TOKENS), used.into());
        }
    }
}

impl HttpBody for WithUsage {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_trailers() {
                Ok(mut trailers) => {
                    self.trailed = true;
                    self.add_usage(&mut trailers);
                    Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            Poll::Ready(None) if !self.trailed => {
                self.trailed = true;
                let mut trailers = HeaderMap::new();
                self.add_usage(&mut trailers);
                if trailers.is_empty() {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        // Never before the trailer frame has had its chance.
        self.trailed && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // Trailers may follow the data: no exact length, which HTTP/1.1
        // would take as the whole message.
        let mut hint = SizeHint::new();
        hint.set_lower(self.inner.size_hint().lower());
        hint
    }
}
