//! What the API does to the jobs table: submit (with the idempotency key
//! and the queue depth the limits check), look up and cancel.

use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::record::{JobRow, job};
use super::{Job, JobRequest, Priority};
use crate::error::Error;

/// Inserts a queued job owned by `region` unless the tenant already used
/// `key` here; `None` then.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    region: &str,
    tenant: &str,
    api_key: Option<&str>,
    key: Option<&str>,
    priority: Priority,
    request: &JobRequest,
    traceparent: Option<&str>,
) -> Result<Option<Job>, Error> {
    let row = sqlx::query_as::<_, JobRow>(
        "INSERT INTO jobs (id, tenant, idempotency_key, priority, state, request, queued_since,
                           traceparent, home_region, owner_region, key_id)
         VALUES ($1, $2, $3, $4, 'queued', $5, now(), $6, $7, $7, $8)
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
    .bind(api_key)
    .fetch_optional(&mut **tx)
    .await?;
    job(row)
}

/// Unfinished jobs of the tenant and of the region, as this transaction sees
/// them (its own insert included).
pub(crate) async fn depth(
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

pub(crate) async fn by_key(
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

/// The earliest job of `tenant` under `key` whatever its home: one that
/// another region stored and replicated here before a replay of the same
/// submission arrived.
pub(crate) async fn by_key_any_home(
    pool: &PgPool,
    tenant: &str,
    key: &str,
) -> Result<Option<Job>, Error> {
    let row = sqlx::query_as::<_, JobRow>(
        "SELECT *, now() AS now FROM jobs
         WHERE tenant = $1 AND idempotency_key = $2
         ORDER BY created_at, id LIMIT 1",
    )
    .bind(tenant)
    .bind(key)
    .fetch_optional(pool)
    .await?;
    job(row)
}

pub(crate) async fn get(pool: &PgPool, tenant: &str, id: Uuid) -> Result<Option<Job>, Error> {
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
pub(crate) async fn cancel(pool: &PgPool, tenant: &str, id: Uuid) -> Result<Option<Job>, Error> {
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
