//! Stored responses of the Responses API: written once by the region that
//! answered, replicated to the tenant's regions (`0024_responses.sql`), and
//! read back as a whole (`GET /v1/responses/{id}`), as the input items of
//! one request, or as the chain a `previous_response_id` continues.
//!
//! The chain is always rebuilt from these rows, never taken from a client,
//! and a response of another tenant is as absent as one never stored.

pub(crate) mod items;

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::Error;
use crate::replication::logged_sequence;

/// A response as stored: its object (without input) and the input items
/// its request added.
pub(crate) struct NewResponse<'a> {
    pub id: &'a str,
    pub tenant: &'a str,
    pub model: &'a str,
    pub status: &'a str,
    pub previous: Option<&'a str>,
    pub body: &'a Value,
    pub input_items: &'a Value,
    /// A background response's job.
    pub job: Option<Uuid>,
}

/// A stored response: its object as last settled, and a background
/// response's job.
pub(crate) struct Stored {
    pub body: Value,
    pub job: Option<Uuid>,
}

/// One response of a chain: what it added to the context, oldest first
/// when returned by [`chain`].
pub(crate) struct Link {
    pub input_items: Vec<Value>,
    pub output: Vec<Value>,
}

/// What a walk back from a `previous_response_id` found.
pub(crate) struct Chain {
    /// Oldest first.
    pub links: Vec<Link>,
    /// Whether older responses were left out at the depth limit.
    pub cut: bool,
}

fn unknown(id: &str, param: Option<&'static str>) -> Error {
    Error::UnknownResponse {
        id: id.to_string(),
        param,
    }
}

/// Stores a finished response. Returns the last sequence of the
/// replication log it wrote, for a writer that waits for a peer's apply.
pub(crate) async fn insert(pool: &PgPool, r: NewResponse<'_>) -> Result<u64, Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO responses
             (id, tenant_id, model, status, previous_response_id, body, input_items, job_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(r.id)
    .bind(r.tenant)
    .bind(r.model)
    .bind(r.status)
    .bind(r.previous)
    .bind(r.body)
    .bind(r.input_items)
    .bind(r.job)
    .execute(&mut *tx)
    .await?;
    let sequence = logged_sequence(&mut tx).await?;
    tx.commit().await?;
    Ok(sequence)
}

/// The response `id`, as returned when it was created or last settled.
pub(crate) async fn get(pool: &PgPool, tenant: &str, id: &str) -> Result<Stored, Error> {
    sqlx::query_as(
        "SELECT body, job_id FROM responses
          WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL",
    )
    .bind(id)
    .bind(tenant)
    .fetch_optional(pool)
    .await?
    .map(|(body, job)| Stored { body, job })
    .ok_or_else(|| unknown(id, None))
}

/// Settles a background response whose job has ended: its final object
/// replaces the queued one. Any region may settle it, from the replicated
/// job, and all write the same object (its item ids come from the job), so
/// which write wins does not matter.
pub(crate) async fn settle(
    pool: &PgPool,
    tenant: &str,
    id: &str,
    body: &Value,
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE responses SET body = $3, status = $4, updated_at = now()
          WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL
            AND status IN ('queued', 'in_progress')",
    )
    .bind(id)
    .bind(tenant)
    .bind(body)
    .bind(body["status"].as_str().unwrap_or("completed"))
    .execute(pool)
    .await?;
    Ok(())
}

/// Blanks `id`: its content is erased here and, through replication, in
/// every region that holds it; the id stays taken.
pub(crate) async fn delete(pool: &PgPool, tenant: &str, id: &str) -> Result<u64, Error> {
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "UPDATE responses
            SET body = '{}', input_items = '[]', deleted_at = now(), updated_at = now()
          WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL",
    )
    .bind(id)
    .bind(tenant)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(unknown(id, None));
    }
    let sequence = logged_sequence(&mut tx).await?;
    tx.commit().await?;
    Ok(sequence)
}

/// The chain that ends at `last`, oldest first, at most `depth` responses
/// long (`cut` says whether older ones were left out). Every response of
/// it must be stored here for `tenant` and not deleted: a response missing
/// from the middle (deleted, or not yet replicated) fails the request
/// rather than leave a hole in the model's context.
pub(crate) async fn chain(
    pool: &PgPool,
    tenant: &str,
    last: &str,
    depth: usize,
) -> Result<Chain, Error> {
    let depth = i32::try_from(depth.max(1)).unwrap_or(i32::MAX);
    // `deleted` rows are walked through so that the error can name them.
    let rows: Vec<(String, Option<String>, bool, Value, Value)> = sqlx::query_as(
        "WITH RECURSIVE chain (id, previous_response_id, deleted, input_items, output, depth) AS (
             SELECT id, previous_response_id, deleted_at IS NOT NULL, input_items,
                    COALESCE(body -> 'output', '[]'), 1
               FROM responses WHERE id = $1 AND tenant_id = $2
             UNION ALL
             SELECT r.id, r.previous_response_id, r.deleted_at IS NOT NULL, r.input_items,
                    COALESCE(r.body -> 'output', '[]'), c.depth + 1
               FROM responses r JOIN chain c ON r.id = c.previous_response_id
              WHERE r.tenant_id = $2 AND c.depth < $3 AND NOT c.deleted
         )
         SELECT id, previous_response_id, deleted, input_items, output
           FROM chain ORDER BY depth DESC",
    )
    .bind(last)
    .bind(tenant)
    .bind(depth)
    .fetch_all(pool)
    .await?;
    let Some(newest) = rows.last() else {
        return Err(unknown(last, Some("previous_response_id")));
    };
    if newest.2 {
        return Err(unknown(last, Some("previous_response_id")));
    }
    if let Some(deleted) = rows.iter().find(|r| r.2) {
        return Err(Error::invalid(
            format!(
                "the chain of `previous_response_id` {last:?} goes through response {:?}, \
                 which was deleted",
                deleted.0
            ),
            Some("previous_response_id"),
        ));
    }
    let oldest = &rows[0];
    let mut cut = false;
    if let Some(before) = &oldest.1 {
        if rows.len() < depth as usize {
            return Err(Error::invalid(
                format!(
                    "the chain of `previous_response_id` {last:?} goes through response \
                     {before:?}, which is not stored in this region (deleted, or not yet \
                     replicated here)"
                ),
                Some("previous_response_id"),
            ));
        }
        cut = true;
    }
    let links = rows
        .into_iter()
        .map(|(_, _, _, input_items, output)| Link {
            input_items: array(input_items),
            output: array(output),
        })
        .collect();
    Ok(Chain { links, cut })
}

fn array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items,
        _ => Vec::new(),
    }
}

/// How often expired responses are looked for.
const EXPIRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Erases, every [`EXPIRY_INTERVAL`], the responses created more than
/// `days` days ago, until `shutdown`.
pub(crate) async fn expire_periodically(
    pool: PgPool,
    days: u64,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut ticker = tokio::time::interval(EXPIRY_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if let Err(e) = expire(&pool, days).await {
            tracing::warn!(error = %e, "cannot erase expired responses");
        }
    }
}

/// Erases the responses created more than `days` days ago, blanked ones
/// included. Each region erases its own copy (`meridian.applying` keeps
/// the deletes out of the replication log): every region holds the same
/// `created_at`, so none needs another's word, and a delete never crosses
/// regions. The rows erased.
async fn expire(pool: &PgPool, days: u64) -> Result<u64, Error> {
    let days = i32::try_from(days).unwrap_or(i32::MAX);
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL meridian.applying = on")
        .execute(&mut *tx)
        .await?;
    let erased =
        sqlx::query("DELETE FROM responses WHERE created_at < now() - make_interval(days => $1)")
            .bind(days)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    tx.commit().await?;
    if erased > 0 {
        tracing::info!(erased, "expired responses erased");
    }
    Ok(erased)
}
