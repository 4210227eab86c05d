//! The retry budget: retries may add at most a fraction of recent traffic
//! (plus a small floor), so when every region fails, the gateway does not
//! multiply the load on them.

use std::sync::Mutex;
use std::time::Instant;

use crate::config::FailoverConfig;

/// Tokens are kept in thousandths so the ratio needs no floats on the hot path.
const ONE: i64 = 1000;

#[derive(Debug)]
pub(crate) struct RetryBudget {
    per_request: i64,
    per_second: i64,
    cap: i64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: i64,
    refilled: Instant,
}

impl RetryBudget {
    pub(crate) fn new(config: &FailoverConfig) -> Self {
        let per_second = i64::from(config.retry_budget_min_per_second) * ONE;
        Self {
            per_request: (config.retry_budget_ratio * ONE as f64) as i64,
            per_second,
            // At most ten seconds' worth of floor, or 100 retries, saved up.
            cap: (per_second * 10).max(100 * ONE),
            state: Mutex::new(State {
                tokens: 0,
                refilled: Instant::now(),
            }),
        }
    }

    /// Every request earns a fraction of a retry.
    pub(crate) fn deposit(&self) {
        let mut s = self.state.lock().expect("retry budget lock");
        s.tokens = (s.tokens + self.per_request).min(self.cap);
    }

    /// Takes one retry from the budget, if there is one.
    pub(crate) fn try_withdraw(&self) -> bool {
        let mut s = self.state.lock().expect("retry budget lock");
        let now = Instant::now();
        let elapsed_ms = now.duration_since(s.refilled).as_millis() as i64;
        if elapsed_ms > 0 {
            s.tokens = (s.tokens + self.per_second * elapsed_ms / 1000).min(self.cap);
            s.refilled = now;
        }
        if s.tokens >= ONE {
            s.tokens -= ONE;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_fraction_of_requests() {
        let budget = RetryBudget::new(&FailoverConfig {
            max_attempts: 3,
            retry_budget_ratio: 0.1,
            retry_budget_min_per_second: 0,
        });
        assert!(!budget.try_withdraw());
        let mut allowed = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.try_withdraw() {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 100);
    }

    #[test]
    fn the_floor_refills_with_time() {
        let budget = RetryBudget::new(&FailoverConfig {
            max_attempts: 3,
            retry_budget_ratio: 0.0,
            retry_budget_min_per_second: 1000,
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(budget.try_withdraw());
    }
}
