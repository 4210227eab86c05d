//! What the sweeper reads: the jobs a worker could start now, and the
//! queue's depth per lane.

use sqlx::PgPool;
use uuid::Uuid;

use super::Priority;
use crate::error::Error;

/// Jobs a worker could start now: queued and due, or running on a lapsed
/// lease, of those `region` owns. The sweeper re-enqueues those Redis does
/// not hold.
pub(crate) async fn runnable(
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
pub(crate) async fn queued_per_lane(pool: &PgPool, region: &str) -> Result<(i64, i64), Error> {
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
