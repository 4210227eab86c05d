//! `meridian.v1.Telemetry`: the gRPC shapes turned into the same
//! [`Reading`]s and [`ReadingsQuery`]s the HTTP handlers make, and the
//! answers turned back.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use meridian_proto::v1 as pb;
use meridian_proto::v1::telemetry_server::Telemetry as TelemetryService;
use tonic::{Request, Response, Status, Streaming};

use super::super::{AppState, Tenant};
use super::guard::Oversized;
use super::{MAX_LISTED_REJECTIONS, run_query};
use crate::error::Error;
use crate::store::Store;
use crate::telemetry::Reading;
use crate::telemetry::ingest::{Sorted, sort_out};
use crate::telemetry::query::{Aggregate, Aggregates, ReadingsQuery};

pub(in crate::api) struct TelemetryApi {
    state: Arc<AppState>,
}

impl TelemetryApi {
    pub(super) fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

fn timestamp(ts: Option<prost_types::Timestamp>) -> Option<Result<DateTime<Utc>, ()>> {
    ts.map(|t| {
        u32::try_from(t.nanos)
            .ok()
            .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
            .ok_or(())
    })
}

fn proto_reading(r: pb::Reading) -> Result<Reading, String> {
    let ts = match timestamp(r.ts) {
        None => return Err("missing ts".into()),
        Some(ts) => ts.map_err(|()| "ts is out of range".to_string())?,
    };
    Ok(Reading {
        device_id: r.device_id,
        ts,
        metric: r.metric,
        value: r.value,
        labels: r.labels.into_iter().collect(),
    })
}

fn required_time(
    name: &'static str,
    ts: Option<prost_types::Timestamp>,
) -> Result<DateTime<Utc>, Error> {
    match timestamp(ts) {
        None => Err(Error::invalid(format!("`{name}` is required"), Some(name))),
        Some(t) => t.map_err(|()| Error::invalid(format!("`{name}` is out of range"), Some(name))),
    }
}

fn proto_query(q: pb::QueryRequest) -> Result<ReadingsQuery, Error> {
    let bucket = q
        .bucket
        .map(|d| {
            Duration::try_from(d)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| Error::invalid("`bucket` must be positive", Some("bucket")))
        })
        .transpose()?;
    let aggregates = q
        .aggregates
        .iter()
        .map(|a| match pb::Aggregate::try_from(*a) {
            Ok(pb::Aggregate::Avg) => Ok(Aggregate::Avg),
            Ok(pb::Aggregate::Min) => Ok(Aggregate::Min),
            Ok(pb::Aggregate::Max) => Ok(Aggregate::Max),
            Ok(pb::Aggregate::Count) => Ok(Aggregate::Count),
            Ok(pb::Aggregate::Last) => Ok(Aggregate::Last),
            Ok(pb::Aggregate::Unspecified) | Err(_) => Err(Error::invalid(
                format!("`aggregates` holds an invalid value {a}"),
                Some("aggregates"),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ReadingsQuery {
        device_id: Some(q.device_id).filter(|d| !d.is_empty()),
        labels: q.labels.into_iter().collect(),
        metric: q.metric,
        start: required_time("start", q.start)?,
        end: required_time("end", q.end)?,
        bucket,
        aggregates: Aggregates::of(&aggregates),
    })
}

#[tonic::async_trait]
impl TelemetryService for TelemetryApi {
    async fn ingest(
        &self,
        request: Request<Streaming<pb::IngestRequest>>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        let tenant = Tenant::from_metadata(request.metadata())?;
        self.state.stores.require(Store::Postgres)?;
        let oversized = request
            .extensions()
            .get::<Oversized>()
            .cloned()
            .unwrap_or_default();
        let mut stream = request.into_inner();
        let t = &self.state.telemetry;
        let mut commits = FuturesUnordered::new();
        let (mut accepted, mut rejected) = (0u64, 0u64);
        let mut rejections = Vec::new();
        let mut batch_index = 0u32;
        while let Some(batch) = stream.message().await? {
            let room = MAX_LISTED_REJECTIONS.saturating_sub(rejections.len());
            // The guard took out a longer batch before it was decoded; the
            // length check holds for a request that came without it.
            let sorted = if let Some(count) = oversized.take(batch_index) {
                Sorted::oversized(count as usize, t.config.max_batch, room)
            } else if batch.readings.len() > t.config.max_batch as usize {
                Sorted::oversized(batch.readings.len(), t.config.max_batch, room)
            } else {
                let items = batch.readings.into_iter().map(proto_reading).collect();
                sort_out(items, &t.limits, Utc::now())
            };
            let good = sorted.good;
            accepted += good.len() as u64;
            rejected += sorted.rejected;
            rejections.extend(
                sorted
                    .bad
                    .into_iter()
                    .take(room)
                    .map(|(i, reason)| pb::Rejection {
                        batch_index,
                        item_index: u32::try_from(i).unwrap_or(u32::MAX),
                        reason,
                    }),
            );
            // Later batches are read while earlier ones are written; the
            // buffer's backpressure bounds how far ahead the stream gets.
            commits.push(t.writer.submit(tenant.as_str(), good).await?.wait());
            while let Some(Some(done)) = commits.next().now_or_never() {
                done?;
            }
            batch_index = batch_index.saturating_add(1);
        }
        while let Some(done) = commits.next().await {
            done?;
        }
        Ok(Response::new(pb::IngestResponse {
            accepted_count: accepted,
            rejections,
            rejected_count: rejected,
            region: self.state.region.clone(),
        }))
    }

    async fn query(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        let tenant = Tenant::from_metadata(request.metadata())?;
        let q = proto_query(request.into_inner())?;
        let series = run_query(&self.state, &tenant, &q).await?;
        Ok(Response::new(pb::QueryResponse {
            series: series
                .into_iter()
                .map(|s| pb::Series {
                    device_id: s.device_id,
                    metric: q.metric.clone(),
                    buckets: s
                        .buckets
                        .into_iter()
                        .map(|b| pb::Bucket {
                            start: Some(prost_types::Timestamp {
                                seconds: b.start.timestamp(),
                                nanos: i32::try_from(b.start.timestamp_subsec_nanos()).unwrap_or(0),
                            }),
                            count: b.count,
                            avg: b.avg,
                            min: b.min,
                            max: b.max,
                            last: b.last,
                        })
                        .collect(),
                })
                .collect(),
            region: self.state.region.clone(),
        }))
    }
}
