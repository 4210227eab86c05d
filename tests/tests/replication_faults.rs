//! Replication under network faults: three regions, each with its own Redis
//! and PostgreSQL, whose peer links each go through a [`FaultProxy`]
//! (`ClusterSandbox::start_replicated_with_proxies`). While a fault is on,
//! every region takes concurrent writes (new tenants and keys, conflicting
//! updates of one shared tenant and of each other's tenants, keys made for
//! another region's tenant, revocations and deletions of the same keys);
//! once the links heal, all regions must show equal digests within 5 s,
//! and every change of every origin's log must have arrived exactly once
//! in every other region.
//!
//! Seeded: each test prints its seed, and `REPLICATION_FAULT_SEED=<n>`
//! replays it (the same fault choices, proxy drop decisions and write
//! sequence; thread and network timing are not replayed).
//!
//! [`FaultProxy`]: meridian_tests::FaultProxy

use std::time::{Duration, Instant};

use meridian_regional::tenancy::{self, TenantLimits};
use meridian_tests::replicated::{converged, until};
use meridian_tests::{ClusterSandbox, RegionSandbox, init_logging};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use sqlx::PgPool;

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
/// From healing the links to equal digests everywhere: the bound.
const AFTER_HEAL: Duration = Duration::from_secs(5);
/// For everything else that has to happen (set-up, progress under faults).
const PATIENCE: Duration = Duration::from_secs(20);
/// The log is never trimmed here, so each origin's whole log can be counted.
const KEEP_THE_LOG: &str = "prune_interval_ms = 3600000\n";

/// The test's seed: `REPLICATION_FAULT_SEED` or a fresh one, printed with
/// the test's name (tests may share a process and its output).
fn seed(test: &str) -> u64 {
    let seed = std::env::var("REPLICATION_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!(
        "{test}: seed {seed} (replay: REPLICATION_FAULT_SEED={seed} cargo test -p meridian-tests --test replication_faults {test})"
    );
    seed
}

async fn pools(regions: &[RegionSandbox]) -> Vec<PgPool> {
    let mut pools = Vec::new();
    for r in regions {
        pools.push(tenancy::connect(&r.postgres.url()).await.unwrap());
    }
    pools
}

async fn start(seed: u64) -> (ClusterSandbox, Vec<PgPool>) {
    let cluster =
        ClusterSandbox::start_replicated_with_proxies(&REGIONS, KEEP_THE_LOG, seed, |_, _| {})
            .await;
    let pools = pools(&cluster.regions).await;
    (cluster, pools)
}

fn limits(rng: &mut StdRng) -> TenantLimits {
    TenantLimits {
        requests_per_second: Some(rng.random_range(1..10_000)),
        tokens_per_minute: Some(rng.random_range(1..1_000_000)),
    }
}

/// What exists everywhere before a fault: a shared tenant, one tenant per
/// region with a few keys. Returns the keys' ids, the same in every region,
/// and the baseline the fault's changes are counted from.
async fn before_the_fault(cluster: &ClusterSandbox, pools: &[PgPool]) -> (Vec<String>, Baseline) {
    tenancy::create_tenant(&pools[0], "shared", TenantLimits::default())
        .await
        .unwrap();
    for (pool, region) in pools.iter().zip(REGIONS) {
        let tenant = format!("base-{region}");
        tenancy::create_tenant(pool, &tenant, TenantLimits::default())
            .await
            .unwrap();
        for _ in 0..4 {
            tenancy::create_api_key(pool, &tenant).await.unwrap();
        }
    }
    until(PATIENCE, "equal digests before the fault", || {
        converged(&cluster.regions)
    })
    .await;
    let keys = sqlx::query_scalar("SELECT id::text FROM api_keys ORDER BY id")
        .fetch_all(&pools[0])
        .await
        .unwrap();
    (keys, baseline(pools).await)
}

/// One region's share of the writes made while a fault is on: `ops`
/// operations chosen by `rng`, a few milliseconds apart, starting with a
/// tenant of its own (so every region has something the others lack).
async fn write(
    pool: &PgPool,
    region: &str,
    tag: &str,
    mut rng: StdRng,
    ops: usize,
    shared_keys: &[String],
) {
    for n in 0..ops {
        let op = if n == 0 { 0 } else { rng.random_range(0..6) };
        match op {
            // New rows nobody else writes.
            0 => {
                let tenant = format!("{region}-{tag}-{n}");
                tenancy::create_tenant(pool, &tenant, limits(&mut rng))
                    .await
                    .unwrap();
                for _ in 0..rng.random_range(1..=2) {
                    tenancy::create_api_key(pool, &tenant).await.unwrap();
                }
            }
            // The same tenant, updated everywhere at once.
            1 => tenancy::create_tenant(pool, "shared", limits(&mut rng))
                .await
                .unwrap(),
            // Another region's tenant: limits, or a key of its own for it.
            2 | 3 => {
                let other = REGIONS.choose(&mut rng).unwrap();
                let tenant = format!("base-{other}");
                if op == 2 {
                    tenancy::create_tenant(pool, &tenant, limits(&mut rng))
                        .await
                        .unwrap();
                } else {
                    tenancy::create_api_key(pool, &tenant).await.unwrap();
                }
            }
            // The same keys revoked (each region with its own time) and
            // deleted in several regions: update against update, update
            // against delete.
            4 => {
                let key = shared_keys.choose(&mut rng).unwrap();
                sqlx::query(
                    "UPDATE api_keys SET revoked_at = clock_timestamp() WHERE id = $1::uuid",
                )
                .bind(key)
                .execute(pool)
                .await
                .unwrap();
            }
            _ => {
                let key = shared_keys.choose(&mut rng).unwrap();
                sqlx::query("DELETE FROM api_keys WHERE id = $1::uuid")
                    .bind(key)
                    .execute(pool)
                    .await
                    .unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
    }
}

/// Every region writes at once; each writer's generator comes from `rng`.
async fn write_everywhere(pools: &[PgPool], tag: &str, rng: &mut StdRng, shared_keys: &[String]) {
    let writers: Vec<_> = pools
        .iter()
        .zip(REGIONS)
        .map(|(pool, region)| {
            let writer = StdRng::seed_from_u64(rng.random());
            write(pool, region, tag, writer, 25, shared_keys)
        })
        .collect();
    futures::future::join_all(writers).await;
}

/// Heals every link and waits, at most [`AFTER_HEAL`], for equal digests.
async fn heal_and_converge(cluster: &ClusterSandbox) {
    cluster.links().heal();
    let healed = Instant::now();
    until(
        AFTER_HEAL,
        "equal digests in all regions after heal",
        || converged(&cluster.regions),
    )
    .await;
    println!(
        "equal digests {:?} after heal; proxies: {:?}",
        healed.elapsed(),
        cluster.links().stats()
    );
}

/// Per origin, the end of its log once every region has applied it, and per
/// (region, origin) the receiving counters then: what the fault is measured
/// from. A region that starts empty may take a peer's first rows in a
/// snapshot rather than one by one, so changes before this point are not
/// counted.
struct Baseline {
    log_end: Vec<i64>,
    counters: Vec<Vec<(i64, i64)>>,
}

async fn baseline(pools: &[PgPool]) -> Baseline {
    let mut log_end = Vec::new();
    let mut counters = Vec::new();
    for (o, origin) in REGIONS.iter().enumerate() {
        let high: Option<i64> = sqlx::query_scalar("SELECT max(sequence) FROM replication_outbox")
            .fetch_one(&pools[o])
            .await
            .unwrap();
        let high = high.unwrap_or(0);
        let mut row = Vec::new();
        for (r, region) in REGIONS.iter().enumerate() {
            if r == o {
                row.push((0, 0));
                continue;
            }
            until(
                PATIENCE,
                &format!("{region} applied {origin}'s log"),
                || async { peer_counters(&pools[r], origin).await.0 == high },
            )
            .await;
            let (_, applied, superseded) = peer_counters(&pools[r], origin).await;
            row.push((applied, superseded));
        }
        log_end.push(high);
        counters.push(row);
    }
    Baseline { log_end, counters }
}

/// `region`'s watermark and counters for `origin`'s log.
async fn peer_counters(pool: &PgPool, origin: &str) -> (i64, i64, i64) {
    sqlx::query_as::<_, (i64, i64, i64)>(
        "SELECT applied_sequence, applied_changes, superseded_changes
           FROM replication_peers WHERE peer = $1",
    )
    .bind(origin)
    .fetch_optional(pool)
    .await
    .unwrap()
    .unwrap_or_default()
}

/// Every change each origin logged since `base` arrived in every other
/// region exactly once: written there or lost to a newer version, never
/// both, never twice. The digests can agree while a superseded change is
/// still on its way, so this first waits for every watermark to reach the
/// end of its origin's log.
async fn each_change_arrived_once(pools: &[PgPool], base: &Baseline) {
    for (o, origin) in REGIONS.iter().enumerate() {
        let (logged, high, pruned): (i64, Option<i64>, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE sequence > $1), max(sequence),
                    (SELECT pruned_through FROM replication_log)
               FROM replication_outbox",
        )
        .bind(base.log_end[o])
        .fetch_one(&pools[o])
        .await
        .unwrap();
        assert_eq!(pruned, 0, "{origin}: the log is kept whole here");
        let high = high.unwrap_or(0);
        for (r, region) in REGIONS.iter().enumerate().filter(|(r, _)| *r != o) {
            until(
                PATIENCE,
                &format!("{region} applied {origin}'s log"),
                || async { peer_counters(&pools[r], origin).await.0 == high },
            )
            .await;
            let (_, applied, superseded) = peer_counters(&pools[r], origin).await;
            let (applied0, superseded0) = base.counters[o][r];
            let (applied, superseded) = (applied - applied0, superseded - superseded0);
            assert_eq!(
                applied + superseded,
                logged,
                "{region} received {origin}'s {logged} changes since the fault began as \
                 {applied} applied + {superseded} superseded"
            );
        }
    }
}

/// Whether `region` has tenant `id`.
async fn has_tenant(pool: &PgPool, id: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// How many keys tenant `id` has in `region`.
async fn keys_of(pool: &PgPool, id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE tenant_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_region_and_the_rest_converge_within_5s_of_healing() {
    init_logging();
    let seed = seed("a_partitioned_region_and_the_rest_converge_within_5s_of_healing");
    let mut rng = StdRng::seed_from_u64(seed);
    let (cluster, pools) = start(seed).await;
    let (keys, base) = before_the_fault(&cluster, &pools).await;

    let isolated = rng.random_range(0..REGIONS.len());
    println!("partitioning {} from the others", REGIONS[isolated]);
    cluster.links().partition(REGIONS[isolated]);
    write_everywhere(&pools, "partition", &mut rng, &keys).await;

    // The two sides each agree within themselves and not with each other:
    // the partition held.
    let connected: Vec<&RegionSandbox> = cluster
        .regions
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != isolated)
        .map(|(_, r)| r)
        .collect();
    until(PATIENCE, "equal digests on the connected side", || {
        converged(connected.iter().copied())
    })
    .await;
    assert!(
        !converged(&cluster.regions).await,
        "the isolated region's writes stayed on its side"
    );
    let own = format!("{}-partition-0", REGIONS[isolated]);
    let other = (isolated + 1) % REGIONS.len();
    assert!(has_tenant(&pools[isolated], &own).await);
    assert!(!has_tenant(&pools[other], &own).await);

    heal_and_converge(&cluster).await;
    each_change_arrived_once(&pools, &base).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_way_cut_converges_within_5s_of_healing() {
    init_logging();
    let seed = seed("a_one_way_cut_converges_within_5s_of_healing");
    let mut rng = StdRng::seed_from_u64(seed);
    let (cluster, pools) = start(seed).await;
    let (keys, base) = before_the_fault(&cluster, &pools).await;

    // Bytes from `from` to `to` stall; bytes from `to` to `from` flow.
    let mut order = [0, 1, 2];
    rand::seq::SliceRandom::shuffle(&mut order[..], &mut rng);
    let [from, to, via] = order;
    println!(
        "cutting {} -> {} (the other way flows; {} is connected to both)",
        REGIONS[from], REGIONS[to], REGIONS[via]
    );
    cluster.links().cut_one_way(REGIONS[from], REGIONS[to]);

    // A chain across origins: `from` makes a tenant, `via` learns it and
    // makes a key for it; `to` receives the key from `via` before the
    // tenant, which cannot come from `from`: applying the key fails on
    // the missing tenant, and `to` takes it from `via` instead.
    let chain = format!("chain-{seed}");
    tenancy::create_tenant(&pools[from], &chain, TenantLimits::default())
        .await
        .unwrap();
    let writes = write_everywhere(&pools, "cut", &mut rng, &keys);
    let chained = async {
        until(
            PATIENCE,
            "the chained tenant reaches the third region",
            || has_tenant(&pools[via], &chain),
        )
        .await;
        tenancy::create_api_key(&pools[via], &chain).await.unwrap();
    };
    tokio::join!(writes, chained);
    until(PATIENCE, "the chained key behind the cut", || async {
        keys_of(&pools[to], &chain).await == 1
    })
    .await;

    heal_and_converge(&cluster).await;
    each_change_arrived_once(&pools, &base).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_and_dropped_connections_on_every_link_converge_within_5s_of_healing() {
    init_logging();
    let seed = seed("delays_and_dropped_connections_on_every_link_converge_within_5s_of_healing");
    let mut rng = StdRng::seed_from_u64(seed);
    let (cluster, pools) = start(seed).await;
    let (keys, base) = before_the_fault(&cluster, &pools).await;

    for link in cluster.links().iter() {
        let a_to_b = Duration::from_millis(rng.random_range(5..60));
        let b_to_a = Duration::from_millis(rng.random_range(5..60));
        let drop_rate = rng.random_range(0.05..0.15);
        println!(
            "{} pulls {}: delay {a_to_b:?} / {b_to_a:?}, drop rate {drop_rate:.3}",
            link.follower, link.peer
        );
        link.proxy.delay(meridian_tests::Direction::AtoB, a_to_b);
        link.proxy.delay(meridian_tests::Direction::BtoA, b_to_a);
        link.proxy.drop_rate(drop_rate);
    }
    write_everywhere(&pools, "lossy", &mut rng, &keys).await;
    // The faults bit: connections were reset mid-stream or on connect.
    until(PATIENCE, "the proxies dropped connections", || async {
        cluster.links().stats().dropped >= 5
    })
    .await;

    heal_and_converge(&cluster).await;
    each_change_arrived_once(&pools, &base).await;
}

/// How many tombstones `region` holds for tenant `id`.
async fn tombstones_of(pool: &PgPool, id: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM replication_tombstones
          WHERE table_name = 'tenants' AND key = convert_to($1, 'UTF8')",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tombstone_stays_while_a_peer_may_send_an_older_write_and_goes_after() {
    init_logging();
    let seed = seed("a_tombstone_stays_while_a_peer_may_send_an_older_write_and_goes_after");
    let mut rng = StdRng::seed_from_u64(seed);
    // Tombstones may go as soon as the peers allow: only the clocks decide.
    let cluster = ClusterSandbox::start_replicated_with_proxies(
        &REGIONS,
        "prune_interval_ms = 100\ntombstone_retention_ms = 1\n",
        seed,
        |_, _| {},
    )
    .await;
    let pools = pools(&cluster.regions).await;
    let mut order = [0, 1, 2];
    order.shuffle(&mut rng);
    let [deleter, third, cut] = order;
    println!(
        "{} deletes while {} is cut off",
        REGIONS[deleter], REGIONS[cut]
    );
    tenancy::create_tenant(&pools[deleter], "doomed", TenantLimits::default())
        .await
        .unwrap();
    until(PATIENCE, "the tenant everywhere", || {
        converged(&cluster.regions)
    })
    .await;

    cluster.links().partition(REGIONS[cut]);
    // The cut-off region changes the tenant, then the deleter deletes it:
    // the change is older than the delete and reaches the others later.
    sqlx::query("UPDATE tenants SET display_name = 'late' WHERE id = 'doomed'")
        .execute(&pools[cut])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    sqlx::query("DELETE FROM tenants WHERE id = 'doomed'")
        .execute(&pools[deleter])
        .await
        .unwrap();
    until(PATIENCE, "the delete in the third region", || async {
        !has_tenant(&pools[third], "doomed").await
    })
    .await;
    // Ten trims later the tombstone is still there: the cut-off region's
    // clock, as last heard, is older than the delete.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in [deleter, third] {
        assert_eq!(
            tombstones_of(&pools[i], "doomed").await,
            1,
            "{} trimmed a tombstone a silent peer may still need",
            REGIONS[i]
        );
    }

    cluster.links().heal();
    until(PATIENCE, "equal digests after healing", || {
        converged(&cluster.regions)
    })
    .await;
    for (pool, region) in pools.iter().zip(REGIONS) {
        assert!(
            !has_tenant(pool, "doomed").await,
            "the older change brought the tenant back in {region}"
        );
    }
    // Every clock is past the delete now: the tombstone goes everywhere.
    until(PATIENCE, "the tombstone trimmed everywhere", || async {
        for pool in &pools {
            if tombstones_of(pool, "doomed").await != 0 {
                return false;
            }
        }
        true
    })
    .await;
    until(PATIENCE, "equal digests after trimming", || {
        converged(&cluster.regions)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_for_a_tenant_that_has_not_arrived_brings_the_tenant_from_the_keys_region() {
    init_logging();
    let seed =
        seed("a_key_for_a_tenant_that_has_not_arrived_brings_the_tenant_from_the_keys_region");
    let mut rng = StdRng::seed_from_u64(seed);
    // Relaying a silent region's changes would also bring the tenant, but
    // only after `relay_after_ms`; this is about not waiting for that.
    let cluster = ClusterSandbox::start_replicated_with_proxies(
        &REGIONS,
        &format!("{KEEP_THE_LOG}relay_after_ms = 25000\n"),
        seed,
        |_, _| {},
    )
    .await;
    let pools = pools(&cluster.regions).await;
    let (_, base) = before_the_fault(&cluster, &pools).await;
    let mut order = [0, 1, 2];
    order.shuffle(&mut rng);
    let [tenants, keys, behind] = order;
    println!(
        "{} makes the tenant, {} its key, {} hears only {}",
        REGIONS[tenants], REGIONS[keys], REGIONS[behind], REGIONS[keys]
    );
    cluster
        .links()
        .cut_one_way(REGIONS[tenants], REGIONS[behind]);
    tenancy::create_tenant(&pools[tenants], "parent", TenantLimits::default())
        .await
        .unwrap();
    until(PATIENCE, "the tenant in the keys' region", || {
        has_tenant(&pools[keys], "parent")
    })
    .await;
    tenancy::create_api_key(&pools[keys], "parent")
        .await
        .unwrap();
    // A later change of the keys' region: its stream is not held back.
    tenancy::create_tenant(&pools[keys], "after-the-key", TenantLimits::default())
        .await
        .unwrap();
    until(
        PATIENCE,
        "the key and what follows it, behind the cut",
        || async {
            keys_of(&pools[behind], "parent").await == 1
                && has_tenant(&pools[behind], "after-the-key").await
        },
    )
    .await;
    assert!(has_tenant(&pools[behind], "parent").await);

    heal_and_converge(&cluster).await;
    each_change_arrived_once(&pools, &base).await;
}
