//! The Redis side: one stream per lane read by one consumer group, and a set
//! of the job ids the streams hold. Redis only carries work to workers; the
//! set lets the sweeper tell which unfinished jobs of PostgreSQL Redis has
//! lost (flushed, restarted empty, or an enqueue that failed) without
//! scanning the streams.

use redis::aio::ConnectionManager;
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamReadOptions, StreamReadReply,
};
use redis::{AsyncCommands, RedisResult};
use uuid::Uuid;

use super::store::Priority;

const GROUP: &str = "workers";
const ENQUEUED: &str = "meridian:jobs:enqueued";
const FIELD: &str = "job";

pub(super) const LANES: [Priority; 2] = [Priority::Interactive, Priority::Batch];

fn key(lane: Priority) -> &'static str {
    match lane {
        Priority::Interactive => "meridian:jobs:interactive",
        Priority::Batch => "meridian:jobs:batch",
    }
}

/// One stream message handed to this node.
#[derive(Debug)]
pub(super) struct Delivery {
    pub lane: Priority,
    pub message: String,
    /// `None` for a message that is not a job id (never written by Meridian).
    pub job: Option<Uuid>,
}

fn delivery(lane: Priority, entry: &StreamId) -> Delivery {
    Delivery {
        lane,
        message: entry.id.clone(),
        job: entry
            .get::<String>(FIELD)
            .and_then(|s| Uuid::parse_str(&s).ok()),
    }
}

/// Creates the consumer groups (and streams). They start at `0`, so messages
/// added to a stream that a restarted Redis recreated are still read.
pub(super) async fn ensure_groups(conn: &mut ConnectionManager) -> RedisResult<()> {
    for lane in LANES {
        let created: RedisResult<()> = conn.xgroup_create_mkstream(key(lane), GROUP, "0").await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Adds the job to its lane and to the set, atomically.
pub(super) async fn enqueue(
    conn: &mut ConnectionManager,
    job: Uuid,
    lane: Priority,
) -> RedisResult<()> {
    let id = job.to_string();
    redis::pipe()
        .atomic()
        .xadd(key(lane), "*", &[(FIELD, id.as_str())])
        .ignore()
        .sadd(ENQUEUED, id.as_str())
        .ignore()
        .query_async::<()>(conn)
        .await
}

/// Reads up to `count` new messages of `lane` for `consumer`.
pub(super) async fn read(
    conn: &mut ConnectionManager,
    consumer: &str,
    lane: Priority,
    count: usize,
) -> RedisResult<Vec<Delivery>> {
    let opts = StreamReadOptions::default()
        .group(GROUP, consumer)
        .count(count);
    let reply: RedisResult<Option<StreamReadReply>> =
        conn.xread_options(&[key(lane)], &[">"], &opts).await;
    let reply = match reply {
        // Redis lost the group (flushed or restarted empty): recreate it and
        // read on the next turn; the sweeper refills the stream.
        Err(e) if e.code() == Some("NOGROUP") => {
            ensure_groups(conn).await?;
            return Ok(vec![]);
        }
        other => other?,
    };
    Ok(reply
        .into_iter()
        .flat_map(|r| r.keys)
        .flat_map(|k| k.ids)
        .map(|entry| delivery(lane, &entry))
        .collect())
}

/// Takes over messages of `lane` delivered to some consumer more than
/// `min_idle_ms` ago and never acknowledged: their worker died.
pub(super) async fn autoclaim(
    conn: &mut ConnectionManager,
    consumer: &str,
    lane: Priority,
    min_idle_ms: u64,
    count: usize,
) -> RedisResult<Vec<Delivery>> {
    let reply: RedisResult<StreamAutoClaimReply> = conn
        .xautoclaim_options(
            key(lane),
            GROUP,
            consumer,
            min_idle_ms,
            "0-0",
            StreamAutoClaimOptions::default().count(count),
        )
        .await;
    match reply {
        Err(e) if e.code() == Some("NOGROUP") => {
            ensure_groups(conn).await?;
            Ok(vec![])
        }
        reply => Ok(reply?
            .claimed
            .iter()
            .map(|entry| delivery(lane, entry))
            .collect()),
    }
}

/// Drops a handled message: acknowledged, deleted (the stream only holds
/// pending work) and out of the set.
pub(super) async fn ack(conn: &mut ConnectionManager, d: &Delivery) -> RedisResult<()> {
    let mut pipe = redis::pipe();
    pipe.atomic()
        .xack(key(d.lane), GROUP, &[d.message.as_str()])
        .ignore()
        .xdel(key(d.lane), &[d.message.as_str()])
        .ignore();
    if let Some(job) = d.job {
        pipe.srem(ENQUEUED, job.to_string()).ignore();
    }
    pipe.query_async::<()>(conn).await
}

/// For each id, whether Redis holds it.
pub(super) async fn held(conn: &mut ConnectionManager, jobs: &[Uuid]) -> RedisResult<Vec<bool>> {
    if jobs.is_empty() {
        return Ok(vec![]);
    }
    let ids: Vec<String> = jobs.iter().map(Uuid::to_string).collect();
    conn.smismember(ENQUEUED, &ids).await
}
