//! OpenAI-compatible HTTP routes.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde_json::{Map, Value};

use super::body::JsonBody;
use super::charge::{self, Charge};
use super::infer::{RequestFacts, durability_header, error_event, model_header};
use super::openai::{
    ChatCompletion, ChatCompletionBody, ChatCompletionChunk, ChunkChoice, Delta, ModelEntry,
    ModelList, StreamOptions, UsageBody,
};
use super::{AppState, Tenant};
use crate::answer::Streamed;
use crate::cache::RESULT_HEADER;
use crate::error::Error;
use crate::inference::Chunk;
use crate::slow_reader::cut_after;

pub(super) fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(retrieve_model))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

pub(super) fn completion_id() -> String {
    format!("chatcmpl-{}", uuid::Uuid::now_v7().simple())
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    facts: RequestFacts,
    JsonBody(body): JsonBody,
) -> Response {
    match chat(state, &tenant, facts, &body).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    }
}

async fn chat(
    state: Arc<AppState>,
    tenant: &Tenant,
    facts: RequestFacts,
    body: &[u8],
) -> Result<Response, Error> {
    let body = ChatCompletionBody::parse(body)?;
    let stream = body.stream();
    let include_usage = StreamOptions::include_usage(body.stream_options.as_ref());
    let ask = facts.ask(
        &state,
        tenant,
        body.has_tools(),
        body.conversation_id.as_deref(),
    )?;
    let mut req = body.into_request()?;
    let id = completion_id();
    let created = chrono::Utc::now().timestamp();
    if stream {
        let streamed = state.pipeline.answer_stream(&mut req, ask).await?;
        let charge = Charge::of(&req);
        let headers = (
            model_header(&req.model, streamed.fallback.as_ref()),
            [(RESULT_HEADER, streamed.outcome.header())],
            durability_header(streamed.durability),
            charge.head_headers(streamed.outcome.is_hit()),
        );
        let body = sse(
            id,
            created,
            req.model,
            include_usage,
            streamed,
            charge.clone(),
        );
        let body = Sse::new(cut_after(
            body,
            state.stream_write_timeout,
            "chat completion stream",
            None,
        ))
        .keep_alive(KeepAlive::default());
        let mut response = (headers, body).into_response();
        charge.trail(&mut response);
        return Ok(response);
    }
    let done = state.pipeline.answer(&mut req, ask).await?;
    let usage = done.answer.usage();
    let answer = &done.answer;
    let body = ChatCompletion::new(
        &id,
        created,
        &req.model,
        &answer.text,
        answer.finish,
        usage,
        &answer.extras,
    );
    let total = charge::used(usage, done.outcome);
    Ok((
        model_header(&req.model, answer.fallback.as_ref()),
        [
            (meridian_proto::header::USAGE_TOKENS, total.to_string()),
            (RESULT_HEADER, done.outcome.header().to_string()),
        ],
        durability_header(done.durability),
        axum::Json(body),
    )
        .into_response())
}

/// Streams chunks as OpenAI server-sent events: a first chunk with the role,
/// one per token, a last one with the finish reason, the usage chunk when asked
/// for, then `[DONE]`.
fn sse(
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
    streamed: Streamed,
    charge: Charge,
) -> impl futures::Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let Streamed {
        chunks,
        outcome,
        record,
        permit,
        ..
    } = streamed;
    let event = move |choices: Vec<ChunkChoice<'_>>,
                      usage: Option<UsageBody>,
                      fields: &Map<String, Value>| {
        let chunk = ChatCompletionChunk {
            id: &id,
            object: "chat.completion.chunk",
            created,
            model: &model,
            choices,
            usage,
            fields,
        };
        Event::default().json_data(chunk).expect("chunks serialize")
    };
    let no_fields = Map::new();
    let first = event(
        vec![ChunkChoice {
            index: 0,
            delta: Delta {
                role: Some("assistant"),
                content: Some(""),
                ..Delta::default()
            },
            finish_reason: None,
            logprobs: None,
        }],
        None,
        &no_fields,
    );
    let body = async_stream::stream! {
        // Admitted for as long as the stream runs.
        let _permit = permit;
        yield Ok::<_, Infallible>(first);
        let mut chunks = chunks;
        let mut ttft = None;
        while let Some(chunk) = chunks.next().await {
            match chunk {
                Err(e) => {
                    // Headers are gone: the error travels as the last event.
                    record.failed(&e);
                    yield Ok(error_event(&e));
                    return;
                }
                Ok(Chunk::Delta(piece)) => {
                    ttft.get_or_insert_with(|| record.elapsed());
                    yield Ok(event(vec![ChunkChoice {
                        index: 0,
                        delta: Delta::of(&piece),
                        finish_reason: None,
                        logprobs: piece.logprobs.as_ref(),
                    }], None, &no_fields));
                }
                Ok(Chunk::Done { finish, usage, meta }) => {
                    record.completed(usage, ttft.unwrap_or_else(|| record.elapsed()), outcome.label());
                    charge.settle(usage, outcome);
                    yield Ok(event(vec![ChunkChoice {
                        index: 0,
                        delta: Delta::default(),
                        finish_reason: Some(finish.as_str()),
                        logprobs: None,
                    }], None, &meta.fields));
                    if include_usage {
                        yield Ok(event(vec![], Some(UsageBody::with_details(usage, &meta)), &meta.fields));
                    }
                }
            }
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    body
}

/// `GET /readyz`: 200 while the node takes requests, 503 once it shuts
/// down. A store that is down, or a model without a healthy backend, does
/// not make the node unready (what does not need it is still served); the
/// body says which parts can serve: each store, each model's backends and
/// the embedding model, as `Admin.RegionStatus` does for gateways.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let ready = !state.shutdown.is_cancelled();
    let stores: serde_json::Map<String, serde_json::Value> = crate::store::Store::ALL
        .into_iter()
        .map(|s| {
            let up = if state.stores.is_up(s) { "up" } else { "down" };
            (s.name().to_string(), serde_json::Value::from(up))
        })
        .collect();
    let status = if ready {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    let models: serde_json::Map<String, serde_json::Value> = state
        .inference
        .models()
        .filter(|m| !m.alias)
        .map(|m| {
            let backends = serde_json::json!({
                "healthy_backends": m.healthy_backends,
                "total_backends": m.total_backends,
                "serving": m.healthy_backends > 0,
            });
            (m.id, backends)
        })
        .collect();
    let body = serde_json::json!({
        "ready": ready,
        "region": state.region,
        "draining": state.status.draining(),
        "stores": stores,
        "unavailable_stores": state.stores.down(),
        "models": models,
        // Loaded before the node serves, or off (`[embeddings]` absent).
        "embeddings": if state.embedder.is_some() { "up" } else { "off" },
    });
    (status, axum::Json(body)).into_response()
}

async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(ModelList {
        object: "list",
        data: served_models(&state),
    })
    .into_response()
}

/// `GET /v1/models/{model}` (the SDKs' `models.retrieve`): one entry of the
/// list, an alias included, or 404 `model_not_found`.
async fn retrieve_model(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(model): axum::extract::Path<String>,
) -> Result<Response, Error> {
    served_models(&state)
        .into_iter()
        .find(|m| m.id == model)
        .map(|m| axum::Json(m).into_response())
        .ok_or(Error::ModelNotFound(model))
}

fn served_models(state: &AppState) -> Vec<ModelEntry> {
    let mut data: Vec<_> = state
        .inference
        .models()
        .map(|m| ModelEntry {
            id: m.id,
            object: "model",
            created: 0,
            owned_by: "meridian",
        })
        .collect();
    // The built-in embedding model lives beside the model table, not in it.
    if state.embedder.is_some() {
        data.push(ModelEntry {
            id: crate::inference::EMBEDDING_MODEL_ID.to_string(),
            object: "model",
            created: 0,
            owned_by: "meridian",
        });
    }
    data
}
