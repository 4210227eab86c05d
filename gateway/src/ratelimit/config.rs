//! The `[rate_limit]` section and the limits a tenant ends up with.

use serde::Deserialize;

/// Per-tenant limits (`[rate_limit]`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Redis shared by the gateways; without it each gateway limits alone.
    pub redis_url: Option<String>,
    /// Longest wait for Redis per decision, in milliseconds; after an error
    /// or a timeout the gateway decides locally for a second.
    pub redis_timeout_ms: u64,
    /// Requests per second of tenants without their own limit; none: unlimited.
    pub requests_per_second: Option<u32>,
    /// Tokens per minute of tenants without their own limit; none: unlimited.
    pub tokens_per_minute: Option<u64>,
    /// Completion tokens assumed for a request whose `max_tokens` is not
    /// known (not given, gRPC, or a body too large to read first).
    pub default_completion_tokens: u64,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            redis_timeout_ms: 50,
            requests_per_second: None,
            tokens_per_minute: None,
            default_completion_tokens: 256,
        }
    }
}

impl RateLimitConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if let Some(url) = &self.redis_url {
            redis::Client::open(url.as_str())
                .map_err(|e| format!("`rate_limit.redis_url` is not a Redis URL: {e}"))?;
        }
        if self.redis_timeout_ms == 0 {
            return Err("`rate_limit.redis_timeout_ms` must be at least 1".into());
        }
        if self.requests_per_second == Some(0) || self.tokens_per_minute == Some(0) {
            return Err(
                "`rate_limit.requests_per_second` and `rate_limit.tokens_per_minute` \
                 must be at least 1 (leave them out for no limit)"
                    .into(),
            );
        }
        Ok(())
    }

    pub(crate) fn default_limits(&self) -> Limits {
        Limits {
            requests_per_second: self.requests_per_second,
            tokens_per_minute: self.tokens_per_minute,
        }
    }
}

// The URL may carry a password.
impl std::fmt::Debug for RateLimitConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitConfig")
            .field("redis_url", &self.redis_url.as_ref().map(|_| "<redacted>"))
            .field("redis_timeout_ms", &self.redis_timeout_ms)
            .field("requests_per_second", &self.requests_per_second)
            .field("tokens_per_minute", &self.tokens_per_minute)
            .field("default_completion_tokens", &self.default_completion_tokens)
            .finish()
    }
}

/// A tenant's effective limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    pub requests_per_second: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

impl Limits {
    pub(crate) fn any(&self) -> bool {
        self.requests_per_second.is_some() || self.tokens_per_minute.is_some()
    }
}
