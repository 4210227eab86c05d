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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::HeaderValue;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Deserialize;

use crate::auth::Tenant;
use crate::metrics::Metrics;

/// Response header in which a region reports the tokens (prompt and
/// completion) a request used; the gateway corrects its estimate with it.
pub const USAGE_TOKENS_HEADER: &str = "x-meridian-usage-tokens";
/// How long Redis is left alone after an error.
const REDIS_BACKOFF_US: u64 = 1_000_000;
/// Microseconds per second and per minute: the periods of the two limits.
const SECOND_US: f64 = 1e6;
const MINUTE_US: f64 = 60e6;
/// Bodies up to this size are read before the decision to find `max_tokens`;
/// larger (or chunked) bodies are estimated from their length alone.
pub(crate) const SCAN_BODY_LIMIT: usize = 16 * 1024;

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
    fn any(&self) -> bool {
        self.requests_per_second.is_some() || self.tokens_per_minute.is_some()
    }

    /// GCRA parameters: requests, then tokens.
    fn gcra(&self) -> [Option<Gcra>; 2] {
        [
            self.requests_per_second
                .map(|r| Gcra::new(u64::from(r), SECOND_US)),
            self.tokens_per_minute.map(|t| Gcra::new(t, MINUTE_US)),
        ]
    }
}

/// The kind of a limit, as in the error type and the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Requests,
    Tokens,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }
}

const KINDS: [Kind; 2] = [Kind::Requests, Kind::Tokens];

#[derive(Debug, Clone, Copy)]
struct Gcra {
    limit: u64,
    /// Microseconds one unit occupies.
    interval: f64,
    /// Microseconds of the period; also the burst tolerance (one period's
    /// worth of units may come at once).
    period: f64,
}

impl Gcra {
    fn new(limit: u64, period: f64) -> Self {
        Self {
            limit,
            interval: period / limit as f64,
            period,
        }
    }
}

/// A tenant's GCRA state in this gateway: the theoretical arrival time of
/// each limit, in microseconds since the limiter started. One small mutex per
/// tenant, never held across an await.
#[derive(Debug, Default)]
pub(crate) struct LocalState(Mutex<[f64; 2]>);

/// One limit's standing after a decision, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LimitStatus {
    pub limit: u64,
    pub remaining: u64,
    /// Until the limit is fully replenished.
    pub reset_us: u64,
}

/// The outcome of one decision.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Decision {
    pub status: [Option<LimitStatus>; 2],
    /// The limit that refused the request, if one did.
    pub rejected: Option<Kind>,
    /// When a refused request could succeed.
    pub retry_after_us: u64,
    /// Tokens charged (the estimate), corrected later from the usage.
    pub tokens: u64,
}

/// Decides at `now` with the current arrival times; returns whether the
/// request is allowed, the arrival times after it, the refusing limit and
/// the wait.
fn evaluate(
    gcra: &[Option<Gcra>; 2],
    costs: [f64; 2],
    now: f64,
    tats: [f64; 2],
) -> ([f64; 2], Option<Kind>, u64) {
    let mut rejected = None;
    let mut wait = 0.0_f64;
    let mut after = [now; 2];
    for i in 0..2 {
        let Some(g) = gcra[i] else { continue };
        let tat = tats[i].max(now);
        let new_tat = tat + costs[i] * g.interval;
        after[i] = new_tat;
        let allow_at = new_tat - g.period;
        if allow_at > now {
            // A request larger than the whole budget never fits: say a period.
            let w = if costs[i] * g.interval > g.period {
                g.period
            } else {
                allow_at - now
            };
            if rejected.is_none() || w > wait {
                rejected = Some(KINDS[i]);
                wait = wait.max(w);
            }
        }
    }
    if rejected.is_some() {
        for i in 0..2 {
            after[i] = tats[i].max(now);
        }
    }
    (after, rejected, wait.ceil() as u64)
}

fn status(gcra: &[Option<Gcra>; 2], now: f64, tats: [f64; 2]) -> [Option<LimitStatus>; 2] {
    let one = |i: usize| {
        gcra[i].map(|g| {
            let tat = tats[i].max(now);
            let remaining = ((now + g.period - tat) / g.interval).floor().max(0.0) as u64;
            LimitStatus {
                limit: g.limit,
                remaining: remaining.min(g.limit),
                reset_us: (tat - now).ceil() as u64,
            }
        })
    };
    [one(0), one(1)]
}

/// Takes one request and `costs[1]` tokens if both limits allow; arrival
/// times as integer microseconds of Redis' clock. Returns
/// `{allowed, now, tat_requests, tat_tokens}` (times after the decision).
const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tats = {now, now}
local ok = 1
for i = 1, 2 do
  local interval = tonumber(ARGV[3 * i - 2])
  if interval > 0 then
    local tat = tonumber(redis.call('GET', KEYS[i])) or now
    if tat < now then tat = now end
    tats[i] = tat
    if tat + tonumber(ARGV[3 * i - 1]) * interval - tonumber(ARGV[3 * i]) > now then ok = 0 end
  end
end
if ok == 1 then
  for i = 1, 2 do
    local interval = tonumber(ARGV[3 * i - 2])
    if interval > 0 then
      tats[i] = tats[i] + tonumber(ARGV[3 * i - 1]) * interval
      redis.call('SET', KEYS[i], string.format('%.0f', tats[i]),
        'PX', math.ceil((tats[i] - now) / 1000) + 1000)
    end
  end
end
return {ok, now, tats[1], tats[2]}
";

/// Moves one arrival time by `ARGV[1]` units of `ARGV[2]` microseconds (a
/// usage correction; negative gives back).
const ADJUST: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
tat = tat + tonumber(ARGV[1]) * tonumber(ARGV[2])
if tat > now then
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
else
  redis.call('DEL', KEYS[1])
end
return 1
";

/// The Redis keys of a tenant's two limits; the hash tag keeps both in one
/// cluster slot, as one script needs.
pub(crate) fn redis_keys(tenant: &str) -> [String; 2] {
    [
        format!("meridian:rl:{{{tenant}}}:requests"),
        format!("meridian:rl:{{{tenant}}}:tokens"),
    ]
}

struct Shared {
    client: redis::Client,
    conn: OnceLock<Option<ConnectionManager>>,
    timeout: Duration,
    /// Microseconds since the limiter's epoch before which Redis is skipped.
    skip_until: AtomicU64,
    take: redis::Script,
    adjust: redis::Script,
}

impl Shared {
    /// The connection, unless Redis failed within the last second. Created
    /// on first use, inside the proxy's runtime.
    fn connection(&self, now_us: u64) -> Option<ConnectionManager> {
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
    fn trip(&self, now_us: u64, metrics: &Metrics, error: &dyn std::fmt::Display) {
        metrics.rate_limit_redis_errors.inc();
        let until = now_us + REDIS_BACKOFF_US;
        let previous = self.skip_until.swap(until, Ordering::Relaxed);
        if previous <= now_us {
            tracing::warn!(%error, "rate-limit Redis failed; deciding locally for a second");
        }
    }
}

/// The rate limiter of one gateway.
pub(crate) struct Limiter {
    epoch: Instant,
    redis: Option<Arc<Shared>>,
    metrics: Arc<Metrics>,
    pub(crate) default_completion_tokens: u64,
}

impl Limiter {
    pub(crate) fn new(config: &RateLimitConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        let redis = match &config.redis_url {
            None => None,
            Some(url) => Some(Arc::new(Shared {
                client: redis::Client::open(url.as_str())
                    .map_err(|e| format!("`rate_limit.redis_url`: {e}"))?,
                conn: OnceLock::new(),
                timeout: Duration::from_millis(config.redis_timeout_ms),
                skip_until: AtomicU64::new(0),
                take: redis::Script::new(TAKE),
                adjust: redis::Script::new(ADJUST),
            })),
        };
        Ok(Self {
            epoch: Instant::now(),
            redis,
            metrics,
            default_completion_tokens: config.default_completion_tokens,
        })
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Whether `tenant` is limited at all (else no decision, no headers).
    pub(crate) fn applies(tenant: &Tenant) -> bool {
        tenant.limits.any()
    }

    /// Whether `tenant` has a tokens limit (the only reason to estimate).
    pub(crate) fn counts_tokens(tenant: &Tenant) -> bool {
        tenant.limits.tokens_per_minute.is_some()
    }

    /// Decides one request of `tenant` costing `tokens` (an estimate).
    pub(crate) async fn check(&self, tenant: &Tenant, tokens: u64) -> Decision {
        let gcra = tenant.limits.gcra();
        let costs = [1.0, tokens as f64];
        let args = |i: usize| gcra[i].map_or((0.0, 0.0), |g| (g.interval, g.period));
        if let Some(shared) = &self.redis {
            let now_us = self.now_us();
            if let Some(mut conn) = shared.connection(now_us) {
                let (ri, rp) = args(0);
                let (ti, tp) = args(1);
                let mut call = shared.take.key(&tenant.redis_keys[0]);
                call.key(&tenant.redis_keys[1])
                    .arg(ri)
                    .arg(costs[0])
                    .arg(rp)
                    .arg(ti)
                    .arg(costs[1])
                    .arg(tp);
                let answer =
                    tokio::time::timeout(shared.timeout, call.invoke_async::<Vec<i64>>(&mut conn))
                        .await;
                match answer {
                    Ok(Ok(v)) if v.len() == 4 => {
                        let now = v[1] as f64;
                        let tats = [v[2] as f64, v[3] as f64];
                        let (_, rejected, wait) = if v[0] == 1 {
                            (tats, None, 0)
                        } else {
                            evaluate(&gcra, costs, now, tats)
                        };
                        // Mirror into local state, in local time, so a
                        // Redis outage starts from where Redis was.
                        let local_now = self.now_us() as f64;
                        *tenant.local.0.lock().expect("limiter state lock") =
                            [local_now + (tats[0] - now), local_now + (tats[1] - now)];
                        return Decision {
                            status: status(&gcra, now, tats),
                            rejected,
                            retry_after_us: wait,
                            tokens,
                        };
                    }
                    Ok(Ok(v)) => {
                        shared.trip(now_us, &self.metrics, &format!("unexpected answer {v:?}"))
                    }
                    Ok(Err(e)) => shared.trip(now_us, &self.metrics, &e),
                    Err(_) => shared.trip(now_us, &self.metrics, &"timed out"),
                }
            }
        }
        let now = self.now_us() as f64;
        let mut state = tenant.local.0.lock().expect("limiter state lock");
        let (after, rejected, wait) = evaluate(&gcra, costs, now, *state);
        *state = after;
        drop(state);
        Decision {
            status: status(&gcra, now, after),
            rejected,
            retry_after_us: wait,
            tokens,
        }
    }

    /// Charges (positive) or gives back (negative) `delta` tokens once the
    /// real usage is known. The Redis part runs in the background: the
    /// response does not wait for it.
    pub(crate) fn adjust_tokens(&self, tenant: &Arc<Tenant>, delta: i64) {
        let Some(g) = tenant.limits.gcra()[1] else {
            return;
        };
        if delta == 0 {
            return;
        }
        let now = self.now_us() as f64;
        {
            let mut state = tenant.local.0.lock().expect("limiter state lock");
            state[1] = (state[1].max(now) + delta as f64 * g.interval).max(now);
        }
        let Some(shared) = &self.redis else { return };
        let now_us = now as u64;
        let Some(mut conn) = shared.connection(now_us) else {
            return;
        };
        let shared = shared.clone();
        let tenant = tenant.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut call = shared.adjust.key(&tenant.redis_keys[1]);
            call.arg(delta).arg(g.interval);
            match tokio::time::timeout(shared.timeout, call.invoke_async::<i64>(&mut conn)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => shared.trip(now_us, &metrics, &e),
                Err(_) => shared.trip(now_us, &metrics, &"timed out"),
            }
        });
    }
}

/// The `x-ratelimit-*` headers of a decision, as OpenAI sends them.
pub(crate) fn headers(decision: &Decision) -> impl Iterator<Item = (&'static str, HeaderValue)> {
    const NAMES: [[&str; 3]; 2] = [
        [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ],
        [
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ],
    ];
    decision
        .status
        .into_iter()
        .zip(NAMES)
        .filter_map(|(s, names)| s.map(|s| (s, names)))
        .flat_map(|(s, [limit, remaining, reset])| {
            [
                (limit, HeaderValue::from(s.limit)),
                (remaining, HeaderValue::from(s.remaining)),
                (
                    reset,
                    HeaderValue::from_str(&duration_text(s.reset_us)).expect("durations are ASCII"),
                ),
            ]
        })
}

/// A duration as OpenAI (and Go) write it: `120ms`, `1s`, `1.5s`, `6m0s`,
/// `1h2m3s`; rounded up to the millisecond.
pub(crate) fn duration_text(us: u64) -> String {
    let ms = us.div_ceil(1000);
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m) = (ms / 3_600_000, ms / 60_000 % 60);
    let (s, frac) = (ms / 1000 % 60, ms % 1000);
    let mut out = String::with_capacity(12);
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if frac == 0 {
        out.push_str(&format!("{s}s"));
    } else {
        let frac = format!("{frac:03}");
        out.push_str(&format!("{s}.{}s", frac.trim_end_matches('0')));
    }
    out
}

/// `max_tokens` (or `max_completion_tokens`) of a JSON request body, found
/// without parsing it: the largest number following either key.
pub(crate) fn scan_max_tokens(body: &[u8]) -> Option<u64> {
    let mut best = None;
    for key in [&b"\"max_tokens\""[..], &b"\"max_completion_tokens\""[..]] {
        let mut from = 0;
        while let Some(at) = find(&body[from..], key) {
            let mut rest = &body[from + at + key.len()..];
            rest = rest.trim_ascii_start();
            if let Some(r) = rest.strip_prefix(b":") {
                let r = r.trim_ascii_start();
                let digits = r.iter().take_while(|b| b.is_ascii_digit()).count();
                if let Some(n) = std::str::from_utf8(&r[..digits])
                    .ok()
                    .and_then(|d| d.parse::<u64>().ok())
                {
                    best = Some(best.map_or(n, |b: u64| b.max(n)));
                }
            }
            from += at + key.len();
        }
    }
    best
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Tokens a request is charged before the region says: a quarter of the
/// body's bytes for the prompt, plus `max_tokens` or the default.
pub(crate) fn estimate(content_length: Option<u64>, max_tokens: Option<u64>, default: u64) -> u64 {
    content_length.unwrap_or(0) / 4 + max_tokens.unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_openai() {
        assert_eq!(duration_text(0), "0s");
        assert_eq!(duration_text(119_001), "120ms");
        assert_eq!(duration_text(1_000_000), "1s");
        assert_eq!(duration_text(1_500_000), "1.5s");
        assert_eq!(duration_text(360_000_000), "6m0s");
        assert_eq!(duration_text(3_723_000_000), "1h2m3s");
    }

    #[test]
    fn max_tokens_is_found_without_parsing() {
        assert_eq!(
            scan_max_tokens(br#"{"model":"m","max_tokens": 512,"x":1}"#),
            Some(512)
        );
        assert_eq!(scan_max_tokens(br#"{"max_completion_tokens":7}"#), Some(7));
        assert_eq!(scan_max_tokens(br#"{"model":"max_tokens"}"#), None);
        assert_eq!(scan_max_tokens(b"{}"), None);
    }

    #[test]
    fn gcra_allows_the_burst_then_the_rate() {
        let limits = Limits {
            requests_per_second: Some(5),
            tokens_per_minute: None,
        };
        let g = limits.gcra();
        let mut tats = [0.0; 2];
        let mut allowed = 0;
        for _ in 0..20 {
            let (after, rejected, _) = evaluate(&g, [1.0, 0.0], 1e6, tats);
            if rejected.is_none() {
                allowed += 1;
            }
            tats = after;
        }
        assert_eq!(allowed, 5, "the burst is one second's worth");
        let (_, rejected, wait) = evaluate(&g, [1.0, 0.0], 1e6, tats);
        assert_eq!(rejected, Some(Kind::Requests));
        assert_eq!(wait, 200_000, "the next slot is one interval away");
        let (_, rejected, _) = evaluate(&g, [1.0, 0.0], 1.2e6, tats);
        assert_eq!(rejected, None);
        let s = status(&g, 1e6, tats)[0].unwrap();
        assert_eq!((s.limit, s.remaining, s.reset_us), (5, 0, 1_000_000));
    }

    #[test]
    fn a_request_larger_than_the_budget_never_fits() {
        let limits = Limits {
            requests_per_second: None,
            tokens_per_minute: Some(1_000),
        };
        let (_, rejected, wait) = evaluate(&limits.gcra(), [1.0, 5_000.0], 0.0, [0.0; 2]);
        assert_eq!(rejected, Some(Kind::Tokens));
        assert_eq!(wait, 60_000_000);
    }
}
