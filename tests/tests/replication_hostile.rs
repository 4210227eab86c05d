//! Replication against hostile data, two regions each with its own Redis
//! and PostgreSQL: rows far larger than a batch (jobs of megabytes of
//! control characters) replicate intact and the follower's watermark moves
//! past them; a snapshot of rows whose chunks outgrow a gRPC message's
//! default size rebuilds a wiped region.
//!
//! Seeded; `REPLICATION_HOSTILE_SEED=<n>` replays a run.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use meridian_mesh::Identity;
use meridian_proto::v1::replication_client::ReplicationClient;
use meridian_proto::v1::replication_server::{Replication, ReplicationServer};
use meridian_proto::v1::{
    AckRequest, AckResponse, Change, ChangeBatch, ChangeOp, LogPosition, PullRequest,
    SnapshotChunk, SnapshotRequest,
};
use meridian_tests::replicated::{converged, pool, seed, until};
use meridian_tests::{
    ClusterSandbox, RegionSandbox, TEST_MODEL, TestPki, init_logging, mesh_channel,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

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
async fn pulled(
    region: &meridian_tests::RegionSandbox,
    peer: &str,
    end: u64,
) -> Vec<(usize, usize)> {
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

/// A peer that holds a valid place in the region's config and lies: its
/// log holds another origin's change and a job whose epoch would wrap, its
/// snapshot claims a position in another origin's log, its relay brings
/// rows of the wrong origin, and its heartbeats report the region lost.
struct ForgedPeer {
    name: &'static str,
    /// Pull streams opened so far: the first starts with another origin's
    /// change, the second with a job of an absurd ownership epoch, when
    /// forging; later ones send heartbeats only, so the peer is heard and
    /// asked for relays.
    pulls: std::sync::atomic::AtomicU32,
    forge_changes: bool,
}

/// The job the forged peer sends with an epoch that would wrap.
const FORGED_JOB: &str = "00000000-0000-4000-8000-00000000f00d";

impl ForgedPeer {
    fn new(name: &'static str, forge_changes: bool) -> Self {
        Self {
            name,
            pulls: 0.into(),
            forge_changes,
        }
    }
}

const FORGED_INCARNATION: &str = "00000000-0000-0000-0000-00000000f00d";

fn forged_change(sequence: u64, origin: &str) -> Change {
    let id = format!("forged-{origin}-{sequence}");
    Change {
        sequence,
        table: "tenants".into(),
        key: id.clone().into_bytes(),
        op: ChangeOp::Upsert.into(),
        payload: serde_json::to_vec(&serde_json::json!({ "id": id })).unwrap(),
        hlc: 1,
        origin_region: origin.into(),
        committed_at: None,
    }
}

#[tonic::async_trait]
impl Replication for ForgedPeer {
    type PullStream = BoxStream<'static, Result<ChangeBatch, Status>>;
    type SnapshotStream = BoxStream<'static, Result<SnapshotChunk, Status>>;

    async fn pull(
        &self,
        request: Request<PullRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let from = request.into_inner().from_sequence;
        let pull = self
            .pulls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let changes = match pull {
            0 if self.forge_changes => vec![forged_change(from + 1, "ap-south")],
            1 if self.forge_changes => vec![Change {
                table: "jobs".into(),
                key: FORGED_JOB.into(),
                payload: serde_json::to_vec(&serde_json::json!({
                    "id": FORGED_JOB,
                    "owner_region": self.name,
                    "owner_epoch": i64::MAX,
                }))
                .unwrap(),
                ..forged_change(from + 1, self.name)
            }],
            _ => Vec::new(),
        };
        let high = from + changes.len() as u64;
        let batch = ChangeBatch {
            changes,
            high_watermark: high,
            log_incarnation: FORGED_INCARNATION.into(),
            clock: 0,
            through_sequence: high,
            lost_regions: vec!["us-east".into()],
        };
        let heartbeat = ChangeBatch {
            changes: Vec::new(),
            ..batch.clone()
        };
        let stream = futures::stream::once(async move { Ok(batch) }).chain(
            futures::stream::unfold(heartbeat, |b| async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Some((Ok(b.clone()), b))
            }),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ack(&self, _: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        Ok(Response::new(AckResponse { high_watermark: 0 }))
    }

    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let req = request.into_inner();
        let chunk = if req.origin_region.is_empty() {
            // Its own position, and one in a log it does not own.
            SnapshotChunk {
                changes: Vec::new(),
                positions: vec![
                    LogPosition {
                        origin_region: self.name.into(),
                        sequence: 5,
                        log_incarnation: FORGED_INCARNATION.into(),
                    },
                    LogPosition {
                        origin_region: "ap-south".into(),
                        sequence: 1_000_000,
                        log_incarnation: FORGED_INCARNATION.into(),
                    },
                ],
                complete: true,
            }
        } else {
            // Asked for ap-south's rows, it sends one of its own.
            SnapshotChunk {
                changes: vec![forged_change(0, self.name)],
                positions: Vec::new(),
                complete: true,
            }
        };
        Ok(Response::new(Box::pin(futures::stream::once(async move {
            Ok(chunk)
        }))))
    }
}

/// Serves `peer` on a free loopback port until the test ends.
async fn serve(peer: ForgedPeer) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ReplicationServer::new(peer))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

/// A loopback address nothing listens on.
async fn dead_addr() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

async fn refused(region: &RegionSandbox, peer: &str, reason: &str) -> f64 {
    region
        .metric(
            "meridian_replication_refused_total",
            &[&format!("peer=\"{peer}\""), &format!("reason=\"{reason}\"")],
        )
        .await
}

/// `refused` of a region served over mTLS, read as a gateway may.
async fn refused_over_tls(pki: &TestPki, region: &RegionSandbox, reason: &str) -> f64 {
    let mut config = (*pki.client(&Identity::gateway("edge").unwrap(), &[])).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let text = reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .build()
        .unwrap()
        .get(format!(
            "https://localhost:{}/metrics",
            region.addr().port()
        ))
        .send()
        .await
        .expect("the region answers")
        .text()
        .await
        .unwrap();
    let label = format!("reason=\"{reason}\"");
    text.lines()
        .filter(|l| l.starts_with("meridian_replication_refused_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_peers_changes_positions_and_relays_are_refused_and_counted() {
    init_logging();
    let forged = serve(ForgedPeer::new("eu-west", true)).await;
    // ap-south never answers, so its changes are relayed through eu-west.
    let region = RegionSandbox::start_with_config(
        "us-east",
        &format!(
            "[replication]\n\
             peers = [{{ region = \"eu-west\", address = \"{forged}\" }}, \
                      {{ region = \"ap-south\", address = \"{}\" }}]\n\
             bootstrap_from = \"eu-west\"\nadopt_after_ms = 0\nrelay_after_ms = 300\n\
             heartbeat_interval_ms = 200\nreconnect_backoff_ms = 50\nreconnect_backoff_max_ms = 200\n",
            dead_addr().await
        ),
    )
    .await;
    let db = pool(&region).await;
    until(
        LIMIT,
        "the forged change refused, the relay refused",
        || async {
            refused(&region, "eu-west", "foreign_origin").await >= 1.0
                && refused(&region, "eu-west", "epoch_ahead").await >= 1.0
                && refused(&region, "eu-west", "relay_origin").await >= 1.0
        },
    )
    .await;
    let tenants: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants WHERE id LIKE 'forged-%'")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(tenants, 0, "nothing forged was applied");
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(jobs, 0, "the job of a wrapping epoch was not applied");
    // The snapshot's position in eu-west's own log holds; the one it claimed
    // in ap-south's log was not taken.
    assert_eq!(applied(&db, "eu-west").await, 5);
    assert_eq!(applied(&db, "ap-south").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_reporting_a_healthy_region_lost_does_not_hold_its_jobs() {
    init_logging();
    // eu-west reports us-east lost in every heartbeat; ap-south, which
    // us-east hears, does not.
    let forged = serve(ForgedPeer::new("eu-west", false)).await;
    let (mut east, mut south) = tokio::join!(
        RegionSandbox::start("us-east"),
        RegionSandbox::start("ap-south")
    );
    let settings = "heartbeat_interval_ms = 200\nreconnect_backoff_ms = 50\n\
                    reconnect_backoff_max_ms = 200\nadopt_after_ms = 3000\n";
    let config = |peers: &[(&str, std::net::SocketAddr)]| {
        let peers: Vec<String> = peers
            .iter()
            .map(|(n, a)| format!("{{ region = \"{n}\", address = \"{a}\" }}"))
            .collect();
        format!("[replication]\npeers = [{}]\n{settings}", peers.join(", "))
    };
    let (east_addr, south_addr) = (east.addr(), south.addr());
    east.stop_node().await;
    east.rewrite_config(&config(&[("eu-west", forged), ("ap-south", south_addr)]));
    south.stop_node().await;
    south.rewrite_config(&config(&[("eu-west", forged), ("us-east", east_addr)]));
    east.start_node().await;
    south.start_node().await;
    let http = reqwest::Client::new();
    let id =
        meridian_tests::replicated::submit_job(&http, &east, "acme", TEST_MODEL, 4, "hi").await;
    let db = pool(&east).await;
    until(
        Duration::from_secs(20),
        "the job runs in its home region",
        || async {
            let state: String = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
                .bind(id)
                .fetch_one(&db)
                .await
                .unwrap();
            state == "succeeded"
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_past_the_logs_end_from_a_valid_peer_certificate_is_refused() {
    init_logging();
    let pki = TestPki::new();
    let region = RegionSandbox::start_with_config(
        "us-east",
        &format!(
            "{}[replication]\npeers = [{{ region = \"eu-west\", address = \"{}\" }}]\n",
            pki.region_toml("us-east"),
            dead_addr().await
        ),
    )
    .await;
    let db = pool(&region).await;
    let end = log_end(&db).await as u64;
    let channel = mesh_channel(
        region.addr(),
        pki.client(&Identity::region("eu-west").unwrap(), &[b"h2"]),
        &meridian_mesh::region_server_name("us-east"),
        Some(Identity::region("us-east").unwrap()),
    );
    let mut client = ReplicationClient::new(channel);
    let status = client
        .ack(AckRequest {
            peer_region: "eu-west".into(),
            applied_sequence: end + 1_000_000,
        })
        .await
        .expect_err("an ack past the log's end is refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status}");
    let stored: Option<i64> =
        sqlx::query_scalar("SELECT acked_sequence FROM replication_peers WHERE peer = 'eu-west'")
            .fetch_optional(&db)
            .await
            .unwrap();
    assert!(stored.unwrap_or(0) <= end as i64, "stored {stored:?}");
    // Only what the log holds is acknowledged.
    client
        .ack(AckRequest {
            peer_region: "eu-west".into(),
            applied_sequence: end,
        })
        .await
        .expect("an ack within the log is taken");
    assert_eq!(refused_over_tls(&pki, &region, "ack_ahead").await, 1.0);
}
/// Copies `region`'s PostgreSQL data directory aside (`to`) or back over
/// it (`from`), with the server stopped, as a file-level backup or restore.
async fn copy_data(region: &mut RegionSandbox, backup: &std::path::Path, restore: bool) {
    region.stop_node().await;
    region.postgres.stop().await.expect("PostgreSQL stops");
    let data = region.postgres.data_dir().to_path_buf();
    let (from, to) = if restore {
        (backup, data.as_path())
    } else {
        (data.as_path(), backup)
    };
    if to.exists() {
        std::fs::remove_dir_all(to).expect("the old copy is removed");
    }
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp runs")
        .success();
    assert!(ok, "copied {} to {}", from.display(), to.display());
    region.postgres.restart().await.expect("PostgreSQL starts");
    region.start_node().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_write_after_a_restore_from_backup_is_confirmed_only_once_a_peer_has_it() {
    init_logging();
    let mut cluster =
        ClusterSandbox::start_replicated(&REGIONS, "sync_timeout_ms = 10000\n", |_, _| {}).await;
    let http = reqwest::Client::new();
    let submit = |url: String, content: String, sync: bool| {
        let http = http.clone();
        async move {
            let res = http
                .post(format!("{url}/v1/jobs"))
                .header("x-meridian-tenant", "acme")
                .header("x-meridian-durability", if sync { "sync" } else { "async" })
                .json(&serde_json::json!({
                    "model": TEST_MODEL,
                    "messages": [{ "role": "user", "content": content }],
                    "max_tokens": 4,
                }))
                .send()
                .await
                .expect("the region answers");
            assert_eq!(res.status(), 202);
            let job: serde_json::Value = res.json().await.unwrap();
            job["id"].as_str().unwrap().parse::<Uuid>().unwrap()
        }
    };
    let away = pool(&cluster.regions[1]).await;
    let caught_up = |end: i64| {
        let away = away.clone();
        async move {
            until(LIMIT, "the peer applies the whole log", || async {
                applied(&away, "us-east").await >= end
            })
            .await;
        }
    };
    for i in 0..2 {
        submit(cluster.regions[0].url(), format!("before {i}"), false).await;
    }
    let end = log_end(&pool(&cluster.regions[0]).await).await;
    caught_up(end).await;
    let backup = tempfile::tempdir().unwrap();
    let backup = backup.path().join("pgdata");
    copy_data(&mut cluster.regions[0], &backup, false).await;

    // Written after the backup and applied by the peer: the peer's
    // watermark now counts changes the restored log will not hold.
    for i in 0..4 {
        submit(cluster.regions[0].url(), format!("after {i}"), false).await;
    }
    let later = log_end(&pool(&cluster.regions[0]).await).await;
    caught_up(later).await;
    copy_data(&mut cluster.regions[0], &backup, true).await;
    let home = pool(&cluster.regions[0]).await;
    assert!(log_end(&home).await < later, "the log is the backup's");

    // The peer's watermark, as its follower acknowledges it on reconnecting
    // (sent here so it arrives before the write, not only perhaps).
    let channel = tonic::transport::Endpoint::from_shared(cluster.regions[0].url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let stale = ReplicationClient::new(channel)
        .ack(AckRequest {
            peer_region: "eu-west".into(),
            applied_sequence: applied(&away, "us-east").await.max(later) as u64,
        })
        .await;
    println!("the stale ack: {stale:?}");
    let acked: i64 = sqlx::query_scalar(
        "SELECT coalesce(max(acked_sequence), 0) FROM replication_peers WHERE peer = 'eu-west'",
    )
    .fetch_one(&home)
    .await
    .unwrap();
    let end = log_end(&home).await;
    assert!(
        acked <= end,
        "an ack of {acked} stored past the log's end {end}"
    );

    // Confirmed means on the peer: killed at once, the write is there.
    let id = submit(cluster.regions[0].url(), "synchronous".into(), true).await;
    cluster.regions[0].kill_node();
    let on_peer: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE id = $1)")
        .bind(id)
        .fetch_one(&away)
        .await
        .unwrap();
    assert!(on_peer, "a confirmed synchronous write is not on the peer");
}
