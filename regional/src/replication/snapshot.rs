//! Snapshots: serving every replicated row of this region from one
//! consistent read, and taking one from a peer when this region cannot
//! follow its logs (a new or wiped database, or a peer's log trimmed past
//! our watermark).
//!
//! A snapshot ends with one position per origin log: the serving region's
//! own high watermark and its applied watermark of every other origin, read
//! in the same transaction as the rows, so the rows hold exactly the
//! changes up to those positions. The taker applies rows, tombstones and
//! positions in one transaction, last writer winning: a crash or a cut
//! stream leaves the old watermarks, and a newer row here survives.

use std::time::Duration;

use futures::TryStreamExt;
use futures::stream::BoxStream;
use meridian_proto::v1::replication_client::ReplicationClient;
use meridian_proto::v1::{Change, ChangeOp, LogPosition, SnapshotChunk, SnapshotRequest};
use sqlx::PgPool;
use tonic::Status;
use tonic::transport::Channel;

pub(super) use self::chunk::Budget;
use self::chunk::Chunk;
use super::hlc::{Hlc, check_drift, now_ms};
use super::{Replication, apply, residency, tables};
use crate::config::PeerConfig;
use crate::error::Error;

mod chunk;

/// What a `Replication.Snapshot` call asks for.
#[derive(Debug, Clone)]
pub(super) enum Scope {
    /// Every row and tombstone, then the log positions they hold.
    Whole,
    /// A relay: the rows and tombstones `origin` wrote last with a clock
    /// above `after_hlc`, and no positions.
    Relay { origin: String, after_hlc: i64 },
}

impl Scope {
    pub(super) fn of(request: &SnapshotRequest) -> Self {
        if request.origin_region.is_empty() {
            Self::Whole
        } else {
            Self::Relay {
                origin: request.origin_region.clone(),
                after_hlc: i64::try_from(request.after_hlc).unwrap_or(i64::MAX),
            }
        }
    }
}

/// The stream `Replication.Snapshot` answers with: rows in chunks within
/// `budget`, then the positions (for a whole snapshot) in the last chunk.
pub(super) fn serve(
    pool: PgPool,
    budget: Budget,
    scope: Scope,
    peer: String,
) -> BoxStream<'static, Result<SnapshotChunk, Status>> {
    Box::pin(async_stream::try_stream! {
        let mut tx = pool.begin().await.map_err(Error::from)?;
        // One snapshot for rows and positions alike.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(Error::from)?;
        sqlx::query("SET LOCAL TimeZone = 'UTC'")
            .execute(&mut *tx)
            .await
            .map_err(Error::from)?;
        // Read in the rows' snapshot: the tenants it holds decide.
        let withheld = residency::withheld(&mut *tx, &peer).await?;
        let mut chunk = Chunk::new(budget);
        for table in tables::TABLES {
            let sql = match &scope {
                Scope::Whole => table.snapshot_sql(),
                Scope::Relay { .. } => table.relay_sql(),
            };
            let mut query = sqlx::query_as::<_, (String, serde_json::Value, i64, String)>(
                sqlx::AssertSqlSafe(sql),
            )
            .bind(&withheld);
            if let Scope::Relay { origin, after_hlc } = &scope {
                query = query.bind(origin.clone()).bind(*after_hlc);
            }
            let mut rows = query.fetch(&mut *tx);
            while let Some((key, payload, hlc, origin)) = rows.try_next().await.map_err(Error::from)? {
                if let Some(full) = chunk.push(row_change(table.name, key.into_bytes(), Some(payload), hlc, origin)) {
                    yield full;
                }
            }
        }
        let mut query = sqlx::query_as::<_, (String, Vec<u8>, i64, String)>(match &scope {
            Scope::Whole => {
                "SELECT table_name, key, hlc, origin_region::text FROM replication_tombstones"
            }
            Scope::Relay { .. } => {
                "SELECT table_name, key, hlc, origin_region::text FROM replication_tombstones
                  WHERE origin_region = $1 AND hlc > $2"
            }
        });
        if let Scope::Relay { origin, after_hlc } = &scope {
            query = query.bind(origin.clone()).bind(*after_hlc);
        }
        let mut rows = query.fetch(&mut *tx);
        while let Some((table, key, hlc, origin)) = rows.try_next().await.map_err(Error::from)? {
            if let Some(full) = chunk.push(row_change(&table, key, None, hlc, origin)) {
                yield full;
            }
        }
        drop(rows);
        let positions = match scope {
            Scope::Whole => positions(&mut tx).await?,
            Scope::Relay { .. } => Vec::new(),
        };
        tx.commit().await.map_err(Error::from)?;
        yield SnapshotChunk { changes: chunk.changes, positions, complete: true };
    })
}

fn row_change(
    table: &str,
    key: Vec<u8>,
    payload: Option<serde_json::Value>,
    hlc: i64,
    origin: String,
) -> Change {
    Change {
        sequence: 0,
        table: table.to_string(),
        key,
        op: if payload.is_some() {
            ChangeOp::Upsert
        } else {
            ChangeOp::Delete
        }
        .into(),
        payload: payload
            .map(|p| p.to_string().into_bytes())
            .unwrap_or_default(),
        hlc: u64::try_from(hlc).unwrap_or(0),
        origin_region: origin,
        committed_at: None,
    }
}

/// This region's own log position, then its applied watermark of every
/// other origin, as of the transaction's snapshot.
async fn positions(tx: &mut sqlx::PgConnection) -> Result<Vec<LogPosition>, Error> {
    let (region, incarnation, pruned, max): (String, String, i64, Option<i64>) = sqlx::query_as(
        "SELECT i.region, i.log_incarnation::text, l.pruned_through,
                (SELECT max(sequence) FROM replication_outbox)
           FROM region_identity i, replication_log l",
    )
    .fetch_one(&mut *tx)
    .await?;
    let own = max.unwrap_or(pruned).max(pruned);
    let mut out = vec![LogPosition {
        origin_region: region.clone(),
        sequence: u64::try_from(own).unwrap_or(0),
        log_incarnation: incarnation,
    }];
    let peers: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT peer, applied_sequence, log_incarnation FROM replication_peers
          WHERE peer <> $1 ORDER BY peer",
    )
    .bind(&region)
    .fetch_all(&mut *tx)
    .await?;
    out.extend(peers.into_iter().map(|(peer, seq, inc)| LogPosition {
        origin_region: peer,
        sequence: u64::try_from(seq).unwrap_or(0),
        log_incarnation: inc,
    }));
    Ok(out)
}

/// Takes a snapshot from `peer` and applies it; counts the result.
pub(super) async fn take(
    r: &Replication,
    peer: &str,
    channel: Channel,
    why: &str,
) -> Result<(), Error> {
    tracing::warn!(peer, why, "taking a replication snapshot");
    let result = receive(r, peer, channel, Scope::Whole).await;
    let label = match &result {
        Ok(got) => {
            tracing::info!(peer, changes = got.rows, "replication snapshot applied");
            r.metrics
                .snapshot_changes
                .with_label_values(&[peer])
                .inc_by(got.rows);
            "applied"
        }
        Err(e) => {
            tracing::warn!(peer, error = %e, "replication snapshot failed; the old watermarks stand");
            "failed"
        }
    };
    r.metrics.snapshots.with_label_values(&[peer, label]).inc();
    result.map(|_| ())
}

/// What a snapshot or relay brought.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Received {
    /// Rows and tombstones received.
    pub rows: u64,
    /// Of those, the ones newer than what was here, so written.
    pub written: u64,
    /// The highest clock among them; 0 for none.
    pub max_hlc: u64,
}

/// Streams a snapshot (or relay) from `peer` into one transaction,
/// committed only once the last chunk arrived.
pub(super) async fn receive(
    r: &Replication,
    peer: &str,
    channel: Channel,
    scope: Scope,
) -> Result<Received, Error> {
    let result = receive_checked(r, peer, channel, scope).await;
    if let Err(e) = &result {
        r.count_refusal(peer, e);
    }
    result
}

async fn receive_checked(
    r: &Replication,
    peer: &str,
    channel: Channel,
    scope: Scope,
) -> Result<Received, Error> {
    let failed = |s: Status| Error::Replication(format!("snapshot from {peer}: {s}"));
    let mut client =
        ReplicationClient::new(channel).max_decoding_message_size(super::MAX_MESSAGE_BYTES);
    let (origin_region, after_hlc) = match &scope {
        Scope::Whole => (String::new(), 0),
        Scope::Relay { origin, after_hlc } => {
            (origin.clone(), u64::try_from(*after_hlc).unwrap_or(0))
        }
    };
    let call = client.snapshot(SnapshotRequest {
        peer_region: r.region.clone(),
        max_chunk: r.config.batch_size,
        origin_region,
        after_hlc,
    });
    let mut stream = tokio::select! {
        s = call => s.map_err(failed)?.into_inner(),
        () = r.shutdown.cancelled() => return Err(Error::Replication("shutting down".into())),
    };
    let mut tx = r.pool.begin().await?;
    // The clock first, as every apply takes it (see `apply.rs`). Local writes
    // wait while the snapshot streams in: it is taken when this region
    // cannot serve its peers' latest data anyway.
    sqlx::query("SELECT 1 FROM region_identity FOR UPDATE")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT set_config('meridian.applying', 'on', true)")
        .execute(&mut *tx)
        .await?;
    let max_drift = r.config.max_clock_drift();
    let mut got = Received::default();
    let positions = loop {
        let chunk = tokio::select! {
            m = stream.message() => m.map_err(failed)?,
            () = r.shutdown.cancelled() => return Err(Error::Replication("shutting down".into())),
        };
        let Some(chunk) = chunk else {
            return Err(Error::Replication(format!(
                "snapshot from {peer} ended before its last chunk"
            )));
        };
        if let Scope::Relay { origin, .. } = &scope {
            check_relay(&chunk, origin, peer)?;
        }
        let now = now_ms();
        for c in &chunk.changes {
            check_drift(Hlc::from_u64(c.hlc), now, max_drift)
                .map_err(|e| Error::ClockDrift(format!("snapshot row from {peer}: {e}")))?;
            got.max_hlc = got.max_hlc.max(c.hlc);
            // Rows of this region's own origin too: a wiped region gets its
            // own writes back from its peers this way.
            if apply::apply_one(&mut tx, c).await? {
                got.written += 1;
            }
            got.rows += 1;
        }
        if chunk.complete {
            break chunk.positions;
        }
    };
    if got.rows == 0 && matches!(scope, Scope::Relay { .. }) {
        // Nothing to write: a relay that found nothing new is the usual case.
        tx.rollback().await?;
        return Ok(got);
    }
    // Our clock passes every row received, so a later local write wins.
    sqlx::query(
        "UPDATE region_identity SET hlc = GREATEST(hlc + 1, $1 + 1,
             (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) << 16)",
    )
    .bind(i64::try_from(got.max_hlc).unwrap_or(i64::MAX))
    .execute(&mut *tx)
    .await?;
    // Only the serving region's own position is taken: it speaks for its
    // own log. Its watermarks of other origins would let it move this
    // region past changes it never sent; those origins are followed from
    // the watermarks here (applying again is idempotent).
    for p in positions.iter().filter(|p| p.origin_region == peer) {
        // Within one incarnation a watermark only grows; a position in
        // another incarnation replaces ours (should it be the stale one,
        // the next Pull sees the peer's incarnation and starts from 0,
        // which is safe).
        sqlx::query(
            "INSERT INTO replication_peers (peer, applied_sequence, log_incarnation, applied_at)
             VALUES ($1, $2, $3, now())
             ON CONFLICT (peer) DO UPDATE SET
                 applied_sequence = CASE
                     WHEN replication_peers.log_incarnation IN ('', EXCLUDED.log_incarnation)
                          OR EXCLUDED.log_incarnation = ''
                     THEN GREATEST(replication_peers.applied_sequence, EXCLUDED.applied_sequence)
                     ELSE EXCLUDED.applied_sequence END,
                 log_incarnation = CASE WHEN EXCLUDED.log_incarnation = ''
                     THEN replication_peers.log_incarnation
                     ELSE EXCLUDED.log_incarnation END,
                 applied_at = now()",
        )
        .bind(&p.origin_region)
        .bind(i64::try_from(p.sequence).unwrap_or(i64::MAX))
        .bind(&p.log_incarnation)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(got)
}

/// A relay carries rows `origin` wrote last and nothing else: no row of
/// another origin, and no log positions.
fn check_relay(chunk: &SnapshotChunk, origin: &str, peer: &str) -> Result<(), Error> {
    use super::trust::{foreign, reason};
    if let Some((_, other)) = foreign(&chunk.changes, origin) {
        return Err(Error::Refused {
            reason: reason::RELAY_ORIGIN,
            message: format!("{peer} relayed a row of {other:?} when asked for {origin:?}"),
        });
    }
    if !chunk.positions.is_empty() {
        return Err(Error::Refused {
            reason: reason::RELAY_POSITIONS,
            message: format!("{peer} sent log positions with a relay of {origin:?}"),
        });
    }
    Ok(())
}

/// Whether this region's database holds nothing replicated and has applied
/// nothing: a new or wiped region, which needs a snapshot before it follows
/// any log (Pulls would not bring back its own earlier writes).
async fn is_empty(pool: &PgPool) -> Result<bool, Error> {
    let mut sql = String::from(
        "SELECT NOT EXISTS (SELECT 1 FROM replication_peers WHERE applied_sequence > 0)
            AND NOT EXISTS (SELECT 1 FROM replication_tombstones)",
    );
    for t in tables::TABLES {
        sql.push_str(&format!(" AND NOT EXISTS (SELECT 1 FROM {})", t.name));
    }
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await?)
}

/// For an empty database: a snapshot from `bootstrap_from`, else from the
/// first peer that answers, retried until one is applied or shutdown.
pub(super) async fn bootstrap(r: &Replication, peers: &[(PeerConfig, Channel)]) {
    let mut backoff = Duration::from_millis(r.config.reconnect_backoff_ms);
    let max = Duration::from_millis(r.config.reconnect_backoff_max_ms);
    loop {
        match is_empty(&r.pool).await {
            Ok(false) => return,
            Ok(true) => {}
            Err(e) => tracing::warn!(error = %e, "cannot tell whether this region is empty"),
        }
        for (peer, channel) in peers {
            if r.config
                .bootstrap_from
                .as_ref()
                .is_some_and(|from| *from != peer.region)
            {
                continue;
            }
            if take(r, &peer.region, channel.clone(), "empty database")
                .await
                .is_ok()
            {
                return;
            }
            if r.shutdown.is_cancelled() {
                return;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = r.shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(max);
    }
}

/// This region's log incarnation, sent with every Pull batch.
pub(super) async fn incarnation(pool: &PgPool) -> Result<String, Error> {
    Ok(
        sqlx::query_scalar("SELECT log_incarnation::text FROM region_identity")
            .fetch_one(pool)
            .await?,
    )
}
