//! Model prices set through the management API, and the spend report: the
//! SQL behind `/admin/v1/prices` and `/v1/usage`.

use chrono::NaiveDate;
use serde::Serialize;
use sqlx::PgPool;

use super::Error;
use super::manage::{Actor, audit};
use crate::config::spend::Price;

/// A model's price as the API shows it.
#[derive(Debug, Serialize)]
pub(crate) struct PriceView {
    pub model: String,
    pub input_per_million: f64,
    pub output_per_million: f64,
    /// `api` (set through the management API, in every region) or
    /// `config` (this region's `[spend.prices]`).
    pub source: &'static str,
}

impl PriceView {
    pub(crate) fn new(model: String, (input, output): (i64, i64), source: &'static str) -> Self {
        Self {
            model,
            input_per_million: input as f64 / 1e6,
            output_per_million: output as f64 / 1e6,
            source,
        }
    }
}

/// Sets the price of `model`, audited.
pub(crate) async fn put_price(
    pool: &PgPool,
    actor: &Actor,
    model: &str,
    price: Price,
) -> Result<(), Error> {
    if let Some(problem) = price.problem() {
        return Err(Error::InvalidPrice(problem));
    }
    if model.is_empty() || model.len() > 256 || model.contains('\0') {
        return Err(Error::InvalidPrice(
            "a model name is 1 to 256 bytes with no NUL".into(),
        ));
    }
    let (input, output) = price.micros();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO model_prices (model, input_micros_per_mtok, output_micros_per_mtok)
         VALUES ($1, $2, $3)
         ON CONFLICT (model) DO UPDATE SET
             input_micros_per_mtok = EXCLUDED.input_micros_per_mtok,
             output_micros_per_mtok = EXCLUDED.output_micros_per_mtok,
             updated_at = now()",
    )
    .bind(model)
    .bind(input)
    .bind(output)
    .execute(&mut *tx)
    .await?;
    let detail = serde_json::json!({
        "input_per_million": price.input_per_million,
        "output_per_million": price.output_per_million,
    });
    audit(
        &mut tx,
        actor,
        "price.set",
        &format!("prices/{model}"),
        detail,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Removes the API's price of `model` (its `[spend.prices]` one applies
/// again); whether there was one.
pub(crate) async fn delete_price(pool: &PgPool, actor: &Actor, model: &str) -> Result<bool, Error> {
    let mut tx = pool.begin().await?;
    let gone = sqlx::query("DELETE FROM model_prices WHERE model = $1")
        .bind(model)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if gone == 0 {
        return Ok(false);
    }
    audit(
        &mut tx,
        actor,
        "price.delete",
        &format!("prices/{model}"),
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// The prices set through the API, by model.
pub(crate) async fn api_prices(pool: &PgPool) -> Result<Vec<(String, (i64, i64))>, Error> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT model, input_micros_per_mtok, output_micros_per_mtok
           FROM model_prices ORDER BY model",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(m, i, o)| (m, (i, o))).collect())
}

/// One line of the spend report.
#[derive(Debug, Serialize)]
pub(crate) struct UsageLine {
    pub tenant: String,
    /// The API key's id; `None`: requests without one.
    pub key_id: Option<String>,
    pub day: NaiveDate,
    pub region: String,
    pub model: String,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_usd: f64,
}

/// (tenant, day, region, model, requests, input, output, nano-dollars, key)
type UsageRow = (
    String,
    NaiveDate,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
);

/// Most lines one report holds: a range or a tenant filter narrows it.
pub(crate) const MAX_USAGE_LINES: i64 = 10_000;

/// Spend of `tenant` (every tenant when `None`) from `start` to `end`
/// inclusive, by day, region and model, as the rows here hold it: this
/// region's as of its last write, every other's as replicated. At most
/// `limit` lines, in (day, tenant, region, model) order.
pub(crate) async fn usage(
    pool: &PgPool,
    tenant: Option<&str>,
    start: NaiveDate,
    end: NaiveDate,
    limit: i64,
) -> Result<Vec<UsageLine>, Error> {
    let rows: Vec<UsageRow> = sqlx::query_as(
        "SELECT tenant_id, day, region, model, requests, input_tokens, output_tokens, cost_nanos,
                key_id
           FROM spend
          WHERE ($1::text IS NULL OR tenant_id = $1) AND day BETWEEN $2 AND $3
          ORDER BY day, tenant_id, region, model, key_id NULLS FIRST
          LIMIT $4",
    )
    .bind(tenant)
    .bind(start)
    .bind(end)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(tenant, day, region, model, requests, input, output, cost, key_id)| UsageLine {
                tenant,
                key_id,
                day,
                region,
                model,
                requests,
                input_tokens: input,
                output_tokens: output,
                cost_usd: cost as f64 / 1e9,
            },
        )
        .collect())
}
