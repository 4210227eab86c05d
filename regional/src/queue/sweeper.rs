//! The sweeper: puts back into Redis every runnable job that PostgreSQL has
//! and Redis does not (lost in a flush or an empty restart, an enqueue that
//! failed, a retry whose node stopped, a dead worker's message that is gone),
//! and refreshes the queue-depth gauges. Every node runs one; two sweepers
//! enqueueing the same job make a duplicate message, which is harmless.

use std::sync::Arc;

use tokio::time::MissedTickBehavior;

use super::Workers;
use super::redis_error;
use super::store::{self, Priority};
use super::stream;
use crate::error::Error;
use crate::store::Store;

/// Most jobs looked at per sweep, oldest first; more wait for the next one.
const BATCH: i64 = 10_000;

pub(super) fn spawn(state: Arc<Workers>) {
    let tasks = state.tasks.clone();
    tasks.spawn(async move {
        // The first tick is immediate: a starting node recovers at once.
        let mut tick = tokio::time::interval(state.jobs.config.sweep_interval());
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                // Jobs accepted while Redis was down go out as soon as it
                // answers again, not at the next tick.
                () = state.jobs.stores.returned(Store::Redis) => {}
                () = state.jobs.stores.returned(Store::Postgres) => {}
                () = state.shutdown().cancelled() => return,
            }
            if let Err(e) = sweep(&state).await {
                tracing::warn!(error = %e, "job sweep failed");
            }
        }
    });
}

async fn sweep(state: &Workers) -> Result<(), Error> {
    let q = &state.jobs;
    let mut redis = state.redis();
    // Recreates what an emptied Redis lost before anything is enqueued.
    stream::ensure_groups(&mut redis)
        .await
        .map_err(redis_error)?;
    let runnable = store::runnable(state.pool(), state.region(), BATCH).await?;
    let ids: Vec<_> = runnable.iter().map(|(id, _)| *id).collect();
    let held = stream::held(&mut redis, &ids).await.map_err(redis_error)?;
    let mut recovered = 0u64;
    for ((id, lane), held) in runnable.into_iter().zip(held) {
        if !held {
            stream::enqueue(&mut redis, id, lane)
                .await
                .map_err(redis_error)?;
            recovered += 1;
        }
    }
    if recovered > 0 {
        q.metrics.recovered.inc_by(recovered);
        q.wake.notify_one();
        tracing::info!(count = recovered, "re-enqueued jobs missing from redis");
    }
    let (interactive, batch) = store::queued_per_lane(state.pool(), state.region()).await?;
    q.metrics.set_depth(Priority::Interactive, interactive);
    q.metrics.set_depth(Priority::Batch, batch);
    Ok(())
}
