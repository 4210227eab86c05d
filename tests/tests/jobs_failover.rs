//! Job failover across three replicated regions, each with its own Redis
//! and PostgreSQL: jobs submitted to one region replicate; that region is
//! killed (node and PostgreSQL) while they run on a slow model; the two
//! survivors adopt them, each job by one survivor, and every job finishes
//! once; then the old region returns, learns of the adoptions from its
//! peers' logs, runs none of those jobs again and overwrites no result.
//!
//! Seeded: `JOBS_FAILOVER_SEED=<n>` replays a run.

use std::collections::HashMap;
use std::time::Duration;

use meridian_tests::replicated::{job_rows, pool, seed, submit_job, until};
use meridian_tests::{ClusterSandbox, init_logging};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const HOME: &str = "us-east";
const TENANT: &str = "acme";
/// Long enough that no job can finish in its home region before the kill.
const MODEL_MS: u64 = 4_000;
const LIMIT: Duration = Duration::from_secs(60);

async fn jobs_digest(url: &str) -> Value {
    let body: Value = reqwest::get(format!("{url}/admin/replication/digest"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "jobs")
        .cloned()
        .expect("jobs are a replicated table")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_regions_jobs_finish_elsewhere_once_and_stay_finished_after_it_returns() {
    init_logging();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut rng = StdRng::seed_from_u64(seed("JOBS_FAILOVER_SEED"));
    let n = rng.random_range(6..=12);
    let extra = format!(
        "adopt_after_ms = 1500\n\
         [jobs]\nworkers = 16\nsweep_interval_ms = 200\n\
         [[models]]\nid = \"sim-crawl\"\n\
         backend = {{ kind = \"sim\", prefill_us_per_token = 0, ttft_ms = {MODEL_MS}, per_token_ms = 0 }}\n"
    );
    let mut cluster = ClusterSandbox::start_replicated(&REGIONS, &extra, |_, _| {}).await;
    let http = reqwest::Client::new();

    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            submit_job(
                &http,
                cluster.region(HOME),
                TENANT,
                "sim-crawl",
                4,
                &format!("job {i}"),
            )
            .await,
        );
    }
    let home_pool = pool(cluster.region(HOME)).await;
    let survivors: Vec<&str> = REGIONS.iter().copied().filter(|r| *r != HOME).collect();
    let mut pools = HashMap::new();
    for r in &survivors {
        pools.insert(*r, pool(cluster.region(r)).await);
    }
    // Replicated, and running at home: in flight when the region dies.
    for r in &survivors {
        until(LIMIT, "the submissions replicate", || async {
            let rows = job_rows(&pools[r]).await;
            ids.iter().all(|id| rows.contains_key(id))
        })
        .await;
    }
    until(LIMIT, "the home region runs its jobs", || async {
        let rows = job_rows(&home_pool).await;
        ids.iter().all(|id| rows[id].0 == "running")
    })
    .await;
    home_pool.close().await;

    let home = cluster.region(HOME);
    home.kill_node();
    home.postgres.kill();

    // Every job finishes in the survivors, adopted once, run once there.
    for r in &survivors {
        until(LIMIT, "every adopted job succeeds", || async {
            let rows = job_rows(&pools[r]).await;
            ids.iter().all(|id| rows[id].0 == "succeeded")
        })
        .await;
    }
    let finals = job_rows(&pools[survivors[0]]).await;
    for id in &ids {
        let (state, completions, attempts, owner, epoch, result) = &finals[id];
        assert_eq!(state, "succeeded", "job {id}");
        assert_eq!(*completions, 1, "job {id} finished once");
        assert_eq!(*attempts, 1, "job {id} ran once where it was adopted");
        assert_eq!(*epoch, 1, "job {id} was adopted once");
        assert!(
            survivors.contains(&owner.as_str()),
            "job {id} owner {owner}"
        );
        assert!(result.is_some(), "job {id} has its result");
    }
    until(LIMIT, "the survivors agree on every job", || async {
        let other = job_rows(&pools[survivors[1]]).await;
        ids.iter().all(|id| other[id] == finals[id])
    })
    .await;
    let mut adopted = 0.0;
    for r in &survivors {
        adopted += cluster
            .region(r)
            .metric("meridian_jobs_adopted_total", &[])
            .await;
    }
    assert_eq!(adopted, n as f64, "each job adopted by one survivor");
    // Readable where the client's next poll lands.
    let reader = cluster.region(survivors[1]);
    for id in &ids {
        let job: Value = http
            .get(format!("{}/v1/jobs/{id}", reader.url()))
            .header("x-meridian-tenant", TENANT)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(job["state"], "succeeded", "{job}");
        assert_eq!(
            job["result"]["id"].as_str(),
            finals[id].5.as_ref().unwrap()["completion_id"].as_str(),
            "{job}"
        );
    }

    // The old region returns with its jobs still `running` in its own
    // database and their messages pending in its Redis.
    let home = cluster.region(HOME);
    home.postgres.restart().await.unwrap();
    home.start_node().await;
    let home_pool = pool(cluster.region(HOME)).await;
    until(
        LIMIT,
        "the returned region learns every adoption",
        || async {
            let rows = job_rows(&home_pool).await;
            ids.iter().all(|id| rows[id] == finals[id])
        },
    )
    .await;
    // Its workers run again (a new job proves it): then none of the old
    // jobs ran, and nothing it did replaced a result.
    let fresh = submit_job(
        &http,
        cluster.region(HOME),
        TENANT,
        "sim-crawl",
        4,
        "after the return",
    )
    .await;
    until(
        LIMIT,
        "a new job in the returned region succeeds",
        || async { job_rows(&home_pool).await[&fresh].0 == "succeeded" },
    )
    .await;
    let home = cluster.region(HOME);
    assert_eq!(
        home.metric("meridian_jobs_run_seconds_count", &[]).await,
        1.0,
        "the returned region ran only the new job"
    );
    assert_eq!(home.metric("meridian_jobs_finished_total", &[]).await, 1.0);
    let at_home = job_rows(&home_pool).await;
    for id in &ids {
        assert_eq!(at_home[id], finals[id], "job {id} in the returned region");
    }
    let urls: Vec<String> = REGIONS.iter().map(|r| cluster.region(r).url()).collect();
    until(LIMIT, "all three regions hold the same jobs", || async {
        let mut digests = Vec::new();
        for url in &urls {
            digests.push(jobs_digest(url).await);
        }
        digests.iter().all(|d| *d == digests[0])
    })
    .await;
    for r in &survivors {
        let rows = job_rows(&pools[r]).await;
        for id in &ids {
            assert_eq!(rows[id], finals[id], "job {id} in {r}");
        }
    }
}
