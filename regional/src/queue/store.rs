//! The job record in PostgreSQL. Every state change is one conditional
//! UPDATE, so concurrent workers, duplicate deliveries and cancels race
//! safely: whoever's condition still holds wins, the others change nothing.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::error::Error;
use crate::inference::{ChatRequest, Message};

/// Where a job is in its lifecycle; the strings are the `jobs.state` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    DeadLettered,
    Cancelled,
}

impl JobState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::DeadLettered => "dead_lettered",
            Self::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "dead_lettered" => Self::DeadLettered,
            "cancelled" => Self::Cancelled,
            other => return Err(Error::Unavailable(format!("unknown job state {other:?}"))),
        })
    }

    pub(crate) fn is_terminal(self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }
}

/// The lane a job waits in: interactive jobs are read before batch ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Priority {
    Interactive,
    Batch,
}

impl Priority {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Interactive => "interactive",
            Self::Batch => "batch",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "interactive" => Some(Self::Interactive),
            "batch" => Some(Self::Batch),
            _ => None,
        }
    }
}

/// The generation a job runs, as stored: the checked inference request, so
/// both APIs read back the same thing and idempotent resubmissions compare
/// equal whatever optional fields the client spelled out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct JobRequest {
    pub model: String,
    pub messages: Vec<JobMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct JobMessage {
    pub role: String,
    pub content: String,
}

impl From<ChatRequest> for JobRequest {
    fn from(r: ChatRequest) -> Self {
        Self {
            model: r.model,
            messages: r
                .messages
                .into_iter()
                .map(|m| JobMessage {
                    role: m.role,
                    content: m.content,
                })
                .collect(),
            max_tokens: r.max_tokens,
            seed: r.seed,
            stop: r.stop,
        }
    }
}

impl JobRequest {
    pub(crate) fn to_chat(&self) -> ChatRequest {
        ChatRequest {
            model: self.model.clone(),
            messages: self
                .messages
                .iter()
                .map(|m| Message {
                    role: m.role.clone(),
                    content: m.content.clone(),
                })
                .collect(),
            max_tokens: self.max_tokens,
            seed: self.seed,
            stop: self.stop.clone(),
            temperature: None,
        }
    }
}

/// What a successful attempt produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct JobResult {
    pub completion_id: String,
    /// Unix seconds.
    pub created: i64,
    pub text: String,
    /// `stop` or `length`.
    pub finish: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub time_to_first_token_ms: u32,
    pub latency_ms: u32,
}

/// Why the latest attempt failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct JobError {
    pub reason: String,
    pub message: String,
    pub retryable: bool,
}

/// A job as the APIs show it.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub id: Uuid,
    pub state: JobState,
    pub priority: Priority,
    pub idempotency_key: Option<String>,
    pub request: JobRequest,
    pub result: Option<JobResult>,
    pub attempts: u32,
    pub last_error: Option<JobError>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Time spent queued and running so far, the current stretch included.
    pub queued_ms: u64,
    pub running_ms: u64,
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: Uuid,
    idempotency_key: Option<String>,
    priority: String,
    state: String,
    request: Json<JobRequest>,
    result: Option<Json<JobResult>>,
    last_error: Option<Json<JobError>>,
    attempts: i32,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    queued_since: Option<DateTime<Utc>>,
    queued_ms: i64,
    running_ms: i64,
    /// The database's clock, so durations never mix two clocks.
    now: DateTime<Utc>,
}

impl TryFrom<JobRow> for Job {
    type Error = Error;

    fn try_from(r: JobRow) -> Result<Self, Error> {
        let state = JobState::parse(&r.state)?;
        let since =
            |t: Option<DateTime<Utc>>| t.map_or(0, |t| (r.now - t).num_milliseconds().max(0));
        let queued_extra = if state == JobState::Queued {
            since(r.queued_since)
        } else {
            0
        };
        let running_extra = if state == JobState::Running {
            since(r.started_at)
        } else {
            0
        };
        Ok(Self {
            id: r.id,
            state,
            priority: Priority::parse(&r.priority).unwrap_or(Priority::Batch),
            idempotency_key: r.idempotency_key,
            request: r.request.0,
            result: r.result.map(|j| j.0),
            attempts: u32::try_from(r.attempts).unwrap_or(0),
            last_error: r.last_error.map(|j| j.0),
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            queued_ms: u64::try_from(r.queued_ms + queued_extra).unwrap_or(0),
            running_ms: u64::try_from(r.running_ms + running_extra).unwrap_or(0),
        })
    }
}

fn job(row: Option<JobRow>) -> Result<Option<Job>, Error> {
    row.map(Job::try_from).transpose()
}

/// Milliseconds from `$from` to now, never negative.
macro_rules! ms_since {
    ($from:literal) => {
        concat!(
            "greatest(0, (extract(epoch FROM now() - ",
            $from,
            ") * 1000)::bigint)"
        )
    };
}

/// Takes the region's replication clock before the row a replicated job
/// write changes, the order every replicated write and every apply keeps
/// (`0009_job_failover.sql` says why jobs take it here rather than in a
/// statement trigger). Uncorrelated, so PostgreSQL evaluates it once, before
/// it scans `jobs`.
macro_rules! clock_first {
    () => {
        "(SELECT true FROM region_identity FOR UPDATE)"
    };
}

/// Inserts a queued job owned by `region` unless the tenant already used
/// `key` here; `None` then.
#[allow(clippy::too_many_arguments)]
pub(super) async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    region: &str,
    tenant: &str,
    key: Option<&str>,
    priority: Priority,
    request: &JobRequest,
    traceparent: Option<&str>,
) -> Result<Option<Job>, Error> {
    let row = sqlx::query_as::<_, JobRow>(
        "INSERT INTO jobs (id, tenant, idempotency_key, priority, state, request, queued_since,
                           traceparent, home_region, owner_region)
         VALUES ($1, $2, $3, $4, 'queued', $5, now(), $6, $7, $7)
         ON CONFLICT (tenant, idempotency_key, home_region) DO NOTHING
         RETURNING *, now() AS now",
    )
    .bind(id)
    .bind(tenant)
    .bind(key)
    .bind(priority.as_str())
    .bind(Json(request))
    .bind(traceparent)
    .bind(region)
    .fetch_optional(&mut **tx)
    .await?;
    job(row)
}

/// Unfinished jobs of the tenant and of the region, as this transaction sees
/// them (its own insert included).
pub(super) async fn depth(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &str,
) -> Result<(u64, u64), Error> {
    let (tenant_depth, region_depth): (Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT max(active) FILTER (WHERE scope = $1), max(active) FILTER (WHERE scope = '')
         FROM job_depth WHERE scope IN ($1, '')",
    )
    .bind(tenant)
    .fetch_one(&mut **tx)
    .await?;
    let n = |v: Option<i64>| u64::try_from(v.unwrap_or(0)).unwrap_or(0);
    Ok((n(tenant_depth), n(region_depth)))
}

pub(super) async fn by_key(
    pool: &PgPool,
    region: &str,
    tenant: &str,
    key: &str,
) -> Result<Option<Job>, Error> {
    let row = sqlx::query_as::<_, JobRow>(
        "SELECT *, now() AS now FROM jobs
         WHERE tenant = $1 AND idempotency_key = $2 AND home_region = $3",
    )
    .bind(tenant)
    .bind(key)
    .bind(region)
    .fetch_optional(pool)
    .await?;
    job(row)
}

pub(super) async fn get(pool: &PgPool, tenant: &str, id: Uuid) -> Result<Option<Job>, Error> {
    let row = sqlx::query_as::<_, JobRow>(
        "SELECT *, now() AS now FROM jobs WHERE id = $1 AND tenant = $2",
    )
    .bind(id)
    .bind(tenant)
    .fetch_optional(pool)
    .await?;
    job(row)
}

/// Cancels an unfinished job; `None` when it is finished, absent or another
/// tenant's. A running attempt loses its lease here, so it can no longer
/// record a result even if its node never hears of the cancel.
pub(super) async fn cancel(pool: &PgPool, tenant: &str, id: Uuid) -> Result<Option<Job>, Error> {
    let row = sqlx::query_as::<_, JobRow>(concat!(
        "UPDATE jobs SET state = 'cancelled', finished_at = now(),
           queued_ms = queued_ms + CASE WHEN state = 'queued' THEN ",
        ms_since!("queued_since"),
        " ELSE 0 END,
           running_ms = running_ms + CASE WHEN state = 'running' THEN ",
        ms_since!("started_at"),
        " ELSE 0 END,
           queued_since = NULL, lease_owner = NULL, lease_expires_at = NULL
         WHERE id = $1 AND tenant = $2 AND state IN ('queued', 'running') AND ",
        clock_first!(),
        "
         RETURNING *, now() AS now"
    ))
    .bind(id)
    .bind(tenant)
    .fetch_optional(pool)
    .await?;
    job(row)
}

/// A job an attempt now owns.
pub(super) struct Claim {
    pub tenant: String,
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
pub(super) async fn claim(
    pool: &PgPool,
    region: &str,
    id: Uuid,
    owner: Uuid,
    lease_ms: i64,
) -> Result<Option<Claim>, Error> {
    type Row = (String, Json<JobRequest>, Option<String>, i32, i64, f64);
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
           extract(epoch FROM now() - created_at)::float8"
    ))
    .bind(id)
    .bind(owner)
    .bind(lease_ms)
    .bind(region)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(
        |(tenant, request, traceparent, attempts, epoch, wait)| Claim {
            tenant,
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
pub(super) async fn renew(pool: &PgPool, lease: Lease, lease_ms: i64) -> Result<bool, Error> {
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
pub(super) async fn succeed(
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
pub(super) async fn retry(
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
pub(super) async fn fail(
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

/// Jobs a worker could start now: queued and due, or running on a lapsed
/// lease, of those `region` owns. The sweeper re-enqueues those Redis does
/// not hold.
pub(super) async fn runnable(
    pool: &PgPool,
    region: &str,
    limit: i64,
) -> Result<Vec<(Uuid, Priority)>, Error> {
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, priority FROM jobs
         WHERE owner_region = $2 AND state IN ('queued', 'running')
           AND ((state = 'queued' AND run_after <= now())
             OR (state = 'running' AND lease_expires_at < now()))
         ORDER BY created_at LIMIT $1",
    )
    .bind(limit)
    .bind(region)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, p)| (id, Priority::parse(&p).unwrap_or(Priority::Batch)))
        .collect())
}

/// Queued jobs `region` owns, per lane: (interactive, batch).
pub(super) async fn queued_per_lane(pool: &PgPool, region: &str) -> Result<(i64, i64), Error> {
    let row: (Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE priority = 'interactive'),
                count(*) FILTER (WHERE priority = 'batch')
         FROM jobs WHERE state = 'queued' AND owner_region = $1",
    )
    .bind(region)
    .fetch_one(pool)
    .await?;
    Ok((row.0.unwrap_or(0), row.1.unwrap_or(0)))
}

/// One attempt's hold on a job: the lease id it took and the ownership
/// epoch it took it under. Every change an attempt makes requires both.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lease {
    pub id: Uuid,
    pub owner: Uuid,
    pub epoch: i64,
}

/// Unfinished jobs `peer` owns, as replicated here.
pub(super) async fn unfinished_of(pool: &PgPool, peer: &str) -> Result<Vec<Uuid>, Error> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM jobs WHERE owner_region = $1 AND state IN ('queued', 'running')
         ORDER BY created_at",
    )
    .bind(peer)
    .fetch_all(pool)
    .await?)
}

/// Takes over `ids` from `peer` for `region`: a new epoch, queued at once.
/// A replicated write, so the adoption reaches every region, the old owner
/// included; conditional on `peer` still owning each job, so two nodes of
/// this region adopting at once adopt each job once.
pub(super) async fn adopt(
    pool: &PgPool,
    region: &str,
    peer: &str,
    ids: &[Uuid],
) -> Result<Vec<(Uuid, Priority)>, Error> {
    let rows: Vec<(Uuid, String)> = sqlx::query_as(concat!(
        "UPDATE jobs SET owner_region = $2, owner_epoch = owner_epoch + 1, state = 'queued',
           lease_owner = NULL, lease_expires_at = NULL, run_after = now(),
           queued_since = now()
         WHERE id = ANY($1) AND owner_region = $3 AND state IN ('queued', 'running') AND ",
        clock_first!(),
        "
         RETURNING id, priority"
    ))
    .bind(ids)
    .bind(region)
    .bind(peer)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, p)| (id, Priority::parse(&p).unwrap_or(Priority::Batch)))
        .collect())
}
