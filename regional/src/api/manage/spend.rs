//! Prices and spend over HTTP: `/admin/v1/prices` for operators, the
//! spend report as `/admin/v1/usage` (any tenant) and `/v1/usage` (the
//! calling tenant, through the gateway with its key).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{NaiveDate, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::super::body::JsonBody;
use super::super::{AppState, Tenant};
use super::{Caller, Durable, no_tenant, pool};
use crate::config::spend::Price;
use crate::error::Error;
use crate::replication::DURABILITY_HEADER;
use crate::store::Store;
use crate::tenancy::prices::{self, MAX_USAGE_LINES, PriceView};

/// The longest range one report covers.
const MAX_RANGE_DAYS: i64 = 366;

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/v1/prices", get(list_prices))
        // A model name may hold '/'.
        .route(
            "/admin/v1/prices/{*model}",
            axum::routing::put(put_price).delete(delete_price),
        )
        .route("/admin/v1/usage", get(admin_usage))
        .route("/v1/usage", get(own_usage))
}

/// `GET /admin/v1/prices`: every price this region charges, from the API
/// (replicated) over its `[spend.prices]`.
async fn list_prices(State(state): State<Arc<AppState>>) -> Result<Json<Value>, Error> {
    Ok(Json(json!({
        "object": "list",
        "data": price_list(&state).await?,
    })))
}

/// Every price this region charges, by model.
pub(super) async fn price_list(state: &AppState) -> Result<Vec<PriceView>, Error> {
    let mut all: BTreeMap<String, PriceView> = state
        .spend
        .configured_prices()
        .iter()
        .map(|(model, price)| {
            (
                model.clone(),
                PriceView::new(model.clone(), *price, "config"),
            )
        })
        .collect();
    for (model, price) in prices::api_prices(pool(state)).await? {
        all.insert(model.clone(), PriceView::new(model, price, "api"));
    }
    Ok(all.into_values().collect())
}

/// `PUT /admin/v1/prices/{model}`: sets a model's price in every region.
async fn put_price(
    State(state): State<Arc<AppState>>,
    Caller(actor): Caller,
    Path(model): Path<String>,
    durability: Durable,
    JsonBody(body): JsonBody,
) -> Result<Response, Error> {
    let price: Price = serde_json::from_slice(&body)
        .map_err(|e| Error::invalid(format!("invalid request body: {e}"), None))?;
    prices::put_price(pool(&state), &actor, &model, price).await?;
    let sync = durability.settle(&state).await?;
    let (input, output) = price.micros();
    Ok((
        [(DURABILITY_HEADER, sync.header())],
        Json(json!(PriceView::new(model, (input, output), "api"))),
    )
        .into_response())
}

/// `DELETE /admin/v1/prices/{model}`: the API's price goes; the region's
/// `[spend.prices]` one, if any, applies again.
async fn delete_price(
    State(state): State<Arc<AppState>>,
    Caller(actor): Caller,
    Path(model): Path<String>,
    durability: Durable,
) -> Result<Response, Error> {
    if !prices::delete_price(pool(&state), &actor, &model).await? {
        return Err(Error::NotFound(format!(
            "no price for model {model:?} set through the API"
        )));
    }
    let sync = durability.settle(&state).await?;
    Ok((
        [(DURABILITY_HEADER, sync.header())],
        Json(json!({ "model": model, "deleted": true })),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Range {
    /// First day (UTC, `YYYY-MM-DD`), inclusive; default: the first of
    /// this month.
    pub start: Option<String>,
    /// Last day, inclusive; default: today.
    pub end: Option<String>,
    /// Admin only: one tenant; default: all.
    pub tenant: Option<String>,
}

impl Range {
    pub(super) fn days(&self) -> Result<(NaiveDate, NaiveDate), Error> {
        let day = |name: &'static str, text: &Option<String>, default: NaiveDate| match text {
            None => Ok(default),
            Some(t) => NaiveDate::parse_from_str(t, "%Y-%m-%d").map_err(|_| {
                Error::invalid(
                    format!("`{name}` must be a date as YYYY-MM-DD, not {t:?}"),
                    Some(name),
                )
            }),
        };
        let today = Utc::now().date_naive();
        let first = crate::tenancy::spend::Period::Month.start(today);
        let start = day("start", &self.start, first)?;
        let end = day("end", &self.end, today)?;
        if end < start {
            return Err(Error::invalid("`end` is before `start`", Some("end")));
        }
        if (end - start).num_days() >= MAX_RANGE_DAYS {
            return Err(Error::invalid(
                format!("a report covers at most {MAX_RANGE_DAYS} days"),
                Some("start"),
            ));
        }
        Ok((start, end))
    }
}

/// `GET /admin/v1/usage`: spend by tenant, day, region and model.
async fn admin_usage(
    State(state): State<Arc<AppState>>,
    Query(range): Query<Range>,
) -> Result<Json<Value>, Error> {
    let (start, end) = range.days()?;
    report(&state, range.tenant.as_deref(), start, end)
        .await
        .map(Json)
}

/// `GET /v1/usage`: the calling tenant's spend, and its budget.
async fn own_usage(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    Query(range): Query<Range>,
) -> Result<Json<Value>, Error> {
    if range.tenant.is_some() {
        return Err(Error::invalid(
            "`tenant` is for operators: a key reads its own tenant's usage",
            Some("tenant"),
        ));
    }
    let (start, end) = range.days()?;
    let mut body = report(&state, Some(tenant.as_str()), start, end).await?;
    body["tenant"] = json!(tenant.as_str());
    body["budget"] = match state.spend.budget(tenant.as_str()) {
        None => Value::Null,
        Some(b) => json!({
            "tokens": b.tokens,
            "usd": b.usd_micros.map(|m| m as f64 / 1e6),
            "period": b.period.as_str(),
            "period_start": b.start,
            "resets": b.resets(),
            "spent_tokens": b.spent.tokens(),
            "spent_usd": b.spent.cost_nanos as f64 / 1e9,
        }),
    };
    Ok(Json(body))
}

/// The report's lines and totals, and how current they are.
async fn report(
    state: &AppState,
    tenant: Option<&str>,
    start: NaiveDate,
    end: NaiveDate,
) -> Result<Value, Error> {
    state.stores.require(Store::Postgres)?;
    if let Some(t) = tenant
        && !meridian_proto::valid_tenant_id(t)
    {
        return Err(no_tenant(t));
    }
    let mut lines = prices::usage(pool(state), tenant, start, end, MAX_USAGE_LINES + 1).await?;
    let truncated = lines.len() as i64 > MAX_USAGE_LINES;
    lines.truncate(MAX_USAGE_LINES as usize);
    let sum = |f: fn(&prices::UsageLine) -> i64| lines.iter().map(f).sum::<i64>();
    let cost: f64 = lines.iter().map(|l| l.cost_usd).sum();
    Ok(json!({
        "object": "usage",
        "start": start,
        "end": end,
        "totals": {
            "requests": sum(|l| l.requests),
            "input_tokens": sum(|l| l.input_tokens),
            "output_tokens": sum(|l| l.output_tokens),
            "cost_usd": cost,
        },
        "truncated": truncated,
        "data": lines,
        // What the rows may lack: this region's last interval, and what
        // each peer has not sent yet.
        "as_of": {
            "region": state.region,
            "unwritten_ms": state.spend.interval_ms(),
            "peers": state.replication.lag().into_iter().map(|l| json!({
                "region": l.peer,
                "lag_events": l.lag_events,
                "lag_ms": l.lag_ms,
            })).collect::<Vec<_>>(),
        },
    }))
}
