//! The active health check of a pool's upstreams.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Pool, Upstream, client};
use crate::error::Error;
use crate::inference::openai;

/// Why an upstream is out.
#[derive(Clone)]
pub(super) enum Down {
    /// It answered 401 or 403 (the pool's credentials are wrong for it),
    /// saying this, key scrubbed.
    Refused { status: u16, said: String },
    /// Anything else, said with the key scrubbed.
    Failed(String),
}

impl Pool {
    /// Why no upstream could be tried: an upstream that refused the pool's
    /// credentials first (the operator has a key to fix), else no healthy
    /// backend, with the first reason known.
    pub(super) fn none_usable(&self) -> Error {
        let failures: Vec<(&Upstream, Down)> = self
            .upstreams
            .iter()
            .filter_map(|up| Some((up, up.failure.lock().expect("failure lock").clone()?)))
            .collect();
        if let Some((up, Down::Refused { status, said })) = failures
            .iter()
            .find(|(_, d)| matches!(d, Down::Refused { .. }))
        {
            return Error::UpstreamRefused {
                upstream: up.base_url.clone(),
                status: *status,
                said: said.clone(),
            };
        }
        let why = match failures.first() {
            Some((up, Down::Failed(why))) => format!(": upstream {}: {why}", up.base_url),
            _ => String::new(),
        };
        Error::NoHealthyBackend {
            model: self.model.clone(),
            why,
        }
    }
}

/// Checks every upstream each `health_interval_ms` with a `GET` its
/// protocol answers cheaply ([`super::Protocol::health_url`]).
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
                .get(pool.protocol.health_url(&up.base_url))
                .headers(up.headers.clone())
                .timeout(timeout);
            async move {
                let down = match request.send().await {
                    Ok(r) if r.status().is_success() => None,
                    Ok(r) if matches!(r.status().as_u16(), 401 | 403) => {
                        let status = r.status().as_u16();
                        let said = openai::error_message(&r.text().await.unwrap_or_default());
                        Some(Down::Refused {
                            status,
                            said: match &up.key {
                                Some(key) => client::scrub(&said, key),
                                None => said,
                            },
                        })
                    }
                    Ok(r) => Some(Down::Failed(format!(
                        "its health check answered {}",
                        r.status()
                    ))),
                    Err(e) => Some(Down::Failed(format!(
                        "its health check failed: {}",
                        causes(&e)
                    ))),
                };
                let ok = down.is_none();
                *up.failure.lock().expect("failure lock") = down;
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

/// An error and its causes, one after the other: reqwest's own message
/// says only that sending failed, its sources say why (a certificate from an
/// unknown issuer, a refused connection).
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
