//! A worker's transitions of a job: claim it for an attempt, renew the
//! lease, and end the attempt (succeeded, retried, failed or dead-lettered).
//! Every one requires the attempt's lease and ownership epoch.

use sqlx::PgPool;
use sqlx::types::Json;
use uuid::Uuid;

use super::{JobError, JobRequest, JobResult, JobState};
use crate::error::Error;

/// One attempt's hold on a job: the lease id it took and the ownership
/// epoch it took it under. Every change an attempt makes requires both.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lease {
    pub id: Uuid,
    pub owner: Uuid,
    pub epoch: i64,
}

/// A job an attempt now owns.
pub(crate) struct Claim {
    pub tenant: String,
    /// The API key that submitted the job, when the gateway said.
    pub key: Option<String>,
    pub request: JobRequest,
    /// The submitting request's trace context.
    pub traceparent: Option<String>,
    pub attempts: u32,
    /// The ownership epoch the attempt runs under: its every later change
    /// requires it still, so an adoption elsewhere fences the attempt off.
    pub epoch: i64,
    /// Seconds from submission to this start, for the first attempt only.
    pub first_wait_s: Option<f64>,
}

/// Starts an attempt: takes a queued job that is due, or a running one whose
/// lease expired (its worker died), if `region` owns it. `owner`
/// identifies the attempt.
pub(crate) async fn claim(
    pool: &PgPool,
    region: &str,
    id: Uuid,
    owner: Uuid,
    lease_ms: i64,
) -> Result<Option<Claim>, Error> {
    type Row = (
        String,
        Json<JobRequest>,
        Option<String>,
        i32,
        i64,
        f64,
        Option<String>,
    );
    let row: Option<Row> = sqlx::query_as(concat!(
        "UPDATE jobs SET state = 'running', attempts = attempts + 1,
           lease_owner = $2, lease_expires_at = now() + $3::bigint * interval '1 millisecond',
           queued_ms = queued_ms + CASE WHEN state = 'queued' THEN ",
        ms_since!("queued_since"),
        " ELSE 0 END,
           running_ms = running_ms + CASE WHEN state = 'running' THEN ",
        ms_since!("started_at"),
        " ELSE 0 END,
           started_at = now(), queued_since = NULL
         WHERE id = $1 AND owner_region = $4
           AND ((state = 'queued' AND run_after <= now())
             OR (state = 'running' AND lease_expires_at < now()))
         RETURNING tenant, request, traceparent, attempts, owner_epoch,
           extract(epoch FROM now() - created_at)::float8, key_id"
    ))
    .bind(id)
    .bind(owner)
    .bind(lease_ms)
    .bind(region)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(
        |(tenant, request, traceparent, attempts, epoch, wait, key)| Claim {
            tenant,
            key,
            request: request.0,
            traceparent,
            attempts: u32::try_from(attempts).unwrap_or(0),
            epoch,
            first_wait_s: (attempts == 1).then_some(wait),
        },
    ))
}

/// Extends the attempt's lease; false when the attempt lost the job
/// (cancelled, or reclaimed after the lease lapsed).
pub(crate) async fn renew(pool: &PgPool, lease: Lease, lease_ms: i64) -> Result<bool, Error> {
    let done = sqlx::query(
        "UPDATE jobs SET lease_expires_at = now() + $3::bigint * interval '1 millisecond'
         WHERE id = $1 AND state = 'running' AND lease_owner = $2 AND owner_epoch = $4",
    )
    .bind(lease.id)
    .bind(lease.owner)
    .bind(lease_ms)
    .bind(lease.epoch)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records the result: the only way to `succeeded`, and only for the attempt
/// holding the lease, so a job completes once however often it is delivered.
pub(crate) async fn succeed(
    pool: &PgPool,
    lease: Lease,
    result: &JobResult,
) -> Result<bool, Error> {
    let done = sqlx::query(concat!(
        "UPDATE jobs SET state = 'succeeded', result = $3, completions = completions + 1,
           finished_at = now(), running_ms = running_ms + ",
        ms_since!("started_at"),
        ", lease_owner = NULL, lease_expires_at = NULL
         WHERE id = $1 AND state = 'running' AND lease_owner = $2 AND owner_epoch = $4 AND ",
        clock_first!()
    ))
    .bind(lease.id)
    .bind(lease.owner)
    .bind(Json(result))
    .bind(lease.epoch)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Puts the job back in the queue after a retryable failure; it may start
/// again once `backoff_ms` has passed.
pub(crate) async fn retry(
    pool: &PgPool,
    lease: Lease,
    error: &JobError,
    backoff_ms: i64,
) -> Result<bool, Error> {
    let done = sqlx::query(concat!(
        "UPDATE jobs SET state = 'queued', last_error = $3,
           run_after = now() + $4::bigint * interval '1 millisecond', queued_since = now(),
           running_ms = running_ms + ",
        ms_since!("started_at"),
        ", lease_owner = NULL, lease_expires_at = NULL
         WHERE id = $1 AND state = 'running' AND lease_owner = $2 AND owner_epoch = $5"
    ))
    .bind(lease.id)
    .bind(lease.owner)
    .bind(Json(error))
    .bind(backoff_ms)
    .bind(lease.epoch)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Ends the job as `failed` or `dead_lettered` with the attempt's error.
pub(crate) async fn fail(
    pool: &PgPool,
    lease: Lease,
    state: JobState,
    error: &JobError,
) -> Result<bool, Error> {
    let done = sqlx::query(concat!(
        "UPDATE jobs SET state = $3, last_error = $4, finished_at = now(),
           running_ms = running_ms + ",
        ms_since!("started_at"),
        ", lease_owner = NULL, lease_expires_at = NULL
         WHERE id = $1 AND state = 'running' AND lease_owner = $2 AND owner_epoch = $5 AND ",
        clock_first!()
    ))
    .bind(lease.id)
    .bind(lease.owner)
    .bind(state.as_str())
    .bind(Json(error))
    .bind(lease.epoch)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}
