//! Regions whose nodes come from DNS SRV records: one [`SrvWatch`] per such
//! region, re-resolving on TTL, and a follower that applies each new answer
//! to the region table. Runs as a Pingora background service next to the
//! health checks.

use std::sync::Arc;

use async_trait::async_trait;
use meridian_mesh::{SrvResolver, SrvWatch};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::config::{Config, HealthConfig};
use crate::health;
use crate::metrics::Metrics;
use crate::regions::{Region, Regions};

pub(crate) struct Discovery {
    regions: Arc<Regions>,
    /// Index into `regions.list` and the watch of its SRV name.
    watches: Vec<(usize, SrvWatch)>,
    health: HealthConfig,
    metrics: Arc<Metrics>,
}

impl Discovery {
    /// None when every region has a static address.
    pub(crate) fn new(
        config: &Config,
        regions: Arc<Regions>,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Self>, String> {
        if regions.list.iter().all(|r| r.srv.is_none()) {
            return Ok(None);
        }
        // One resolver for all regions: one cache, one set of sockets.
        let resolver = Arc::new(
            SrvResolver::new(config.discovery.clone()).map_err(|e| format!("discovery: {e}"))?,
        );
        let watches = regions
            .list
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((i, SrvWatch::new(r.srv.as_deref()?, resolver.clone()))))
            .collect::<Vec<_>>();
        for (i, _) in &watches {
            // Present at zero from the start, so a rate over it is defined.
            metrics
                .discovery_failures
                .with_label_values(&[&regions.list[*i].name])
                .inc_by(0);
        }
        Ok(Some(Self {
            regions,
            watches,
            health: config.health.clone(),
            metrics,
        }))
    }

    /// Applies the watch's answers to the region until shutdown.
    async fn follow(&self, region: &Region, watch: &SrvWatch, mut shutdown: ShutdownWatch) {
        let mut rx = watch.subscribe();
        let mut failures = 0;
        loop {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = shutdown.changed() => return,
            }
            let state = rx.borrow_and_update().clone();
            if state.failures > failures {
                self.metrics
                    .discovery_failures
                    .with_label_values(&[&region.name])
                    .inc_by(state.failures - failures);
                failures = state.failures;
            }
            let Some(at) = state.refreshed else { continue };
            let same = {
                let current = region.nodes();
                current.len() == state.nodes.len()
                    && current.iter().zip(state.nodes.iter()).all(|(n, s)| {
                        n.address == s.addr
                            && n.priority() == u32::from(s.priority)
                            && n.weight() == u32::from(s.weight)
                    })
            };
            if !same {
                let t = region.set_nodes(&state.nodes, &self.health);
                tracing::info!(
                    region = %region.name,
                    srv = watch.name(),
                    nodes = state.nodes.len(),
                    "region nodes changed"
                );
                health::apply_region(&self.metrics, region, t, "dns");
            }
            region.refreshed(at);
        }
    }
}

#[async_trait]
impl BackgroundService for Discovery {
    async fn start(&self, shutdown: ShutdownWatch) {
        let tasks = self.watches.iter().map(|(i, watch)| {
            let region = &self.regions.list[*i];
            let mut stop = shutdown.clone();
            let resolve = watch.run(async move {
                let _ = stop.changed().await;
            });
            let follow = self.follow(region, watch, shutdown.clone());
            async move {
                tokio::join!(resolve, follow);
            }
        });
        futures::future::join_all(tasks).await;
    }
}
