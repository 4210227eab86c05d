//! What a node reports about itself to gateways and operators: requests in
//! flight against its capacity, and whether it is draining.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

/// Live status of one node.
#[derive(Debug)]
pub(crate) struct NodeStatus {
    in_flight: AtomicU32,
    draining: AtomicBool,
    /// Requests the node is sized for; gateways weigh load as in-flight over this.
    pub capacity: u32,
    pub started_at: SystemTime,
}

impl NodeStatus {
    pub(crate) fn new(capacity: u32) -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            capacity,
            started_at: SystemTime::now(),
        }
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }
}

/// Counts a request from arrival until its response body ends, so a stream
/// of tokens counts as in flight for as long as it runs.
struct InFlight(Arc<NodeStatus>);

impl InFlight {
    fn new(status: Arc<NodeStatus>) -> Self {
        status.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(status)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Middleware: wraps every response body in an in-flight guard.
pub(crate) async fn track_in_flight(
    State(status): State<Arc<NodeStatus>>,
    request: Request,
    next: Next,
) -> Response {
    let guard = InFlight::new(status);
    let response = next.run(request).await;
    response.map(|body| {
        Body::new(Guarded {
            inner: body,
            _guard: guard,
        })
    })
}

/// A body that holds a guard until it is dropped; frames, trailers included,
/// pass through untouched (gRPC needs its trailers).
struct Guarded {
    inner: Body,
    _guard: InFlight,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
