//! Job failover when a region is cut off rather than dead, across three
//! replicated regions whose replication links go through fault proxies.
//! Every region sends its generations to one shared simulator, so the
//! simulator's count of generations that reached their first token (the
//! model's whole latency is time to first token here) is the upstream's
//! count of work done.
//!
//! - An isolated region fences its jobs before its peers adopt them: its
//!   running attempts are cancelled, its queued jobs are not started, and
//!   after healing every job has run to its end exactly once, in a survivor.
//! - A region cut off from one peer but heard by the other keeps its jobs:
//!   the peer that cannot hear it finds no agreement to adopt them.
//!
//! Seeded: `JOBS_PARTITION_SEED=<n>` replays a run's job counts and the
//! proxies' randomness.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use meridian_regional::SimConfig;
use meridian_tests::replicated::{converged, until};
use meridian_tests::replicated::{job_rows, pool, seed, submit_job};
use meridian_tests::{ClusterSandbox, RegionSandbox, SimServer, init_logging};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use uuid::Uuid;

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
/// The region cut off.
const X: &str = "us-east";
const TENANT: &str = "acme";
const ADOPT_AFTER_MS: u64 = 1_500;
/// Several times `adopt_after_ms`: a job X runs when the cut comes is still
/// running when its peers could adopt it.
const MODEL_MS: u64 = 5_000;
const LIMIT: Duration = Duration::from_secs(60);
/// The simulator's count of generations that produced their (first and
/// only) token.
const GENERATIONS: &str = "meridian_sim_time_to_first_token_seconds_count";

async fn sim() -> SimServer {
    SimServer::start(SimConfig {
        prefill_us_per_token: 0,
        ttft_ms: MODEL_MS,
        per_token_ms: 0,
        max_concurrency: 64,
        ..SimConfig::default()
    })
    .await
}

/// Three regions with failover after `ADOPT_AFTER_MS` (so the fence after
/// half of it), `workers` workers each, and the model on `upstream`.
async fn cluster(seed: u64, upstream: &SimServer, workers: u32) -> ClusterSandbox {
    let extra = format!(
        "adopt_after_ms = {ADOPT_AFTER_MS}\n\
         [jobs]\nworkers = {workers}\nsweep_interval_ms = 200\n\
         [[models]]\nid = \"crawl\"\n\
         backend = {{ kind = \"openai\", upstreams = [{{ base_url = \"{}\" }}] }}\n",
        upstream.base_url()
    );
    ClusterSandbox::start_replicated_with_proxies(&REGIONS, &extra, seed, |_, _| {}).await
}

fn region<'a>(cluster: &'a ClusterSandbox, name: &str) -> &'a RegionSandbox {
    cluster
        .regions
        .iter()
        .find(|r| r.name == name)
        .expect("a region of the cluster")
}

async fn adopted_anywhere(cluster: &ClusterSandbox) -> f64 {
    let mut adopted = 0.0;
    for r in REGIONS {
        adopted += region(cluster, r)
            .metric("meridian_jobs_adopted_total", &[])
            .await;
    }
    adopted
}

/// Submits `n` jobs to X and waits until every region holds them and X
/// runs `running` of them (the rest queued behind its busy workers).
async fn jobs_at_x(
    cluster: &ClusterSandbox,
    pools: &HashMap<&str, PgPool>,
    n: usize,
    running: usize,
) -> Vec<Uuid> {
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            submit_job(
                &http,
                region(cluster, X),
                TENANT,
                "crawl",
                1,
                &format!("job {i}"),
            )
            .await,
        );
    }
    for r in REGIONS {
        until(LIMIT, "the submissions replicate", || async {
            let rows = job_rows(&pools[r]).await;
            ids.iter().all(|id| rows.contains_key(id))
        })
        .await;
    }
    until(LIMIT, "X runs as many jobs as it has workers", || async {
        let rows = job_rows(&pools[X]).await;
        ids.iter().filter(|id| rows[id].0 == "running").count() == running
    })
    .await;
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_isolated_region_fences_its_jobs_before_the_survivors_adopt_and_run_them_once() {
    init_logging();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let seed = seed("JOBS_PARTITION_SEED");
    let mut rng = StdRng::seed_from_u64(seed);
    let workers = rng.random_range(2..=3);
    let queued = rng.random_range(2..=4);
    let n = workers + queued;
    let upstream = sim().await;
    let cluster = cluster(seed, &upstream, workers as u32).await;
    let mut pools = HashMap::new();
    for r in REGIONS {
        pools.insert(r, pool(region(&cluster, r)).await);
    }
    let survivors: Vec<&str> = REGIONS.iter().copied().filter(|r| *r != X).collect();

    let ids = jobs_at_x(&cluster, &pools, n, workers).await;
    assert_eq!(
        upstream.metric(GENERATIONS).await,
        0.0,
        "no generation finished before the cut: the test needs them in flight"
    );
    cluster.links().partition(X);

    // X stops its jobs before anyone takes them: the fence is up while no
    // survivor has adopted anything.
    until(LIMIT, "X fences its jobs", || async {
        region(&cluster, X)
            .metric("meridian_jobs_fenced", &[])
            .await
            == 1.0
    })
    .await;
    assert_eq!(
        adopted_anywhere(&cluster).await,
        0.0,
        "X fenced before the survivors adopted"
    );
    let x = region(&cluster, X);
    until(
        LIMIT,
        "X's running attempts are cancelled by the fence",
        || async { x.metric("meridian_jobs_fenced_attempts_total", &[]).await == workers as f64 },
    )
    .await;
    until(LIMIT, "X's calls to the model are dropped", || async {
        x.metric("meridian_upstream_outstanding_requests", &[])
            .await
            == 0.0
    })
    .await;

    // The survivors agree X is lost, adopt every job (each once), run them.
    for r in &survivors {
        until(LIMIT, "every adopted job succeeds", || async {
            let rows = job_rows(&pools[r]).await;
            ids.iter().all(|id| rows[id].0 == "succeeded")
        })
        .await;
    }
    assert_eq!(adopted_anywhere(&cluster).await, n as f64);
    assert_eq!(
        upstream.metric(GENERATIONS).await,
        n as f64,
        "each job generated once: in its adopter, none in X"
    );
    let x = region(&cluster, X);
    assert_eq!(
        x.metric("meridian_jobs_finished_total", &[]).await,
        0.0,
        "X finished nothing after the cut"
    );
    assert_eq!(
        x.metric("meridian_jobs_run_seconds_count", &[]).await,
        workers as f64,
        "X ended only the attempts the fence cancelled, and started no other"
    );
    assert_eq!(
        x.metric("meridian_jobs_fenced", &[]).await,
        1.0,
        "still fenced while cut off"
    );

    cluster.links().heal();
    let x = region(&cluster, X);
    until(LIMIT, "X lifts its fence", || async {
        x.metric("meridian_jobs_fenced", &[]).await == 0.0
    })
    .await;
    until(LIMIT, "the three regions converge", || {
        converged(cluster.regions.iter())
    })
    .await;
    let finals = job_rows(&pools[survivors[0]]).await;
    for r in REGIONS {
        let rows = job_rows(&pools[r]).await;
        for id in &ids {
            let (state, completions, _, owner, epoch, result) = &rows[id];
            assert_eq!(state, "succeeded", "job {id} in {r}");
            assert_eq!(*completions, 1, "job {id} in {r} finished once");
            assert_eq!(*epoch, 1, "job {id} in {r} adopted once");
            assert!(
                survivors.contains(&owner.as_str()),
                "job {id} owner {owner}"
            );
            assert!(result.is_some(), "job {id} in {r} has its result");
            assert_eq!(rows[id], finals[id], "job {id} in {r}");
        }
    }

    // X runs jobs again once caught up (a new one proves it), and none of
    // the old ones: their messages, still pending in its Redis, find them
    // adopted.
    let fresh = submit_job(
        &reqwest::Client::new(),
        region(&cluster, X),
        TENANT,
        "crawl",
        1,
        "after the heal",
    )
    .await;
    until(LIMIT, "a new job in X succeeds", || async {
        job_rows(&pools[X])
            .await
            .get(&fresh)
            .is_some_and(|r| r.0 == "succeeded")
    })
    .await;
    let x = region(&cluster, X);
    assert_eq!(x.metric("meridian_jobs_finished_total", &[]).await, 1.0);
    assert_eq!(
        x.metric("meridian_jobs_run_seconds_count", &[]).await,
        workers as f64 + 1.0,
        "after the heal X ran only the new job"
    );
    assert_eq!(upstream.metric(GENERATIONS).await, n as f64 + 1.0);
    let at_x = job_rows(&pools[X]).await;
    for id in &ids {
        assert_eq!(at_x[id], finals[id], "job {id} in X");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_region_cut_off_from_one_peer_keeps_its_jobs_and_runs_each_once() {
    init_logging();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let seed = seed("JOBS_PARTITION_SEED");
    let mut rng = StdRng::seed_from_u64(seed);
    // Enough jobs that P, adopting over {P, Z}, would take some of them
    // unless something stopped it (all go to Z with chance 2^-n).
    let n = rng.random_range(8..=12);
    let upstream = sim().await;
    let cluster = cluster(seed, &upstream, 16).await;
    let mut pools = HashMap::new();
    for r in REGIONS {
        pools.insert(r, pool(region(&cluster, r)).await);
    }
    // P cannot hear X nor X P; Z hears both.
    let (p, z) = (REGIONS[1], REGIONS[2]);

    let ids = jobs_at_x(&cluster, &pools, n, n).await;
    cluster.links().get(X, p).cut_all();
    cluster.links().get(p, X).cut_all();

    until(LIMIT, "P considers X lost", || async {
        region(&cluster, p)
            .metric(
                "meridian_replication_peer_lost",
                &[&format!("peer=\"{X}\"")],
            )
            .await
            == 1.0
    })
    .await;
    let lost_at = Instant::now();
    let at_x = job_rows(&pools[X]).await;
    assert!(
        ids.iter().all(|id| at_x[id].0 == "running"),
        "X still runs every job when P gives it up: the test needs them in flight"
    );
    let x_lost_at_z = region(&cluster, z)
        .metric(
            "meridian_replication_peer_lost",
            &[&format!("peer=\"{X}\"")],
        )
        .await;
    assert_eq!(x_lost_at_z, 0.0, "Z still hears X");

    // P would adopt a share now if it did not need Z's agreement.
    until(LIMIT, "X finishes its own jobs", || async {
        assert_eq!(
            adopted_anywhere(&cluster).await,
            0.0,
            "nobody adopts the jobs of a region one survivor still hears"
        );
        let rows = job_rows(&pools[X]).await;
        ids.iter().all(|id| rows[id].0 == "succeeded")
    })
    .await;
    assert!(
        lost_at.elapsed() >= Duration::from_millis(ADOPT_AFTER_MS),
        "P considered X lost for longer than adopt_after_ms while X ran its jobs ({:?})",
        lost_at.elapsed()
    );
    assert_eq!(adopted_anywhere(&cluster).await, 0.0);
    let x = region(&cluster, X);
    assert_eq!(
        x.metric("meridian_jobs_fenced", &[]).await,
        0.0,
        "X hears Z: no fence"
    );
    assert_eq!(
        x.metric("meridian_jobs_fenced_attempts_total", &[]).await,
        0.0
    );
    assert_eq!(
        x.metric("meridian_jobs_finished_total", &[]).await,
        n as f64
    );
    assert_eq!(
        upstream.metric(GENERATIONS).await,
        n as f64,
        "each job generated once, in X"
    );

    cluster.links().heal();
    until(LIMIT, "the three regions converge", || {
        converged(cluster.regions.iter())
    })
    .await;
    for r in REGIONS {
        let rows = job_rows(&pools[r]).await;
        for id in &ids {
            let (state, completions, attempts, owner, epoch, result) = &rows[id];
            assert_eq!(state, "succeeded", "job {id} in {r}");
            assert_eq!(*completions, 1, "job {id} in {r} finished once");
            assert_eq!(*attempts, 1, "job {id} in {r} ran once");
            assert_eq!(owner, X, "job {id} in {r} stayed X's");
            assert_eq!(*epoch, 0, "job {id} in {r} was never adopted");
            assert!(result.is_some(), "job {id} in {r} has its result");
        }
    }
    assert_eq!(adopted_anywhere(&cluster).await, 0.0);
}
