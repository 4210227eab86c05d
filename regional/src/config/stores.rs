//! The `[stores]` section: how the node watches its own PostgreSQL and
//! Redis, so that requests needing a store that is gone are refused at once
//! (503, replayed by the gateway in another region) instead of waiting out a
//! pool timeout.

use std::time::Duration;

use meridian_proto::config::Problems;
use serde::Deserialize;

/// Store probes. Every key has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoresConfig {
    /// How often each store is probed (`SELECT 1`, `PING`) on a connection
    /// of its own, in milliseconds.
    pub probe_interval_ms: u64,
    /// How long one probe may take before it counts as failed, in
    /// milliseconds: a store that accepts connections but does not answer
    /// (stopped, its disk hung) is as gone as a dead one.
    pub probe_timeout_ms: u64,
    /// Consecutive failed probes that mark a store down; one success marks
    /// it up again.
    pub failures_to_trip: u32,
    /// How long a request waits for a PostgreSQL connection of the pool, in
    /// milliseconds, before it is refused with 503 (which the gateway
    /// replays elsewhere). It bounds what a request that was already waiting
    /// when the database died loses before it goes to another region; a
    /// region whose pool is this busy sheds the work as well.
    pub acquire_timeout_ms: u64,
}

impl Default for StoresConfig {
    fn default() -> Self {
        Self {
            probe_interval_ms: 100,
            probe_timeout_ms: 250,
            failures_to_trip: 2,
            acquire_timeout_ms: 500,
        }
    }
}

impl StoresConfig {
    pub(crate) fn validate(&self, problems: &mut Problems) {
        if self.probe_interval_ms < 10 {
            problems.push("`stores.probe_interval_ms` must be at least 10");
        }
        if self.probe_timeout_ms < 10 {
            problems.push("`stores.probe_timeout_ms` must be at least 10");
        }
        if self.failures_to_trip == 0 {
            problems.push("`stores.failures_to_trip` must be at least 1");
        }
        if self.acquire_timeout_ms < 10 {
            problems.push("`stores.acquire_timeout_ms` must be at least 10");
        }
    }

    pub(crate) fn probe_interval(&self) -> Duration {
        Duration::from_millis(self.probe_interval_ms)
    }

    pub(crate) fn probe_timeout(&self) -> Duration {
        Duration::from_millis(self.probe_timeout_ms)
    }

    pub(crate) fn acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.acquire_timeout_ms)
    }
}
