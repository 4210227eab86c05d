//! The shared Redis and its breaker: after an error or a timeout the
//! gateway leaves Redis alone for a second and decides locally, so an outage
//! costs one timeout per second instead of one per request.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::scripts::{ADJUST, TAKE};
use crate::metrics::Metrics;

/// How long Redis is left alone after an error.
const REDIS_BACKOFF_US: u64 = 1_000_000;

/// The Redis the gateways share limits in, and when to leave it alone.
pub(super) struct Shared {
    client: redis::Client,
    conn: OnceLock<Option<ConnectionManager>>,
    pub(super) timeout: Duration,
    /// Microseconds since the limiter's epoch before which Redis is skipped.
    skip_until: AtomicU64,
    pub(super) take: redis::Script,
    pub(super) adjust: redis::Script,
}

impl Shared {
    pub(super) fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        Ok(Self {
            client: redis::Client::open(url).map_err(|e| format!("`rate_limit.redis_url`: {e}"))?,
            conn: OnceLock::new(),
            timeout,
            skip_until: AtomicU64::new(0),
            take: redis::Script::new(TAKE),
            adjust: redis::Script::new(ADJUST),
        })
    }

    /// The connection, unless Redis failed within the last second. Created
    /// on first use, inside the proxy's runtime.
    pub(super) fn connection(&self, now_us: u64) -> Option<ConnectionManager> {
        if now_us < self.skip_until.load(Ordering::Relaxed) {
            return None;
        }
        self.conn
            .get_or_init(|| {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                ConnectionManager::new_lazy_with_config(self.client.clone(), config)
                    .inspect_err(|e| tracing::error!(error = %e, "cannot use the rate-limit Redis"))
                    .ok()
            })
            .clone()
    }

    /// Leaves Redis alone for a while; logs once per trip.
    pub(super) fn trip(&self, now_us: u64, metrics: &Metrics, error: &dyn std::fmt::Display) {
        metrics.rate_limit_redis_errors.inc();
        let until = now_us + REDIS_BACKOFF_US;
        let previous = self.skip_until.swap(until, Ordering::Relaxed);
        if previous <= now_us {
            tracing::warn!(%error, "rate-limit Redis failed; deciding locally for a second");
        }
    }
}
