//! GCRA, the generic cell rate algorithm: one "theoretical arrival time"
//! (TAT) per limit, no counters to reset, exact at any instant. This is the
//! decision in Rust; [`super::scripts`] makes the same one in Redis.

use meridian_proto::ErrorClass;

use super::config::Limits;

/// Microseconds per second and per minute: the periods of the two limits.
const SECOND_US: f64 = 1e6;
const MINUTE_US: f64 = 60e6;

impl Limits {
    /// GCRA parameters: requests, then tokens.
    pub(super) fn gcra(&self) -> [Option<Gcra>; 2] {
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

    /// How a refusal by this limit reaches the client.
    pub(crate) fn class(self) -> ErrorClass {
        match self {
            Self::Requests => ErrorClass::RequestsLimitExceeded,
            Self::Tokens => ErrorClass::TokensLimitExceeded,
        }
    }
}

pub(super) const KINDS: [Kind; 2] = [Kind::Requests, Kind::Tokens];

#[derive(Debug, Clone, Copy)]
pub(super) struct Gcra {
    pub(super) limit: u64,
    /// Microseconds one unit occupies.
    pub(super) interval: f64,
    /// Microseconds of the period; also the burst tolerance (one period's
    /// worth of units may come at once).
    pub(super) period: f64,
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
pub(super) fn evaluate(
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

pub(super) fn status(
    gcra: &[Option<Gcra>; 2],
    now: f64,
    tats: [f64; 2],
) -> [Option<LimitStatus>; 2] {
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

#[cfg(test)]
mod tests {
    use super::*;

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

    /// OpenAI names the refusing limit in the error `type`, as the metric
    /// label does.
    #[test]
    fn a_refusal_reads_as_its_limit_kind() {
        assert_eq!(
            Kind::Requests.class().openai_type(),
            Kind::Requests.as_str()
        );
        assert_eq!(Kind::Tokens.class().openai_type(), Kind::Tokens.as_str());
    }
}
