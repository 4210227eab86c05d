//! Background responses (`background: true`): the request runs as a
//! durable job (`crate::queue`), so it survives its client's disconnect
//! and, like any job, its region's loss: another region adopts and
//! finishes it. The stored response holds the job's id; whoever reads it
//! while it is pending (a retrieve, a cancel, the next turn's chain) looks
//! at the job and, once the job has ended, settles the response into its
//! final object in storage.

use serde_json::Value;

use super::object::{State, output_items};
use crate::api::{AppState, Tenant};
use crate::cache::Answer;
use crate::error::Error;
use crate::inference::Finish;
use crate::queue::{Job, JobState};
use crate::responses as stored;

/// Whether a stored status is one a job may still change.
pub(super) fn pending(body: &Value) -> bool {
    matches!(body["status"].as_str(), Some("queued" | "in_progress"))
}

/// The response `id` as it stands now: a pending background response is
/// read from its job, and settled in storage once the job has ended.
pub(super) async fn current(state: &AppState, tenant: &Tenant, id: &str) -> Result<Value, Error> {
    let found = stored::get(&state.pool, tenant.as_str(), id).await?;
    let (Some(job_id), true) = (found.job, pending(&found.body)) else {
        return Ok(found.body);
    };
    let job = state.jobs.get(tenant, &job_id.to_string()).await?;
    let body = from_job(found.body, &job);
    if job.state.is_terminal() {
        stored::settle(&state.pool, tenant.as_str(), id, &body).await?;
    }
    Ok(body)
}

/// Cancels a pending background response's job; answers the response as
/// it stands after (a response that ended before keeps its end).
pub(super) async fn cancel(state: &AppState, tenant: &Tenant, id: &str) -> Result<Value, Error> {
    let found = stored::get(&state.pool, tenant.as_str(), id).await?;
    let Some(job_id) = found.job else {
        return Err(Error::invalid(
            "only a response created with `background: true` can be cancelled",
            None,
        ));
    };
    stop(state, tenant, job_id, &found.body).await?;
    current(state, tenant, id).await
}

/// Cancels the job of a response still pending (`body`); a job that ended
/// meanwhile keeps its end.
pub(super) async fn stop(
    state: &AppState,
    tenant: &Tenant,
    job: uuid::Uuid,
    body: &Value,
) -> Result<(), Error> {
    if !pending(body) {
        return Ok(());
    }
    match state.jobs.cancel(tenant, &job.to_string()).await {
        Ok(_) | Err(Error::JobAlreadyFinished { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `body` with the state of its job.
fn from_job(mut body: Value, job: &Job) -> Value {
    match job.state {
        JobState::Queued => State::pending("queued").apply(&mut body),
        JobState::Running => State::pending("in_progress").apply(&mut body),
        JobState::Cancelled => State::pending("cancelled").apply(&mut body),
        JobState::Failed | JobState::DeadLettered => {
            let message = job
                .last_error
                .as_ref()
                .map_or("the job failed", |e| e.message.as_str());
            let error = Error::Unavailable(message.to_string());
            State::failed(&[], &error).apply(&mut body);
        }
        JobState::Succeeded => {
            let Some(result) = &job.result else {
                State::pending("in_progress").apply(&mut body);
                return body;
            };
            let answer = Answer {
                text: result.text.clone(),
                finish: Finish::parse(&result.finish),
                prompt_tokens: result.prompt_tokens,
                completion_tokens: result.completion_tokens,
                extras: result.extras.clone(),
                fallback: None,
            };
            let logprobs = job.request.extra.get("logprobs") == Some(&Value::Bool(true));
            // Ids from the job, so every region settles the same object.
            let mut n = 0;
            let mut ids = |prefix: &'static str| {
                n += 1;
                format!("{prefix}_{}{n:02}", job.id.simple())
            };
            let output = output_items(&answer, logprobs, &mut ids);
            State::finished(&output, answer.finish, answer.usage(), &answer.extras.meta)
                .apply(&mut body);
        }
    }
    body
}
