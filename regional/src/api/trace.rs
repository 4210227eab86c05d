//! The request span of every call to the node, HTTP and gRPC alike (both
//! reach the same router): a child of the caller's `traceparent` (the
//! gateway's span), current while the handler runs, so the queue and the
//! upstream pools start their spans under it with `trace::child_span`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::Request;
use axum::middleware::Next;
use axum::response::Response;
use meridian_mesh::trace::{self, FutureExt, KeyValue, Kind};
use tracing::Instrument;

use super::{AppState, TENANT_HEADER, is_grpc};
use crate::tenancy::DEFAULT_TENANT;

pub(super) async fn request_span(
    State(state): State<Arc<AppState>>,
    req: Request<Body>,
    next: Next,
) -> Response {
    let tracer = &state.tracer;
    if !tracer.is_enabled() || is_probe(req.uri().path()) {
        return next.run(req).await;
    }
    let parent = tracer.extract(req.headers());
    let tenant = req
        .headers()
        .get(TENANT_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(DEFAULT_TENANT)
        .to_string();
    let grpc = is_grpc(&req);
    let mut attributes = vec![
        KeyValue::new("meridian.region", state.region.clone()),
        KeyValue::new("meridian.tenant", tenant),
        KeyValue::new("http.request.method", req.method().to_string()),
        KeyValue::new("url.path", req.uri().path().to_string()),
    ];
    if grpc {
        attributes.push(KeyValue::new("rpc.system", "grpc"));
    }
    let cx = tracer.start_span("region.request", Kind::Server, &parent, attributes);
    let log = trace::log_span(&cx);
    let res = next.run(req).with_context(cx.clone()).instrument(log).await;
    let status = res.status().as_u16();
    let mut done = vec![KeyValue::new(
        "http.response.status_code",
        i64::from(status),
    )];
    // A gRPC error answered before any message comes as a trailers-only
    // response, its status in the headers; later ones are in trailers,
    // after this span.
    if let Some(code) = res
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
    {
        done.push(KeyValue::new("rpc.grpc.status_code", code));
    }
    trace::set_attributes(&cx, done);
    if status >= 500 {
        trace::set_error(&cx, format!("answered {status}"));
    }
    trace::end(&cx);
    res
}

/// Health and load probes (every gateway, several times a second) would
/// bury the traces worth reading.
fn is_probe(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || path == "/meridian.v1.Admin/RegionStatus"
        || path == "/metrics"
}
