//! Spend and budgets across regions.
//!
//! Each region counts what it serves per (day, tenant, model) in memory and
//! adds it, every `spend.flush_interval_ms`, to its own rows of the
//! replicated `spend` table (`0017_budgets.sql`): a grow-only counter per
//! region, which only that region writes, so summing every region's rows
//! counts each request once. After each write the region reads back every
//! region's spend for the tenants with a budget, so a budget check sees:
//! this region's spend exactly (what the rows hold, plus what is not
//! written yet), and the others' as of their last write and the
//! replication lag. A tenant over its budget is refused with 429
//! `insufficient_quota` before its request reaches a model.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{Datelike, NaiveDate, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::SpendConfig;
use crate::error::Error;

/// One counter: what one tenant spent on one model in one UTC day here.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Counter {
    day: NaiveDate,
    tenant: String,
    /// The API key's id; `None` without one.
    key: Option<String>,
    model: String,
}

/// What was added to a counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Amount {
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_nanos: i64,
}

impl Amount {
    fn add(&mut self, other: Amount) {
        self.requests += other.requests;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cost_nanos = self.cost_nanos.saturating_add(other.cost_nanos);
    }

    pub(crate) fn tokens(&self) -> i64 {
        self.input_tokens + self.output_tokens
    }
}

/// A budget period: a UTC day or month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Period {
    Day,
    Month,
}

impl Period {
    pub(crate) fn parse(name: &str) -> Option<Self> {
        match name {
            "day" => Some(Self::Day),
            "month" => Some(Self::Month),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
        }
    }

    /// The first day of the period `day` falls in.
    pub(crate) fn start(self, day: NaiveDate) -> NaiveDate {
        match self {
            Self::Day => day,
            Self::Month => day.with_day(1).unwrap_or(day),
        }
    }
}

/// A tenant's budget, and its spend in all regions as last read.
#[derive(Debug, Clone)]
struct Budget {
    tokens: Option<i64>,
    usd_micros: Option<i64>,
    period: Period,
    start: NaiveDate,
    spent: Amount,
}

/// A tenant's budget and its spend, for checks and reports.
#[derive(Debug, Clone)]
pub(crate) struct BudgetStatus {
    pub tokens: Option<i64>,
    pub usd_micros: Option<i64>,
    pub period: Period,
    /// The first day of the current period.
    pub start: NaiveDate,
    pub spent: Amount,
}

impl BudgetStatus {
    /// The first day of the next period.
    pub(crate) fn resets(&self) -> NaiveDate {
        next_period(self.period, self.start)
    }
}

/// Prices in micro-dollars per million tokens (input, output).
type Prices = HashMap<String, (i64, i64)>;

#[derive(Default)]
struct State {
    /// Not yet written.
    pending: HashMap<Counter, Amount>,
    /// Being written, or left by a write that failed.
    flushing: HashMap<Counter, Amount>,
    /// Written, and counted here until a read of the rows includes it, so
    /// that no check misses it nor counts it twice.
    written: HashMap<Counter, Amount>,
    /// Tenants with a budget, as last read.
    budgets: HashMap<String, Budget>,
    /// The API's prices over the config's, as last read.
    prices: Prices,
}

/// This region's spend accounting; shared by the request paths.
pub(crate) struct Spend {
    region: String,
    interval: std::time::Duration,
    configured: Prices,
    state: Mutex<State>,
    stop: CancellationToken,
}

impl Spend {
    /// Starts the writer on `tasks`; it writes once more after
    /// [`Spend::stop`], which the node calls once requests have drained.
    pub(crate) fn start(
        pool: PgPool,
        region: &str,
        config: &SpendConfig,
        tasks: &TaskTracker,
    ) -> Arc<Self> {
        let configured: Prices = config
            .prices
            .iter()
            .map(|(model, price)| (model.clone(), price.micros()))
            .collect();
        let spend = Arc::new(Self {
            region: region.to_string(),
            interval: config.flush_interval(),
            state: Mutex::new(State {
                prices: configured.clone(),
                ..State::default()
            }),
            configured,
            stop: CancellationToken::new(),
        });
        tasks.spawn(run(spend.clone(), pool, config.flush_interval()));
        spend
    }

    /// How often this region writes its spend, in milliseconds.
    pub(crate) fn interval_ms(&self) -> u64 {
        u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX)
    }

    /// Writes what is left and stops the writer.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }

    /// Counts one answered request of `tenant` on `model`.
    pub(crate) fn add(
        &self,
        tenant: &str,
        key: Option<&str>,
        model: &str,
        input_tokens: u32,
        output_tokens: u32,
    ) {
        let counter = Counter {
            day: Utc::now().date_naive(),
            tenant: tenant.to_string(),
            key: key.map(str::to_string),
            model: model.to_string(),
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (input_price, output_price) = state.prices.get(model).copied().unwrap_or((0, 0));
        let amount = Amount {
            requests: 1,
            input_tokens: i64::from(input_tokens),
            output_tokens: i64::from(output_tokens),
            cost_nanos: cost_nanos(input_tokens, input_price)
                .saturating_add(cost_nanos(output_tokens, output_price)),
        };
        state.pending.entry(counter).or_default().add(amount);
    }

    /// `tenant`'s budget and what it has spent of it in all regions, as
    /// far as this region knows: its own spend exactly, the others' as
    /// last read. `None` when it has no budget.
    pub(crate) fn budget(&self, tenant: &str) -> Option<BudgetStatus> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let budget = state.budgets.get(tenant)?;
        let mut spent = budget.spent;
        let unread = state
            .pending
            .iter()
            .chain(&state.flushing)
            .chain(&state.written);
        for (counter, amount) in unread {
            if counter.tenant == tenant && counter.day >= budget.start {
                spent.add(*amount);
            }
        }
        Some(BudgetStatus {
            tokens: budget.tokens,
            usd_micros: budget.usd_micros,
            period: budget.period,
            start: budget.start,
            spent,
        })
    }

    /// Refuses a request of `tenant` once its budget is spent.
    pub(crate) fn check(&self, tenant: &str) -> Result<(), Error> {
        let Some(budget) = self.budget(tenant) else {
            return Ok(());
        };
        let spent = budget.spent;
        let over_tokens = budget.tokens.filter(|limit| spent.tokens() >= *limit);
        let over_money = budget
            .usd_micros
            .filter(|limit| spent.cost_nanos >= limit.saturating_mul(1000));
        let what = match (over_tokens, over_money) {
            (Some(limit), _) => format!("{limit} tokens"),
            (None, Some(limit)) => format!("${}", usd(limit)),
            (None, None) => return Ok(()),
        };
        Err(Error::BudgetSpent {
            tenant: tenant.to_string(),
            budget: what,
            period: budget.period.as_str(),
            resets: budget.resets(),
        })
    }

    /// The prices in `[spend.prices]`, in micro-dollars per million tokens.
    pub(crate) fn configured_prices(&self) -> &HashMap<String, (i64, i64)> {
        &self.configured
    }

    /// One round: write what was counted, then read back every region's.
    async fn round(&self, pool: &PgPool) {
        let flushing: Vec<(Counter, Amount)> = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let pending = std::mem::take(&mut state.pending);
            for (counter, amount) in pending {
                state.flushing.entry(counter).or_default().add(amount);
            }
            state
                .flushing
                .iter()
                .map(|(c, a)| (c.clone(), *a))
                .collect()
        };
        if !flushing.is_empty() {
            if let Err(e) = write(pool, &self.region, &flushing).await {
                // Kept in `flushing`, counted in checks, written next round.
                tracing::warn!(error = %e, counters = flushing.len(), "spend not written; retrying");
                return;
            }
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            for (counter, amount) in std::mem::take(&mut state.flushing) {
                state.written.entry(counter).or_default().add(amount);
            }
        }
        match read(pool).await {
            Ok((budgets, prices)) => {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                state.budgets = budgets;
                let mut merged = self.configured.clone();
                merged.extend(prices);
                state.prices = merged;
                state.written.clear();
            }
            Err(e) => {
                // What was written stays counted here until a read has it.
                tracing::warn!(error = %e, "budgets not read; the last ones stand");
            }
        }
    }
}

async fn run(spend: Arc<Spend>, pool: PgPool, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => spend.round(&pool).await,
            () = spend.stop.cancelled() => {
                spend.round(&pool).await;
                return;
            }
        }
    }
}

/// Nano-dollars for `tokens` at `micros_per_mtok` micro-dollars per million.
fn cost_nanos(tokens: u32, micros_per_mtok: i64) -> i64 {
    let nanos = i128::from(tokens) * i128::from(micros_per_mtok) / 1000;
    i64::try_from(nanos).unwrap_or(i64::MAX)
}

/// Micro-dollars as dollars, for messages.
pub(crate) fn usd(micros: i64) -> String {
    let text = format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000);
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn next_period(period: Period, start: NaiveDate) -> NaiveDate {
    match period {
        Period::Day => start.succ_opt().unwrap_or(start),
        Period::Month => start
            .checked_add_months(chrono::Months::new(1))
            .unwrap_or(start),
    }
}

/// Adds `counters` to this region's rows, in one replicated transaction.
async fn write(pool: &PgPool, region: &str, counters: &[(Counter, Amount)]) -> Result<(), Error> {
    let ids: Vec<String> = counters
        .iter()
        .map(|(c, _)| match &c.key {
            // Counters without a key keep the id they had before keys were
            // counted; a key (a UUID, no '/') goes before the model, which
            // may hold '/'s.
            None => format!("{region}/{}/{}/{}", c.day, c.tenant, c.model),
            Some(key) => format!("{region}/{}/{}/key:{key}/{}", c.day, c.tenant, c.model),
        })
        .collect();
    let column = |f: fn(&Amount) -> i64| counters.iter().map(|(_, a)| f(a)).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO spend (id, region, day, tenant_id, model, requests, input_tokens,
                            output_tokens, cost_nanos, key_id)
         SELECT u.id, $2, u.day, u.tenant, u.model, u.requests, u.input, u.output, u.cost,
                u.key
           FROM UNNEST($1::text[], $3::date[], $4::text[], $5::text[], $6::int8[], $7::int8[],
                       $8::int8[], $9::int8[], $10::text[])
                AS u(id, day, tenant, model, requests, input, output, cost, key)
         ON CONFLICT (id) DO UPDATE SET
             requests = spend.requests + EXCLUDED.requests,
             input_tokens = spend.input_tokens + EXCLUDED.input_tokens,
             output_tokens = spend.output_tokens + EXCLUDED.output_tokens,
             cost_nanos = spend.cost_nanos + EXCLUDED.cost_nanos,
             updated_at = now()",
    )
    .bind(&ids)
    .bind(region)
    .bind(counters.iter().map(|(c, _)| c.day).collect::<Vec<_>>())
    .bind(
        counters
            .iter()
            .map(|(c, _)| c.tenant.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        counters
            .iter()
            .map(|(c, _)| c.model.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(column(|a| a.requests))
    .bind(column(|a| a.input_tokens))
    .bind(column(|a| a.output_tokens))
    .bind(column(|a| a.cost_nanos))
    .bind(
        counters
            .iter()
            .map(|(c, _)| c.key.as_deref())
            .collect::<Vec<_>>(),
    )
    .execute(pool)
    .await?;
    Ok(())
}

type BudgetRow = (
    String,
    Option<i64>,
    Option<i64>,
    Option<String>,
    i64,
    i64,
    i64,
    i64,
    i64,
);

/// Every budget with the spend of its current period in all regions, and
/// the prices set through the API.
async fn read(pool: &PgPool) -> Result<(HashMap<String, Budget>, Prices), Error> {
    let today = Utc::now().date_naive();
    let rows: Vec<BudgetRow> = sqlx::query_as(
        "SELECT t.id, t.budget_tokens, t.budget_usd_micros, t.budget_period,
                coalesce(sum(s.requests), 0)::int8, coalesce(sum(s.input_tokens), 0)::int8,
                coalesce(sum(s.output_tokens), 0)::int8, coalesce(sum(s.cost_nanos), 0)::int8,
                count(s.id)
           FROM tenants t
           LEFT JOIN spend s
             ON s.tenant_id = t.id
            AND s.day >= CASE t.budget_period WHEN 'day' THEN $1
                              ELSE date_trunc('month', $1)::date END
          WHERE t.budget_tokens IS NOT NULL OR t.budget_usd_micros IS NOT NULL
          GROUP BY t.id",
    )
    .bind(today)
    .fetch_all(pool)
    .await?;
    let budgets = rows
        .into_iter()
        .map(
            |(id, tokens, usd_micros, period, requests, input, output, cost, _)| {
                let period = period
                    .as_deref()
                    .and_then(Period::parse)
                    .unwrap_or(Period::Month);
                let budget = Budget {
                    tokens,
                    usd_micros,
                    period,
                    start: period.start(today),
                    spent: Amount {
                        requests,
                        input_tokens: input,
                        output_tokens: output,
                        cost_nanos: cost,
                    },
                };
                (id, budget)
            },
        )
        .collect();
    let prices: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT model, input_micros_per_mtok, output_micros_per_mtok FROM model_prices",
    )
    .fetch_all(pool)
    .await?;
    let prices = prices
        .into_iter()
        .map(|(model, input, output)| (model, (input, output)))
        .collect();
    Ok((budgets, prices))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_nano_dollars_of_micro_dollar_prices() {
        // $2.50 per million tokens: 1,000 tokens cost $0.0025.
        assert_eq!(cost_nanos(1000, 2_500_000), 2_500_000);
        // $0.02 per million: 7 tokens cost 140 nano-dollars, not zero.
        assert_eq!(cost_nanos(7, 20_000), 140);
        assert_eq!(usd(1_500_000), "1.5");
        assert_eq!(usd(3_000_000), "3");
        assert_eq!(usd(250), "0.00025");
    }

    #[test]
    fn periods_start_and_end_on_utc_calendar_days() {
        let day = NaiveDate::from_ymd_opt(2026, 12, 31).unwrap();
        assert_eq!(
            Period::Month.start(day),
            NaiveDate::from_ymd_opt(2026, 12, 1).unwrap()
        );
        assert_eq!(
            next_period(Period::Month, Period::Month.start(day)),
            NaiveDate::from_ymd_opt(2027, 1, 1).unwrap()
        );
        assert_eq!(
            next_period(Period::Day, day),
            NaiveDate::from_ymd_opt(2027, 1, 1).unwrap()
        );
    }
}
