//! One decision: in the shared Redis when there is one and it answers in
//! time, else in this gateway's own state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::breaker::Shared;
use super::config::{Limits, RateLimitConfig};
use super::gcra::{Decision, evaluate, status};
use super::states::States;
use crate::metrics::Metrics;

/// The rate limiter of one gateway.
pub(crate) struct Limiter {
    epoch: Instant,
    redis: Option<Arc<Shared>>,
    states: States,
    metrics: Arc<Metrics>,
    pub(crate) default_completion_tokens: u64,
}

impl Limiter {
    pub(crate) fn new(config: &RateLimitConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        let redis = match &config.redis_url {
            None => None,
            Some(url) => Some(Arc::new(Shared::new(
                url,
                Duration::from_millis(config.redis_timeout_ms),
            )?)),
        };
        Ok(Self {
            epoch: Instant::now(),
            redis,
            states: States::default(),
            metrics,
            default_completion_tokens: config.default_completion_tokens,
        })
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Whether a tenant with `limits` is limited at all (else no decision,
    /// no headers).
    pub(crate) fn applies(limits: &Limits) -> bool {
        limits.any()
    }

    /// Whether `limits` has a tokens limit (the only reason to estimate).
    pub(crate) fn counts_tokens(limits: &Limits) -> bool {
        limits.tokens_per_minute.is_some()
    }

    /// Decides one request of `tenant` costing `tokens` (an estimate).
    pub(crate) async fn check(&self, tenant: &Arc<str>, limits: &Limits, tokens: u64) -> Decision {
        let gcra = limits.gcra();
        let costs = [1.0, tokens as f64];
        let state = self.states.get(tenant, self.now_us() as f64);
        let args = |i: usize| gcra[i].map_or((0.0, 0.0), |g| (g.interval, g.period));
        if let Some(shared) = &self.redis {
            let now_us = self.now_us();
            if let Some(mut conn) = shared.connection(now_us) {
                let (ri, rp) = args(0);
                let (ti, tp) = args(1);
                let mut call = shared.take.key(&state.redis_keys[0]);
                call.key(&state.redis_keys[1])
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
                        *state.tats.lock().expect("limiter state lock") =
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
        let mut tats = state.tats.lock().expect("limiter state lock");
        let (after, rejected, wait) = evaluate(&gcra, costs, now, *tats);
        *tats = after;
        drop(tats);
        Decision {
            status: status(&gcra, now, after),
            rejected,
            retry_after_us: wait,
            tokens,
        }
    }

    /// Charges (positive) or gives back (negative) `delta` tokens of
    /// `tenant` once the real usage is known. The Redis part runs in the
    /// background: the response does not wait for it.
    pub(crate) fn adjust_tokens(&self, tenant: &Arc<str>, limits: &Limits, delta: i64) {
        let Some(g) = limits.gcra()[1] else {
            return;
        };
        if delta == 0 {
            return;
        }
        let now = self.now_us() as f64;
        let state = self.states.get(tenant, now);
        {
            let mut tats = state.tats.lock().expect("limiter state lock");
            tats[1] = (tats[1].max(now) + delta as f64 * g.interval).max(now);
        }
        let Some(shared) = &self.redis else { return };
        let now_us = now as u64;
        let Some(mut conn) = shared.connection(now_us) else {
            return;
        };
        let shared = shared.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut call = shared.adjust.key(&state.redis_keys[1]);
            call.arg(delta).arg(g.interval);
            match tokio::time::timeout(shared.timeout, call.invoke_async::<i64>(&mut conn)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => shared.trip(now_us, &metrics, &e),
                Err(_) => shared.trip(now_us, &metrics, &"timed out"),
            }
        });
    }
}
