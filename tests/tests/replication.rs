//! Cross-region replication of tenants and API keys, three regions each with
//! its own Redis and PostgreSQL: concurrent writes converge to equal
//! digests, a key made in one region authenticates through a gateway that
//! reads another region's database and a revocation anywhere reaches it, a
//! stopped region catches up from its watermark receiving each change once,
//! replaying a batch changes nothing, and last-writer-wins breaks clock ties
//! by origin region the same way everywhere.
//!
//! Randomised tests print their seed; `REPLICATION_SEED=<n>` replays one.

use std::time::Duration;

use meridian_gateway::AuthConfig;
use meridian_proto::v1::replication_client::ReplicationClient;
use meridian_proto::v1::{Change, ChangeOp, PullRequest};
use meridian_regional::replication::{Hlc, apply_batch};
use meridian_regional::tenancy::{self, TenantLimits};
use meridian_tests::replicated::{converged, digest, rows, until};
use meridian_tests::{ClusterSandbox, RegionSandbox, TEST_MODEL, init_logging};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sqlx::PgPool;

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const CONVERGE: Duration = Duration::from_secs(20);
const DRIFT: Duration = Duration::from_secs(5);

fn seed() -> u64 {
    let seed = std::env::var("REPLICATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("seed {seed} (set REPLICATION_SEED to replay)");
    seed
}

async fn pools(regions: &[RegionSandbox]) -> Vec<PgPool> {
    let mut pools = Vec::new();
    for r in regions {
        pools.push(tenancy::connect(&r.postgres.url()).await.unwrap());
    }
    pools
}

#[tokio::test]
async fn concurrent_writes_in_every_region_converge() {
    init_logging();
    let seed = seed();
    let cluster = ClusterSandbox::start_replicated(&REGIONS, "", |_, _| {}).await;
    let pools = pools(&cluster.regions).await;
    // Every region creates tenants and keys of its own and, at the same time,
    // sets limits on one shared tenant: a conflict last-writer-wins settles.
    let writers = pools.iter().enumerate().map(|(i, pool)| {
        let pool = pool.clone();
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(i as u64));
        async move {
            let mut keys = 0;
            for n in 0..8 {
                if rng.random_bool(0.5) {
                    let limits = TenantLimits {
                        requests_per_second: Some(rng.random_range(1..1000)),
                        tokens_per_minute: None,
                    };
                    tenancy::create_tenant(&pool, "shared", limits)
                        .await
                        .unwrap();
                }
                let tenant = format!("t-{}-{n}", REGIONS[i]);
                tenancy::create_tenant(&pool, &tenant, TenantLimits::default())
                    .await
                    .unwrap();
                for _ in 0..rng.random_range(1..=3) {
                    tenancy::create_api_key(&pool, &tenant).await.unwrap();
                    keys += 1;
                }
            }
            keys
        }
    });
    let keys: i64 = futures::future::join_all(writers).await.into_iter().sum();
    until(CONVERGE, "equal digests in all regions", || {
        converged(&cluster.regions)
    })
    .await;
    let d = digest(&cluster.regions[0]).await;
    assert_eq!(rows(&d, "api_keys"), keys, "{d}");
    // 8 tenants per region, plus `shared` if any region wrote it.
    let shared: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants WHERE id = 'shared'")
        .fetch_one(&pools[0])
        .await
        .unwrap();
    assert_eq!(rows(&d, "tenants"), 24 + shared, "{d}");
    // The rows themselves agree, not only their clocks.
    let mut limits = Vec::new();
    for pool in &pools {
        let l: Option<(Option<i32>, i64, String)> = sqlx::query_as(
            "SELECT requests_per_second, hlc, origin_region FROM tenants WHERE id = 'shared'",
        )
        .fetch_optional(pool)
        .await
        .unwrap();
        limits.push(l);
    }
    assert!(limits.windows(2).all(|w| w[0] == w[1]), "{limits:?}");
}

#[tokio::test]
async fn keys_made_anywhere_authenticate_everywhere_and_revocations_reach_every_region() {
    init_logging();
    // The gateway reads keys from eu-west's database only.
    let cluster = ClusterSandbox::start_replicated(&REGIONS, "", |regions, config| {
        config.auth = Some(AuthConfig {
            reload_interval_ms: 100,
            ..AuthConfig::new(regions[1].postgres.url())
        });
    })
    .await;
    let pools = pools(&cluster.regions).await;
    tenancy::create_tenant(&pools[0], "acme", TenantLimits::default())
        .await
        .unwrap();
    let key = tenancy::create_api_key(&pools[0], "acme").await.unwrap();
    let client = reqwest::Client::new();
    let chat = |key: String| {
        let (client, url) = (client.clone(), cluster.gateway_url());
        async move {
            client
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(key)
                .json(&json!({
                    "model": TEST_MODEL,
                    "messages": [{ "role": "user", "content": "hello" }],
                    "max_tokens": 4,
                }))
                .send()
                .await
                .expect("the gateway answers")
                .status()
        }
    };
    until(
        CONVERGE,
        "a key made in us-east works through eu-west's keys",
        || {
            let chat = chat(key.clone());
            async move { chat.await == 200 }
        },
    )
    .await;

    // Revoked in the third region, it stops working at the gateway and is
    // revoked in every region's database. The key works through eu-west once
    // it reached eu-west; the third region may apply it a moment later, and
    // a revocation there before then would find no key to revoke.
    until(CONVERGE, "the key reaches the third region", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM api_keys WHERE tenant_id = 'acme'")
            .fetch_one(&pools[2])
            .await
            .unwrap()
            == 1
    })
    .await;
    assert!(tenancy::revoke_api_key(&pools[2], &key).await.unwrap());
    until(CONVERGE, "the revoked key is refused", || {
        let chat = chat(key.clone());
        async move { chat.await == 401 }
    })
    .await;
    until(CONVERGE, "the revocation reaches every region", || async {
        let mut live = 0;
        for pool in &pools {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM api_keys WHERE tenant_id = 'acme' AND revoked_at IS NULL",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            live += n;
        }
        live == 0
    })
    .await;
    until(CONVERGE, "equal digests", || converged(&cluster.regions)).await;
}

#[tokio::test]
async fn a_stopped_region_catches_up_from_its_watermark_receiving_each_change_once() {
    init_logging();
    let mut cluster = ClusterSandbox::start_replicated(&REGIONS, "", |_, _| {}).await;
    let pools = pools(&cluster.regions).await;
    tenancy::create_tenant(&pools[0], "before", TenantLimits::default())
        .await
        .unwrap();
    until(CONVERGE, "equal digests", || converged(&cluster.regions)).await;

    cluster.region("eu-west").stop_node().await;
    for n in 0..20 {
        let tenant = format!("while-down-{n}");
        let pool = &pools[if n % 2 == 0 { 0 } else { 2 }];
        tenancy::create_tenant(pool, &tenant, TenantLimits::default())
            .await
            .unwrap();
        tenancy::create_api_key(pool, &tenant).await.unwrap();
    }
    cluster.region("eu-west").start_node().await;
    until(CONVERGE, "eu-west caught up", || {
        converged(&cluster.regions)
    })
    .await;

    // Every change of each origin's log arrived exactly once: what eu-west
    // wrote plus what lost a conflict adds up to the origin's log, and the
    // watermark is its end (sequences have no gaps here: nothing rolled back).
    for (i, origin) in [(0, "us-east"), (2, "ap-south")] {
        let high: i64 = sqlx::query_scalar(
            "SELECT GREATEST(COALESCE(max(sequence), 0), (SELECT pruned_through FROM replication_log))
               FROM replication_outbox",
        )
        .fetch_one(&pools[i])
        .await
        .unwrap();
        let (applied_sequence, applied, superseded): (i64, i64, i64) = sqlx::query_as(
            "SELECT applied_sequence, applied_changes, superseded_changes
               FROM replication_peers WHERE peer = $1",
        )
        .bind(origin)
        .fetch_one(&pools[1])
        .await
        .unwrap();
        assert_eq!(applied_sequence, high, "{origin}");
        assert_eq!(applied + superseded, high, "{origin}");
        assert_eq!(superseded, 0, "{origin}: no conflicts were written");
    }
    let d = digest(&cluster.regions[1]).await;
    assert_eq!(rows(&d, "tenants"), 21, "{d}");
    assert_eq!(rows(&d, "api_keys"), 20, "{d}");
}

/// The first batch of `region`'s log, pulled as `as_peer` would.
async fn pull_first_batch(region: &RegionSandbox, as_peer: &str) -> Vec<Change> {
    let mut client = ReplicationClient::connect(region.url()).await.unwrap();
    let mut stream = client
        .pull(PullRequest {
            peer_region: as_peer.into(),
            from_sequence: 0,
            max_batch: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    stream
        .message()
        .await
        .unwrap()
        .expect("a first batch")
        .changes
}

#[tokio::test]
async fn applying_the_same_batch_again_changes_nothing() {
    init_logging();
    let (source, target) = tokio::join!(
        RegionSandbox::start("us-east"),
        RegionSandbox::start("eu-west")
    );
    let source_pool = tenancy::connect(&source.postgres.url()).await.unwrap();
    for n in 0..5 {
        let tenant = format!("t{n}");
        tenancy::create_tenant(&source_pool, &tenant, TenantLimits::default())
            .await
            .unwrap();
        let key = tenancy::create_api_key(&source_pool, &tenant)
            .await
            .unwrap();
        if n == 0 {
            tenancy::revoke_api_key(&source_pool, &key).await.unwrap();
        }
    }
    let batch = pull_first_batch(&source, "eu-west").await;
    assert_eq!(batch.len(), 11, "5 tenants, 5 keys, 1 revocation");
    let pool = tenancy::connect(&target.postgres.url()).await.unwrap();

    let first = apply_batch(&pool, "eu-west", "us-east", &batch, DRIFT)
        .await
        .unwrap();
    assert_eq!((first.applied, first.skipped), (11, 0));
    assert_eq!(first.watermark, batch.last().unwrap().sequence);
    let after_first = digest(&target).await;
    assert_eq!(after_first, digest(&source).await);

    // Again from the same peer: the watermark says it is done.
    let again = apply_batch(&pool, "eu-west", "us-east", &batch, DRIFT)
        .await
        .unwrap();
    assert_eq!((again.applied, again.superseded, again.skipped), (0, 0, 11));
    // Again under a watermark that does not know it (a lost commit, a
    // restored backup): every row is as new already, so nothing is written.
    let replay = apply_batch(&pool, "eu-west", "replay", &batch, DRIFT)
        .await
        .unwrap();
    assert_eq!((replay.applied, replay.superseded), (0, 11));
    assert_eq!(digest(&target).await, after_first);
    // And the replayed revocation still holds.
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(live, 4);
}

fn tenant_change(
    sequence: u64,
    id: &str,
    name: &str,
    hlc: Hlc,
    origin: &str,
    op: ChangeOp,
) -> Change {
    let payload = match op {
        ChangeOp::Delete => Vec::new(),
        _ => json!({
            "id": id,
            "display_name": name,
            "requests_per_second": null,
            "tokens_per_minute": null,
            "created_at": "2026-01-01T00:00:00+00:00",
            "updated_at": "2026-01-01T00:00:00+00:00",
        })
        .to_string()
        .into_bytes(),
    };
    Change {
        sequence,
        table: "tenants".into(),
        key: id.as_bytes().to_vec(),
        payload,
        hlc: hlc.as_u64(),
        origin_region: origin.into(),
        committed_at: None,
        op: op.into(),
    }
}

#[tokio::test]
async fn last_writer_wins_breaks_ties_by_origin_and_deletes_stay_deleted() {
    init_logging();
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let region = RegionSandbox::start("us-east").await;
    let pool = tenancy::connect(&region.postgres.url()).await.unwrap();
    let now = Hlc::new(
        u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap(),
        0,
    );
    let later = Hlc::from_u64(now.as_u64() + 1);

    // Per tenant, the same writes from three origins in a random order each
    // time: the same winner every time.
    let mut sequences = std::collections::HashMap::new();
    for t in 0..6 {
        let id = format!("tie-{t}");
        let mut writes = vec![
            ("eu-west", now, "eu"),
            ("ap-south", now, "ap"),
            ("us-west", now, "us-west"),
        ];
        // An older clock loses even with the greatest origin.
        writes.push(("zz-old", Hlc::from_u64(now.as_u64() - 1), "old"));
        writes.shuffle(&mut rng);
        println!("{id}: {:?}", writes.iter().map(|w| w.0).collect::<Vec<_>>());
        for (origin, hlc, name) in writes {
            let seq = sequences.entry(origin).or_insert(0u64);
            *seq += 1;
            let change = tenant_change(*seq, &id, name, hlc, origin, ChangeOp::Upsert);
            apply_batch(&pool, "us-east", origin, &[change], DRIFT)
                .await
                .unwrap();
        }
        let (name, origin): (String, String) =
            sqlx::query_as("SELECT display_name, origin_region FROM tenants WHERE id = $1")
                .bind(&id)
                .fetch_one(&pool)
                .await
                .unwrap();
        // "us-west" > "eu-west" > "ap-south" byte-wise.
        assert_eq!((name.as_str(), origin.as_str()), ("us-west", "us-west"));
    }

    // A delete is a tombstone with a clock: an older upsert arriving after
    // it does not bring the row back; a newer one does.
    let mut seq = 100;
    let apply = |change: Change| {
        let pool = pool.clone();
        async move {
            apply_batch(&pool, "us-east", "eu-west", &[change], DRIFT)
                .await
                .unwrap()
        }
    };
    seq += 1;
    apply(tenant_change(
        seq,
        "gone",
        "v1",
        now,
        "eu-west",
        ChangeOp::Upsert,
    ))
    .await;
    seq += 1;
    let deleted = apply(tenant_change(
        seq,
        "gone",
        "",
        later,
        "eu-west",
        ChangeOp::Delete,
    ))
    .await;
    assert_eq!(deleted.applied, 1);
    seq += 1;
    let late = apply(tenant_change(
        seq,
        "gone",
        "late",
        now,
        "eu-west",
        ChangeOp::Upsert,
    ))
    .await;
    assert_eq!((late.applied, late.superseded), (0, 1));
    let exists = |id: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert!(!exists("gone").await);
    seq += 1;
    let newer = Hlc::from_u64(later.as_u64() + 1);
    apply(tenant_change(
        seq,
        "gone",
        "back",
        newer,
        "eu-west",
        ChangeOp::Upsert,
    ))
    .await;
    assert!(exists("gone").await);

    // A clock too far ahead is refused, and the watermark stays put.
    let ahead = Hlc::new(now.physical_ms() + 60_000, 0);
    let refused = apply_batch(
        &pool,
        "us-east",
        "eu-west",
        &[tenant_change(
            seq + 1,
            "ahead",
            "x",
            ahead,
            "eu-west",
            ChangeOp::Upsert,
        )],
        DRIFT,
    )
    .await;
    assert!(refused.is_err());
    let watermark: i64 =
        sqlx::query_scalar("SELECT applied_sequence FROM replication_peers WHERE peer = 'eu-west'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(watermark, i64::try_from(seq).unwrap());

    // Local writes after applying move past the remote clocks.
    tenancy::create_tenant(&pool, "tie-0", TenantLimits::default())
        .await
        .unwrap();
    let (hlc, origin): (i64, String) =
        sqlx::query_as("SELECT hlc, origin_region FROM tenants WHERE id = 'tie-0'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(u64::try_from(hlc).unwrap() > newer.as_u64());
    assert_eq!(origin, "us-east");
}

#[tokio::test]
async fn a_peer_behind_the_trimmed_log_is_told_so() {
    init_logging();
    // One peer that never acknowledges: the log keeps at most 3 changes.
    let region = RegionSandbox::start_with_config(
        "us-east",
        "[replication]\npeers = [{ region = \"eu-west\", address = \"127.0.0.1:1\" }]\n\
         max_retained_changes = 3\nprune_interval_ms = 50\n",
    )
    .await;
    let pool = tenancy::connect(&region.postgres.url()).await.unwrap();
    for n in 0..10 {
        tenancy::create_tenant(&pool, &format!("t{n}"), TenantLimits::default())
            .await
            .unwrap();
    }
    until(CONVERGE, "the log is trimmed", || async {
        let pruned: i64 = sqlx::query_scalar("SELECT pruned_through FROM replication_log")
            .fetch_one(&pool)
            .await
            .unwrap();
        pruned == 7
    })
    .await;
    let mut client = ReplicationClient::connect(region.url()).await.unwrap();
    let status = client
        .pull(PullRequest {
            peer_region: "eu-west".into(),
            from_sequence: 0,
            max_batch: 0,
        })
        .await
        .expect_err("changes 1 to 7 are gone");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let detail = meridian_proto::error_detail(&status).expect("an ErrorDetail");
    assert_eq!(detail.reason, "REPLICATION_LOG_TRUNCATED");
    // From the trimmed point on, the rest is there.
    let mut stream = client
        .pull(PullRequest {
            peer_region: "eu-west".into(),
            from_sequence: 7,
            max_batch: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let batch = stream.message().await.unwrap().unwrap();
    let seqs: Vec<u64> = batch.changes.iter().map(|c| c.sequence).collect();
    assert_eq!(seqs, [8, 9, 10]);
    assert_eq!(batch.high_watermark, 10);
}
