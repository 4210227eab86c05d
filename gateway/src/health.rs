//! Active health checks: every interval, each node's `grpc.health.v1` and
//! `Admin.RegionStatus` over one lazily (re)connected h2c channel per node.
//! Runs as a Pingora background service next to the proxy. Nodes come and go
//! with DNS, so channels are kept by address and dropped with their node.

use std::collections::HashMap;
use std::net::SocketAddr;
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
use crate::regions::{Node, Region, Regions, Stores, Transition};

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

/// Applies a node's health transition, and whatever it or a drain or load
/// report did to its region: log them and count them.
pub(crate) fn apply(
    metrics: &Metrics,
    region: &Region,
    node: &Node,
    transition: Transition,
    cause: &str,
) {
    match transition {
        Transition::None => {}
        Transition::Ejected => {
            tracing::warn!(region = %region.name, node = %node.address, cause, "node ejected");
        }
        Transition::Recovered => {
            tracing::info!(region = %region.name, node = %node.address, "node recovered");
        }
    }
    apply_region(metrics, region, region.refresh(), cause);
}

/// Logs and counts a region's own transition (its last healthy node went,
/// or its first came back).
pub(crate) fn apply_region(
    metrics: &Metrics,
    region: &Region,
    transition: Transition,
    cause: &str,
) {
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

/// What a node's `Admin.RegionStatus` says: draining, in flight, capacity,
/// stores down.
type Reported = (bool, u32, u32, Stores);

async fn check(channel: Channel, timeout: Duration) -> Result<Option<Reported>, String> {
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
                    Stores::from_names(r.unavailable_stores.iter().map(String::as_str)),
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

impl HealthChecker {
    fn channel(&self, region: &Region, address: SocketAddr, timeout: Duration) -> Channel {
        match &self.mesh {
            // A region name that cannot be an identity cannot pass a check
            // either: its channel is plain and every check fails.
            Some(mesh) => mesh
                .channel(&region.name, address, timeout)
                .unwrap_or_else(|e| {
                    tracing::error!(region = %region.name, error = %e, "no mesh channel for region");
                    plain_channel(address, timeout)
                }),
            None => plain_channel(address, timeout),
        }
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let timeout = Duration::from_millis(self.config.timeout_ms);
        // Keyed by region too: a channel verifies the region's identity, and
        // one address listed under two regions must pass only as its own.
        let mut channels: HashMap<(usize, SocketAddr), Channel> = HashMap::new();
        for r in &self.regions.list {
            self.metrics
                .region_healthy
                .with_label_values(&[&r.name])
                .set(i64::from(r.is_healthy()));
        }
        let mut ticker = tokio::time::interval(Duration::from_millis(self.config.interval_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => return,
            }
            let mut targets = Vec::new();
            let mut live = Vec::new();
            for (i, region) in self.regions.list.iter().enumerate() {
                for node in region.nodes().iter() {
                    let channel = channels
                        .entry((i, node.address))
                        .or_insert_with(|| self.channel(region, node.address, timeout))
                        .clone();
                    live.push((i, node.address));
                    targets.push((region, node.clone(), channel));
                }
            }
            // Nodes DNS removed are not checked again.
            channels.retain(|key, _| live.contains(key));
            let checks = targets
                .into_iter()
                .map(|(region, node, channel)| async move {
                    let started = std::time::Instant::now();
                    let result = check(channel, timeout).await;
                    (region, node, result, started.elapsed())
                });
            for (region, node, result, rtt) in futures::future::join_all(checks).await {
                match result {
                    Ok(status) => {
                        // The check's round trip, not requests' time to first
                        // byte: that mixes in how long each model takes.
                        region.observe_latency(rtt.as_micros() as u64);
                        if let Some((draining, in_flight, capacity, down)) = status {
                            node.report(draining, in_flight, capacity, down);
                        }
                        let t = node.success(&self.config);
                        apply(&self.metrics, region, &node, t, "");
                    }
                    Err(cause) => {
                        let t = node.failure(&self.config);
                        apply(&self.metrics, region, &node, t, &cause);
                    }
                }
            }
        }
    }
}
