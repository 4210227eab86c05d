//! The active health check of a pool's upstreams.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Pool;

/// Checks every upstream each `health_interval_ms` with `GET {base_url}/models`.
pub(super) async fn check_health(pool: Weak<Pool>, shutdown: CancellationToken) {
    let Some(interval) = pool
        .upgrade()
        .map(|p| Duration::from_millis(p.config.health_interval_ms))
    else {
        return;
    };
    let timeout = interval.clamp(Duration::from_millis(200), Duration::from_secs(5));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let model = pool.model.as_str();
        let checks = pool.upstreams.iter().map(|up| {
            let request = pool
                .client
                .get(format!("{}/models", up.base_url))
                .headers(up.headers.clone())
                .timeout(timeout);
            async move {
                let status = request.send().await.map(|r| r.status().as_u16());
                let ok = status.as_ref().is_ok_and(|s| (200..300).contains(s));
                // Kept so that a request finding no usable upstream says
                // why when the reason is the key, not "no healthy backend".
                let refused = status
                    .as_ref()
                    .ok()
                    .copied()
                    .filter(|s| matches!(s, 401 | 403))
                    .unwrap_or(0);
                up.refused.store(refused, Ordering::Relaxed);
                let was = up.healthy.swap(ok, Ordering::Relaxed);
                if was != ok {
                    tracing::warn!(model, upstream = %up.base_url, healthy = ok, "upstream health changed");
                }
                up.metrics.up.set(i64::from(up.usable(Instant::now())));
            }
        });
        futures::future::join_all(checks).await;
    }
}
