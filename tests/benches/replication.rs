//! Replication lag across three regions at a steady write rate.
//!
//! Three replicated regions (each its own PostgreSQL and Redis, the
//! sandbox's test-sized replication settings) take API key inserts at
//! `BENCH_RATE` writes/s (default 100) for `BENCH_SECONDS` (default 10),
//! round-robin over the regions, each write on its own task so the rate
//! holds whatever the latency (an open loop).
//!
//! How lag is measured: the bench adds a trigger to `api_keys` in every
//! region that records `clock_timestamp()` for each inserted row, in the
//! inserting transaction, whether the row is a local write or one applied
//! from a peer (`bench_arrivals`). A write's lag to a peer is the peer's
//! arrival time minus the origin's. Both stamps are taken the same way,
//! just before their transaction commits, by PostgreSQL servers on one host
//! (one clock), so the figure is origin commit to peer commit, within the
//! few hundred microseconds each transaction spends after its insert. It
//! includes the whole path: commit notification, the log read, the Pull
//! stream, the apply transaction.
//!
//! Baseline, measured in the same run: the local commit latency of the
//! same writes (client side, one INSERT through a pool), i.e. what a write
//! costs where it is made; the ratio says how much later it is visible
//! elsewhere. The heartbeat interval (200 ms here) is the floor lag would
//! fall to if commit notifications were lost.
//!
//! `BENCH_LINK_DELAY_MS` (default 0) routes every peer link through a
//! fault proxy adding that delay in each direction, to see lag over a
//! slower network. Run with `make bench` or
//! `cargo bench -p meridian-tests --bench replication`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use meridian_tests::load::{env_or, ms, percentile};
use meridian_tests::{ClusterSandbox, Direction, RegionSandbox};
use rand::Rng;
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const HEARTBEAT: Duration = Duration::from_millis(200);

/// Records when each `api_keys` row is inserted here, local or applied.
const RECORDER: &str = "
    CREATE TABLE bench_arrivals (id uuid PRIMARY KEY, at timestamptz NOT NULL);
    CREATE FUNCTION bench_arrival() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO bench_arrivals VALUES (NEW.id, clock_timestamp());
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER bench_arrival AFTER INSERT ON api_keys
        FOR EACH ROW EXECUTE FUNCTION bench_arrival();";

async fn digest(region: &RegionSandbox) -> Value {
    let body: Value = reqwest::get(format!("{}/admin/replication/digest", region.url()))
        .await
        .expect("the region answers")
        .json()
        .await
        .expect("the digest is JSON");
    body["tables"].clone()
}

async fn converged(regions: &[RegionSandbox]) -> bool {
    let first = digest(&regions[0]).await;
    for r in &regions[1..] {
        if digest(r).await != first {
            return false;
        }
    }
    true
}

async fn wait_for<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One API key for `tenant`, inserted as the CLI does; returns its id and
/// how long the INSERT took to commit.
async fn write_key(pool: &PgPool, tenant: &str) -> (Uuid, Duration) {
    let id = Uuid::now_v7();
    let hash: [u8; 32] = rand::rng().random();
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, prefix, key_hash) VALUES ($1, $2, 'mk-bench', $3)",
    )
    .bind(id)
    .bind(tenant)
    .bind(&hash[..])
    .execute(pool)
    .await
    .expect("the key is written");
    (id, started.elapsed())
}

async fn arrivals(pool: &PgPool) -> HashMap<Uuid, DateTime<Utc>> {
    sqlx::query_as::<_, (Uuid, DateTime<Utc>)>("SELECT id, at FROM bench_arrivals")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

fn row(name: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let (p50, p90, p99) = (
        percentile(&samples, 0.5),
        percentile(&samples, 0.9),
        percentile(&samples, 0.99),
    );
    let max = samples.last().copied().unwrap_or_default();
    println!(
        "{name:<22} {:>7} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        samples.len(),
        ms(p50),
        ms(p90),
        ms(p99),
        ms(max)
    );
    (p50, p99)
}

#[tokio::main]
async fn main() {
    let rate = env_or("BENCH_RATE", 100).max(1);
    let seconds = env_or("BENCH_SECONDS", 10);
    let link_delay = Duration::from_millis(env_or("BENCH_LINK_DELAY_MS", 0));

    let cluster = if link_delay.is_zero() {
        ClusterSandbox::start_replicated(&REGIONS, "", |_, _| {}).await
    } else {
        let cluster =
            ClusterSandbox::start_replicated_with_proxies(&REGIONS, "", 0, |_, _| {}).await;
        for link in cluster.links().iter() {
            link.proxy.delay(Direction::AtoB, link_delay);
            link.proxy.delay(Direction::BtoA, link_delay);
        }
        cluster
    };
    let mut pools = Vec::new();
    for (region, name) in cluster.regions.iter().zip(REGIONS) {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&region.postgres.url())
            .await
            .expect("the region's PostgreSQL");
        sqlx::raw_sql(RECORDER).execute(&pool).await.unwrap();
        meridian_regional::tenancy::create_tenant(
            &pool,
            &format!("bench-{name}"),
            meridian_regional::tenancy::TenantLimits::default(),
        )
        .await
        .unwrap();
        pools.push(pool);
    }
    wait_for(Duration::from_secs(30), "tenants everywhere", || {
        converged(&cluster.regions)
    })
    .await;
    // Warm every pool and stream; these keys are not measured.
    for (pool, name) in pools.iter().zip(REGIONS) {
        for _ in 0..8 {
            write_key(pool, &format!("bench-{name}")).await;
        }
    }
    wait_for(Duration::from_secs(30), "warm-up replicated", || {
        converged(&cluster.regions)
    })
    .await;

    let total = rate * seconds;
    println!(
        "{total} key inserts at {rate}/s for {seconds} s, round-robin over {} regions; links {}",
        REGIONS.len(),
        if link_delay.is_zero() {
            "direct (loopback)".to_string()
        } else {
            format!("through proxies, +{link_delay:?} each way")
        }
    );
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let started = Instant::now();
    let mut writes = Vec::new();
    for i in 0..total {
        ticker.tick().await;
        let origin = (i % REGIONS.len() as u64) as usize;
        let pool = pools[origin].clone();
        writes.push(tokio::spawn(async move {
            let (id, commit) = write_key(&pool, &format!("bench-{}", REGIONS[origin])).await;
            (id, origin, commit)
        }));
    }
    let mut written = Vec::new();
    for w in writes {
        written.push(w.await.expect("the write does not panic"));
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    wait_for(Duration::from_secs(30), "every key everywhere", || async {
        converged(&cluster.regions).await
    })
    .await;

    let mut seen = Vec::new();
    for pool in &pools {
        seen.push(arrivals(pool).await);
    }
    let mut lag: HashMap<(usize, usize), Vec<Duration>> = HashMap::new();
    let mut early = 0;
    for (id, origin, _) in &written {
        let at = seen[origin.to_owned()][id];
        for (peer, arrivals) in seen.iter().enumerate().filter(|(p, _)| p != origin) {
            let d = (arrivals[id] - at).to_std().unwrap_or_else(|_| {
                early += 1;
                Duration::ZERO
            });
            lag.entry((*origin, peer)).or_default().push(d);
        }
    }
    println!("achieved {achieved:.1} writes/s");
    println!(
        "{:<22} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "", "samples", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    let (commit50, commit99) = row("local commit (base)", written.iter().map(|w| w.2).collect());
    let (lag50, lag99) = row("lag, all pairs", lag.values().flatten().copied().collect());
    let mut pairs: Vec<_> = lag.into_iter().collect();
    pairs.sort_by_key(|((o, p), _)| (*o, *p));
    for ((o, p), samples) in pairs {
        row(&format!("  {} -> {}", REGIONS[o], REGIONS[p]), samples);
    }
    println!(
        "lag / local commit: p50 {:.1}x, p99 {:.1}x; lag p99 is {:.2} of the {} ms heartbeat",
        lag50.as_secs_f64() / commit50.as_secs_f64(),
        lag99.as_secs_f64() / commit99.as_secs_f64(),
        lag99.as_secs_f64() / HEARTBEAT.as_secs_f64(),
        HEARTBEAT.as_millis()
    );
    if early > 0 {
        println!(
            "{early} arrivals stamped before their origin's insert (clock steps?) counted as 0"
        );
    }
}
