//! Replication against hostile data and peers, regions each with its own
//! Redis and PostgreSQL: rows far larger than a batch (jobs of megabytes
//! of control characters) replicate intact and the follower's watermark
//! moves past them; a snapshot of rows whose chunks outgrow a gRPC
//! message's default size rebuilds a wiped region; a forged peer's lies
//! are refused (`forged.rs`); a restored database's stale acks confirm
//! nothing (`restore.rs`).
//!
//! Seeded; `REPLICATION_HOSTILE_SEED=<n>` replays a run.

use std::collections::HashMap;
use std::time::Duration;

use meridian_proto::v1::PullRequest;
use meridian_proto::v1::replication_client::ReplicationClient;
use meridian_tests::replicated::{converged, pool, seed, until};
use meridian_tests::{ClusterSandbox, RegionSandbox, TEST_MODEL, init_logging};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use uuid::Uuid;

// Beside this file, as `foo.rs` beside `foo/`: a test crate's root looks
// for its modules next to it unless told.
#[path = "replication_hostile/forged.rs"]
mod forged;
#[path = "replication_hostile/restore.rs"]
mod restore;

const REGIONS: [&str; 2] = ["us-east", "eu-west"];
const LIMIT: Duration = Duration::from_secs(60);

/// `chars` characters, each a control character (or DEL): the worst case
/// for JSON escaping, six bytes on the wire per character.
fn control_text(rng: &mut StdRng, chars: usize) -> String {
    (0..chars)
        .map(|_| match rng.random_range(0..33u8) {
            32 => '\u{7f}',
            // U+0000 is not a character PostgreSQL's jsonb stores.
            c => char::from(c.max(1)),
        })
        .collect()
}

/// The request content of every job of the database behind `pool`, by id.
async fn contents(pool: &PgPool) -> HashMap<Uuid, String> {
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, request -> 'messages' -> 0 ->> 'content' FROM jobs")
            .fetch_all(pool)
            .await
            .expect("jobs are readable");
    rows.into_iter().collect()
}

/// The last sequence of `origin`'s log applied in the database behind `pool`.
async fn applied(pool: &PgPool, origin: &str) -> i64 {
    sqlx::query_scalar("SELECT applied_sequence FROM replication_peers WHERE peer = $1")
        .bind(origin)
        .fetch_optional(pool)
        .await
        .expect("replication_peers is readable")
        .unwrap_or(0)
}

async fn log_end(pool: &PgPool) -> i64 {
    // Trimmed changes count: the log's end is where its numbering stands.
    sqlx::query_scalar(
        "SELECT greatest((SELECT coalesce(max(sequence), 0) FROM replication_outbox),
                         (SELECT pruned_through FROM replication_log))",
    )
    .fetch_one(pool)
    .await
    .expect("the outbox is readable")
}

/// The Pull batches `region` serves `peer` from sequence 0 until one
/// reaches `end`: (changes, bytes of their payloads) of each.
async fn pulled(region: &RegionSandbox, peer: &str, end: u64) -> Vec<(usize, usize)> {
    let channel = tonic::transport::Endpoint::from_shared(region.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut stream = ReplicationClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .pull(PullRequest {
            peer_region: peer.into(),
            from_sequence: 0,
            max_batch: 0,
        })
        .await
        .expect("the region serves its log")
        .into_inner();
    let mut batches = Vec::new();
    while let Some(batch) = stream.message().await.expect("a batch") {
        batches.push((
            batch.changes.len(),
            batch.changes.iter().map(|c| c.payload.len()).sum(),
        ));
        if batch.through_sequence >= end {
            return batches;
        }
    }
    panic!("the stream ended before sequence {end}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_megabytes_of_control_characters_replicate_intact_past_the_batch_budget() {
    init_logging();
    let mut rng = StdRng::seed_from_u64(seed("REPLICATION_HOSTILE_SEED"));
    const BUDGET: usize = 1 << 20;
    let mut cluster = ClusterSandbox::start_replicated(
        &REGIONS,
        &format!("max_batch_bytes = {BUDGET}\n"),
        |_, _| {},
    )
    .await;
    let (home, away) = (
        pool(&cluster.regions[0]).await,
        pool(&cluster.regions[1]).await,
    );
    // Written while the follower is away, so they wait in the log together.
    cluster.regions[1].stop_node().await;
    let http = reqwest::Client::new();
    let mut sent = HashMap::new();
    for _ in 0..4 {
        // About 1.7 MB of JSON on the wire (under the API's body limit),
        // more than the batch budget.
        let content = control_text(&mut rng, 280_000);
        let res = http
            .post(format!("{}/v1/jobs", cluster.regions[0].url()))
            .header("x-meridian-tenant", "acme")
            .json(&serde_json::json!({
                "model": TEST_MODEL,
                "messages": [{ "role": "user", "content": content }],
                "max_tokens": 4,
            }))
            .send()
            .await
            .expect("the region answers");
        assert_eq!(
            res.status(),
            202,
            "{}",
            res.text().await.unwrap_or_default()
        );
        let job: serde_json::Value = res.json().await.expect("a JSON job");
        let id: Uuid = job["id"].as_str().expect("an id").parse().expect("a UUID");
        sent.insert(id, content);
    }
    assert_eq!(contents(&home).await, sent, "stored intact at home");
    let end = log_end(&home).await;

    // Each job is over the budget: it comes alone in its batch, and a batch
    // of several changes stays within the budget.
    let batches = pulled(&cluster.regions[0], "eu-west", end as u64).await;
    assert!(batches.iter().map(|b| b.0).sum::<usize>() >= sent.len());
    for (changes, bytes) in &batches {
        assert!(
            *changes <= 1 || *bytes <= BUDGET,
            "a batch of {changes} changes carries {bytes} bytes: {batches:?}"
        );
    }

    cluster.regions[1].start_node().await;
    until(
        LIMIT,
        "the follower applies past the large jobs",
        || async { applied(&away, "us-east").await >= end },
    )
    .await;
    let got = contents(&away).await;
    for (id, content) in &sent {
        assert!(got.get(id) == Some(content), "job {id} arrived changed");
    }
    until(LIMIT, "no lag", || async {
        cluster.regions[1]
            .metric("meridian_replication_lag_changes", &["peer=\"us-east\""])
            .await
            == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_region_rebuilds_from_a_snapshot_of_rows_larger_than_a_default_message() {
    init_logging();
    let mut cluster = ClusterSandbox::start_replicated(&REGIONS, "", |_, _| {}).await;
    let home = pool(&cluster.regions[0]).await;
    // 600 finished jobs of 10 KiB each: 6 MB, past a gRPC message's default
    // 4 MiB in the default 500 rows of a chunk.
    sqlx::query(
        "INSERT INTO jobs (id, tenant, priority, state, request, finished_at)
         SELECT gen_random_uuid(), 'acme', 'batch', 'succeeded',
                jsonb_build_object('model', 'sim-fast', 'messages',
                    jsonb_build_array(jsonb_build_object('role', 'user',
                        'content', repeat(chr(65 + i % 26), 10240)))),
                now()
           FROM generate_series(1, 600) i",
    )
    .execute(&home)
    .await
    .expect("jobs inserted");
    cluster.regions[1].replace_postgres().await;
    let away = pool(&cluster.regions[1]).await;
    until(LIMIT, "the wiped region holds every row again", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(&away)
            .await
            .unwrap_or(0);
        n == 600
    })
    .await;
    assert_eq!(contents(&away).await, contents(&home).await);
    assert!(
        cluster.regions[1]
            .metric(
                "meridian_replication_snapshots_total",
                &["result=\"applied\""]
            )
            .await
            >= 1.0
    );
    until(LIMIT, "equal digests after the snapshot", || {
        converged(&cluster.regions)
    })
    .await;
}
