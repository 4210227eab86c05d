//! Telemetry over HTTP (`POST /v1/telemetry`, `GET /v1/telemetry/query`,
//! `GET /v1/usage/summary`) and gRPC (`meridian.v1.Telemetry`). Both turn
//! their wire shapes into [`Reading`]s and [`ReadingsQuery`]s and share
//! everything after that.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use meridian_proto::v1::telemetry_server::TelemetryServer;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{AppState, Tenant, body};
use crate::error::Error;
use crate::store::Store;
use crate::telemetry::Reading;
use crate::telemetry::ingest::{Sorted, sort_out};
use crate::telemetry::query::{self, Aggregate, Aggregates, ReadingsQuery, Series, UsageSummary};

mod grpc;
mod guard;

use self::grpc::TelemetryApi;

/// Rejections listed in one answer at most; the count is always complete.
const MAX_LISTED_REJECTIONS: usize = 1_000;

pub(super) fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/telemetry", post(ingest))
        .route("/v1/telemetry/query", get(query_readings))
        .route("/v1/usage/summary", get(usage_summary))
        .with_state(state)
}

/// The gRPC service, its Ingest streams counted before they are decoded
/// ([`guard`]), with the same message size limit as an HTTP body.
pub(super) fn service(state: Arc<AppState>) -> guard::Guarded {
    let config = &state.telemetry.config;
    let max_batch = config.max_batch;
    let server = TelemetryServer::new(TelemetryApi::new(state.clone()))
        .max_decoding_message_size(config.body_limit());
    guard::Guarded::new(server, max_batch, config.body_limit())
}

/// One reading as JSON. Every field is optional here so that a missing one
/// is reported like the other per-item problems, not as a parse error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonReading {
    #[serde(default)]
    device_id: String,
    ts: Option<String>,
    #[serde(default)]
    metric: String,
    value: Option<serde_json::Value>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// One item of a body (a JSON array element or an NDJSON line) as a
/// reading, or why it is not one.
fn json_reading(item: &[u8]) -> Result<Reading, String> {
    let r: JsonReading = serde_json::from_slice(item).map_err(|e| match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            format!("not valid JSON: {e}")
        }
        _ => e.to_string(),
    })?;
    let ts = r.ts.ok_or("missing ts")?;
    let ts = DateTime::parse_from_rfc3339(&ts)
        .map_err(|_| format!("ts {ts:?} is not an RFC 3339 timestamp"))?
        .with_timezone(&Utc);
    let value = match r.value.ok_or("missing value")? {
        serde_json::Value::Number(n) => n.as_f64().ok_or("value is not a number")?,
        // JSON has no NaN or infinity; encoders that emit them as strings
        // get the same answer as gRPC clients that send them.
        serde_json::Value::String(s) => s
            .parse::<f64>()
            .ok()
            .filter(|v| !v.is_finite())
            .ok_or("value is not a number")?,
        _ => return Err("value is not a number".into()),
    };
    Ok(Reading {
        device_id: r.device_id,
        ts,
        metric: r.metric,
        value,
        labels: r.labels,
    })
}

/// The items of a JSON array body, or of an NDJSON body (one per non-empty
/// line), counted before any is parsed: a body of more than `max_batch`
/// items is only counted, never expanded, whatever its size. A JSON body
/// that is not an array fails the request; an NDJSON line that is not JSON
/// fails only its item.
fn body_items(headers: &HeaderMap, body: &[u8], max_batch: u32) -> Result<Batch, Error> {
    let max = max_batch as usize;
    let ndjson = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-ndjson"));
    if ndjson {
        let lines = || {
            body.split(|b| *b == b'\n')
                .filter(|line| !line.trim_ascii().is_empty())
        };
        let count = lines().count();
        if count > max {
            return Ok(Batch::Oversized(count));
        }
        return Ok(Batch::Items(lines().map(json_reading).collect()));
    }
    let over = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let items = Elements { max, over: &over }
        .deserialize(&mut de)
        .and_then(|items| de.end().map(|()| items))
        .map_err(|e| {
            Error::invalid(
                format!("the body must be a JSON array of readings: {e}"),
                None,
            )
        })?;
    if let Some(count) = over.get() {
        return Ok(Batch::Oversized(count));
    }
    Ok(Batch::Items(
        items
            .into_iter()
            .map(|raw| json_reading(raw.get().as_bytes()))
            .collect(),
    ))
}

/// What a body holds: its items, parsed one by one, or only their count
/// when there are more than `max_batch`.
enum Batch {
    Items(Vec<Result<Reading, String>>),
    Oversized(usize),
}

/// The elements of a JSON array as unparsed slices of the body, at most
/// `max`; past that the rest are only counted, into `over`.
struct Elements<'a> {
    max: usize,
    over: &'a Cell<Option<usize>>,
}

impl<'de> DeserializeSeed<'de> for Elements<'_> {
    type Value = Vec<&'de RawValue>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Elements<'_> {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<&RawValue>()? {
            if items.len() == self.max {
                drop(items);
                let mut count = self.max + 1;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    count += 1;
                }
                self.over.set(Some(count));
                return Ok(Vec::new());
            }
            items.push(item);
        }
        Ok(items)
    }
}

#[derive(Serialize)]
struct IngestReport {
    accepted: u64,
    rejected: u64,
    rejections: Vec<ItemRejection>,
    region: String,
}

#[derive(Serialize)]
struct ItemRejection {
    index: usize,
    reason: String,
}

async fn ingest(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::Json<IngestReport>, Error> {
    let t = &state.telemetry;
    state.stores.require(Store::Postgres)?;
    let limit = t.config.body_limit();
    let body = body::read(&headers, body, limit, "telemetry.max_body_bytes").await?;
    let sorted = match body_items(&headers, &body, t.config.max_batch)? {
        Batch::Items(items) => sort_out(items, &t.limits, Utc::now()),
        Batch::Oversized(count) => {
            Sorted::oversized(count, t.config.max_batch, MAX_LISTED_REJECTIONS)
        }
    };
    drop(body);
    let accepted = sorted.good.len() as u64;
    t.writer
        .submit(tenant.as_str(), sorted.good)
        .await?
        .wait()
        .await?;
    Ok(axum::Json(IngestReport {
        accepted,
        rejected: sorted.rejected,
        rejections: sorted
            .bad
            .into_iter()
            .take(MAX_LISTED_REJECTIONS)
            .map(|(index, reason)| ItemRejection { index, reason })
            .collect(),
        region: state.region.clone(),
    }))
}

/// `90s`, `15m`, `1h`, `1d`, `500ms`.
fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().ok()?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(Duration::from_millis(n.checked_mul(unit_ms)?))
}

fn parse_time(name: &'static str, text: &str) -> Result<DateTime<Utc>, Error> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            Error::invalid(
                format!("`{name}` must be an RFC 3339 timestamp"),
                Some(name),
            )
        })
}

/// Reads `device_id`, `metric`, `start`, `end`, `bucket`, `aggregates`
/// (comma-separated) and `label.<name>` parameters.
fn readings_query(params: Vec<(String, String)>) -> Result<ReadingsQuery, Error> {
    let mut device_id = None;
    let mut metric = String::new();
    let (mut start, mut end, mut bucket) = (None, None, None);
    let mut labels = BTreeMap::new();
    let mut aggregates = Vec::new();
    for (key, value) in params {
        match key.as_str() {
            "device_id" => device_id = Some(value),
            "metric" => metric = value,
            "start" => start = Some(parse_time("start", &value)?),
            "end" => end = Some(parse_time("end", &value)?),
            "bucket" => {
                bucket = Some(parse_duration(&value).ok_or_else(|| {
                    Error::invalid(
                        "`bucket` must be a whole number with a unit: ms, s, m, h or d (e.g. 15m)",
                        Some("bucket"),
                    )
                })?);
            }
            "aggregates" => {
                for name in value.split(',').filter(|n| !n.is_empty()) {
                    aggregates.push(Aggregate::parse(name).ok_or_else(|| {
                        Error::invalid(
                            format!("unknown aggregate {name:?}: use avg, min, max, count or last"),
                            Some("aggregates"),
                        )
                    })?);
                }
            }
            other => match other.strip_prefix("label.") {
                Some(label) if !label.is_empty() => {
                    labels.insert(label.to_string(), value);
                }
                _ => {
                    return Err(Error::invalid(
                        format!("unknown query parameter `{other}`"),
                        None,
                    ));
                }
            },
        }
    }
    Ok(ReadingsQuery {
        device_id: device_id.filter(|d| !d.is_empty()),
        labels,
        metric,
        start: start.ok_or_else(|| Error::invalid("`start` is required", Some("start")))?,
        end: end.ok_or_else(|| Error::invalid("`end` is required", Some("end")))?,
        bucket,
        aggregates: Aggregates::of(&aggregates),
    })
}

fn query_params<T>(params: Result<Query<T>, QueryRejection>) -> Result<T, Error> {
    params
        .map(|Query(p)| p)
        .map_err(|e| Error::invalid(e.body_text(), None))
}

#[derive(Serialize)]
struct QueryReport {
    series: Vec<SeriesBody>,
    region: String,
}

#[derive(Serialize)]
struct SeriesBody {
    device_id: String,
    metric: String,
    buckets: Vec<BucketBody>,
}

#[derive(Serialize)]
struct BucketBody {
    start: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    avg: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last: Option<f64>,
}

async fn run_query(
    state: &AppState,
    tenant: &Tenant,
    q: &ReadingsQuery,
) -> Result<Vec<Series>, Error> {
    let t = &state.telemetry;
    q.check(t.config.max_query_buckets)?;
    state.stores.require(Store::Postgres)?;
    query::readings(&state.pool, t.mode, tenant.as_str(), q).await
}

async fn query_readings(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<axum::Json<QueryReport>, Error> {
    let q = readings_query(query_params(params)?)?;
    let series = run_query(&state, &tenant, &q).await?;
    Ok(axum::Json(QueryReport {
        series: series
            .into_iter()
            .map(|s| SeriesBody {
                device_id: s.device_id,
                metric: q.metric.clone(),
                buckets: s
                    .buckets
                    .into_iter()
                    .map(|b| BucketBody {
                        start: b.start,
                        count: b.count,
                        avg: b.avg,
                        min: b.min,
                        max: b.max,
                        last: b.last,
                    })
                    .collect(),
            })
            .collect(),
        region: state.region.clone(),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageParams {
    start: String,
    end: String,
    model: Option<String>,
}

#[derive(Serialize)]
struct UsageReport {
    tenant: String,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    models: Vec<UsageSummary>,
    region: String,
}

async fn usage_summary(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    params: Result<Query<UsageParams>, QueryRejection>,
) -> Result<axum::Json<UsageReport>, Error> {
    let p = query_params(params)?;
    let start = parse_time("start", &p.start)?;
    let end = parse_time("end", &p.end)?;
    state.stores.require(Store::Postgres)?;
    let models = query::usage(&state.pool, tenant.as_str(), start, end, p.model.as_deref()).await?;
    Ok(axum::Json(UsageReport {
        tenant: tenant.as_str().to_string(),
        start,
        end,
        models,
        region: state.region.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_duration("1d"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("15"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration("1w"), None);
    }

    #[test]
    fn json_items_report_their_own_problem() {
        let parse = |v: &serde_json::Value| json_reading(v.to_string().as_bytes());
        let item = |v: serde_json::Value| parse(&v).unwrap_err();
        let ok = serde_json::json!({"device_id": "d", "ts": "2026-01-01T00:00:00Z",
            "metric": "m", "value": 1.0});
        assert!(parse(&ok).is_ok());
        let mut extra = ok.clone();
        extra["colour"] = "red".into();
        assert!(item(extra).contains("unknown field `colour`"));
        let mut nan = ok.clone();
        nan["value"] = "NaN".into();
        assert!(parse(&nan).unwrap().value.is_nan());
        let mut text = ok.clone();
        text["value"] = "12".into();
        assert!(item(text).contains("not a number"));
        let mut ts = ok;
        ts["ts"] = "yesterday".into();
        assert!(item(ts).contains("RFC 3339"));
    }
}
