//! Taking over a lost peer's unfinished jobs: which they are, and the
//! replicated write that moves them to this region under a new epoch.

use sqlx::PgPool;
use uuid::Uuid;

use super::Priority;
use crate::error::Error;

/// Unfinished jobs `peer` owns, as replicated here.
pub(crate) async fn unfinished_of(pool: &PgPool, peer: &str) -> Result<Vec<Uuid>, Error> {
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
pub(crate) async fn adopt(
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
