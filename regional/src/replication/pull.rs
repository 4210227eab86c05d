//! Following one peer: a Pull stream from the last sequence applied, each
//! batch applied in one transaction and acknowledged at once, and reconnection
//! with capped, jittered backoff when the stream fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meridian_proto::v1::replication_client::ReplicationClient;
use meridian_proto::v1::{AckRequest, ChangeBatch, PullRequest};
use rand::Rng;
use tonic::transport::Channel;

use super::trust::{self, reason};
use super::{Replication, apply, relay, snapshot};
use crate::config::PeerConfig;
use crate::error::Error;

/// What this region knows of one peer's log, for `Admin.RegionStatus`.
#[derive(Debug)]
pub(crate) struct PeerState {
    pub region: String,
    /// The peer's latest high watermark.
    pub high: AtomicU64,
    /// The last sequence of the peer's log applied here.
    pub applied: AtomicU64,
    /// Age of the newest applied change while more wait; 0 when caught up.
    pub lag_ms: AtomicU32,
}

impl PeerState {
    pub(crate) fn new(region: &str) -> Self {
        Self {
            region: region.to_string(),
            high: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            lag_ms: AtomicU32::new(0),
        }
    }
}

/// Follows `peer` until shutdown.
pub(crate) async fn follow(
    r: Arc<Replication>,
    peer: PeerConfig,
    state: Arc<PeerState>,
    channel: Channel,
) {
    let first = Duration::from_millis(r.config.reconnect_backoff_ms);
    let max = Duration::from_millis(r.config.reconnect_backoff_max_ms);
    let mut backoff = first;
    loop {
        let result = session(&r, &peer, &state, channel.clone(), &mut backoff, first).await;
        r.metrics
            .connected
            .with_label_values(&[&peer.region])
            .set(0);
        if r.shutdown.is_cancelled() {
            return;
        }
        match result {
            Ok(()) => tracing::info!(peer = %peer.region, "replication stream ended; reconnecting"),
            Err(e) => {
                r.metrics
                    .stream_failures
                    .with_label_values(&[&peer.region])
                    .inc();
                tracing::warn!(peer = %peer.region, error = %e, backoff_ms = backoff.as_millis() as u64, "replication stream failed");
            }
        }
        // Full jitter: regions that lost a peer together do not return in step.
        let wait = backoff.mul_f64(rand::rng().random_range(0.5..=1.0));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = r.shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(max);
    }
}

/// One Pull stream from `peer`, from the last sequence applied here until
/// it ends, fails or the node stops.
async fn session(
    r: &Replication,
    peer: &PeerConfig,
    state: &PeerState,
    channel: Channel,
    backoff: &mut Duration,
    first_backoff: Duration,
) -> Result<(), Error> {
    let name = peer.region.as_str();
    let (applied, incarnation) = watermark(&r.pool, name).await?;
    state.applied.store(applied, Ordering::Relaxed);
    // A batch outgrows tonic's 4 MiB default: the server bounds it by
    // `max_batch_bytes`, or to one larger change, within this limit.
    let mut client =
        ReplicationClient::new(channel.clone()).max_decoding_message_size(super::MAX_MESSAGE_BYTES);
    let pull = client.pull(PullRequest {
        peer_region: r.region.clone(),
        from_sequence: applied,
        max_batch: r.config.batch_size,
    });
    let mut stream = tokio::select! {
        s = pull => match s {
            Ok(s) => s.into_inner(),
            Err(s) if is_truncated(&s) => {
                // The peer trimmed changes we never applied: only a copy of
                // its data brings them, then Pulls go on from its positions.
                return snapshot::take(r, name, channel, "log truncated past our watermark").await;
            }
            Err(s) => return Err(Error::Replication(format!("pull from {name}: {s}"))),
        },
        () = r.shutdown.cancelled() => return Ok(()),
    };
    r.metrics.connected.with_label_values(&[name]).set(1);
    // Acks go out from a task of their own, so applying the next batch never
    // waits for the previous ack's round trip; the task sends the latest
    // applied sequence, coalescing batches applied while an ack was out.
    let (acks, applied_rx) = tokio::sync::watch::channel(applied);
    let acker = tokio::spawn(ack_loop(
        client.clone(),
        r.region.clone(),
        name.to_string(),
        applied_rx,
        Duration::from_millis(r.config.ack_interval_ms),
    ));
    let _acker = AbortOnDrop(acker);
    let mut follower = Follower {
        r,
        name,
        state,
        channel,
        applied,
        incarnation,
        clock_stored: 0,
        clock_stored_at: None,
        acks,
    };
    loop {
        let batch = tokio::select! {
            m = stream.message() => m.map_err(|s| Error::Replication(format!("stream from {name}: {s}")))?,
            () = r.shutdown.cancelled() => return Ok(()),
        };
        let Some(batch) = batch else {
            return Ok(());
        };
        // A peer's log holds its own changes only (those applied from others
        // stay out of it): one of another origin is forged or corrupt, and
        // nothing of its batch is applied or believed.
        if let Some((sequence, origin)) = trust::foreign(&batch.changes, name) {
            return Err(r.refuse(
                name,
                reason::FOREIGN_ORIGIN,
                format!("change {sequence} of {name}'s log names origin {origin:?}"),
            ));
        }
        *backoff = first_backoff;
        r.liveness.heard(name, batch.lost_regions.clone());
        if follower.log_restarted(&batch).await? {
            return Ok(());
        }
        let newest = follower.apply(&batch).await?;
        follower.progress(&batch, newest).await?;
    }
}

/// Where one Pull session stands with its peer's log.
struct Follower<'a> {
    r: &'a Replication,
    name: &'a str,
    state: &'a PeerState,
    channel: Channel,
    /// The last sequence of the peer's log applied here.
    applied: u64,
    /// The incarnation of the peer's log followed; empty until known.
    incarnation: String,
    /// The peer's clock last stored as applied through, and when.
    clock_stored: u64,
    clock_stored_at: Option<Instant>,
    /// The ack task's latest applied sequence.
    acks: tokio::sync::watch::Sender<u64>,
}

impl Follower<'_> {
    /// Whether the peer's log restarted (wiped, or restored from an older
    /// backup): the session then ends, to follow it again from its start.
    /// Learns the incarnation of a log followed before incarnations existed.
    async fn log_restarted(&mut self, batch: &ChangeBatch) -> Result<bool, Error> {
        let (r, name) = (self.r, self.name);
        let restarted = (!self.incarnation.is_empty()
            && !batch.log_incarnation.is_empty()
            && batch.log_incarnation != self.incarnation)
            || batch.high_watermark < self.applied;
        if restarted {
            r.metrics.log_restarts.with_label_values(&[name]).inc();
            tracing::error!(
                peer = name,
                high_watermark = batch.high_watermark,
                applied = self.applied,
                incarnation = %batch.log_incarnation,
                followed_incarnation = %self.incarnation,
                "the peer's replication log restarted (wiped, or restored from an older backup): following it again from its start"
            );
            restart(&r.pool, name, &batch.log_incarnation, batch.high_watermark).await?;
            return Ok(true);
        }
        if self.incarnation.is_empty() && !batch.log_incarnation.is_empty() {
            adopt(&r.pool, name, &batch.log_incarnation).await?;
            self.incarnation = batch.log_incarnation.clone();
        }
        Ok(false)
    }

    /// Applies the batch's changes in one transaction with the new
    /// watermark; returns the commit time of its newest change, if any.
    async fn apply(
        &mut self,
        batch: &ChangeBatch,
    ) -> Result<Option<prost_types::Timestamp>, Error> {
        let (r, name) = (self.r, self.name);
        // A batch with no changes may still move past changes the peer
        // leaves out for this region (another region's readings); that only
        // needs the watermark written, and only when it moves.
        if batch.changes.is_empty() && batch.through_sequence <= self.applied {
            return Ok(None);
        }
        let applying = apply::apply_batch_through(
            &r.pool,
            &r.region,
            name,
            &batch.changes,
            batch.through_sequence,
            r.config.max_clock_drift(),
        )
        .await;
        let out = match applying {
            Ok(out) => out,
            Err(e) => {
                r.count_refusal(name, &e);
                if matches!(e, Error::ClockDrift(_)) {
                    r.metrics.drift_refusals.with_label_values(&[name]).inc();
                }
                if is_missing_parent(&e) {
                    // The peer's change refers to a row another region
                    // wrote (a key to a tenant) that has not come here
                    // yet; the peer had it. Taken from the peer, so the
                    // batch applies when it comes again, instead of
                    // waiting for that region's own stream.
                    relay::parents_from(r, name, self.channel.clone()).await;
                }
                return Err(e);
            }
        };
        self.applied = out.watermark;
        let m = &r.metrics;
        m.applied.with_label_values(&[name]).inc_by(out.applied);
        m.superseded
            .with_label_values(&[name])
            .inc_by(out.superseded);
        if out.applied + out.superseded > 0
            && let Some(age) = batch
                .changes
                .first()
                .and_then(|c| c.committed_at)
                .and_then(|at| age(&at))
        {
            m.apply_delay
                .with_label_values(&[name])
                .observe(age.as_secs_f64());
        }
        Ok(batch.changes.last().and_then(|c| c.committed_at))
    }

    /// Publishes how far behind the peer this region is, marks a catch-up,
    /// stores the peer's clock, and hands the applied sequence to the ack
    /// task.
    async fn progress(
        &mut self,
        batch: &ChangeBatch,
        newest: Option<prost_types::Timestamp>,
    ) -> Result<(), Error> {
        let (r, name, applied) = (self.r, self.name, self.applied);
        let lag = batch.high_watermark.saturating_sub(applied);
        let lag_s = match newest {
            Some(at) if lag > 0 => age(&at).map_or(0.0, |d| d.as_secs_f64()),
            _ if lag > 0 => r.metrics.lag_seconds.with_label_values(&[name]).get(),
            _ => 0.0,
        };
        self.state
            .high
            .store(batch.high_watermark, Ordering::Relaxed);
        self.state.applied.store(applied, Ordering::Relaxed);
        if applied >= batch.high_watermark {
            r.liveness.caught_up_with(name);
        }
        // Caught up with the batch's snapshot of the log: every change of
        // the peer up to its clock is here. Stored at most once per
        // heartbeat interval; it bounds relays and tombstone trimming, which
        // need no fresher figure.
        let heartbeat = Duration::from_millis(r.config.heartbeat_interval_ms);
        if applied >= batch.high_watermark
            && batch.clock > self.clock_stored
            && self
                .clock_stored_at
                .is_none_or(|at: Instant| at.elapsed() >= heartbeat)
        {
            note_clock(&r.pool, name, batch.clock).await?;
            self.clock_stored = batch.clock;
            self.clock_stored_at = Some(Instant::now());
        }
        self.state.lag_ms.store(
            (lag_s * 1000.0).min(f64::from(u32::MAX)) as u32,
            Ordering::Relaxed,
        );
        r.metrics
            .lag_changes
            .with_label_values(&[name])
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
        r.metrics.lag_seconds.with_label_values(&[name]).set(lag_s);
        // Right after a batch is applied, the origin's synchronous writers
        // may be waiting for it: the ack task sends it at once.
        self.acks.send_if_modified(|sent| {
            let newer = applied > *sent;
            if newer {
                *sent = applied;
            }
            newer
        });
        Ok(())
    }
}

/// How long ago `at` was by this host's clock; `None` if it is ahead.
fn age(at: &prost_types::Timestamp) -> Option<Duration> {
    let at = std::time::UNIX_EPOCH
        + Duration::new(
            u64::try_from(at.seconds).unwrap_or(0),
            u32::try_from(at.nanos).unwrap_or(0),
        );
    at.elapsed().ok()
}

/// Sends `peer` an Ack of each newly applied sequence as it is published
/// on `applied`. The log's owner trims by Acks and releases synchronous
/// writers with them; a lost one is only sent again, after `interval`.
async fn ack_loop(
    mut client: ReplicationClient<Channel>,
    region: String,
    peer: String,
    mut applied: tokio::sync::watch::Receiver<u64>,
    interval: Duration,
) {
    // Zero, so a new session announces the watermark it starts from.
    let mut acked = 0;
    loop {
        let target = *applied.borrow_and_update();
        if target > acked {
            let ack = client.ack(AckRequest {
                peer_region: region.clone(),
                applied_sequence: target,
            });
            match tokio::time::timeout(Duration::from_secs(5), ack).await {
                Ok(Ok(_)) => acked = target,
                Ok(Err(s)) => tracing::warn!(peer, error = %s, "replication ack refused"),
                Err(_) => tracing::warn!(peer, "replication ack timed out"),
            }
            if acked < target {
                tokio::time::sleep(interval).await;
                continue;
            }
        }
        if applied.changed().await.is_err() {
            return;
        }
    }
}

/// Ends the ack task with the session that feeds it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The last sequence of `peer`'s log applied here, and the incarnation of
/// that log.
async fn watermark(pool: &sqlx::PgPool, peer: &str) -> Result<(u64, String), Error> {
    let row: Option<(i64, String)> = sqlx::query_as(
        "SELECT applied_sequence, log_incarnation FROM replication_peers WHERE peer = $1",
    )
    .bind(peer)
    .fetch_optional(pool)
    .await?;
    Ok(row.map_or((0, String::new()), |(s, i)| {
        (u64::try_from(s).unwrap_or(0), i)
    }))
}

/// Records that every change of `peer` up to `clock` is applied here.
async fn note_clock(pool: &sqlx::PgPool, peer: &str, clock: u64) -> Result<(), Error> {
    sqlx::query(
        "UPDATE replication_peers SET applied_hlc = GREATEST(applied_hlc, $2) WHERE peer = $1",
    )
    .bind(peer)
    .bind(i64::try_from(clock).unwrap_or(i64::MAX))
    .execute(pool)
    .await?;
    Ok(())
}

/// A foreign key's parent row is missing (SQLSTATE 23503).
fn is_missing_parent(e: &Error) -> bool {
    matches!(e, Error::Postgres(sqlx::Error::Database(d)) if d.code().as_deref() == Some("23503"))
}

fn is_truncated(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
        && meridian_proto::error_detail(status)
            .is_some_and(|d| d.reason == meridian_proto::error::reason::REPLICATION_LOG_TRUNCATED)
}

/// Records the incarnation of a log first followed before incarnations
/// existed, or from its start.
async fn adopt(pool: &sqlx::PgPool, peer: &str, incarnation: &str) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO replication_peers (peer, log_incarnation) VALUES ($1, $2)
         ON CONFLICT (peer) DO UPDATE SET log_incarnation = EXCLUDED.log_incarnation
             WHERE replication_peers.log_incarnation = ''",
    )
    .bind(peer)
    .bind(incarnation)
    .execute(pool)
    .await?;
    Ok(())
}

/// Follows `peer`'s log from 0 in its new incarnation. Only if the stored
/// watermark still disagrees with the peer: a snapshot applied meanwhile
/// may have set it right already. Re-applying is idempotent, and changes
/// trimmed from the new log end in a snapshot.
async fn restart(
    pool: &sqlx::PgPool,
    peer: &str,
    incarnation: &str,
    high: u64,
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE replication_peers SET applied_sequence = 0, log_incarnation = $2
          WHERE peer = $1 AND (log_incarnation NOT IN ('', $2) OR applied_sequence > $3)",
    )
    .bind(peer)
    .bind(incarnation)
    .bind(i64::try_from(high).unwrap_or(i64::MAX))
    .execute(pool)
    .await?;
    Ok(())
}
