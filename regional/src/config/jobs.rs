//! The `[jobs]` section: the worker pool, retries, leases and queue limits of
//! asynchronous jobs.

use std::time::Duration;

use meridian_proto::config::Problems;
use serde::Deserialize;

/// Asynchronous jobs. Every key has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Jobs this node runs at once; 0 makes a node that accepts jobs but
    /// leaves running them to other nodes of the region.
    pub workers: u32,
    /// Attempts a job gets before it is dead-lettered, the first included.
    pub max_attempts: u32,
    /// How long an attempt owns its job without renewing, in milliseconds;
    /// a job whose worker died is run again once this has passed.
    pub lease_ms: u64,
    /// How often the sweeper re-enqueues jobs that Redis lost and reclaims
    /// abandoned stream messages, in milliseconds; it also runs at start.
    pub sweep_interval_ms: u64,
    /// Backoff before the first retry, in milliseconds; it doubles per
    /// attempt (with jitter) up to `retry_max_ms`.
    pub retry_base_ms: u64,
    /// Longest backoff between two attempts, in milliseconds.
    pub retry_max_ms: u64,
    /// Most unfinished (queued or running) jobs of one tenant.
    pub max_queued_per_tenant: u64,
    /// Most unfinished jobs of the whole region.
    pub max_queued_per_region: u64,
    /// The `Retry-After` given with a queue-full refusal, in milliseconds.
    pub queue_full_retry_after_ms: u64,
    /// Job watches (`Jobs.Watch`, `GET /v1/jobs/{id}/events`) one tenant
    /// may hold open on one node.
    pub max_watches_per_tenant: u32,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            workers: 8,
            max_attempts: 3,
            lease_ms: 30_000,
            sweep_interval_ms: 5_000,
            retry_base_ms: 500,
            retry_max_ms: 60_000,
            max_queued_per_tenant: 10_000,
            max_queued_per_region: 100_000,
            queue_full_retry_after_ms: 1_000,
            max_watches_per_tenant: 256,
        }
    }
}

impl JobsConfig {
    pub(crate) fn validate(&self, problems: &mut Problems) {
        if self.max_attempts == 0 {
            problems.push("`jobs.max_attempts` must be at least 1");
        }
        // Renewal runs at a third of the lease; shorter leases would renew
        // faster than a database round trip.
        if self.lease_ms < 100 {
            problems.push("`jobs.lease_ms` must be at least 100");
        }
        if self.sweep_interval_ms < 10 {
            problems.push("`jobs.sweep_interval_ms` must be at least 10");
        }
        if self.retry_base_ms > self.retry_max_ms {
            problems.push("`jobs.retry_base_ms` must not exceed `jobs.retry_max_ms`");
        }
        if self.max_queued_per_tenant == 0 {
            problems.push("`jobs.max_queued_per_tenant` must be at least 1");
        }
        if self.max_watches_per_tenant == 0 {
            problems.push("`jobs.max_watches_per_tenant` must be at least 1");
        }
        if self.max_queued_per_region == 0 {
            problems.push("`jobs.max_queued_per_region` must be at least 1");
        }
    }

    pub(crate) fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    pub(crate) fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.sweep_interval_ms)
    }

    /// Backoff before retrying after `attempt` (1-based) failed: exponential,
    /// with "equal jitter" (half fixed, half random) so retries of many jobs
    /// that failed together spread out instead of hitting the backend at once.
    pub(crate) fn backoff(&self, attempt: u32, random: f64) -> Duration {
        let exp = self
            .retry_base_ms
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(32));
        let capped = exp.min(self.retry_max_ms) as f64;
        Duration::from_millis((capped / 2.0 + capped / 2.0 * random.clamp(0.0, 1.0)) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let c = JobsConfig {
            retry_base_ms: 100,
            retry_max_ms: 1_000,
            ..JobsConfig::default()
        };
        assert_eq!(c.backoff(1, 0.0), Duration::from_millis(50));
        assert_eq!(c.backoff(1, 1.0), Duration::from_millis(100));
        assert_eq!(c.backoff(3, 1.0), Duration::from_millis(400));
        assert_eq!(c.backoff(30, 1.0), Duration::from_millis(1_000));
        assert_eq!(c.backoff(u32::MAX, 0.5), Duration::from_millis(750));
    }

    #[test]
    fn validation_names_the_key() {
        let bad = JobsConfig {
            max_attempts: 0,
            ..JobsConfig::default()
        };
        assert!(
            Problems::of(|p| bad.validate(p))
                .unwrap_err()
                .contains("`jobs.max_attempts`")
        );
        assert!(Problems::of(|p| JobsConfig::default().validate(p)).is_ok());
    }
}
