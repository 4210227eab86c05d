//! A running regional node: binds, connects its Redis and PostgreSQL, serves,
//! and shuts down within its grace period.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::answer::{self, Pipeline};
use crate::api;
use crate::config::Config;
use crate::error::Error;
use crate::inference::{Embedder, Inference};
use crate::peers::Peers;
use crate::store;

/// A started node. Dropping it without [`RegionalNode::shutdown`] cancels it.
pub struct RegionalNode {
    region: String,
    addr: SocketAddr,
    shutdown: CancellationToken,
    server: Option<JoinHandle<Result<(), Error>>>,
    pool: sqlx::PgPool,
    health: tonic_health::server::HealthReporter,
    stores: Arc<store::StoreHealth>,
    tasks: TaskTracker,
    spend: Arc<crate::tenancy::spend::Spend>,
    grace: std::time::Duration,
    tracer: meridian_mesh::Tracer,
    time_series: crate::telemetry::Mode,
}

impl RegionalNode {
    /// Binds the API address, connects to Redis and PostgreSQL (failing fast
    /// with the cause when either is unreachable), migrates, and starts serving.
    pub async fn start(config: Config) -> Result<Self, Error> {
        // Certificates first: a bad file fails the start before any port or
        // store is touched.
        let tls = crate::mesh::server_tls(&config.mesh, &config.region)?;
        let tracer = meridian_mesh::Tracer::start(
            &config.tracing,
            "meridian-regional",
            vec![meridian_mesh::trace::KeyValue::new(
                "meridian.region",
                config.region.clone(),
            )],
        )
        .map_err(|message| Error::Config {
            origin: "tracing".into(),
            message,
        })?;
        // The embedding model loads while the stores connect, and the node
        // serves only once it has: readiness never reports a node whose
        // first embedding request would wait for a load.
        let embedder = match &config.embeddings {
            Some(embeddings) => {
                Embedder::check_files(embeddings)?;
                let (embeddings, region) = (embeddings.clone(), config.region.clone());
                Some(tokio::task::spawn_blocking(move || {
                    Embedder::start(&embeddings, &region)
                }))
            }
            None => None,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Listen {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr()?;
        let redis = connect_redis(&config).await?;
        let pool = store::connect(
            &config.postgres_url,
            &config.region,
            config.postgres_max_connections,
            config.connect_timeout,
            config.stores.acquire_timeout(),
        )
        .await?;
        let stores = store::StoreHealth::new(&config.region);

        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let spend = crate::tenancy::spend::Spend::start(
            pool.clone(),
            &config.region,
            &config.spend,
            &tasks,
        );
        let telemetry = crate::telemetry::start(
            &pool,
            &config.region,
            &config.telemetry,
            !config.replication.telemetry_peers.is_empty(),
            spend.clone(),
            &shutdown,
            &tasks,
        )
        .await?;
        let time_series = telemetry.mode;
        let embedder = match embedder {
            Some(load) => {
                Some(Arc::new(load.await.map_err(|e| {
                    Error::EmbeddingModel(format!("loading failed: {e}"))
                })??))
            }
            None => None,
        };
        let peers = Arc::new(Peers::new(
            &config.region,
            config.replication.peers.iter().map(|p| p.region.clone()),
            config.replication.adopt_after(),
            config.replication.fence_after(),
        ));
        let replication = crate::replication::Replication::start(
            &config.region,
            &config.replication,
            &config.mesh,
            &pool,
            peers.clone(),
            &shutdown,
            &tasks,
        )?;
        let (health, health_service) = tonic_health::server::health_reporter();
        for service in [
            "",
            "meridian.v1.Inference",
            "meridian.v1.Admin",
            "meridian.v1.Telemetry",
            "meridian.v1.Jobs",
            "meridian.v1.Replication",
        ] {
            health
                .set_service_status(service, tonic_health::ServingStatus::Serving)
                .await;
        }
        stores.start(
            store::Urls {
                postgres: config.postgres_url.clone(),
                redis: redis::Client::open(config.redis_url.as_str()).map_err(|e| {
                    Error::RedisUnreachable {
                        url: store::redact(&config.redis_url),
                        message: e.to_string(),
                    }
                })?,
            },
            &config.stores,
            health.clone(),
            &shutdown,
            &tasks,
        );
        let inference = Arc::new(Inference::new(&config, shutdown.clone())?);
        let cache = Arc::new(crate::cache::ResponseCache::new(
            &config.cache,
            &config.region,
            redis.clone(),
            embedder.clone(),
        ));
        let pipeline = Arc::new(Pipeline::new(answer::Parts {
            region: config.region.clone(),
            pool: pool.clone(),
            stores: stores.clone(),
            inference: inference.clone(),
            cache: cache.clone(),
            usage: telemetry.usage.clone(),
            spend: spend.clone(),
            replication: replication.clone(),
            tasks: tasks.clone(),
            tracer: tracer.clone(),
            limits: answer::Limits {
                messages: config.inference.max_messages as usize,
                conversation_bytes: config.inference.max_conversation_bytes,
            },
        }));
        let jobs = Arc::new(crate::queue::Queue::new(
            pool.clone(),
            redis.clone(),
            stores.clone(),
            config.jobs.clone(),
            &config.region,
            shutdown.clone(),
        ));
        crate::queue::Workers {
            jobs: jobs.clone(),
            pipeline: pipeline.clone(),
            peers,
            tasks: tasks.clone(),
            tracer: tracer.clone(),
        }
        .start();
        if config.inference.response_retention_days > 0 {
            tasks.spawn(crate::responses::expire_periodically(
                pool.clone(),
                u64::from(config.inference.response_retention_days),
                shutdown.clone(),
            ));
        }
        tasks.spawn(cache.clone().follow(shutdown.clone()));
        tasks.spawn(crate::inference::routes::follow(
            inference.clone(),
            pool.clone(),
            shutdown.clone(),
        ));
        let api = api::Parts {
            region: config.region.clone(),
            pipeline,
            inference,
            pool: pool.clone(),
            stores: stores.clone(),
            shutdown: shutdown.clone(),
            status: Arc::new(crate::status::NodeStatus::new(config.max_in_flight)),
            telemetry,
            jobs,
            embedder,
            cache,
            tracer: tracer.clone(),
            replication,
            spend: spend.clone(),
            max_body_bytes: config.max_body_bytes,
            stream_write_timeout: config.stream_write_timeout,
        };
        let app = crate::mesh::protect(api::app(api, health_service), &config.mesh, pool.clone());

        let token = shutdown.clone();
        let grace = config.shutdown_grace;
        let region = config.region.clone();
        let server = tokio::spawn(async move {
            let serve = crate::mesh::serve(listener, app, tls, token.clone());
            tokio::pin!(serve);
            tokio::select! {
                res = &mut serve => res.map_err(Error::Io),
                () = async {
                    token.cancelled().await;
                    tokio::time::sleep(grace).await;
                } => {
                    tracing::warn!(region = %region, grace_ms = grace.as_millis() as u64, "grace period over, closing remaining connections");
                    Ok(())
                }
            }
        });
        tracing::info!(region = %config.region, %addr, "regional node serving");
        Ok(Self {
            region: config.region,
            addr,
            shutdown,
            server: Some(server),
            pool,
            health,
            stores,
            tasks,
            spend,
            grace: config.shutdown_grace,
            tracer,
            time_series,
        })
    }

    /// This node's tracer, to flush its spans (tests do, before they look
    /// at a collector).
    pub fn tracer(&self) -> &meridian_mesh::Tracer {
        &self.tracer
    }

    /// The address the API listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// This node's region.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// How the region keeps its time series: `timescaledb` (hypertables)
    /// or `pg_partman` (native partitions).
    pub fn time_series_mode(&self) -> &'static str {
        self.time_series.name()
    }

    /// Stops accepting, lets in-flight requests finish within the grace
    /// period, and closes the database pool.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        // Health checkers see NOT_SERVING first, so a gateway stops sending
        // new work while in-flight requests drain; the store probes no
        // longer say otherwise.
        self.stores.close().await;
        for service in [
            "",
            "meridian.v1.Inference",
            "meridian.v1.Admin",
            "meridian.v1.Telemetry",
            "meridian.v1.Jobs",
            "meridian.v1.Replication",
        ] {
            self.health
                .set_service_status(service, tonic_health::ServingStatus::NotServing)
                .await;
        }
        self.shutdown.cancel();
        let result = match self.server.take() {
            Some(server) => server
                .await
                .unwrap_or_else(|e| Err(Error::Unavailable(format!("server task failed: {e}")))),
            None => Ok(()),
        };
        // Every request has ended: its spend is counted, and written now.
        self.spend.stop();
        // Background tasks saw the same cancellation; they get what is left
        // of the grace period to flush and hand back their work.
        self.tasks.close();
        if tokio::time::timeout(self.grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(region = %self.region, "background tasks still running after the grace period");
        }
        self.pool.close().await;
        // The last spans go out before the node reports itself stopped.
        let tracer = self.tracer.clone();
        let _ = tokio::task::spawn_blocking(move || tracer.shutdown()).await;
        tracing::info!(region = %self.region, "regional node stopped");
        result
    }

    /// Waits until the server stops on its own (an I/O failure) or `signal`
    /// resolves, then shuts down.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> Result<(), Error> {
        let server = self.server.as_mut().expect("server runs until shutdown");
        tokio::select! {
            res = server => {
                self.server = None;
                res.unwrap_or_else(|e| Err(Error::Unavailable(format!("server task failed: {e}"))))
            }
            () = signal => self.shutdown().await,
        }
    }
}

impl Drop for RegionalNode {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Connects to the region's Redis and checks it answers. The connection
/// manager reconnects on its own later, so a Redis restart does not need a
/// node restart; commands fail fast (response timeout) while it is away.
async fn connect_redis(config: &Config) -> Result<redis::aio::ConnectionManager, Error> {
    let unreachable = |message: String| Error::RedisUnreachable {
        url: store::redact(&config.redis_url),
        message,
    };
    let client =
        redis::Client::open(config.redis_url.as_str()).map_err(|e| unreachable(e.to_string()))?;
    let manager_config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.connect_timeout))
        .set_number_of_retries(2);
    let mut conn = tokio::time::timeout(
        config.connect_timeout,
        client.get_connection_manager_with_config(manager_config),
    )
    .await
    .map_err(|_| unreachable(format!("no answer within {:?}", config.connect_timeout)))?
    .map_err(|e| unreachable(e.to_string()))?;
    let _: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    Ok(conn)
}
