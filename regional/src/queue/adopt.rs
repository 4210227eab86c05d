//! Job failover: a peer region that has not answered for `adopt_after_ms`
//! is lost, and once every other peer still heard from reports it lost too
//! (`Peers::agreed_lost`), its unfinished jobs (known here because
//! jobs replicate) are adopted by the surviving regions. The agreement keeps
//! a region that only this one cannot hear, but others can, running its own
//! jobs; a region no one hears has fenced its jobs by then (`fence.rs`). Each job goes to one survivor, chosen
//! by rendezvous hashing of its id over the survivors, so regions that agree
//! on who survives agree on the adopter without talking. The adoption is a
//! replicated write with a new ownership epoch: it fences off the old
//! owner's attempts wherever it arrives (see `store::Lease`).

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::Workers;
use super::store;
use super::stream;
use crate::error::Error;

/// Most often the adopter looks for lost peers.
const MAX_INTERVAL: Duration = Duration::from_secs(1);

pub(super) fn spawn(state: Arc<Workers>) {
    let Some(after) = state.peers.adopt_after() else {
        return;
    };
    if !state.peers.has_peers() {
        return;
    }
    let interval = (after / 4).clamp(Duration::from_millis(50), MAX_INTERVAL);
    let tasks = state.tasks.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = state.shutdown().cancelled() => return,
            }
            if let Err(e) = adopt_lost(&state).await {
                tracing::warn!(error = %e, "adopting a lost region's jobs failed");
            }
        }
    });
}

async fn adopt_lost(state: &Workers) -> Result<(), Error> {
    // A fenced region is the one that may be cut off: the peers it lost are
    // likely alive, and running their jobs.
    if state.jobs.fence.is_raised() {
        return Ok(());
    }
    let lost = state.peers.agreed_lost();
    if lost.is_empty() {
        return Ok(());
    }
    let survivors = state.peers.survivors();
    for peer in &lost {
        let ids: Vec<Uuid> = store::unfinished_of(state.pool(), peer)
            .await?
            .into_iter()
            .filter(|id| adopter(*id, &survivors) == Some(state.region()))
            .collect();
        if ids.is_empty() {
            continue;
        }
        let adopted = store::adopt(state.pool(), state.region(), peer, &ids).await?;
        if adopted.is_empty() {
            continue;
        }
        state
            .jobs
            .metrics
            .adopted
            .with_label_values(&[peer])
            .inc_by(adopted.len() as u64);
        tracing::warn!(peer = %peer, count = adopted.len(), "adopted the unfinished jobs of a lost region");
        let mut redis = state.redis();
        for (id, lane) in adopted {
            // Committed means adopted: the sweeper enqueues what fails here.
            if let Err(e) = stream::enqueue(&mut redis, id, lane).await {
                tracing::warn!(job = %id, error = %e, "enqueue of an adopted job failed; the sweeper will retry");
            }
            state.jobs.changed(id);
        }
        state.jobs.wake.notify_one();
    }
    Ok(())
}

/// The survivor that adopts `job`: highest rendezvous score of (job,
/// region), so losing one more region moves only that region's share.
fn adopter(job: Uuid, survivors: &[String]) -> Option<&str> {
    survivors
        .iter()
        .max_by_key(|r| (score(job, r), r.as_str()))
        .map(String::as_str)
}

/// FNV-1a over the job id and the region name: stable across builds and
/// platforms, which every region's choice depends on.
fn score(job: Uuid, region: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in job
        .as_bytes()
        .iter()
        .chain([0xff].iter())
        .chain(region.as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits mix poorly for short inputs; a final avalanche step.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_survivor_picks_the_same_adopter_and_shares_are_fair() {
        let a = vec!["eu-west".to_string(), "ap-south".to_string()];
        let b = vec!["ap-south".to_string(), "eu-west".to_string()];
        let mut eu = 0;
        for _ in 0..1000 {
            let id = Uuid::new_v4();
            assert_eq!(adopter(id, &a), adopter(id, &b));
            if adopter(id, &a) == Some("eu-west") {
                eu += 1;
            }
        }
        assert!((350..650).contains(&eu), "eu-west adopted {eu} of 1000");
        assert_eq!(adopter(Uuid::nil(), &[]), None);
    }
}
