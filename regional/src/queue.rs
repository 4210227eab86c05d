//! Asynchronous jobs. A job is a row in the region's PostgreSQL, committed
//! before Submit answers; Redis Streams only carry job ids to the workers of
//! the region's nodes (one stream per priority lane, one consumer group).
//!
//! - **Exactly once.** Starting an attempt, recording its result and
//!   cancelling are conditional UPDATEs: an attempt takes a fresh lease id,
//!   and only the holder of the current lease may move a running job to a
//!   terminal state. A message delivered twice finds the job taken or done
//!   and is dropped.
//! - **Nothing acknowledged is lost.** Whatever Redis forgets (a flush, a
//!   restart without persistence, an enqueue that failed after the commit)
//!   the sweeper puts back: it compares the runnable jobs of PostgreSQL with
//!   the set of ids Redis holds. A worker that dies leaves its message
//!   pending and its lease to lapse; `XAUTOCLAIM` (or the sweeper, if the
//!   message is gone too) hands the job to another attempt.

mod adopt;
mod fence;
mod metrics;
mod store;
mod stream;
mod sweeper;
mod watch;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use meridian_mesh::trace::{self, FutureExt, KeyValue};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::answer::Pipeline;
use crate::config::JobsConfig;
use crate::error::Error;
use crate::peers::Peers;
use crate::store::{Store, StoreHealth};
use crate::tenancy::Tenant;

pub(crate) use self::metrics::Metrics;
pub(crate) use self::store::{Job, JobError, JobRequest, JobState, Priority};

/// Longest idempotency key accepted (the proto allows servers this limit).
pub(crate) const MAX_KEY_BYTES: usize = 255;

/// The jobs of one node: submission, lookups, cancellation, and the handles
/// its workers and sweeper share.
/// The longest a submission waits for Redis to take a job it already
/// stored: past it the sweeper enqueues the job instead.
const ENQUEUE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

pub(crate) struct Queue {
    pool: PgPool,
    /// This region: the owner of the jobs submitted here, and of those it
    /// adopts from a lost peer.
    region: String,
    redis: ConnectionManager,
    /// Whether PostgreSQL (the jobs' record of truth) and Redis (their
    /// dispatch) answer now.
    stores: Arc<StoreHealth>,
    config: JobsConfig,
    shutdown: CancellationToken,
    /// This node's consumer name in the stream group: new per start, so a
    /// restarted node never mistakes the dead one's pending messages for its own.
    consumer: String,
    /// Attempts running on this node, so a cancel stops their inference at
    /// once rather than at the next lease renewal.
    running: Mutex<HashMap<Uuid, CancellationToken>>,
    /// Ids of jobs whose state changed, for watchers: this node's changes
    /// at once, the region's through [`watch::listen`].
    changes: broadcast::Sender<Uuid>,
    /// Open watches per tenant.
    watches: watch::Watches,
    /// Wakes the dispatcher when this node enqueued work.
    wake: Notify,
    /// Up while this node hears from no peer region: it runs no jobs then.
    fence: fence::Fence,
    pub(crate) metrics: Metrics,
}

/// A validated job submission.
pub(crate) struct Submission {
    pub request: JobRequest,
    pub priority: Priority,
    pub idempotency_key: Option<String>,
}

impl Submission {
    /// PostgreSQL's text and jsonb cannot hold U+0000: a submission with
    /// one anywhere is refused as invalid, not failed at the insert.
    fn check_storable(&self) -> Result<(), Error> {
        let nul = |field: &'static str| {
            Error::invalid(format!("`{field}` contains a NUL character"), Some(field))
        };
        if self
            .idempotency_key
            .as_ref()
            .is_some_and(|k| k.contains('\0'))
        {
            return Err(nul("idempotency_key"));
        }
        let r = &self.request;
        if r.model.contains('\0') {
            return Err(nul("model"));
        }
        if r.messages
            .iter()
            .any(|m| m.role.contains('\0') || m.content.contains('\0'))
        {
            return Err(nul("messages"));
        }
        if r.stop.iter().any(|s| s.contains('\0')) {
            return Err(nul("stop"));
        }
        Ok(())
    }
}

/// What a submission stored.
pub(crate) struct Submitted {
    pub job: Job,
    /// The job's insert in this region's replication log; `None` for an
    /// idempotent replay, which stored nothing.
    pub logged_as: Option<u64>,
}

/// One change of a job, as Watch reports it.
pub(crate) struct JobEvent {
    pub job: Job,
    /// `None` on the first event, which reports the current state.
    pub previous: Option<JobState>,
    pub at: DateTime<Utc>,
}

impl Queue {
    pub(crate) fn new(
        pool: PgPool,
        redis: ConnectionManager,
        stores: Arc<StoreHealth>,
        config: JobsConfig,
        region: &str,
        shutdown: CancellationToken,
    ) -> Self {
        let max_watches = config.max_watches_per_tenant;
        Self {
            pool,
            stores,
            region: region.to_string(),
            redis,
            config,
            shutdown,
            consumer: format!("{region}-{}", Uuid::new_v4().simple()),
            running: Mutex::new(HashMap::new()),
            changes: broadcast::channel(1024).0,
            watches: watch::Watches::new(max_watches),
            wake: Notify::new(),
            fence: fence::Fence::new(),
            metrics: Metrics::new(region),
        }
    }

    /// Records the job, then hands it to Redis. Returns the job and whether
    /// this call created it (false: an idempotent replay).
    pub(crate) async fn submit(
        &self,
        tenant: &Tenant,
        submission: Submission,
    ) -> Result<Submitted, Error> {
        submission.check_storable()?;
        self.stores.require(Store::Postgres)?;
        let model = KeyValue::new("meridian.model", submission.request.model.clone());
        trace::set_attributes(&trace::Context::current(), [model.clone()]);
        let cx = trace::child_span(
            "job.submit",
            trace::Kind::Producer,
            vec![
                KeyValue::new("meridian.tenant", tenant.as_str().to_string()),
                model,
                KeyValue::new("meridian.job.priority", submission.priority.as_str()),
            ],
        );
        // Stored with the job: the worker's span continues this one.
        let traceparent = trace::traceparent(&cx);
        let result = self
            .record(tenant, submission, traceparent.as_deref())
            .with_context(cx.clone())
            .await;
        match &result {
            Ok(done) => trace::set_attributes(
                &cx,
                [
                    KeyValue::new("meridian.job.id", done.job.id.to_string()),
                    KeyValue::new("meridian.job.created", done.logged_as.is_some()),
                ],
            ),
            Err(e) => trace::set_error(&cx, e.to_string()),
        }
        trace::end(&cx);
        result
    }

    async fn record(
        &self,
        tenant: &Tenant,
        submission: Submission,
        traceparent: Option<&str>,
    ) -> Result<Submitted, Error> {
        let Submission {
            request,
            priority,
            idempotency_key: key,
        } = submission;
        if let Some(k) = &key
            && (k.is_empty() || k.len() > MAX_KEY_BYTES)
        {
            return Err(Error::invalid(
                format!("`idempotency_key` must be 1 to {MAX_KEY_BYTES} bytes"),
                Some("idempotency_key"),
            ));
        }
        if let Some(k) = &key
            && let Some(existing) = store::by_key_any_home(&self.pool, tenant.as_str(), k).await?
        {
            // Keys are unique per home region, but a replay in another
            // region (a failover after the first may have stored the job)
            // finds the first job once its row has replicated here.
            if existing.request != request || existing.priority != priority {
                return Err(Error::IdempotencyKeyReused(k.clone()));
            }
            return Ok(Submitted {
                job: existing,
                logged_as: None,
            });
        }
        let mut tx = self.pool.begin().await?;
        let inserted = store::insert(
            &mut tx,
            Uuid::now_v7(),
            &self.region,
            tenant.as_str(),
            tenant.key(),
            key.as_deref(),
            priority,
            &request,
            traceparent,
        )
        .await?;
        let Some(job) = inserted else {
            drop(tx);
            let key = key.expect("only a keyed insert can conflict");
            let existing = store::by_key(&self.pool, &self.region, tenant.as_str(), &key)
                .await?
                .ok_or_else(|| Error::Unavailable("job submission raced, retry".into()))?;
            if existing.request != request || existing.priority != priority {
                return Err(Error::IdempotencyKeyReused(key));
            }
            return Ok(Submitted {
                job: existing,
                logged_as: None,
            });
        };
        // The trigger counted the new job under row locks held until commit,
        // so concurrent submitters see each other and a limit holds exactly.
        let (tenant_depth, region_depth) = store::depth(&mut tx, tenant.as_str()).await?;
        let retry_after = std::time::Duration::from_millis(self.config.queue_full_retry_after_ms);
        if tenant_depth > self.config.max_queued_per_tenant {
            return Err(Error::QueueFull {
                scope: "tenant",
                retry_after,
            });
        }
        if region_depth > self.config.max_queued_per_region {
            return Err(Error::QueueFull {
                scope: "region",
                retry_after,
            });
        }
        // A synchronous submitter waits until a peer applied through it.
        let logged_as = crate::replication::logged_sequence(&mut tx).await?;
        tx.commit().await?;
        self.metrics.submitted.inc();
        // Committed means accepted: if Redis fails now, the sweeper enqueues
        // the job later, so the client still gets its 202, without waiting
        // on a Redis that its probe already knows is down.
        if self.stores.is_up(Store::Redis) {
            let mut redis = self.redis.clone();
            let enqueue = stream::enqueue(&mut redis, job.id, priority);
            match tokio::time::timeout(ENQUEUE_TIMEOUT, enqueue).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(job = %job.id, error = %e, "enqueue failed; the sweeper will retry");
                }
                Err(_) => {
                    tracing::warn!(job = %job.id, "enqueue timed out; the sweeper will retry");
                }
            }
        }
        self.wake.notify_one();
        Ok(Submitted {
            job,
            logged_as: Some(logged_as),
        })
    }

    pub(crate) async fn get(&self, tenant: &Tenant, id: &str) -> Result<Job, Error> {
        let uuid = parse_id(id)?;
        self.stores.require(Store::Postgres)?;
        store::get(&self.pool, tenant.as_str(), uuid)
            .await?
            .ok_or_else(|| Error::JobNotFound(id.to_string()))
    }

    /// Cancels a job. Cancelling a cancelled job returns it unchanged; one in
    /// another terminal state cannot be cancelled.
    pub(crate) async fn cancel(&self, tenant: &Tenant, id: &str) -> Result<Job, Error> {
        let uuid = parse_id(id)?;
        self.stores.require(Store::Postgres)?;
        if let Some(job) = store::cancel(&self.pool, tenant.as_str(), uuid).await? {
            let token = self
                .running
                .lock()
                .expect("not poisoned")
                .get(&uuid)
                .cloned();
            if let Some(token) = token {
                token.cancel();
            }
            self.metrics
                .finished
                .with_label_values(&[JobState::Cancelled.as_str()])
                .inc();
            let _ = self.changes.send(uuid);
            return Ok(job);
        }
        let job = self.get(tenant, id).await?;
        match job.state {
            JobState::Cancelled => Ok(job),
            state => Err(Error::JobAlreadyFinished {
                id: id.to_string(),
                state: state.as_str(),
            }),
        }
    }

    /// The job's current state, then one event per change, ending after a
    /// terminal state. A watch holds one of the tenant's watch slots while
    /// it is open, and reads the job only when a change may concern it.
    pub(crate) async fn watch(
        self: Arc<Self>,
        tenant: Tenant,
        id: &str,
    ) -> Result<BoxStream<'static, Result<JobEvent, Error>>, Error> {
        let slot = self.watches.open(tenant.as_str())?;
        // Subscribed before the first read, so no change slips in between.
        let mut changes = self.changes.subscribe();
        let first = self.get(&tenant, id).await?;
        let id = id.to_string();
        let stream = async_stream::try_stream! {
            let _slot = slot;
            let uuid = first.id;
            let mut last = first.state;
            yield JobEvent { job: first, previous: None, at: Utc::now() };
            while !last.is_terminal() {
                tokio::select! {
                    changed = changes.recv() => match changed {
                        Ok(changed) if changed != uuid && changed != watch::RESYNC => continue,
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    () = self.shutdown.cancelled() => break,
                }
                let job = self.get(&tenant, &id).await?;
                if job.state != last {
                    let previous = std::mem::replace(&mut last, job.state);
                    yield JobEvent { job, previous: Some(previous), at: Utc::now() };
                }
            }
        };
        Ok(Box::pin(stream))
    }

    fn changed(&self, id: Uuid) {
        let _ = self.changes.send(id);
    }
}

/// What the node's workers, sweeper, adopter and fence run with: the queue
/// itself, the pipeline that runs an attempt, and the peers' liveness that
/// says whether this region may run its jobs.
pub(crate) struct Workers {
    pub jobs: Arc<Queue>,
    pub pipeline: Arc<Pipeline>,
    /// Which peer regions are heard: whether jobs may run, and whose to adopt.
    pub peers: Arc<Peers>,
    /// The node's background tasks, which it waits for at shutdown.
    pub tasks: tokio_util::task::TaskTracker,
    pub tracer: meridian_mesh::Tracer,
}

impl Workers {
    /// Starts the node's job change listener, workers, sweeper, adopter and
    /// fence on its task tracker.
    pub(crate) fn start(self) {
        let w = Arc::new(self);
        w.tasks.spawn(watch::listen(
            w.jobs.pool.clone(),
            w.jobs.changes.clone(),
            w.jobs.shutdown.clone(),
        ));
        sweeper::spawn(w.clone());
        worker::spawn(w.clone());
        adopt::spawn(w.clone());
        fence::spawn(w);
    }

    fn pool(&self) -> &PgPool {
        &self.jobs.pool
    }

    fn region(&self) -> &str {
        &self.jobs.region
    }

    fn redis(&self) -> ConnectionManager {
        self.jobs.redis.clone()
    }

    fn shutdown(&self) -> &CancellationToken {
        &self.jobs.shutdown
    }
}

/// A malformed id names no job: 404 like an unknown one.
fn parse_id(id: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(id).map_err(|_| Error::JobNotFound(id.to_string()))
}

fn redis_error(e: redis::RedisError) -> Error {
    Error::Unavailable(format!("redis: {e}"))
}
