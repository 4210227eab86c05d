//! Cross-region replication: this region's change log (a transactional
//! outbox filled by triggers), the `Replication` service peers pull it
//! through, one follower per peer that applies the peer's log here, the
//! digest that shows whether regions agree, and trimming of the log.
//!
//! See `docs/ARCHITECTURE.md` (Replication) for the choices and why.

mod apply;
mod hlc;
mod log;
mod metrics;
mod pull;
mod readings;
mod relay;
mod residency;
mod serve;
mod snapshot;
mod sync;
mod tables;
mod trust;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use meridian_mesh::rustls::ClientConfig;
use meridian_mesh::{ArcSwap, Identity, MeshConnector};
use meridian_proto::v1::PeerLag;
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};

pub use self::apply::{Applied, apply_batch, apply_batch_through};
pub use self::hlc::{ClockDrift, Hlc, check_drift};
pub(crate) use self::readings::{READINGS_PER_CHANGE, notify_commit, tick};
pub(crate) use self::serve::service;
pub(crate) use self::sync::{DURABILITY_HEADER, Durability};

use self::metrics::Metrics;
use self::pull::PeerState;
use crate::config::ReplicationConfig;
use crate::error::Error;
use crate::mesh::Mesh;
use crate::peers::Peers;

/// Largest replication message (Pull batch, snapshot chunk) either end
/// encodes or accepts: twice the largest `max_batch_bytes`, so that a batch
/// may hold a change that outgrew the budget, alone.
pub(crate) const MAX_MESSAGE_BYTES: usize = 2 * crate::config::MAX_BATCH_BYTES as usize;

/// Largest change that replicates: a message less room for its framing
/// (the batch's fields, the protobuf and gRPC headers).
const MAX_CHANGE_BYTES: usize = MAX_MESSAGE_BYTES - (64 << 10);

/// The node's replication: shared by the service, the followers and status.
pub(crate) struct Replication {
    region: String,
    config: ReplicationConfig,
    pool: PgPool,
    /// Bumped on every commit to the log (LISTEN/NOTIFY).
    commits: watch::Sender<u64>,
    /// What each peer acknowledged of this log, for synchronous writers.
    acked: sync::Acked,
    metrics: Arc<Metrics>,
    /// How far this region has followed each peer's log.
    peers: Vec<Arc<PeerState>>,
    /// Which peers are heard; the followers report to it.
    liveness: Arc<Peers>,
    shutdown: CancellationToken,
}

impl Replication {
    /// Starts the commit listener, the trimmer and one follower per peer;
    /// in a region whose database is empty, the followers start once a
    /// snapshot from a peer is applied.
    pub(crate) fn start(
        region: &str,
        config: &ReplicationConfig,
        mesh: &Mesh,
        pool: &PgPool,
        liveness: Arc<Peers>,
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Arc<Self>, Error> {
        let tls = client_tls(mesh, region)?;
        let channels = config
            .peers
            .iter()
            .map(|p| channel(p, tls.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let r = Arc::new(Self {
            region: region.to_string(),
            config: config.clone(),
            pool: pool.clone(),
            commits: watch::channel(0).0,
            acked: watch::channel(Default::default()).0,
            metrics: Arc::new(Metrics::new(region)),
            peers: config
                .peers
                .iter()
                .map(|p| Arc::new(PeerState::new(&p.region)))
                .collect(),
            liveness,
            shutdown: shutdown.clone(),
        });
        tasks.spawn(log::listen(
            pool.clone(),
            r.commits.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(log::prune_periodically(
            pool.clone(),
            config.clone(),
            r.metrics.clone(),
            shutdown.clone(),
        ));
        let peers: Vec<_> = config.peers.iter().cloned().zip(channels).collect();
        let (replication, followers) = (r.clone(), tasks.clone());
        tasks.spawn(async move {
            let r = replication;
            snapshot::bootstrap(&r, &peers).await;
            followers.spawn(relay::run(r.clone(), peers.clone()));
            for ((peer, channel), state) in peers.into_iter().zip(&r.peers) {
                followers.spawn(pull::follow(r.clone(), peer, state.clone(), channel));
            }
        });
        Ok(r)
    }

    /// Lag behind each peer, sorted by peer, for `Admin.RegionStatus`.
    pub(crate) fn lag(&self) -> Vec<PeerLag> {
        let mut lag: Vec<PeerLag> = self
            .peers
            .iter()
            .map(|p| {
                let events = p
                    .high
                    .load(Ordering::Relaxed)
                    .saturating_sub(p.applied.load(Ordering::Relaxed));
                PeerLag {
                    peer: p.region.clone(),
                    lag_events: events,
                    lag_ms: if events == 0 {
                        0
                    } else {
                        p.lag_ms.load(Ordering::Relaxed)
                    },
                }
            })
            .collect();
        lag.sort_by(|a, b| a.peer.cmp(&b.peer));
        lag
    }

    /// How far behind each peer this region's reads may be, sorted by
    /// peer: the silence since the peer last answered, plus the age of its
    /// changes still waiting here. `None` for a peer not yet caught up with
    /// since the node started, whose writes may all be missing.
    pub(crate) fn behind(&self) -> Vec<(String, Option<Duration>)> {
        self.lag()
            .into_iter()
            .map(|lag| {
                let behind = self
                    .liveness
                    .caught_up_and_heard(&lag.peer)
                    .map(|silence| silence + Duration::from_millis(u64::from(lag.lag_ms)));
                (lag.peer, behind)
            })
            .collect()
    }

    /// The Prometheus text of replication, with each peer's lost gauge
    /// read from the liveness as it is now.
    pub(crate) fn render_metrics(&self) -> String {
        for (peer, lost) in self.liveness.liveness() {
            self.metrics
                .lost
                .with_label_values(&[peer])
                .set(i64::from(lost));
        }
        self.metrics.render()
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// The digest of one replicated table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableDigest {
    /// Table name; `replication_tombstones` for deleted keys.
    pub table: String,
    /// Rows in it.
    pub rows: i64,
    /// SHA-256 (hex) over every row's key, clock, origin and content in key
    /// order.
    pub sha256: String,
}

/// The digest of every replicated table (and the tombstones) of the
/// database behind `pool`: two regions that agree have equal digests.
pub async fn digest(pool: &PgPool) -> Result<Vec<TableDigest>, Error> {
    let mut tx = pool.begin().await?;
    // One snapshot for all tables, and timestamps rendered the same in every
    // region whatever the server's time zone.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SET LOCAL TimeZone = 'UTC'")
        .execute(&mut *tx)
        .await?;
    let mut out = Vec::new();
    for table in tables::TABLES {
        let (rows, sha256): (i64, String) = sqlx::query_as(sqlx::AssertSqlSafe(table.digest_sql()))
            .fetch_one(&mut *tx)
            .await?;
        out.push(TableDigest {
            table: table.name.to_string(),
            rows,
            sha256,
        });
    }
    let (rows, sha256): (i64, String) = sqlx::query_as(tables::TOMBSTONES_DIGEST)
        .fetch_one(&mut *tx)
        .await?;
    out.push(TableDigest {
        table: "replication_tombstones".into(),
        rows,
        sha256,
    });
    tx.commit().await?;
    Ok(out)
}

/// This region's client certificate for calling peers, reloaded as its
/// files change; `None` in plaintext mode.
fn client_tls(mesh: &Mesh, region: &str) -> Result<Option<Arc<ArcSwap<ClientConfig>>>, Error> {
    let Mesh::Tls {
        files,
        reload_interval,
        ..
    } = mesh
    else {
        return Ok(None);
    };
    let expected = Identity::region(region).map_err(config_error)?;
    let tls = meridian_mesh::watch(files.clone(), *reload_interval, move |loaded| {
        if loaded.identity != expected {
            return Err(format!(
                "the certificate names {}, not {expected}",
                loaded.identity
            ));
        }
        meridian_mesh::client_config(loaded)
    })
    .map_err(config_error)?;
    Ok(Some(tls))
}

fn config_error(message: String) -> Error {
    Error::Config {
        origin: "replication".into(),
        message,
    }
}

/// A lazily connecting channel to `peer`; over mTLS it checks that the
/// server is that region (DNS name and identity URI).
fn channel(
    peer: &crate::config::PeerConfig,
    tls: Option<&Arc<ArcSwap<ClientConfig>>>,
) -> Result<Channel, Error> {
    let endpoint = Endpoint::from_shared(format!("http://{}", peer.address))
        .map_err(|e| config_error(format!("peer {}: {e}", peer.region)))?
        .connect_timeout(Duration::from_secs(3))
        // Peers are far apart: with HTTP/2's default 64 KiB window a Pull
        // stream carries at most 64 KiB per round trip (~350 KiB/s at
        // 180 ms), which a busy region outgrows. The adaptive window sizes
        // itself to the link's bandwidth-delay product.
        .http2_adaptive_window(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let Some(tls) = tls else {
        return Ok(endpoint.connect_lazy());
    };
    let tls = tls.clone();
    let connector = MeshConnector::new(
        Arc::new(move || tls.load_full()),
        &meridian_mesh::region_server_name(&peer.region),
        Some(Identity::region(&peer.region).map_err(config_error)?),
    )
    .map_err(config_error)?;
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// The last change this transaction wrote to this region's replication
/// log, for a writer that answers only once a peer has applied it. The
/// outbox triggers drew from the log's sequence in this session, so
/// `currval` is this transaction's whatever else commits.
pub(crate) async fn logged_sequence(tx: &mut sqlx::PgConnection) -> Result<u64, Error> {
    let sequence: i64 = sqlx::query_scalar(
        "SELECT currval(pg_get_serial_sequence('replication_outbox', 'sequence'))",
    )
    .fetch_one(tx)
    .await?;
    Ok(u64::try_from(sequence).unwrap_or(0))
}
