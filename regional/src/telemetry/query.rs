//! Aggregates over time buckets, and usage summaries. Buckets are aligned to
//! the Unix epoch in both storage modes; only the SQL function differs
//! (see [`Mode::bucket_sql`]).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{FromRow, PgPool};

use super::schema::{Mode, interval_of};
use crate::error::Error;

/// An aggregate of the readings in one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Aggregate {
    Avg,
    Min,
    Max,
    Count,
    Last,
}

impl Aggregate {
    pub(crate) fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "avg" => Self::Avg,
            "min" => Self::Min,
            "max" => Self::Max,
            "count" => Self::Count,
            "last" => Self::Last,
            _ => return None,
        })
    }
}

/// Which aggregates a query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Aggregates {
    pub avg: bool,
    pub min: bool,
    pub max: bool,
    pub count: bool,
    pub last: bool,
}

impl Aggregates {
    /// The listed ones; all of them when the list is empty.
    pub(crate) fn of(list: &[Aggregate]) -> Self {
        let has = |a| list.is_empty() || list.contains(&a);
        Self {
            avg: has(Aggregate::Avg),
            min: has(Aggregate::Min),
            max: has(Aggregate::Max),
            count: has(Aggregate::Count),
            last: has(Aggregate::Last),
        }
    }
}

/// A checked query over one metric.
#[derive(Debug, Clone)]
pub(crate) struct ReadingsQuery {
    pub device_id: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub metric: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// `None`: one bucket from `start` to `end`.
    pub bucket: Option<Duration>,
    pub aggregates: Aggregates,
}

/// The aggregates of one bucket; unrequested ones are `None`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BucketValues {
    pub start: DateTime<Utc>,
    pub count: Option<u64>,
    pub avg: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub last: Option<f64>,
}

/// One device's buckets, in time order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Series {
    pub device_id: String,
    pub buckets: Vec<BucketValues>,
}

impl ReadingsQuery {
    /// Refuses queries that are incomplete or would make too many buckets.
    pub(crate) fn check(&self, max_buckets: u32) -> Result<(), Error> {
        if self.metric.is_empty() {
            return Err(Error::invalid("`metric` is required", Some("metric")));
        }
        if self.device_id.is_none() && self.labels.is_empty() {
            return Err(Error::invalid(
                "`device_id` or `labels` is required",
                Some("device_id"),
            ));
        }
        if self.end <= self.start {
            return Err(Error::invalid("`end` must be after `start`", Some("end")));
        }
        let Some(width) = self.bucket else {
            return Ok(());
        };
        let width = i64::try_from(width.as_micros()).unwrap_or(i64::MAX);
        if width < 1 {
            return Err(Error::invalid(
                "`bucket` must be at least 1 microsecond",
                Some("bucket"),
            ));
        }
        // In i128: the span of two far-apart timestamps overflows an i64
        // of microseconds.
        let width = i128::from(width);
        let first = i128::from(self.start.timestamp_micros()).div_euclid(width);
        let last = (i128::from(self.end.timestamp_micros()) - 1).div_euclid(width);
        let buckets = last - first + 1;
        if buckets > i128::from(max_buckets) {
            return Err(Error::invalid(
                format!("the query makes {buckets} buckets, more than the limit of {max_buckets}"),
                Some("bucket"),
            ));
        }
        Ok(())
    }
}

#[derive(FromRow)]
struct Row {
    device_id: String,
    bucket: DateTime<Utc>,
    n: i64,
    avg: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
    last: Option<f64>,
}

/// Runs a checked query for `tenant`.
pub(crate) async fn readings(
    pool: &PgPool,
    mode: Mode,
    tenant: &str,
    q: &ReadingsQuery,
) -> Result<Vec<Series>, Error> {
    let (width, origin) = match q.bucket {
        Some(width) => (width, DateTime::UNIX_EPOCH),
        None => ((q.end - q.start).to_std().unwrap_or_default(), q.start),
    };
    let pick = |wanted: bool, sql: &'static str| if wanted { sql } else { "NULL::float8" };
    let mut filters = String::new();
    let mut next = 7;
    if q.device_id.is_some() {
        filters.push_str(&format!(" AND device_id = ${next}"));
        next += 1;
    }
    if !q.labels.is_empty() {
        filters.push_str(&format!(" AND labels @> ${next}"));
    }
    // Only constant fragments and parameter numbers go into the text.
    let sql = format!(
        "SELECT device_id, {bucket} AS bucket, count(*) AS n, {avg} AS avg, {min} AS min,
                {max} AS max, {last} AS last
           FROM telemetry_readings
          WHERE tenant = $3 AND metric = $4 AND ts >= $5 AND ts < $6{filters}
          GROUP BY device_id, bucket
          ORDER BY device_id, bucket",
        bucket = mode.bucket_sql(),
        avg = pick(q.aggregates.avg, "avg(value)"),
        min = pick(q.aggregates.min, "min(value)"),
        max = pick(q.aggregates.max, "max(value)"),
        last = pick(q.aggregates.last, mode.last_sql()),
    );
    let mut query = sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(sql))
        .bind(interval_of(width))
        .bind(origin)
        .bind(tenant)
        .bind(&q.metric)
        .bind(q.start)
        .bind(q.end);
    if let Some(device) = &q.device_id {
        query = query.bind(device);
    }
    if !q.labels.is_empty() {
        query = query.bind(Json(&q.labels));
    }
    let rows = query.fetch_all(pool).await?;
    let mut series: Vec<Series> = Vec::new();
    for row in rows {
        let values = BucketValues {
            start: row.bucket,
            count: q
                .aggregates
                .count
                .then(|| u64::try_from(row.n).unwrap_or(0)),
            avg: row.avg,
            min: row.min,
            max: row.max,
            last: row.last,
        };
        match series.last_mut() {
            Some(s) if s.device_id == row.device_id => s.buckets.push(values),
            _ => series.push(Series {
                device_id: row.device_id,
                buckets: vec![values],
            }),
        }
    }
    Ok(series)
}

/// Usage of one model over a time range.
#[derive(Debug, Clone, PartialEq, FromRow, serde::Serialize)]
pub(crate) struct UsageSummary {
    pub model: String,
    pub requests: i64,
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Of successful requests.
    pub p95_latency_ms: Option<f64>,
    /// Hits over cache lookups of successful requests; `None` without any.
    pub cache_hit_rate: Option<f64>,
}

const USAGE_SUMMARY: &str = "
    SELECT model,
           count(*) AS requests,
           count(*) FILTER (WHERE status <> 'ok') AS errors,
           coalesce(sum(prompt_tokens), 0)::int8 AS prompt_tokens,
           coalesce(sum(completion_tokens), 0)::int8 AS completion_tokens,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms)
               FILTER (WHERE status = 'ok') AS p95_latency_ms,
           (count(*) FILTER (WHERE status = 'ok' AND cache LIKE 'hit%'))::float8
               / nullif(count(*) FILTER (WHERE status = 'ok' AND cache <> 'bypass'), 0)
               AS cache_hit_rate
      FROM inference_usage
     WHERE tenant = $1 AND ts >= $2 AND ts < $3 AND ($4::text IS NULL OR model = $4)
     GROUP BY model
     ORDER BY model";

/// Usage per model of `tenant` in `[start, end)`, optionally of one model.
pub(crate) async fn usage(
    pool: &PgPool,
    tenant: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    model: Option<&str>,
) -> Result<Vec<UsageSummary>, Error> {
    if end <= start {
        return Err(Error::invalid("`end` must be after `start`", Some("end")));
    }
    Ok(sqlx::query_as(USAGE_SUMMARY)
        .bind(tenant)
        .bind(start)
        .bind(end)
        .bind(model)
        .fetch_all(pool)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(start: i64, end: i64, bucket_s: u64) -> ReadingsQuery {
        ReadingsQuery {
            device_id: Some("d".into()),
            labels: BTreeMap::new(),
            metric: "m".into(),
            start: DateTime::from_timestamp(start, 0).unwrap(),
            end: DateTime::from_timestamp(end, 0).unwrap(),
            bucket: Some(Duration::from_secs(bucket_s)),
            aggregates: Aggregates::of(&[]),
        }
    }

    #[test]
    fn bucket_count_counts_epoch_aligned_buckets() {
        // [5, 25) with width 10 touches buckets 0, 10 and 20.
        assert!(query(5, 25, 10).check(3).is_ok());
        let e = query(5, 25, 10).check(2).unwrap_err().to_string();
        assert!(e.contains("3 buckets"), "{e}");
        // [10, 20) is exactly one bucket.
        assert!(query(10, 20, 10).check(1).is_ok());
        assert!(query(20, 10, 10).check(10).is_err());
        // The widest span two timestamps can make, in 1 µs buckets.
        let mut wide = query(0, 10, 1);
        wide.start = DateTime::<Utc>::MIN_UTC;
        wide.end = DateTime::<Utc>::MAX_UTC;
        wide.bucket = Some(Duration::from_micros(1));
        let e = wide.check(10).unwrap_err().to_string();
        assert!(e.contains("more than the limit of 10"), "{e}");
        let mut q = query(0, 10, 1);
        q.device_id = None;
        assert!(q.check(100).is_err());
    }
}
