//! The worker pool of a node: a dispatcher takes messages from Redis only
//! when a worker is free, interactive lane first, and runs each job as a
//! task holding one of `jobs.workers` permits.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::store::{self, Claim, JobError, JobResult, JobState, Lease};
use super::stream::{self, Delivery, LANES};
use meridian_mesh::trace::{self, FutureExt, KeyValue};
use tracing::Instrument;

use super::Workers;
use crate::error::Error;
use crate::inference::Completion;
use crate::store::Store;

/// How long an idle dispatcher waits before looking at Redis again when no
/// local submission woke it: jobs submitted on other nodes of the region,
/// and retries that came due, are found within this.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// Pause after Redis failed, so an outage is not a busy loop.
const REDIS_PAUSE: Duration = Duration::from_millis(500);

pub(super) fn spawn(state: Arc<Workers>) {
    if state.jobs.config.workers > 0 {
        let tasks = state.tasks.clone();
        tasks.spawn(dispatch(state));
    }
}

async fn dispatch(state: Arc<Workers>) {
    let mut fence = state.jobs.fence.subscribe();
    // A region back from an outage may have had its jobs adopted meanwhile:
    // it learns so from its peers' logs, and runs nothing before then.
    tokio::select! {
        () = state.peers.may_run_own_jobs() => {}
        () = state.shutdown().cancelled() => return,
    }
    let q = &state.jobs;
    let slots = Arc::new(Semaphore::new(q.config.workers as usize));
    let mut redis = state.redis();
    let reclaim_every = q.config.sweep_interval();
    let mut last_reclaim: Option<Instant> = None;
    loop {
        // The same holds after a fence: this region was cut off, and may
        // have been given up for lost.
        if fence.has_changed().unwrap_or(false) && !sit_out_fence(&state, &mut fence).await {
            return;
        }
        // A free worker first, then a message: taking messages only when
        // they can start keeps the rest in Redis, where a later interactive
        // job still overtakes them.
        // Without PostgreSQL no job can be claimed: messages stay in Redis
        // until it answers again.
        if !q.stores.is_up(Store::Postgres) {
            tokio::select! {
                () = q.stores.returned(Store::Postgres) => {}
                () = tokio::time::sleep(IDLE_POLL) => {}
                () = state.shutdown().cancelled() => return,
            }
            continue;
        }
        let first = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = state.shutdown().cancelled() => return,
        };
        let mut permits = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        let reclaim = last_reclaim.is_none_or(|t| t.elapsed() >= reclaim_every);
        let next = async {
            let mut got = Vec::new();
            if reclaim {
                last_reclaim = Some(Instant::now());
                got = take_abandoned(&mut redis, q, permits.len()).await?;
            }
            for lane in LANES {
                let want = permits.len() - got.len();
                if want == 0 {
                    break;
                }
                got.extend(stream::read(&mut redis, &q.consumer, lane, want).await?);
            }
            Ok::<_, redis::RedisError>(got)
        };
        let deliveries = match next.await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "reading the job streams failed");
                drop(permits);
                pause(state.shutdown(), REDIS_PAUSE).await;
                continue;
            }
        };
        if deliveries.is_empty() {
            drop(permits);
            tokio::select! {
                () = q.wake.notified() => {}
                () = tokio::time::sleep(IDLE_POLL) => {}
                () = state.shutdown().cancelled() => return,
            }
            continue;
        }
        for d in deliveries {
            let permit = permits.pop().expect("never more deliveries than permits");
            state.tasks.spawn(run(state.clone(), d, permit));
        }
    }
}

/// Waits until the fence is down and every peer has been caught up with
/// again; false on shutdown.
async fn sit_out_fence(state: &Workers, fence: &mut watch::Receiver<bool>) -> bool {
    let lifted = tokio::select! {
        lifted = fence.wait_for(|raised| !raised) => lifted.is_ok(),
        () = state.shutdown().cancelled() => false,
    };
    if !lifted {
        return false;
    }
    tokio::select! {
        () = state.peers.may_run_own_jobs() => {}
        () = state.shutdown().cancelled() => return false,
    }
    tracing::info!("caught up with every peer region after the job fence: running jobs again");
    true
}

/// Messages pending longer than a lease: their worker died (a live one
/// renews its lease in PostgreSQL, not in Redis, so a slow job's message can
/// be taken too; its claim then fails and it is dropped, which is harmless).
async fn take_abandoned(
    redis: &mut redis::aio::ConnectionManager,
    q: &super::Queue,
    count: usize,
) -> redis::RedisResult<Vec<Delivery>> {
    let mut got = Vec::new();
    for lane in LANES {
        let want = count - got.len();
        if want == 0 {
            break;
        }
        got.extend(stream::autoclaim(redis, &q.consumer, lane, q.config.lease_ms, want).await?);
    }
    if !got.is_empty() {
        q.metrics.recovered.inc_by(got.len() as u64);
        tracing::info!(count = got.len(), "reclaimed job messages of a dead worker");
    }
    Ok(got)
}

async fn pause(shutdown: &CancellationToken, d: Duration) {
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        () = shutdown.cancelled() => {}
    }
}

enum Outcome {
    Done(Box<Completion>, Duration),
    Failed(Error),
    /// The attempt lost its job: cancelled, or its lease was taken over.
    Lost,
    /// The node is stopping: the job is left running with its lease, to be
    /// reclaimed once the lease lapses.
    Shutdown,
    /// The job fence went up: like `Shutdown`, nothing is recorded, and
    /// once the lease lapses the job runs again here, unless a peer adopted
    /// it meanwhile.
    Fenced,
}

async fn run(state: Arc<Workers>, d: Delivery, _permit: OwnedSemaphorePermit) {
    let q = &state.jobs;
    let mut redis = state.redis();
    let Some(id) = d.job else {
        let _ = stream::ack(&mut redis, &d).await;
        return;
    };
    // A fenced node starts nothing: the message stays pending, for this
    // node once it may run jobs again, or for the claim that drops it if the
    // job was adopted meanwhile. Taken before the claim, so a fence raised
    // from here on cancels the attempt.
    let Some(fence) = q.fence.admit_attempt() else {
        return;
    };
    let owner = Uuid::new_v4();
    let lease_ms = i64::try_from(q.config.lease_ms).unwrap_or(i64::MAX);
    let claim = match store::claim(state.pool(), state.region(), id, owner, lease_ms).await {
        Ok(Some(claim)) => claim,
        // Done, cancelled, not yet due, adopted by another region, or
        // another attempt holds it: the message is a duplicate, and
        // PostgreSQL (with the sweeper) has the job.
        Ok(None) => {
            ack(&mut redis, &d).await;
            return;
        }
        // PostgreSQL failed us (gone, most likely): the job there is as it
        // was, or its claim's lease runs out. Acked, the message does not
        // wait out a lease in Redis; the sweeper, which runs as soon as
        // PostgreSQL answers again, enqueues whatever is runnable.
        Err(e) => {
            tracing::warn!(job = %id, error = %e, "claiming a job failed; the sweeper will enqueue it again");
            ack(&mut redis, &d).await;
            return;
        }
    };
    let owner = Lease {
        id,
        owner,
        epoch: claim.epoch,
    };
    q.changed(id);
    if let Some(wait) = claim.first_wait_s {
        q.metrics.queue_wait.observe(wait);
    }
    if claim.attempts > q.config.max_attempts {
        // Earlier attempts died with their workers until the budget ran out;
        // a job that kills its worker must not loop forever.
        let error = JobError {
            reason: meridian_proto::error::reason::INTERNAL.into(),
            message: "the job's workers stopped during every allowed attempt".into(),
            retryable: true,
        };
        let Some(_finishing) = q.fence.admit_finish() else {
            q.metrics.fenced_attempts.inc();
            return;
        };
        match dead_letter(&state, id, owner, &error).await {
            Ok(()) => ack(&mut redis, &d).await,
            Err(e) => tracing::warn!(job = %id, error = %e, "dead-lettering a job failed"),
        }
        return;
    }

    let token = CancellationToken::new();
    q.running
        .lock()
        .expect("not poisoned")
        .insert(id, token.clone());
    let started = Instant::now();
    let cx = attempt_span(&state, id, &claim);
    let outcome = attempt(&state, id, owner, &claim, &token, &fence)
        .with_context(cx.clone())
        .instrument(trace::log_span(&cx))
        .await;
    q.running.lock().expect("not poisoned").remove(&id);
    q.metrics.run_time.observe(started.elapsed().as_secs_f64());
    let (ended, error) = match &outcome {
        Outcome::Done(..) => ("succeeded", None),
        Outcome::Failed(e) => ("failed", Some(e.to_string())),
        Outcome::Lost => ("lost", None),
        Outcome::Shutdown => ("shutdown", None),
        Outcome::Fenced => ("fenced", None),
    };
    trace::set_attributes(&cx, [KeyValue::new("meridian.job.outcome", ended)]);
    if let Some(e) = error {
        trace::set_error(&cx, e);
    }
    trace::end(&cx);

    // An outcome is written only while the fence is down, and the fence is
    // not up before the write has ended: hence held across it.
    let finishing = match &outcome {
        Outcome::Done(..) | Outcome::Failed(_) => {
            let Some(finishing) = q.fence.admit_finish() else {
                q.metrics.fenced_attempts.inc();
                tracing::warn!(job = %id, "the job fence went up as the attempt ended: its outcome is not recorded");
                return;
            };
            Some(finishing)
        }
        Outcome::Lost | Outcome::Shutdown | Outcome::Fenced => None,
    };
    let recorded = match outcome {
        Outcome::Shutdown => return,
        Outcome::Fenced => {
            q.metrics.fenced_attempts.inc();
            tracing::warn!(job = %id, "attempt cancelled by the job fence");
            return;
        }
        Outcome::Lost => Ok(()),
        Outcome::Done(done, latency) => {
            let result = result(*done, latency);
            let lease = Duration::from_millis(q.config.lease_ms);
            once_postgres_answers(&state, lease, || {
                store::succeed(state.pool(), owner, &result)
            })
            .await
            .map(|won| {
                if won {
                    q.metrics
                        .finished
                        .with_label_values(&[JobState::Succeeded.as_str()])
                        .inc();
                }
            })
        }
        Outcome::Failed(e) => failed(&state, &d, id, owner, &claim, &e).await,
    };
    drop(finishing);
    match recorded {
        Ok(()) => {
            ack(&mut redis, &d).await;
            q.changed(id);
        }
        // Not acknowledged: the message is reclaimed after a lease, and the
        // lapsed lease lets that attempt run the job again.
        Err(e) => tracing::warn!(job = %id, error = %e, "recording a job's outcome failed"),
    }
}

/// Runs `write` again while PostgreSQL is down, for up to `lease`: an
/// answer the model already produced is worth waiting for, rather than
/// running the job again once its lease has lapsed. Writes are fenced by
/// the attempt's lease, so a late one that lost the job changes nothing.
async fn once_postgres_answers<T, F, Fut>(
    state: &Workers,
    lease: Duration,
    mut write: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let deadline = Instant::now() + lease;
    loop {
        match write().await {
            Err(e) if e.store_down().is_some() && Instant::now() < deadline => {
                tokio::select! {
                    () = state.jobs.stores.returned(Store::Postgres) => {}
                    () = tokio::time::sleep(IDLE_POLL) => {}
                    () = state.shutdown().cancelled() => return Err(e),
                }
            }
            other => return other,
        }
    }
}

/// The attempt's span: a child of the span that submitted the job, so the
/// trace runs from the client's request to the work done for it later.
fn attempt_span(state: &Workers, id: Uuid, claim: &Claim) -> trace::Context {
    if !state.tracer.is_enabled() {
        return trace::Context::new();
    }
    let parent = claim
        .traceparent
        .as_deref()
        .map(trace::from_traceparent)
        .unwrap_or_default();
    state.tracer.start_span(
        "job.run",
        trace::Kind::Consumer,
        &parent,
        vec![
            KeyValue::new("meridian.region", state.region().to_string()),
            KeyValue::new("meridian.tenant", claim.tenant.clone()),
            KeyValue::new("meridian.model", claim.request.model.clone()),
            KeyValue::new("meridian.job.id", id.to_string()),
            KeyValue::new("meridian.job.attempt", i64::from(claim.attempts)),
        ],
    )
}

async fn attempt(
    state: &Workers,
    id: Uuid,
    owner: Lease,
    claim: &Claim,
    token: &CancellationToken,
    fence: &CancellationToken,
) -> Outcome {
    let q = &state.jobs;
    let request = claim.request.to_chat();
    let started = Instant::now();
    let lease_ms = i64::try_from(q.config.lease_ms).unwrap_or(i64::MAX);
    // Renewal doubles as the cross-node cancel check: a cancel on another
    // node takes the lease away, and the next renewal finds out; so does an
    // adoption by another region, once it has replicated here.
    let renew = async {
        loop {
            tokio::time::sleep(q.config.lease() / 3).await;
            match store::renew(state.pool(), owner, lease_ms).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => tracing::warn!(job = %id, error = %e, "renewing a job lease failed"),
            }
        }
    };
    tokio::select! {
        biased;
        () = state.shutdown().cancelled() => Outcome::Shutdown,
        // Before the inference is polled: an attempt admitted just before
        // the fence went up never reaches the upstream.
        () = fence.cancelled() => Outcome::Fenced,
        () = token.cancelled() => Outcome::Lost,
        () = renew => Outcome::Lost,
        done = state.pipeline.attempt(&claim.tenant, claim.key.as_deref(), &request) => match done {
            Ok(done) => Outcome::Done(Box::new(done), started.elapsed()),
            Err(e) => Outcome::Failed(e),
        },
    }
}

/// Records a failed attempt: queued again after a backoff while attempts
/// remain and the error is retryable, else failed or dead-lettered.
async fn failed(
    state: &Arc<Workers>,
    d: &Delivery,
    id: Uuid,
    owner: Lease,
    claim: &Claim,
    e: &Error,
) -> Result<(), Error> {
    let q = &state.jobs;
    let retryable = e.code() == tonic::Code::Unavailable;
    let error = JobError {
        reason: match e {
            Error::ModelNotFound(_) => meridian_proto::error::reason::MODEL_NOT_FOUND,
            Error::InvalidRequest { .. } => meridian_proto::error::reason::INVALID_REQUEST,
            _ if retryable => meridian_proto::error::reason::BACKEND_ERROR,
            _ => meridian_proto::error::reason::INTERNAL,
        }
        .into(),
        message: e.to_string(),
        retryable,
    };
    if !retryable {
        if store::fail(state.pool(), owner, JobState::Failed, &error).await? {
            q.metrics
                .finished
                .with_label_values(&[JobState::Failed.as_str()])
                .inc();
        }
        return Ok(());
    }
    if claim.attempts >= q.config.max_attempts {
        return dead_letter(state, id, owner, &error).await;
    }
    let backoff = q
        .config
        .backoff(claim.attempts, rand::rng().random::<f64>());
    let backoff_ms = i64::try_from(backoff.as_millis()).unwrap_or(i64::MAX);
    if store::retry(state.pool(), owner, &error, backoff_ms).await? {
        q.metrics.retries.inc();
        // Re-enqueued when due; if this node stops first, the sweeper does it.
        let state = state.clone();
        let lane = d.lane;
        let tasks = state.tasks.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(backoff) => {
                    let mut redis = state.redis();
                    if let Err(e) = stream::enqueue(&mut redis, id, lane).await {
                        tracing::warn!(job = %id, error = %e, "re-enqueue failed; the sweeper will retry");
                    }
                    state.jobs.wake.notify_one();
                }
                () = state.shutdown().cancelled() => {}
            }
        });
    }
    Ok(())
}

async fn dead_letter(
    state: &Workers,
    id: Uuid,
    owner: Lease,
    error: &JobError,
) -> Result<(), Error> {
    if store::fail(state.pool(), owner, JobState::DeadLettered, error).await? {
        state.jobs.metrics.dead_lettered.inc();
        state
            .jobs
            .metrics
            .finished
            .with_label_values(&[JobState::DeadLettered.as_str()])
            .inc();
        tracing::warn!(job = %id, error = %error.message, "job dead-lettered");
    }
    Ok(())
}

async fn ack(redis: &mut redis::aio::ConnectionManager, d: &Delivery) {
    // A failed ack only leaves a duplicate behind, which its claim drops.
    if let Err(e) = stream::ack(redis, d).await {
        tracing::warn!(message = %d.message, error = %e, "acknowledging a job message failed");
    }
}

fn result(done: Completion, latency: Duration) -> JobResult {
    let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    JobResult {
        completion_id: format!("chatcmpl-{}", Uuid::now_v7().simple()),
        created: chrono::Utc::now().timestamp(),
        text: done.text,
        finish: done.finish.as_str().into(),
        prompt_tokens: done.usage.prompt_tokens,
        completion_tokens: done.usage.completion_tokens,
        time_to_first_token_ms: ms(done.time_to_first_token),
        latency_ms: ms(latency),
        extras: done.extras,
    }
}
