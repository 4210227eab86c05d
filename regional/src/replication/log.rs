//! This region's change log (`replication_outbox`): reading it for Pull,
//! learning of new commits, and trimming what every peer has acknowledged.

use std::time::Duration;

use meridian_proto::v1::{Change, ChangeOp};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use crate::config::ReplicationConfig;
use crate::error::Error;

/// The channel the outbox trigger notifies on every commit.
const CHANNEL: &str = "meridian_replication";

type Row = (
    i64,
    String,
    Vec<u8>,
    String,
    Option<serde_json::Value>,
    i64,
    String,
    chrono::DateTime<chrono::Utc>,
    i64,
);

/// 'append' changes (up to [`super::READINGS_PER_CHANGE`] readings each)
/// in one batch at most, whatever the batch size: a Pull message and the
/// applier's transaction (which holds the peer's clock) stay a few MB.
const MAX_APPENDS_PER_BATCH: i64 = 8;

/// What a change costs on the wire beside its key and payload (table,
/// clock, origin, time, protobuf tags), counted against a batch's bytes.
pub(super) const CHANGE_OVERHEAD_BYTES: i64 = 128;

/// What one read of the log found for a caller.
#[derive(Debug)]
pub(crate) struct Read {
    /// The changes for the caller, in sequence order.
    pub changes: Vec<Change>,
    /// Every change up to here the caller is to receive is in `changes` (or
    /// was before `after`): the caller's next position.
    pub through: u64,
    /// The log's high watermark.
    pub high: u64,
    /// This region's clock as of `high` (see `ChangeBatch.clock`).
    pub clock: u64,
    /// Whether more changes for the caller may follow right away (the batch
    /// was cut short by its limits).
    pub full: bool,
}

/// The peer a read is for, and so which changes it receives.
#[derive(Debug)]
pub(crate) struct Audience {
    pub peer: String,
    /// Whether telemetry readings go to it (`replication.telemetry_peers`).
    pub with_readings: bool,
}

/// Up to `limit` changes (and `max_bytes`, or one change) after `after`
/// that `audience` is to receive (readings only when it takes them; no
/// rows of a tenant whose `allowed_regions` leave it out), how far that
/// reaches, and the log's high watermark. Fails with
/// [`Error::LogTruncated`] when changes after `after` were trimmed.
pub(crate) async fn read(
    pool: &PgPool,
    after: u64,
    limit: u32,
    max_bytes: u64,
    audience: &Audience,
) -> Result<Read, Error> {
    let withheld = super::residency::withheld(pool, &audience.peer).await?;
    // Read first: sequences commit in order (the clock's lock), so every
    // change up to `top` has committed and the page below sees all of them;
    // `through` may then pass the ones left out without skipping a change
    // that commits later.
    let top: Option<i64> = sqlx::query_scalar("SELECT max(sequence) FROM replication_outbox")
        .fetch_one(pool)
        .await?;
    let after_i = i64::try_from(after).unwrap_or(i64::MAX);
    // A page of `limit` changes, cut short after the eighth append and
    // where its bytes pass `max_bytes`; its first change always stays, so a
    // change larger than a batch travels alone. Sizes are measured as the
    // text the change is sent as, so the budget holds on the wire.
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT sequence, table_name, key, op, payload, hlc, origin_region, committed_at, page_rows
           FROM (SELECT *, sum((op = 'append')::int) OVER w AS appends,
                        sum(octet_length(key) + coalesce(octet_length(payload::text), 0)
                            + $7) OVER w AS bytes,
                        row_number() OVER w AS position,
                        count(*) OVER () AS page_rows
                   FROM (SELECT sequence, table_name, key, op,
                                CASE WHEN op = 'append' AND cardinality($8::text[]) > 0
                                     THEN (SELECT coalesce(jsonb_agg(r), '[]'::jsonb)
                                             FROM jsonb_array_elements(payload) r
                                            WHERE NOT (r ->> 'tenant' = ANY($8)))
                                     ELSE payload END AS payload,
                                hlc, origin_region, committed_at
                           FROM replication_outbox
                          WHERE sequence > $1 AND sequence <= $2
                            AND ($3 OR table_name <> 'telemetry_readings')
                            AND (cardinality($8::text[]) = 0 OR NOT (
                                 table_name = ANY($9)
                                 AND coalesce(payload ->> 'tenant_id', payload ->> 'tenant')
                                     = ANY($8)))
                          ORDER BY sequence LIMIT $4) page
                 WINDOW w AS (ORDER BY sequence)) counted
          WHERE appends <= $5 AND (bytes <= $6 OR position = 1)
          ORDER BY sequence",
    )
    .bind(after_i)
    .bind(top.unwrap_or(after_i))
    .bind(audience.with_readings)
    .bind(i64::from(limit))
    .bind(MAX_APPENDS_PER_BATCH)
    .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
    .bind(CHANGE_OVERHEAD_BYTES)
    .bind(&withheld)
    .bind(super::residency::tenant_tables())
    .fetch_all(pool)
    .await?;
    // Read after the rows: a trim that committed before the rows were read
    // is seen here, so a gap it left is never served as if it were none.
    let (pruned, high, clock) = bounds_and_clock(pool).await?;
    if after < pruned {
        return Err(Error::LogTruncated {
            from: after,
            pruned_through: pruned,
        });
    }
    let page = rows
        .first()
        .map_or(0, |r| usize::try_from(r.8).unwrap_or(0));
    let full = page >= limit as usize || rows.len() < page;
    let through = match rows.last() {
        Some(last) if full => u64::try_from(last.0).unwrap_or(0),
        _ => after.max(top.map_or(0, |t| u64::try_from(t).unwrap_or(0))),
    };
    let changes = rows
        .into_iter()
        .map(
            |(seq, table, key, op, payload, hlc, origin, at, _)| Change {
                sequence: u64::try_from(seq).unwrap_or(0),
                table,
                key,
                payload: payload
                    .map(|p| p.to_string().into_bytes())
                    .unwrap_or_default(),
                hlc: u64::try_from(hlc).unwrap_or(0),
                origin_region: origin,
                committed_at: Some(prost_types::Timestamp {
                    seconds: at.timestamp(),
                    nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
                }),
                op: match op.as_str() {
                    "delete" => ChangeOp::Delete,
                    "append" => ChangeOp::Append,
                    _ => ChangeOp::Upsert,
                }
                .into(),
            },
        )
        .collect::<Vec<Change>>();
    // Only a change alone in its batch can outgrow the budget; one too large
    // for any replication message is named, rather than failing the stream
    // in the encoder.
    if let [only] = changes.as_slice()
        && wire_bytes(only) > super::MAX_CHANGE_BYTES
    {
        return Err(Error::Replication(format!(
            "change {} ({}) is {} bytes, more than a replication message carries",
            only.sequence,
            only.table,
            wire_bytes(only)
        )));
    }
    Ok(Read {
        changes,
        through,
        high,
        clock,
        full,
    })
}

/// About what `change` takes in a message: what the batch budget counts.
pub(super) fn wire_bytes(change: &Change) -> usize {
    change.key.len()
        + change.payload.len()
        + change.table.len()
        + change.origin_region.len()
        + CHANGE_OVERHEAD_BYTES as usize
}

/// (trimmed through, high watermark) of the log.
pub(crate) async fn bounds(pool: &PgPool) -> Result<(u64, u64), Error> {
    let (pruned, high, _) = bounds_and_clock(pool).await?;
    Ok((pruned, high))
}

/// (trimmed through, high watermark, clock), from one statement's snapshot.
/// The clock is the last committed tick: a writer holds the clock row until
/// it commits, so every change stamped at or below it has committed, and
/// is in the same snapshot's high watermark.
async fn bounds_and_clock(pool: &PgPool) -> Result<(u64, u64, u64), Error> {
    let (pruned, max, clock): (i64, Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT pruned_through, (SELECT max(sequence) FROM replication_outbox),
                (SELECT hlc FROM region_identity)
           FROM replication_log",
    )
    .fetch_one(pool)
    .await?;
    let pruned = u64::try_from(pruned).unwrap_or(0);
    Ok((
        pruned,
        max.map_or(pruned, |m| u64::try_from(m).unwrap_or(0).max(pruned)),
        clock.map_or(0, |c| u64::try_from(c).unwrap_or(0)),
    ))
}

/// Records how far `peer` has applied this region's log.
pub(crate) async fn ack(pool: &PgPool, peer: &str, applied: u64) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO replication_peers (peer, acked_sequence, acked_at) VALUES ($1, $2, now())
         ON CONFLICT (peer) DO UPDATE
             SET acked_sequence = GREATEST(replication_peers.acked_sequence, EXCLUDED.acked_sequence),
                 acked_at = now()",
    )
    .bind(peer)
    .bind(i64::try_from(applied).unwrap_or(i64::MAX))
    .execute(pool)
    .await?;
    Ok(())
}

/// Bumps `commits` whenever the outbox trigger notifies, so Pull streams
/// that are caught up wake at once instead of at their next heartbeat.
/// Notifications sent while the listening connection is down are lost; a
/// bump after every reconnect and the heartbeat's read of the log cover that.
pub(crate) async fn listen(pool: PgPool, commits: watch::Sender<u64>, shutdown: CancellationToken) {
    // A gap wakes the streams too: something may have committed meanwhile.
    crate::store::listen(&pool, CHANNEL, "outbox commits", &shutdown, |_| {
        commits.send_modify(|n| *n += 1);
    })
    .await;
}

/// Trims the log every `prune_interval_ms`: through the lowest sequence every
/// configured peer acknowledged, and never keeping more than
/// `max_retained_changes` (a peer left behind then needs a snapshot); and
/// the tombstones no peer can still need; and erases deleted tenants'
/// data once their retention has passed.
pub(crate) async fn prune_periodically(
    pool: PgPool,
    config: ReplicationConfig,
    metrics: std::sync::Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(Duration::from_millis(config.prune_interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match prune(&pool, &config).await {
            Ok(n) => metrics.pruned.inc_by(n),
            Err(e) => tracing::warn!(error = %e, "cannot trim the replication log"),
        }
        match trim_tombstones(&pool, &config).await {
            Ok(n) => metrics.trimmed_tombstones.inc_by(n),
            Err(e) => tracing::warn!(error = %e, "cannot trim tombstones"),
        }
        // Deleted tenants past their retention: every region erases its
        // own copy on this same housekeeping tick.
        if let Err(e) = crate::tenancy::manage::purge_deleted(&pool).await {
            tracing::warn!(error = %e, "cannot erase deleted tenants' data");
        }
    }
}

/// Trims tombstones older than `tombstone_retention_ms` whose clock every
/// configured peer's clock has passed: no change older than the delete can
/// still come from any of them, directly or relayed, so the tombstone has
/// nothing left to refuse. A peer never heard from holds every tombstone.
/// Returns how many went.
pub(crate) async fn trim_tombstones(
    pool: &PgPool,
    config: &ReplicationConfig,
) -> Result<u64, Error> {
    let peers: Vec<String> = config.peers.iter().map(|p| p.region.clone()).collect();
    let seen: Vec<(String, i64)> =
        sqlx::query_as("SELECT peer, applied_hlc FROM replication_peers WHERE peer = ANY($1)")
            .bind(&peers)
            .fetch_all(pool)
            .await?;
    let horizon = peers
        .iter()
        .map(|p| seen.iter().find(|(s, _)| s == p).map_or(0, |(_, h)| *h))
        .min()
        .unwrap_or(i64::MAX);
    if horizon == 0 {
        return Ok(0);
    }
    let retention = i64::try_from(config.tombstone_retention_ms).unwrap_or(i64::MAX);
    let gone = sqlx::query(
        "DELETE FROM replication_tombstones
          WHERE hlc < $1 AND deleted_at < now() - make_interval(secs => $2::float8 / 1000)",
    )
    .bind(horizon)
    .bind(retention as f64)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(gone)
}

/// One trim; returns how many changes went.
pub(crate) async fn prune(pool: &PgPool, config: &ReplicationConfig) -> Result<u64, Error> {
    let (pruned, high) = bounds(pool).await?;
    let peers: Vec<String> = config.peers.iter().map(|p| p.region.clone()).collect();
    let acked: Vec<(String, i64)> =
        sqlx::query_as("SELECT peer, acked_sequence FROM replication_peers WHERE peer = ANY($1)")
            .bind(&peers)
            .fetch_all(pool)
            .await?;
    // A configured peer that never acknowledged holds everything back.
    let all_acked = peers
        .iter()
        .map(|p| {
            acked
                .iter()
                .find(|(a, _)| a == p)
                .map_or(0, |(_, s)| u64::try_from(*s).unwrap_or(0))
        })
        .min();
    let retained_floor = high.saturating_sub(config.max_retained_changes);
    let through = all_acked.unwrap_or(0).max(retained_floor).min(high);
    if through <= pruned {
        return Ok(0);
    }
    if all_acked.is_some_and(|a| a < through) {
        tracing::warn!(
            through,
            max_retained_changes = config.max_retained_changes,
            "trimming changes a peer has not acknowledged: it will need a snapshot"
        );
    }
    let mut tx = pool.begin().await?;
    let gone = sqlx::query("DELETE FROM replication_outbox WHERE sequence <= $1")
        .bind(i64::try_from(through).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?
        .rows_affected();
    sqlx::query("UPDATE replication_log SET pruned_through = $1")
        .bind(i64::try_from(through).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(gone)
}
