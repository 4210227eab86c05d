//! Snapshots, three replicated regions each with its own Redis and
//! PostgreSQL: a region that was away while its peers trimmed their logs
//! past it rebuilds from a snapshot and follows again; a region whose node
//! and database were wiped rebuilds (its own earlier writes included) and
//! its new writes, numbered from 1 again, reach the others.
//!
//! Seeded; `REPLICATION_SEED=<n>` replays a run.

use std::time::Duration;

use meridian_regional::tenancy::{self, TenantLimits};
use meridian_tests::replicated::{converged, digest, until};
use meridian_tests::{ClusterSandbox, RegionSandbox, init_logging, metric};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const CONVERGE: Duration = Duration::from_secs(30);
/// Small, so a few writes trim past a stopped region.
const TRIMMING: &str = "max_retained_changes = 5\nprune_interval_ms = 50\n";

fn seed() -> u64 {
    let seed = std::env::var("REPLICATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("seed {seed} (set REPLICATION_SEED to replay)");
    seed
}

async fn pool(region: &RegionSandbox) -> PgPool {
    tenancy::connect(&region.postgres.url()).await.unwrap()
}

/// `n` tenants named `{prefix}-{i}`, each with 0 to 2 keys.
async fn write(pool: &PgPool, rng: &mut StdRng, prefix: &str, n: usize) {
    for i in 0..n {
        let tenant = format!("{prefix}-{i}");
        tenancy::create_tenant(pool, &tenant, TenantLimits::default())
            .await
            .unwrap();
        for _ in 0..rng.random_range(0..=2) {
            tenancy::create_api_key(pool, &tenant).await.unwrap();
        }
    }
}

async fn has_tenant(pool: &PgPool, id: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn snapshots_applied(region: &RegionSandbox) -> f64 {
    metric(
        &format!("{}/metrics", region.url()),
        "meridian_replication_snapshots_total",
        &["result=\"applied\""],
    )
    .await
}

#[tokio::test]
async fn a_region_behind_trimmed_logs_rebuilds_from_a_snapshot_and_follows_again() {
    init_logging();
    let mut rng = StdRng::seed_from_u64(seed());
    let mut cluster = ClusterSandbox::start_replicated(&REGIONS, TRIMMING, |_, _| {}).await;
    let pools = [
        pool(&cluster.regions[0]).await,
        pool(&cluster.regions[1]).await,
    ];
    write(&pools[0], &mut rng, "before", 3).await;
    until(CONVERGE, "equal digests before the stop", || {
        converged(&cluster.regions)
    })
    .await;
    cluster.regions[2].stop_node().await;
    // While ap-south is away: writes in both others, and a delete, which
    // only a tombstone in the snapshot can bring over.
    let (us, eu) = (rng.random_range(12..20), rng.random_range(12..20));
    write(&pools[0], &mut rng, "us", us).await;
    write(&pools[1], &mut rng, "eu", eu).await;
    sqlx::query("DELETE FROM api_keys WHERE tenant_id = 'before-0'")
        .execute(&pools[0])
        .await
        .unwrap();
    sqlx::query("DELETE FROM tenants WHERE id = 'before-0'")
        .execute(&pools[0])
        .await
        .unwrap();
    let gone = pool(&cluster.regions[2]).await;
    let applied: Vec<(String, i64)> =
        sqlx::query_as("SELECT peer, applied_sequence FROM replication_peers ORDER BY peer")
            .fetch_all(&gone)
            .await
            .unwrap();
    for (i, p) in pools.iter().enumerate() {
        let name = REGIONS[i];
        let watermark = applied
            .iter()
            .find(|(peer, _)| peer == name)
            .map_or(0, |(_, s)| *s);
        until(CONVERGE, "the log is trimmed past ap-south", || async {
            let pruned: i64 = sqlx::query_scalar("SELECT pruned_through FROM replication_log")
                .fetch_one(p)
                .await
                .unwrap();
            pruned > watermark
        })
        .await;
    }
    cluster.regions[2].start_node().await;
    until(CONVERGE, "equal digests after the snapshot", || {
        converged(&cluster.regions)
    })
    .await;
    // Counted by the restarted node alone (metrics live in the process), and
    // its database was not empty: a snapshot here is the truncated log's.
    assert!(
        snapshots_applied(&cluster.regions[2]).await > 0.0,
        "ap-south caught up through a snapshot"
    );
    assert!(
        !has_tenant(&gone, "before-0").await,
        "the delete reached it"
    );
    // It follows the logs again from the snapshot's positions.
    write(&pools[1], &mut rng, "after", 2).await;
    until(CONVERGE, "a write after the snapshot arrives", || {
        has_tenant(&gone, "after-1")
    })
    .await;
    until(CONVERGE, "equal digests after new writes", || {
        converged(&cluster.regions)
    })
    .await;
}

#[tokio::test]
async fn a_wiped_region_rebuilds_from_a_snapshot_and_its_new_writes_replicate() {
    init_logging();
    let mut rng = StdRng::seed_from_u64(seed());
    let mut cluster = ClusterSandbox::start_replicated(&REGIONS, TRIMMING, |_, _| {}).await;
    for (i, region) in cluster.regions.iter().enumerate() {
        let n = rng.random_range(4..10);
        write(&pool(region).await, &mut rng, REGIONS[i], n).await;
    }
    until(CONVERGE, "equal digests before the wipe", || {
        converged(&cluster.regions)
    })
    .await;
    let full = digest(&cluster.regions[0]).await;
    let us_east = pool(&cluster.regions[0]).await;
    let us_east_metrics = format!("{}/metrics", cluster.regions[0].url());
    let restarts = || async {
        metric(
            &us_east_metrics,
            "meridian_replication_log_restarts_total",
            &["peer=\"ap-south\""],
        )
        .await
    };
    let restarts_before = restarts().await;

    cluster.regions[2].replace_postgres().await;
    let wiped = pool(&cluster.regions[2]).await;
    until(CONVERGE, "the wiped region rebuilds", || {
        converged(&cluster.regions)
    })
    .await;
    // Nothing was lost, its own earlier writes included.
    assert_eq!(digest(&cluster.regions[2]).await, full);
    assert!(has_tenant(&wiped, "ap-south-0").await);
    assert!(snapshots_applied(&cluster.regions[2]).await >= 1.0);

    // Its log starts from 1 again; the others must not take the new
    // sequences for ones they applied.
    write(&wiped, &mut rng, "reborn", 3).await;
    until(
        CONVERGE,
        "the rebuilt region's new writes reach us-east",
        || has_tenant(&us_east, "reborn-2"),
    )
    .await;
    until(CONVERGE, "equal digests after the new writes", || {
        converged(&cluster.regions)
    })
    .await;
    assert!(
        restarts().await > restarts_before,
        "us-east saw ap-south's log restart"
    );
    let incarnations: Vec<String> =
        sqlx::query_scalar("SELECT log_incarnation FROM replication_peers WHERE peer = 'ap-south'")
            .fetch_all(&us_east)
            .await
            .unwrap();
    let new: String = sqlx::query_scalar("SELECT log_incarnation::text FROM region_identity")
        .fetch_one(&wiped)
        .await
        .unwrap();
    assert_eq!(incarnations, [new], "us-east follows the new log");
}
