//! The simulator as a standalone OpenAI-compatible server: real HTTP
//! upstreams for tests, benchmarks and demos, without a GPU.
//! `POST /v1/chat/completions` (JSON or SSE), `POST /v1/moderations`
//! ([`super::moderation`]), `GET /v1/models`, `GET /metrics`;
//! or, speaking Anthropic's protocol, `POST /v1/messages` instead
//! ([`super::anthropic`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use meridian_mesh::Tracer;
use meridian_mesh::trace::{self, FutureExt, KeyValue, TraceContextExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::SimBackend;
use crate::config::SimConfig;
use crate::inference::metrics::Metrics;
use crate::inference::{Chunk, ToolCall};

/// The model name `/v1/models` lists; requests may name any model.
pub(super) const MODEL: &str = "sim";

/// The protocol a simulator server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SimProtocol {
    /// OpenAI's chat completions.
    #[default]
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
}

pub(super) struct Sim {
    pub(super) backend: SimBackend,
    metrics: Metrics,
    /// Image blocks received over the Anthropic protocol, base64 and URL.
    pub(super) images: [AtomicU64; 2],
}

/// Serves the simulator on `listener` until `shutdown` resolves, then
/// finishes the requests in flight.
pub async fn serve_sim(
    config: SimConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_sim_traced(config, listener, shutdown, Tracer::disabled()).await
}

/// [`serve_sim`], recording a span for each request that arrives with a
/// `traceparent`, as an instrumented inference server would. Requests
/// without one (health checks) start no trace.
pub async fn serve_sim_traced(
    config: SimConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    tracer: Tracer,
) -> std::io::Result<()> {
    serve_sim_as(
        SimProtocol::OpenAi,
        config,
        listener,
        shutdown,
        tracer,
        Vec::new(),
    )
    .await
}

/// [`serve_sim`] behind credentials, as a hosted provider is: a `/v1`
/// request missing one of the `required` headers (name, exact value; e.g.
/// `authorization` = `Bearer k`) gets a 401 whose message quotes the
/// `authorization` it came with, as a careless provider's does.
pub async fn serve_sim_requiring(
    config: SimConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    required: Vec<(String, String)>,
) -> std::io::Result<()> {
    serve_sim_as(
        SimProtocol::OpenAi,
        config,
        listener,
        shutdown,
        Tracer::disabled(),
        required,
    )
    .await
}

/// The simulator speaking `protocol`, traced as [`serve_sim_traced`] and
/// behind the `required` headers of [`serve_sim_requiring`] (for
/// Anthropic, `x-api-key`; its 401 is Anthropic's error shape).
pub async fn serve_sim_as(
    protocol: SimProtocol,
    config: SimConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    tracer: Tracer,
    required: Vec<(String, String)>,
) -> std::io::Result<()> {
    let metrics = Metrics::with_labels(None);
    let sim = Arc::new(Sim {
        backend: SimBackend::new(config, metrics.sim(MODEL)),
        metrics,
        images: Default::default(),
    });
    let v1 = match protocol {
        SimProtocol::OpenAi => Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/moderations", post(moderations))
            .route("/v1/models", get(models)),
        SimProtocol::Anthropic => Router::new()
            .route("/v1/messages", post(super::anthropic::messages))
            .route("/v1/models", get(super::anthropic::models)),
    };
    let v1 = v1.route_layer(axum::middleware::from_fn_with_state(
        Arc::new((protocol, required)),
        require_headers,
    ));
    let app = v1
        .route("/metrics", get(metrics_text))
        .with_state(sim)
        .layer(axum::middleware::from_fn_with_state(tracer, request_span));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The protocol, whose error shape a refusal takes, and the headers (name,
/// exact value) a request must carry.
type Required = (SimProtocol, Vec<(String, String)>);

async fn require_headers(
    State(required): State<Arc<Required>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = req.headers();
    let (protocol, required) = &*required;
    let missing = required.iter().any(|(name, value)| {
        headers
            .get(name.as_str())
            .is_none_or(|v| v != value.as_str())
    });
    if !missing {
        return next.run(req).await;
    }
    let carrier = match protocol {
        SimProtocol::OpenAi => "authorization",
        SimProtocol::Anthropic => "x-api-key",
    };
    let sent = headers
        .get(carrier)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("nothing");
    let message = format!("Incorrect API key provided: {sent}");
    if *protocol == SimProtocol::Anthropic {
        let body = json!({ "type": "error",
            "error": { "type": "authentication_error", "message": message } });
        return (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    }
    let body = json!({ "error": { "message": message, "type": "invalid_request_error",
        "param": null, "code": "invalid_api_key" } });
    (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
}

async fn request_span(
    State(tracer): State<Tracer>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let parent = tracer.extract(req.headers());
    if !parent.has_active_span() {
        return next.run(req).await;
    }
    let cx = tracer.start_span(
        "sim.request",
        trace::Kind::Server,
        &parent,
        vec![KeyValue::new("url.path", req.uri().path().to_string())],
    );
    let res = next.run(req).with_context(cx.clone()).await;
    let status = i64::from(res.status().as_u16());
    trace::set_attributes(&cx, [KeyValue::new("http.response.status_code", status)]);
    trace::end(&cx);
    res
}

fn error(status: StatusCode, message: String) -> Response {
    let body = json!({ "error": { "message": message, "type": "invalid_request_error",
        "param": null, "code": null } });
    (status, axum::Json(body)).into_response()
}

async fn chat(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    let (req, stream, include_usage) = match crate::api::read_chat_body(&body) {
        Ok(read) => read,
        Err(e) => return e.into_response(),
    };
    let id = format!("chatcmpl-sim-{}", uuid::Uuid::now_v7().simple());
    let created = chrono::Utc::now().timestamp();
    if !stream {
        return match sim.backend.complete(&req).await {
            Ok(done) => axum::Json(json!({
                "id": id, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{ "index": 0, "finish_reason": done.finish.as_str(),
                    "message": message(&done.text, &done.extras.tool_calls),
                    "logprobs": done.extras.logprobs }],
                "usage": usage(done.usage),
            }))
            .into_response(),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        };
    }
    let model = req.model.clone();
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({ "id": id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [{ "index": 0, "delta": delta, "finish_reason": finish,
            "logprobs": null }] })
    };
    let chunks = sim.backend.stream(req);
    let events = async_stream::stream! {
        yield chunk(json!({ "role": "assistant", "content": "" }), None);
        let mut chunks = chunks;
        while let Some(c) = chunks.next().await {
            match c {
                Chunk::Delta(piece) if piece.tool_calls.is_empty() => {
                    let mut c = chunk(json!({ "content": piece.content }), None);
                    c["choices"][0]["logprobs"] = piece.logprobs.unwrap_or(Value::Null);
                    yield c;
                }
                Chunk::Delta(piece) => yield chunk(json!({ "tool_calls": piece.tool_calls }), None),
                Chunk::Done { finish, usage: u, .. } => {
                    yield chunk(json!({}), Some(finish.as_str()));
                    if include_usage {
                        let mut last = chunk(json!({}), None);
                        last["choices"] = json!([]);
                        last["usage"] = usage(u);
                        yield last;
                    }
                }
            }
        }
    };
    let events = events
        .map(|v| Ok::<_, Infallible>(Event::default().data(v.to_string())))
        .chain(futures::stream::once(async {
            Ok(Event::default().data("[DONE]"))
        }));
    Sse::new(events).into_response()
}

async fn moderations(body: Bytes) -> Response {
    let body: Value = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid request body: {e}"),
            );
        }
    };
    match super::moderation::classify(&body["input"]) {
        Ok(results) => axum::Json(json!({
            "id": format!("modr-sim-{}", uuid::Uuid::now_v7().simple()),
            "model": body["model"].as_str().unwrap_or("omni-moderation-latest"),
            "results": results,
        }))
        .into_response(),
        Err(message) => error(StatusCode::BAD_REQUEST, message),
    }
}

/// The answer's message: `content` null when the model only called tools,
/// as OpenAI sends it.
fn message(text: &str, calls: &[ToolCall]) -> Value {
    if calls.is_empty() {
        json!({ "role": "assistant", "content": text })
    } else {
        json!({ "role": "assistant", "content": null, "tool_calls": calls })
    }
}

fn usage(u: crate::inference::Usage) -> Value {
    json!({ "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens })
}

async fn models() -> Response {
    axum::Json(json!({ "object": "list",
        "data": [{ "id": MODEL, "object": "model", "created": 0, "owned_by": "meridian" }] }))
    .into_response()
}

async fn metrics_text(State(sim): State<Arc<Sim>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        format!(
            "{}# TYPE meridian_sim_image_blocks_total counter\n\
             meridian_sim_image_blocks_total{{source=\"base64\"}} {}\n\
             meridian_sim_image_blocks_total{{source=\"url\"}} {}\n",
            sim.metrics.render(),
            sim.images[0].load(Ordering::Relaxed),
            sim.images[1].load(Ordering::Relaxed),
        ),
    )
        .into_response()
}
