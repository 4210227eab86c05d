//! A forged peer: a Replication server (and client) that holds a valid
//! place in a region's config, or a valid region certificate, and lies.
//! Each lie is refused, changes nothing, and is counted.

use futures::StreamExt;
use futures::stream::BoxStream;
use meridian_mesh::Identity;
use meridian_proto::v1::replication_client::ReplicationClient;
use meridian_proto::v1::replication_server::{Replication, ReplicationServer};
use meridian_proto::v1::{
    AckRequest, AckResponse, Change, ChangeBatch, ChangeOp, LogPosition, PullRequest,
    SnapshotChunk, SnapshotRequest,
};
use meridian_tests::replicated::{pool, until};
use meridian_tests::{RegionSandbox, TEST_MODEL, TestPki, init_logging, mesh_channel};
use std::time::Duration;
use tonic::{Request, Response, Status};

use super::{LIMIT, applied, log_end};

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
