//! The region's time series: device telemetry and inference usage, kept in
//! its own PostgreSQL as TimescaleDB hypertables or pg_partman partitions
//! ([`schema`]), written in batches ([`ingest`], [`usage`]) and read as
//! time-bucketed aggregates ([`query`]).

pub(crate) mod ingest;
pub(crate) mod query;
pub(crate) mod schema;
pub(crate) mod usage;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::TelemetryConfig;
use crate::error::Error;

pub(crate) use self::ingest::{Limits, Reading, ReadingWriter};
pub(crate) use self::schema::Mode;
pub(crate) use self::usage::UsageRecorder;

/// What the API needs of telemetry; lives in `AppState`.
pub(crate) struct Telemetry {
    pub mode: Mode,
    pub config: TelemetryConfig,
    pub limits: Limits,
    pub writer: ReadingWriter,
    pub usage: UsageRecorder,
}

/// Sets the schema up, runs maintenance once (so partitions exist for now
/// before anything is written, even after the node was down for days), and
/// starts the writers and the periodic maintenance on `tasks`. With
/// `replicate_readings`, every insert also logs its readings for the peers
/// in `replication.telemetry_peers`.
pub(crate) async fn start(
    pool: &PgPool,
    region: &str,
    config: &TelemetryConfig,
    replicate_readings: bool,
    spend: std::sync::Arc<crate::tenancy::spend::Spend>,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<Telemetry, Error> {
    let mode = schema::setup(pool, config).await?;
    schema::maintain(pool, mode, config).await?;
    tracing::info!(region, %mode, "telemetry storage ready");
    tasks.spawn(maintain_periodically(
        pool.clone(),
        mode,
        config.clone(),
        shutdown.clone(),
    ));
    Ok(Telemetry {
        mode,
        config: config.clone(),
        limits: Limits::new(config),
        writer: ReadingWriter::start(
            pool.clone(),
            config,
            replicate_readings,
            shutdown.clone(),
            tasks,
        ),
        usage: UsageRecorder::start(
            pool.clone(),
            region,
            config.usage_buffer as usize,
            spend,
            shutdown.clone(),
            tasks,
        ),
    })
}

async fn maintain_periodically(
    pool: PgPool,
    mode: Mode,
    config: TelemetryConfig,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(config.maintenance_interval());
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate, and start has just run maintenance.
    every.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        match schema::maintain(&pool, mode, &config).await {
            Ok(()) => tracing::debug!(%mode, "telemetry maintenance done"),
            Err(e) => tracing::warn!(%mode, error = %e, "telemetry maintenance failed"),
        }
    }
}
