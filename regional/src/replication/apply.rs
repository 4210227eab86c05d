//! Applying a batch of a peer's changes: one transaction holds the rows, the
//! clock update and the new watermark, so a crash at any point leaves either
//! all of the batch or none of it, and the next Pull starts right after the
//! last change applied.

use std::time::Duration;

use meridian_proto::v1::{Change, ChangeOp};
use sqlx::{PgPool, Postgres, Transaction};

use super::hlc::{Hlc, check_drift, now_ms};
use super::tables;
use crate::error::Error;

/// What applying a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Changes written (an upsert or delete that was newer than the row here,
    /// or an append: its rows are merged, whichever of them were here).
    pub applied: u64,
    /// Changes that lost to a row (or tombstone) with a higher
    /// (hlc, origin_region): received, nothing to write.
    pub superseded: u64,
    /// Changes at or below the watermark already, or of this region's own
    /// origin: not looked at again.
    pub skipped: u64,
    /// The peer's last applied sequence after the batch.
    pub watermark: u64,
}

/// Applies `changes` (in sequence order) from `peer`'s log to this region's
/// database, last writer winning by (hlc, origin_region), and records the
/// new watermark in the same transaction. Applying a batch again is a no-op.
///
/// Public so that tests and tools can replay batches; the node's pullers
/// call [`apply_batch_through`] for every batch they receive.
pub async fn apply_batch(
    pool: &PgPool,
    local_region: &str,
    peer: &str,
    changes: &[Change],
    max_drift: Duration,
) -> Result<Applied, Error> {
    apply_batch_through(pool, local_region, peer, changes, 0, max_drift).await
}

/// [`apply_batch`], with the watermark moved to at least `through` (the
/// batch's `through_sequence`: the peer sent every change up to it that
/// this region is to receive), in the same transaction. With no changes,
/// only moves the watermark.
pub async fn apply_batch_through(
    pool: &PgPool,
    local_region: &str,
    peer: &str,
    changes: &[Change],
    through: u64,
    max_drift: Duration,
) -> Result<Applied, Error> {
    if changes.is_empty() {
        return advance(pool, peer, through).await;
    }
    // Before anything is written: a refused clock must hold the watermark
    // back, so the batch is fetched again once the clocks agree.
    let now = now_ms();
    let mut max_hlc = 0;
    for c in changes {
        check_drift(Hlc::from_u64(c.hlc), now, max_drift)
            .map_err(|e| Error::ClockDrift(format!("change {} from {peer}: {e}", c.sequence)))?;
        max_hlc = max_hlc.max(c.hlc);
    }
    let mut tx = pool.begin().await?;
    // The clock's lock before any row, in the order local writers take them
    // (see `replication_lock_clock` in 0005_replication.sql); the other
    // order deadlocks against a local write to the same row.
    sqlx::query("SELECT 1 FROM region_identity FOR UPDATE")
        .execute(&mut *tx)
        .await?;
    // Rows written here keep their origin's stamp and stay out of this
    // region's own log (the triggers look at this setting).
    sqlx::query("SELECT set_config('meridian.applying', 'on', true)")
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO replication_peers (peer) VALUES ($1) ON CONFLICT (peer) DO NOTHING")
        .bind(peer)
        .execute(&mut *tx)
        .await?;
    let watermark: i64 = sqlx::query_scalar(
        "SELECT applied_sequence FROM replication_peers WHERE peer = $1 FOR UPDATE",
    )
    .bind(peer)
    .fetch_one(&mut *tx)
    .await?;
    let mut out = Applied {
        watermark: u64::try_from(watermark).unwrap_or(0),
        ..Applied::default()
    };
    // The newest clock of the changes received now: the origin's clock grows
    // with its sequence, so every change of it at or below this is here
    // (which the relay of a lost origin starts from, see `relay.rs`).
    let mut received_hlc = 0;
    for c in changes {
        if c.sequence <= out.watermark {
            out.skipped += 1;
            continue;
        }
        out.watermark = c.sequence;
        received_hlc = received_hlc.max(c.hlc);
        if c.origin_region == local_region {
            out.skipped += 1;
            continue;
        }
        if apply_one(&mut tx, c).await? {
            out.applied += 1;
        } else {
            out.superseded += 1;
        }
    }
    // Past the changes left out for this region; never backwards (a batch
    // replayed below the watermark leaves it as it is).
    out.watermark = out.watermark.max(through);
    if out.applied + out.superseded > 0 {
        // Receive event: our clock moves past everything just applied, so
        // a later local write to the same row wins over it.
        sqlx::query(
            "UPDATE region_identity SET hlc = GREATEST(hlc + 1, $1 + 1,
                 (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) << 16)",
        )
        .bind(i64::try_from(max_hlc).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "UPDATE replication_peers
            SET applied_sequence = $2, applied_at = now(),
                applied_changes = applied_changes + $3,
                superseded_changes = superseded_changes + $4,
                applied_hlc = GREATEST(applied_hlc, $5)
          WHERE peer = $1",
    )
    .bind(peer)
    .bind(i64::try_from(out.watermark).unwrap_or(i64::MAX))
    .bind(i64::try_from(out.applied).unwrap_or(i64::MAX))
    .bind(i64::try_from(out.superseded).unwrap_or(i64::MAX))
    .bind(i64::try_from(received_hlc).unwrap_or(i64::MAX))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(out)
}

/// Moves `peer`'s watermark to `through` when that is ahead: nothing of the
/// peer's log up to it is for this region. No clock lock: no row is written
/// but the watermark, whose row lock orders this against a concurrent apply.
async fn advance(pool: &PgPool, peer: &str, through: u64) -> Result<Applied, Error> {
    let watermark: i64 = sqlx::query_scalar(
        "INSERT INTO replication_peers AS p (peer, applied_sequence, applied_at)
         VALUES ($1, $2, now())
         ON CONFLICT (peer) DO UPDATE
             SET applied_sequence = GREATEST(p.applied_sequence, EXCLUDED.applied_sequence),
                 applied_at = CASE WHEN EXCLUDED.applied_sequence > p.applied_sequence
                                   THEN now() ELSE p.applied_at END
         RETURNING applied_sequence",
    )
    .bind(peer)
    .bind(i64::try_from(through).unwrap_or(i64::MAX))
    .fetch_one(pool)
    .await?;
    Ok(Applied {
        watermark: u64::try_from(watermark).unwrap_or(0),
        ..Applied::default()
    })
}

/// Refuses a row whose fencing epoch (a job's `owner_epoch`) is missing,
/// out of range or too far past the row's epoch here: the epoch orders
/// versions before the clock, so one absurdly high would win every later
/// write and fence the job off everywhere.
async fn check_fence(
    tx: &mut Transaction<'_, Postgres>,
    table: &tables::Table,
    fence: &str,
    key_text: &str,
    payload: &serde_json::Value,
) -> Result<(), Error> {
    let epoch = payload.get(fence).and_then(serde_json::Value::as_i64);
    // Names from the constant table list, never from the wire.
    let here: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT {fence} FROM {} WHERE {} = $1::{}",
        table.name, table.key, table.key_type
    )))
    .bind(key_text)
    .fetch_optional(&mut **tx)
    .await?;
    match epoch {
        Some(epoch) => super::trust::check_epoch(key_text, epoch, here.unwrap_or(0)),
        None => Err(Error::Refused {
            reason: super::trust::reason::EPOCH_AHEAD,
            message: format!("{} {key_text} carries no integer {fence}", table.name),
        }),
    }
}

/// Applies one change; false when a newer version is here already.
pub(super) async fn apply_one(
    tx: &mut Transaction<'_, Postgres>,
    c: &Change,
) -> Result<bool, Error> {
    if c.op == ChangeOp::Append as i32 {
        // Append-only rows have no clock and no tombstones: merging them
        // always succeeds, so the change counts as applied.
        super::readings::apply(tx, c).await?;
        return Ok(true);
    }
    let invalid = |m: &str| Error::Replication(format!("change {} ({}): {m}", c.sequence, c.table));
    let (table, sql) = tables::find(&c.table).ok_or_else(|| invalid("not a replicated table"))?;
    let hlc = i64::try_from(c.hlc).map_err(|_| invalid("hlc out of range"))?;
    let origin = c.origin_region.as_str();
    let key_text = std::str::from_utf8(&c.key).map_err(|_| invalid("key is not UTF-8"))?;
    let tombstone: Option<(i64, String)> = sqlx::query_as(
        "SELECT hlc, origin_region FROM replication_tombstones WHERE table_name = $1 AND key = $2",
    )
    .bind(table.name)
    .bind(&c.key)
    .fetch_optional(&mut **tx)
    .await?;
    let newer_than_tombstone = tombstone
        .as_ref()
        .is_none_or(|(h, o)| (*h, o.as_bytes()) < (hlc, origin.as_bytes()));
    match ChangeOp::try_from(c.op) {
        Ok(ChangeOp::Upsert) => {
            if !newer_than_tombstone {
                return Ok(false);
            }
            let payload: serde_json::Value = serde_json::from_slice(&c.payload)
                .map_err(|e| invalid(&format!("payload is not JSON: {e}")))?;
            if payload.get(table.key).and_then(|k| k.as_str()) != Some(key_text) {
                return Err(invalid("payload and key disagree"));
            }
            if let Some(fence) = table.fence {
                check_fence(tx, table, fence, key_text, &payload).await?;
            }
            let written = sqlx::query(sql.upsert.as_str())
                .bind(&payload)
                .bind(hlc)
                .bind(origin)
                .execute(&mut **tx)
                .await?
                .rows_affected();
            if written > 0 && tombstone.is_some() {
                sqlx::query(
                    "DELETE FROM replication_tombstones WHERE table_name = $1 AND key = $2",
                )
                .bind(table.name)
                .bind(&c.key)
                .execute(&mut **tx)
                .await?;
            }
            Ok(written > 0)
        }
        Ok(ChangeOp::Delete) => {
            if !newer_than_tombstone {
                return Ok(false);
            }
            sqlx::query(sql.delete.as_str())
                .bind(key_text)
                .bind(hlc)
                .bind(origin)
                .execute(&mut **tx)
                .await?;
            // Names from the constant table list, never from the wire.
            let row_newer: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT EXISTS (SELECT 1 FROM {} WHERE {} = $1::{})",
                table.name, table.key, table.key_type
            )))
            .bind(key_text)
            .fetch_one(&mut **tx)
            .await?;
            if row_newer {
                // A write after the delete (in clock order) keeps the row.
                return Ok(false);
            }
            sqlx::query(
                "INSERT INTO replication_tombstones (table_name, key, hlc, origin_region)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (table_name, key) DO UPDATE
                     SET hlc = EXCLUDED.hlc, origin_region = EXCLUDED.origin_region,
                         deleted_at = now()",
            )
            .bind(table.name)
            .bind(&c.key)
            .bind(hlc)
            .bind(origin)
            .execute(&mut **tx)
            .await?;
            Ok(true)
        }
        _ => Err(invalid("op must be upsert, delete or append")),
    }
}
