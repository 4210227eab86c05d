//! The `[spend]` section: how often this region writes its spend and reads
//! everyone's, and the price of each model.

use std::collections::BTreeMap;
use std::time::Duration;

use meridian_proto::config::Problems;
use serde::Deserialize;

/// Spend accounting for budgets. Every key has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpendConfig {
    /// How often this region adds what it served to its spend counters
    /// and then reads every region's spend, the budgets and the prices
    /// set through the API, in milliseconds. A region sees another's spend
    /// up to twice this late, plus the replication lag; its own at once.
    pub flush_interval_ms: u64,
    /// Price of each model, in US dollars per million tokens. A price set
    /// through the management API (`PUT /admin/v1/prices/{model}`) takes
    /// precedence; a model with no price costs nothing (its tokens still
    /// count against token budgets).
    pub prices: BTreeMap<String, Price>,
}

/// A model's price, in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_million: f64,
    pub output_per_million: f64,
}

/// The most a price may be, in dollars per million tokens: far above any
/// model's, and small enough that a day's spend fits the counters.
pub(crate) const MAX_PRICE: f64 = 1_000_000.0;

impl Price {
    /// What is wrong with this price, if anything.
    pub(crate) fn problem(&self) -> Option<String> {
        [
            ("input_per_million", self.input_per_million),
            ("output_per_million", self.output_per_million),
        ]
        .into_iter()
        .find(|(_, v)| !v.is_finite() || *v < 0.0 || *v > MAX_PRICE)
        .map(|(name, v)| {
            format!("`{name}` must be a number of dollars from 0 to {MAX_PRICE}, not {v}")
        })
    }

    /// In micro-dollars per million tokens, as stored.
    pub(crate) fn micros(&self) -> (i64, i64) {
        let micros = |usd: f64| (usd * 1e6).round() as i64;
        (
            micros(self.input_per_million),
            micros(self.output_per_million),
        )
    }
}

impl Default for SpendConfig {
    fn default() -> Self {
        Self {
            flush_interval_ms: 100,
            prices: BTreeMap::new(),
        }
    }
}

impl SpendConfig {
    pub(crate) fn validate(&self, problems: &mut Problems) {
        if !(10..=60_000).contains(&self.flush_interval_ms) {
            problems.push("`spend.flush_interval_ms` must be from 10 to 60000 milliseconds");
        }
        for (model, price) in &self.prices {
            if let Some(problem) = price.problem() {
                problems.push(format!("`spend.prices.{model:?}`: {problem}"));
            }
        }
    }

    pub(crate) fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.flush_interval_ms)
    }
}
