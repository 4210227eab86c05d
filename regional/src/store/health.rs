//! Whether this region's PostgreSQL and Redis answer now.
//!
//! A probe per store runs `SELECT 1` / `PING` on a connection of its own
//! every `stores.probe_interval_ms`. After `stores.failures_to_trip` failed
//! probes in a row the store is down: requests that need it are refused at
//! once with [`Error::StoreUnavailable`] (503, `UNAVAILABLE`), which the
//! gateway replays in another region, instead of each waiting out a pool
//! timeout. One answered probe brings it back, so a returning store takes
//! its traffic back without a restart. The probe's own connection keeps it
//! independent of the pool: a pool busy with slow queries is not a dead
//! database.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::core::Collector;
use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::StoresConfig;
use crate::error::Error;

/// A store the region depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Store {
    Postgres,
    Redis,
}

impl Store {
    pub(crate) const ALL: [Store; 2] = [Store::Postgres, Store::Redis];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Redis => "redis",
        }
    }

    /// The gRPC services that cannot serve without this store. Plain
    /// inference needs neither, so `meridian.v1.Inference` and the overall
    /// status stay `SERVING`; what needs the store is refused request by
    /// request.
    fn services(self) -> &'static [&'static str] {
        match self {
            Self::Postgres => &["meridian.v1.Jobs", "meridian.v1.Telemetry"],
            // Jobs are accepted into PostgreSQL without Redis, and cached
            // answers are only skipped.
            Self::Redis => &[],
        }
    }
}

/// The probes' verdicts and what they count.
pub(crate) struct StoreHealth {
    /// One per store, in the order of [`Store::ALL`].
    stores: [Verdict; 2],
    /// Held while the gRPC health statuses are written, so a probe cannot
    /// write `SERVING` after shutdown wrote `NOT_SERVING`.
    reporting: tokio::sync::Mutex<Reporting>,
    metrics: Metrics,
}

/// One store's state as its probe last saw it.
struct Verdict {
    up: AtomicBool,
    /// Woken when the store comes back, for work that waited for it (jobs
    /// accepted while Redis was down are enqueued then).
    back: tokio::sync::Notify,
}

struct Reporting {
    health: Option<tonic_health::server::HealthReporter>,
}

impl StoreHealth {
    /// Both stores up: the node checked them at start.
    pub(crate) fn new(region: &str) -> Arc<Self> {
        let metrics = Metrics::new(region);
        for store in Store::ALL {
            metrics.up.with_label_values(&[store.name()]).set(1);
        }
        let verdict = || Verdict {
            up: AtomicBool::new(true),
            back: tokio::sync::Notify::new(),
        };
        Arc::new(Self {
            stores: [verdict(), verdict()],
            reporting: tokio::sync::Mutex::new(Reporting { health: None }),
            metrics,
        })
    }

    fn verdict(&self, store: Store) -> &Verdict {
        &self.stores[store as usize]
    }

    /// Resolves the next time `store` comes back after being down.
    pub(crate) async fn returned(&self, store: Store) {
        self.verdict(store).back.notified().await;
    }

    pub(crate) fn is_up(&self, store: Store) -> bool {
        self.verdict(store).up.load(Ordering::Relaxed)
    }

    /// `Ok` when `store` is up; else the refusal a request that needs it
    /// gets.
    pub(crate) fn require(&self, store: Store) -> Result<(), Error> {
        if self.is_up(store) {
            return Ok(());
        }
        Err(Error::StoreUnavailable(store.name()))
    }

    /// Counts a refusal that named `store` (the `x-meridian-unavailable`
    /// value of an answer): a probe's verdict and a query that lost its
    /// connection alike, HTTP and gRPC alike.
    pub(crate) fn count_refusal(&self, store: &[u8]) {
        if let Some(store) = Store::ALL
            .into_iter()
            .find(|s| s.name().as_bytes() == store)
        {
            self.metrics
                .refused
                .with_label_values(&[store.name()])
                .inc();
        }
    }

    /// The stores that are down now, by name.
    pub(crate) fn down(&self) -> Vec<&'static str> {
        Store::ALL
            .into_iter()
            .filter(|s| !self.is_up(*s))
            .map(Store::name)
            .collect()
    }

    pub(crate) fn render_metrics(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.metrics.registry.gather(), &mut out)
            .expect("text encoding of gathered metrics");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    /// Starts a probe per store until `shutdown`; transitions update the
    /// gRPC health of the services that need the store.
    pub(crate) fn start(
        self: &Arc<Self>,
        urls: Urls,
        config: &StoresConfig,
        health: tonic_health::server::HealthReporter,
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
    ) {
        // No await can happen before the probes start: nothing else holds
        // the lock yet.
        if let Ok(mut reporting) = self.reporting.try_lock() {
            reporting.health = Some(health);
        }
        let postgres = urls.postgres;
        tasks.spawn(self.clone().probe(
            Store::Postgres,
            move || {
                let url = postgres.clone();
                async move {
                    sqlx::PgConnection::connect(&url)
                        .await
                        .map(Probed::Postgres)
                        .map_err(|e| e.to_string())
                }
            },
            config.clone(),
            shutdown.clone(),
        ));
        let redis = urls.redis;
        tasks.spawn(self.clone().probe(
            Store::Redis,
            move || {
                let client = redis.clone();
                async move {
                    client
                        .get_multiplexed_async_connection()
                        .await
                        .map(Probed::Redis)
                        .map_err(|e| e.to_string())
                }
            },
            config.clone(),
            shutdown.clone(),
        ));
    }

    /// Marks the node as shutting down: probes no longer write health.
    pub(crate) async fn close(&self) {
        self.reporting.lock().await.health = None;
    }

    async fn probe<F, Fut>(
        self: Arc<Self>,
        store: Store,
        connect: F,
        config: StoresConfig,
        shutdown: CancellationToken,
    ) where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Probed, String>>,
    {
        let mut conn: Option<Probed> = None;
        let mut failures = 0u32;
        let mut tick = tokio::time::interval(config.probe_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let answered = tokio::time::timeout(config.probe_timeout(), async {
                if conn.is_none() {
                    conn = Some(connect().await?);
                }
                match conn.as_mut() {
                    Some(c) => c.ping().await,
                    None => Ok(()),
                }
            })
            .await
            .map_err(|_| format!("no answer within {:?}", config.probe_timeout()))
            .and_then(|r| r);
            match answered {
                Ok(()) => {
                    failures = 0;
                    self.set(store, true, None).await;
                }
                Err(e) => {
                    // A connection that failed once is not trusted again.
                    conn = None;
                    failures = failures.saturating_add(1);
                    if failures >= config.failures_to_trip {
                        self.set(store, false, Some(&e)).await;
                    }
                }
            }
        }
    }

    async fn set(&self, store: Store, up: bool, cause: Option<&str>) {
        let verdict = self.verdict(store);
        if verdict.up.swap(up, Ordering::Relaxed) == up {
            return;
        }
        let name = store.name();
        if up {
            tracing::info!(
                store = name,
                "store answers again; requests that need it are served"
            );
            verdict.back.notify_waiters();
        } else {
            tracing::warn!(
                store = name,
                cause = cause.unwrap_or_default(),
                "store is down; requests that need it are refused with 503 for another region"
            );
        }
        self.metrics
            .up
            .with_label_values(&[name])
            .set(i64::from(up));
        self.metrics
            .transitions
            .with_label_values(&[name, if up { "up" } else { "down" }])
            .inc();
        let reporting = self.reporting.lock().await;
        if let Some(health) = &reporting.health {
            // A service is served when every store it needs is up.
            for service in store.services() {
                let serving = Store::ALL
                    .into_iter()
                    .filter(|s| s.services().contains(service))
                    .all(|s| self.is_up(s));
                let status = if serving {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                health.set_service_status(*service, status).await;
            }
        }
    }
}

/// Where the probes connect.
pub(crate) struct Urls {
    pub postgres: String,
    pub redis: redis::Client,
}

/// A probe's own connection.
enum Probed {
    Postgres(sqlx::PgConnection),
    Redis(redis::aio::MultiplexedConnection),
}

impl Probed {
    async fn ping(&mut self) -> Result<(), String> {
        match self {
            Self::Postgres(c) => c.ping().await.map_err(|e| e.to_string()),
            Self::Redis(c) => redis::cmd("PING")
                .query_async::<String>(c)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
        }
    }
}

struct Metrics {
    registry: Registry,
    up: IntGaugeVec,
    transitions: IntCounterVec,
    refused: IntCounterVec,
}

impl Metrics {
    fn new(region: &str) -> Self {
        let registry = Registry::new_custom(None, Some([("region".into(), region.into())].into()))
            .expect("static registry labels are valid");
        fn reg<T: Collector + Clone + 'static>(r: &Registry, c: T) -> T {
            r.register(Box::new(c.clone())).expect("registered once");
            c
        }
        Self {
            up: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "meridian_store_up",
                        "1 while the store (postgres, redis) answers this node's probes, else 0.",
                    ),
                    &["store"],
                )
                .expect("valid metric"),
            ),
            transitions: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "meridian_store_transitions_total",
                        "Times a store was marked down or up again by its probe.",
                    ),
                    &["store", "to"],
                )
                .expect("valid metric"),
            ),
            refused: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "meridian_store_refused_total",
                        "Requests refused with 503 (UNAVAILABLE) because a store they need is down, by the probe's verdict or a query that lost its connection.",
                    ),
                    &["store"],
                )
                .expect("valid metric"),
            ),
            registry,
        }
    }
}
