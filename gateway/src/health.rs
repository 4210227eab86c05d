//! Active health checks: every interval, each region's `grpc.health.v1` and
//! `Admin.RegionStatus` over one lazily (re)connected h2c channel per region.
//! Runs as a Pingora background service next to the proxy.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use meridian_proto::v1::admin_client::AdminClient;
use meridian_proto::v1::{RegionState, RegionStatusRequest};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::config::HealthConfig;
use crate::metrics::Metrics;
use crate::regions::{Region, Regions, Transition};

pub(crate) struct HealthChecker {
    regions: Arc<Regions>,
    config: HealthConfig,
    metrics: Arc<Metrics>,
    /// mTLS to regions; plain h2c when `None`.
    mesh: Option<crate::mesh::Upstream>,
}

impl HealthChecker {
    pub(crate) fn new(
        regions: Arc<Regions>,
        config: HealthConfig,
        metrics: Arc<Metrics>,
        mesh: Option<crate::mesh::Upstream>,
    ) -> Self {
        Self {
            regions,
            config,
            metrics,
            mesh,
        }
    }
}

/// Applies a health transition: log it and count it.
pub(crate) fn apply(metrics: &Metrics, region: &Region, transition: Transition, cause: &str) {
    match transition {
        Transition::None => return,
        Transition::Ejected => {
            tracing::warn!(region = %region.name, cause, "region ejected");
            metrics.ejections.with_label_values(&[&region.name]).inc();
        }
        Transition::Recovered => tracing::info!(region = %region.name, "region recovered"),
    }
    metrics
        .region_healthy
        .with_label_values(&[&region.name])
        .set(i64::from(region.is_healthy()));
}

async fn check(channel: Channel, timeout: Duration) -> Result<Option<(bool, u32, u32)>, String> {
    let health = async {
        let status = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|s| format!("health check: {}", s.message()))?
            .into_inner()
            .status;
        if status != ServingStatus::Serving as i32 {
            return Err(format!("health status {status}"));
        }
        // Load and drain come from Admin; a region without it is still healthy.
        let status = AdminClient::new(channel)
            .region_status(RegionStatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
            .map(|r| {
                (
                    r.state == RegionState::Draining as i32,
                    r.in_flight_requests,
                    r.capacity_requests,
                )
            });
        Ok(status)
    };
    tokio::time::timeout(timeout, health)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

fn plain_channel(address: std::net::SocketAddr, timeout: Duration) -> Channel {
    Endpoint::from_shared(format!("http://{address}"))
        .expect("socket addresses make valid URIs")
        .connect_timeout(timeout)
        .connect_lazy()
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let channels: Vec<Channel> = self
            .regions
            .list
            .iter()
            .map(|r| match &self.mesh {
                // A region name that cannot be an identity cannot pass a
                // check either: its channel is plain and every check fails.
                Some(mesh) => mesh
                    .channel(&r.name, r.address, timeout)
                    .unwrap_or_else(|e| {
                        tracing::error!(region = %r.name, error = %e, "no mesh channel for region");
                        plain_channel(r.address, timeout)
                    }),
                None => plain_channel(r.address, timeout),
            })
            .collect();
        for r in &self.regions.list {
            self.metrics
                .region_healthy
                .with_label_values(&[&r.name])
                .set(1);
        }
        let mut ticker = tokio::time::interval(Duration::from_millis(self.config.interval_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => return,
            }
            let checks =
                self.regions
                    .list
                    .iter()
                    .zip(&channels)
                    .map(|(region, channel)| async move {
                        let started = std::time::Instant::now();
                        let result = check(channel.clone(), timeout).await;
                        (region, result, started.elapsed())
                    });
            for (region, result, rtt) in futures::future::join_all(checks).await {
                match result {
                    Ok(status) => {
                        // The check's round trip, not requests' time to first
                        // byte: that mixes in how long each model takes.
                        region.observe_latency(rtt.as_micros() as u64);
                        if let Some((draining, in_flight, capacity)) = status {
                            region.report(draining, in_flight, capacity);
                        }
                        let t = region.success(&self.config);
                        apply(&self.metrics, region, t, "");
                    }
                    Err(cause) => {
                        let t = region.failure(&self.config);
                        apply(&self.metrics, region, t, &cause);
                    }
                }
            }
        }
    }
}
