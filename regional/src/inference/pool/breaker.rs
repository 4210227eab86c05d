//! An upstream's circuit breaker.

use std::time::Duration;

use tokio::time::Instant;

/// A circuit breaker: consecutive failures open it for a cooldown; then one
/// probe request is let through, whose outcome closes or reopens it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Breaker {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

impl Breaker {
    pub(super) fn usable(&self, now: Instant) -> bool {
        match *self {
            Self::Closed { .. } => true,
            Self::Open { until } => now >= until,
            Self::HalfOpen { probing } => !probing,
        }
    }

    /// Lets a request through, taking the probe slot when half open.
    pub(super) fn admit(&mut self, now: Instant) -> bool {
        match *self {
            Self::Closed { .. } => true,
            Self::Open { until } if now >= until => {
                *self = Self::HalfOpen { probing: true };
                true
            }
            Self::HalfOpen { probing: false } => {
                *self = Self::HalfOpen { probing: true };
                true
            }
            _ => false,
        }
    }

    pub(super) fn failure(&mut self, now: Instant, threshold: u32, cooldown: Duration) {
        *self = match *self {
            Self::Closed { failures } if failures + 1 < threshold => Self::Closed {
                failures: failures + 1,
            },
            Self::Open { until } => Self::Open { until },
            _ => Self::Open {
                until: now + cooldown,
            },
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_probes_and_closes() {
        let cooldown = Duration::from_millis(100);
        let mut b = Breaker::Closed { failures: 0 };
        let now = Instant::now();
        b.failure(now, 2, cooldown);
        assert!(b.usable(now), "one failure of two");
        b.failure(now, 2, cooldown);
        assert!(!b.usable(now) && !b.admit(now), "open");
        let later = now + cooldown;
        assert!(b.usable(later));
        assert!(b.admit(later), "the probe");
        assert!(!b.admit(later), "one probe at a time");
        b.failure(later, 2, cooldown);
        assert_eq!(
            b,
            Breaker::Open {
                until: later + cooldown
            }
        );
    }
}
