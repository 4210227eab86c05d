//! Request bodies, read with a limit before anything parses them: a body
//! over its limit is refused from its `Content-Length` alone, or as soon as
//! the bytes read pass the limit when it has none (chunked), so a hostile
//! body never costs more memory than the limit. The rest of a refused body
//! is read and dropped before the answer, so that the client sees it.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, header};
use futures::StreamExt;

use super::AppState;
use crate::error::Error;

/// Reads `body` whole if it is at most `limit` bytes; `key` is the config
/// key that sets the limit, for the error.
pub(crate) async fn read(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    key: &'static str,
) -> Result<Bytes, Error> {
    let too_large = || {
        Error::too_large(
            format!("the request body is larger than {limit} bytes, the limit set by `{key}`"),
            None,
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut chunks = body.into_data_stream();
    if declared.is_some_and(|n| n > limit as u64) {
        if !expects_continue(headers) {
            drain(&mut chunks).await;
        }
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(declared.map_or(0, |n| n as usize).min(limit));
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(unreadable)?;
        let needed = buf.len() + chunk.len();
        if needed > limit {
            drop(buf);
            drain(&mut chunks).await;
            return Err(too_large());
        }
        if needed > buf.capacity() {
            // Doubling, but never past the limit: a body of unknown length
            // costs at most `limit` bytes, not the next power of two.
            let target = (buf.capacity() * 2).max(needed).min(limit);
            buf.reserve_exact(target - buf.len());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.into())
}

/// Bytes of a refused body read and dropped at most, and for how long.
const DRAIN_BYTES: usize = 256 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Reads and drops what is left of a refused body, within [`DRAIN_BYTES`]
/// and [`DRAIN_TIME`], before the refusal goes out: closing a connection
/// with unread bytes resets it, and a client still sending would then
/// never see the 413 (the lingering close web servers do). It costs time,
/// bounded, but no memory.
async fn drain(chunks: &mut BodyDataStream) {
    let mut left = DRAIN_BYTES;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(chunk)) = chunks.next().await {
            left = left.saturating_sub(chunk.len());
            if left == 0 {
                break;
            }
        }
    })
    .await;
}

/// A client that sent `Expect: 100-continue` waits for the server's go
/// before it sends the body, so it hears a refusal without one.
fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

fn unreadable(e: axum::Error) -> Error {
    Error::invalid(format!("the request body could not be read: {e}"), None)
}

/// A JSON API body, at most `server.max_body_bytes`.
pub(crate) struct JsonBody(pub Bytes);

impl FromRequest<Arc<AppState>> for JsonBody {
    type Rejection = Error;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Error> {
        let (parts, body) = req.into_parts();
        let limit = state.max_body_bytes;
        read(&parts.headers, body, limit, "server.max_body_bytes")
            .await
            .map(Self)
    }
}
