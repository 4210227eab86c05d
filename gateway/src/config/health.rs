//! `[health]` and `[failover]`: when a region is ejected, and how a failed
//! request is retried in another.

use meridian_proto::config::Problems;
use serde::Deserialize;

/// How regions are health-checked (`grpc.health.v1` plus `Admin.RegionStatus`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Time between checks of one region, in milliseconds.
    pub interval_ms: u64,
    /// Time one check may take, in milliseconds.
    pub timeout_ms: u64,
    /// Consecutive failures (active checks, or connect errors, timeouts and
    /// 5xx seen by requests) that eject a healthy region.
    pub failures_to_eject: u32,
    /// Consecutive successful active checks that bring an ejected region back.
    pub successes_to_recover: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval_ms: 250,
            timeout_ms: 200,
            failures_to_eject: 2,
            successes_to_recover: 2,
        }
    }
}

/// Retries in the next region, for requests that failed before any byte of
/// the answer reached the client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// Most regions one request is tried in.
    pub max_attempts: u32,
    /// Retries allowed as a fraction of recent requests, so a total outage
    /// does not multiply the load (0.2 = one retry per five requests).
    pub retry_budget_ratio: f64,
    /// Retries per second always allowed, so a quiet gateway can still fail over.
    pub retry_budget_min_per_second: u32,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            retry_budget_ratio: 0.2,
            retry_budget_min_per_second: 10,
        }
    }
}

impl HealthConfig {
    pub(super) fn check(&self, problems: &mut Problems) {
        if self.interval_ms == 0 || self.timeout_ms == 0 {
            problems.push("`health.interval_ms` and `health.timeout_ms` must be at least 1");
        }
        if self.failures_to_eject == 0 || self.successes_to_recover == 0 {
            problems.push(
                "`health.failures_to_eject` and `health.successes_to_recover` must be at least 1",
            );
        }
    }
}

impl FailoverConfig {
    pub(super) fn check(&self, problems: &mut Problems) {
        if self.max_attempts == 0 {
            problems.push("`failover.max_attempts` must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.retry_budget_ratio) {
            problems.push("`failover.retry_budget_ratio` must be between 0 and 1");
        }
    }
}
