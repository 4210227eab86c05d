//! Per-tenant rate limits: requests per second and tokens per minute, with
//! GCRA (the generic cell rate algorithm: one "theoretical arrival time" per
//! limit, no counters to reset, exact at any instant).
//!
//! With `rate_limit.redis_url` every decision is one atomic Lua script in
//! Redis, timed by Redis' own `TIME`, so gateways share the limit and their
//! clocks do not matter. Each decision is mirrored into the gateway's local
//! state; when Redis errs or is slower than `redis_timeout_ms`, the gateway
//! decides locally and leaves Redis alone for a second, so an outage costs one
//! timeout per second instead of one per request. During an outage every
//! gateway enforces the full limit on its own.
//!
//! A limit's burst is one period's worth: a tenant with 5 requests per second
//! may send 5 at once, then one every 200 ms.
//!
//! One concern per file: [`config`] (the `[rate_limit]` section and a
//! tenant's limits), [`gcra`] (the maths of one decision), [`scripts`] (the
//! same maths as Lua for Redis), [`breaker`] (when to leave Redis alone),
//! [`states`] (the per-tenant state this gateway keeps), [`limiter`] (a
//! decision, shared or local), [`headers`] (what the client is told) and
//! [`estimate`] (the tokens charged before the region reports usage).

mod breaker;
mod config;
mod estimate;
mod gcra;
mod headers;
mod limiter;
mod scripts;
mod states;

pub(crate) use self::config::Limits;
pub use self::config::RateLimitConfig;
pub use self::estimate::scan_max_tokens;
pub(crate) use self::estimate::{SCAN_BODY_LIMIT, Scan, estimate, scan};
pub(crate) use self::gcra::{Decision, Kind};
pub(crate) use self::headers::{duration_text, headers};
pub(crate) use self::limiter::Limiter;
