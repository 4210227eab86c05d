//! The node's API surface: the OpenAI-compatible HTTP routes and the
//! `meridian.v1` gRPC services, on one axum router so a single port serves
//! both (gRPC is told apart by path and content type).

mod admin;
mod body;
mod charge;
mod completions;
mod conversations;
mod embeddings;
mod grpc;
mod http;
mod infer;
mod jobs;
mod manage;
mod moderations;
mod openai;
mod responses;
mod telemetry;
mod trace;

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, header};
use axum::response::{IntoResponse, Response};
use tonic::server::NamedService;
use tonic_health::pb::health_server::{Health, HealthServer};
use tower::ServiceExt;

use crate::answer::Pipeline;
use crate::error::Error;
use crate::inference::Inference;

pub(crate) use crate::tenancy::{TENANT_HEADER, Tenant};

/// What the API is built from: the node's parts it serves requests with.
/// The node wires them once, at start; handlers see them only through
/// [`AppState`].
pub(crate) struct Parts {
    pub region: String,
    /// The answer pipeline every chat entry point calls.
    pub pipeline: Arc<Pipeline>,
    /// Model listing, reloads, admission and default deadlines.
    pub inference: Arc<Inference>,
    /// The region's PostgreSQL.
    pub pool: sqlx::PgPool,
    /// Whether PostgreSQL and Redis answer now.
    pub stores: Arc<crate::store::StoreHealth>,
    /// Cancelled when the node starts shutting down.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// In-flight count, capacity and drain state, for `Admin.RegionStatus`.
    pub status: Arc<crate::status::NodeStatus>,
    /// Time-series storage: reading writer, usage recorder, limits.
    pub telemetry: crate::telemetry::Telemetry,
    /// Asynchronous jobs: submission, lookups and watches.
    pub jobs: Arc<crate::queue::Queue>,
    /// The built-in embedding model, when `[embeddings]` turns it on.
    pub embedder: Option<Arc<crate::inference::Embedder>>,
    /// The response cache, for its statistics and purges.
    pub cache: Arc<crate::cache::ResponseCache>,
    /// This node's traces; the request layer opens a span per call.
    pub tracer: meridian_mesh::Tracer,
    /// This region's change log and its followers of peers' logs.
    pub replication: Arc<crate::replication::Replication>,
    /// Spend and budgets: checks, and what `/v1/usage` adds to the rows.
    pub spend: Arc<crate::tenancy::spend::Spend>,
    /// `server.max_body_bytes`: the largest JSON body (telemetry ingest
    /// has its own).
    pub max_body_bytes: usize,
    /// `server.stream_write_timeout_ms`: how long a streamed answer waits
    /// for its reader before it is cut.
    pub stream_write_timeout: std::time::Duration,
}

/// What every handler shares: the [`Parts`], read only, and the region's
/// name as a header value, made once.
pub(crate) struct AppState {
    parts: Parts,
    region_header: HeaderValue,
}

impl AppState {
    fn new(parts: Parts) -> Self {
        Self {
            region_header: HeaderValue::from_str(&parts.region)
                .expect("validated region names are header-safe"),
            parts,
        }
    }
}

/// Handlers read the parts as the state's own: `state.jobs`, `state.pool`.
impl std::ops::Deref for AppState {
    type Target = Parts;

    fn deref(&self) -> &Parts {
        &self.parts
    }
}

/// The response header that names the region which produced an answer. The
/// gateway adds its own `x-meridian-region` for the region it chose; the two
/// agree unless routing is broken.
pub(crate) const SERVED_BY: &str = meridian_proto::header::SERVED_BY;

/// Builds the whole API as a router, so tests can drive it without a socket.
pub(crate) fn app<H>(parts: Parts, health: HealthServer<H>) -> Router
where
    H: Health,
{
    let state = Arc::new(AppState::new(parts));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(meridian_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(meridian_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");
    let router = http::routes(state.clone())
        .merge(telemetry::routes(state.clone()))
        .merge(jobs::routes(state.clone()))
        .merge(embeddings::routes(state.clone()))
        .merge(moderations::routes(state.clone()))
        .merge(completions::routes(state.clone()))
        .merge(responses::routes(state.clone()))
        .merge(conversations::routes(state.clone()))
        .merge(admin::routes(state.clone()))
        .merge(manage::routes(state.clone()));
    let router = grpc_service(router, grpc::inference(state.clone()));
    let router = grpc_service(router, reflection_v1);
    let router = grpc_service(router, reflection_v1alpha);
    let router = grpc_service(router, health);
    let router = grpc_service(router, admin::service(state.clone()));
    let router = grpc_service(router, telemetry::service(state.clone()));
    let router = grpc_service(router, jobs::grpc(state.clone()));
    let router = grpc_service(
        router,
        crate::replication::service(state.replication.clone()),
    );
    let region_header = state.region_header.clone();
    let stores = state.stores.clone();
    let traced = state.clone();
    router
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(fallback)
        .layer(axum::middleware::map_response(charge::trailing_usage))
        .layer(axum::middleware::from_fn_with_state(
            state.replication.clone(),
            manage::say_how_far_behind,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.status.clone(),
            crate::status::track_in_flight,
        ))
        .layer(axum::middleware::map_response(move |mut res: Response| {
            let value = region_header.clone();
            // Every refusal for a store that is down carries its name, so
            // they are counted here, however they were refused.
            if let Some(store) = res.headers().get(meridian_proto::header::UNAVAILABLE) {
                stores.count_refusal(store.as_bytes());
            }
            async move {
                res.headers_mut().insert(SERVED_BY, value);
                res
            }
        }))
        // Outermost, so the span covers the whole answer and every log line.
        .layer(axum::middleware::from_fn_with_state(
            traced,
            trace::request_span,
        ))
}

/// Mounts a tonic service under `/{package.Service}/*`, the way tonic's own
/// router does, so it can sit beside HTTP routes that have their own fallback.
fn grpc_service<S>(router: Router, svc: S) -> Router
where
    S: tower::Service<
            Request<tonic::body::Body>,
            Response = axum::http::Response<tonic::body::Body>,
            Error = Infallible,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    router.route_service(
        &format!("/{}/{{*rest}}", S::NAME),
        svc.map_request(|req: Request<Body>| req.map(tonic::body::Body::new)),
    )
}

fn is_grpc(req: &Request<Body>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

async fn fallback(req: Request<Body>) -> Response {
    if is_grpc(&req) {
        let status = tonic::Status::unimplemented(format!("no such method {}", req.uri().path()));
        return status.into_http::<Body>().into_response();
    }
    Error::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
    .into_response()
}

/// A route called with a method it does not take: OpenAI's error object,
/// as for every other refusal (axum's own answer has an empty body).
async fn method_not_allowed(req: Request<Body>) -> Response {
    let body = serde_json::json!({ "error": {
        "message": format!("{} is not a method of {}", req.method(), req.uri().path()),
        "type": "invalid_request_error", "param": null, "code": null,
    }});
    (axum::http::StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}

/// A `/v1/chat/completions` body read as the region reads it: the request,
/// whether the client asked for a stream, and whether for usage in it. The
/// simulator's own server reads bodies through this, so it takes what a
/// region takes.
pub(crate) fn read_chat_body(
    bytes: &[u8],
) -> Result<(crate::inference::ChatRequest, bool, bool), Error> {
    let body = openai::ChatCompletionBody::parse(bytes)?;
    let stream = body.stream();
    let include_usage = openai::StreamOptions::include_usage(body.stream_options.as_ref());
    Ok((body.into_request()?, stream, include_usage))
}

/// Parses and checks a `/v1/chat/completions` body as its handler does,
/// serving nothing: the fuzz harness reaches the parser through this.
#[doc(hidden)]
pub fn check_chat_body(bytes: &[u8]) -> Result<(), Error> {
    openai::ChatCompletionBody::parse(bytes)?
        .into_request()
        .map(drop)
}
