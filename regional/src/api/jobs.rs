//! The jobs API: `POST /v1/jobs`, `GET`/`DELETE /v1/jobs/{id}`,
//! `GET /v1/jobs/{id}/events` (server-sent events), and the
//! `meridian.v1.Jobs` gRPC service (in `jobs/grpc.rs`).

mod grpc;

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::body::JsonBody;
use super::charge::Charge;
use super::openai::{ChatCompletion, ChatCompletionBody};
use super::{AppState, Tenant};
use crate::error::Error;
use crate::inference::{Finish, Usage};
use crate::queue::{Job, JobError, JobRequest, Priority, Submission};
use crate::replication::{DURABILITY_HEADER, Durability};
use crate::slow_reader::cut_after;

pub(super) use self::grpc::service as grpc;

pub(super) fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/jobs", axum::routing::post(submit))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel))
        .route("/v1/jobs/{id}/events", get(events))
        .with_state(state)
}

/// The job fields of a `POST /v1/jobs` body, beside the chat request's.
#[derive(Deserialize)]
struct JobOptions {
    #[serde(default)]
    priority: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

const IDEMPOTENCY_HEADER: &str = "idempotency-key";

fn submission(
    state: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Submission, Charge), Error> {
    let mut chat = ChatCompletionBody::parse(body)?;
    // The job's own fields, read below: not for the model.
    chat.take_field("priority");
    chat.take_field("idempotency_key");
    if chat.stream() {
        return Err(Error::invalid(
            "`stream` is not supported for jobs: follow /v1/jobs/{id}/events instead",
            Some("stream"),
        ));
    }
    let options: JobOptions = serde_json::from_slice(body)
        .map_err(|e| Error::invalid(format!("invalid request body: {e}"), None))?;
    let request = chat.into_request()?;
    check_model(state, &request.model)?;
    state.pipeline.check_size(&request)?;
    let priority = match options.priority.as_deref() {
        None => Priority::Batch,
        Some(p) => Priority::parse(p).ok_or_else(|| {
            Error::invalid(
                "`priority` must be \"interactive\" or \"batch\"",
                Some("priority"),
            )
        })?,
    };
    let header_key = match headers.get(IDEMPOTENCY_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| Error::invalid("`Idempotency-Key` must be ASCII", None))?
                .to_string(),
        ),
    };
    let idempotency_key = match (options.idempotency_key, header_key) {
        (Some(a), Some(b)) if a != b => {
            return Err(Error::invalid(
                "`idempotency_key` and the `Idempotency-Key` header differ",
                Some("idempotency_key"),
            ));
        }
        (a, b) => a.or(b),
    };
    let charge = Charge::of(&request);
    Ok((
        Submission {
            request: request.into(),
            priority,
            idempotency_key,
        },
        charge,
    ))
}

/// Refused at submission, not after a trip through the queue.
pub(super) fn check_model(state: &AppState, model: &str) -> Result<(), Error> {
    if state.inference.models().any(|m| m.id == model) {
        Ok(())
    } else {
        Err(Error::ModelNotFound(model.to_string()))
    }
}

async fn submit(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, Error> {
    let (submission, charge) = submission(&state, &headers, &body)?;
    let requested = Durability::requested(headers.get(DURABILITY_HEADER).map(|v| v.as_bytes()))?;
    let durability = state.replication.durability(tenant.as_str(), requested)?;
    tenant.may_use(&submission.request.model)?;
    state.spend.check(tenant.as_str())?;
    let submitted = state.jobs.submit(&tenant, submission).await?;
    if durability == Durability::Sync {
        state.replication.wait_logged(submitted.logged_as).await?;
    }
    let job = submitted.job;
    let head = charge.head_headers(submitted.logged_as.is_none());
    let location = format!("/v1/jobs/{}", job.id);
    Ok((
        StatusCode::ACCEPTED,
        [
            (header::LOCATION, location),
            (
                header::HeaderName::from_static(DURABILITY_HEADER),
                durability.header().to_string(),
            ),
        ],
        head,
        axum::Json(JobBody::new(&job, &state.region)),
    )
        .into_response())
}

async fn get_job(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    let job = state.jobs.get(&tenant, &id).await?;
    Ok(axum::Json(JobBody::new(&job, &state.region)).into_response())
}

async fn cancel(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    let job = state.jobs.cancel(&tenant, &id).await?;
    Ok(axum::Json(JobBody::new(&job, &state.region)).into_response())
}

/// One `job` event per state change, the current state first; the stream
/// ends after a terminal state.
async fn events(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    let region = state.region.clone();
    let changes = state.jobs.clone().watch(tenant, &id).await?;
    let events = changes.map(move |change| {
        let event = match change {
            Ok(change) => Event::default()
                .event("job")
                .json_data(JobBody::new(&change.job, &region))
                .expect("jobs serialize"),
            Err(e) => Event::default().event("error").data(e.to_string()),
        };
        Ok::<_, Infallible>(event)
    });
    let events = cut_after(events, state.stream_write_timeout, "job events", None);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// A job on the HTTP API. Times are Unix seconds, as in OpenAI's API.
#[derive(Serialize)]
struct JobBody<'a> {
    id: String,
    object: &'static str,
    state: &'static str,
    priority: &'static str,
    idempotency_key: Option<&'a str>,
    request: &'a JobRequest,
    /// The answer as a `chat.completion` object, once succeeded.
    result: Option<ChatCompletion<'a>>,
    attempts: u32,
    last_error: Option<&'a JobError>,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    queued_ms: u64,
    running_ms: u64,
    region: &'a str,
}

impl<'a> JobBody<'a> {
    fn new(job: &'a Job, region: &'a str) -> Self {
        let result = job.result.as_ref().map(|r| {
            ChatCompletion::new(
                &r.completion_id,
                r.created,
                &job.request.model,
                &r.text,
                Finish::parse(&r.finish),
                Usage {
                    prompt_tokens: r.prompt_tokens,
                    completion_tokens: r.completion_tokens,
                },
                &r.extras,
            )
        });
        Self {
            id: job.id.to_string(),
            object: "job",
            state: job.state.as_str(),
            priority: job.priority.as_str(),
            idempotency_key: job.idempotency_key.as_deref(),
            request: &job.request,
            result,
            attempts: job.attempts,
            last_error: job.last_error.as_ref(),
            created_at: job.created_at.timestamp(),
            started_at: job.started_at.map(|t| t.timestamp()),
            finished_at: job.finished_at.map(|t| t.timestamp()),
            queued_ms: job.queued_ms,
            running_ms: job.running_ms,
            region,
        }
    }
}
