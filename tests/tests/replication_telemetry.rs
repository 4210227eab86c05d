//! Telemetry readings replicate to the peers named in
//! `replication.telemetry_peers` only, three regions each with its own Redis
//! and PostgreSQL: us-east sends its readings to eu-west, logged in chunks
//! of at most 1,000 readings, and they arrive there whole (rows, values and
//! through eu-west's query API); ap-south never receives them, yet its
//! position in us-east's log moves past them, so its lag reaches 0 and
//! us-east trims them from its log; the same readings ingested in eu-west
//! too merge without duplicates or errors. In both time-series modes.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use meridian_proto::v1::telemetry_client::TelemetryClient;
use meridian_proto::v1::{Aggregate, IngestRequest, QueryRequest, Reading};
use meridian_regional::tenancy::{self, TenantLimits};
use meridian_tests::replicated::until;
use meridian_tests::{
    ClusterSandbox, RegionSandbox, TimeSeries, in_both_time_series_modes, init_logging, metric,
};
use sqlx::PgPool;

const A: &str = "us-east";
const B: &str = "eu-west";
const C: &str = "ap-south";
const CONVERGE: Duration = Duration::from_secs(30);
const TENANT: &str = "acme";
const METRIC: &str = "temp";
const DEVICES: usize = 10;

/// Readings `first..first + n`, one a second back from `now` (whole
/// milliseconds, so what PostgreSQL stores is what was sent), spread over
/// the devices, with values that are exact binary fractions: sums agree to
/// the last bit whatever order they are added in.
fn readings(now: DateTime<Utc>, first: usize, n: usize) -> Vec<Reading> {
    (first..first + n)
        .map(|i| {
            let ts = now - chrono::Duration::seconds(i64::try_from(i).unwrap());
            Reading {
                device_id: format!("dev-{}", i % DEVICES),
                ts: Some(prost_types::Timestamp {
                    seconds: ts.timestamp(),
                    nanos: i32::try_from(ts.timestamp_subsec_nanos()).unwrap(),
                }),
                metric: METRIC.into(),
                value: i as f64 * 0.25,
                labels: HashMap::from([("site".to_string(), "plant-7".to_string())]),
            }
        })
        .collect()
}

fn sum(readings: &[Reading]) -> f64 {
    readings.iter().map(|r| r.value).sum()
}

/// Ingests `readings` over gRPC in requests of 500; every one must be
/// accepted.
async fn ingest(region: &RegionSandbox, readings: Vec<Reading>) {
    let mut client = TelemetryClient::connect(region.url()).await.unwrap();
    let n = readings.len();
    let batches: Vec<IngestRequest> = readings
        .chunks(500)
        .map(|c| IngestRequest {
            readings: c.to_vec(),
        })
        .collect();
    let mut request = tonic::Request::new(futures::stream::iter(batches));
    request
        .metadata_mut()
        .insert("x-meridian-tenant", TENANT.parse().unwrap());
    let res = client.ingest(request).await.unwrap().into_inner();
    assert_eq!(
        (res.accepted_count as usize, res.rejected_count),
        (n, 0),
        "{} ingest: {res:?}",
        region.name
    );
}

/// (rows, sum of values) of the tenant's readings in `pool`.
async fn stored(pool: &PgPool) -> (i64, f64) {
    sqlx::query_as(
        "SELECT count(*), coalesce(sum(value), 0) FROM telemetry_readings WHERE tenant = $1",
    )
    .bind(TENANT)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// (rows, sum of values) of the tenant's readings as the region's Query API
/// reports them: one bucket per device over the last day.
async fn queried(region: &RegionSandbox, now: DateTime<Utc>) -> (u64, f64) {
    let mut client = TelemetryClient::connect(region.url()).await.unwrap();
    let ts = |t: DateTime<Utc>| prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    };
    let mut request = tonic::Request::new(QueryRequest {
        device_id: String::new(),
        labels: HashMap::from([("site".to_string(), "plant-7".to_string())]),
        metric: METRIC.into(),
        start: Some(ts(now - chrono::Duration::days(1))),
        end: Some(ts(now + chrono::Duration::minutes(1))),
        bucket: None,
        aggregates: vec![Aggregate::Count as i32, Aggregate::Avg as i32],
    });
    request
        .metadata_mut()
        .insert("x-meridian-tenant", TENANT.parse().unwrap());
    let res = client.query(request).await.unwrap().into_inner();
    assert_eq!(res.region, region.name);
    let mut count = 0;
    let mut total = 0.0;
    for bucket in res.series.iter().flat_map(|s| &s.buckets) {
        let n = bucket.count.expect("a count");
        count += n;
        total += bucket.avg.expect("an average") * n as f64;
    }
    (count, total)
}

/// Asserts that the region's Query API counts `count` readings summing to
/// `sum` (up to the rounding of averages).
async fn assert_queried(region: &RegionSandbox, now: DateTime<Utc>, count: u64, sum: f64) {
    let (n, total) = queried(region, now).await;
    assert_eq!(n, count, "readings {} reports", region.name);
    assert!(
        (total - sum).abs() <= sum.abs() * 1e-9,
        "{} reports a sum of {total}, not {sum}",
        region.name
    );
}

/// (applied sequence, applied changes, superseded changes) of `origin`'s log
/// in the region behind `pool`.
async fn applied(pool: &PgPool, origin: &str) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT applied_sequence, applied_changes, superseded_changes
           FROM replication_peers WHERE peer = $1",
    )
    .bind(origin)
    .fetch_optional(pool)
    .await
    .unwrap()
    .unwrap_or((0, 0, 0))
}

/// The latest sequence of the region's own log.
async fn high(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT greatest(coalesce(max(sequence), 0), (SELECT pruned_through FROM replication_log))
           FROM replication_outbox",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until the region behind `pool` has applied `origin`'s whole log.
async fn caught_up(pool: &PgPool, origin_pool: &PgPool, origin: &str, what: &str) {
    let target = high(origin_pool).await;
    until(CONVERGE, what, move || async move {
        applied(pool, origin).await.0 >= target
    })
    .await;
}

in_both_time_series_modes!(readings_replicate_to_the_configured_peers_only);

async fn readings_replicate_to_the_configured_peers_only(mode: TimeSeries) {
    init_logging();
    let mut cluster = ClusterSandbox::start_replicated_configured(
        &[A, B, C],
        |_| mode.config(""),
        |name| {
            let peers = if name == A {
                format!("telemetry_peers = [\"{B}\"]\n")
            } else {
                String::new()
            };
            format!("{peers}prune_interval_ms = 200\n")
        },
        |_, _| {},
    )
    .await;
    let mut pools = Vec::new();
    for r in &cluster.regions {
        pools.push(PgPool::connect(&r.postgres.url()).await.unwrap());
    }
    let (a, b, c) = (&pools[0], &pools[1], &pools[2]);
    // A row in every region first: a region whose database is empty takes a
    // snapshot when it starts, which would bring ap-south us-east's changes
    // without Pull, and this test counts what Pull brings.
    tenancy::create_tenant(a, "before-readings", TenantLimits::default())
        .await
        .unwrap();
    caught_up(b, a, A, "eu-west following us-east").await;
    caught_up(c, a, A, "ap-south following us-east").await;
    let base_high = high(a).await;
    let base_b = applied(b, A).await;
    let base_c = applied(c, A).await;

    // ap-south is down while the first readings are written: nothing it has
    // not acknowledged can be trimmed, so us-east's log can be counted.
    cluster.region(C).stop_node().await;
    let now = DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap();
    let first = readings(now, 0, 4_500);
    ingest(&cluster.regions[0], first.clone()).await;
    // A change every peer receives, after the readings.
    tenancy::create_tenant(a, "after-readings", TenantLimits::default())
        .await
        .unwrap();
    caught_up(b, a, A, "eu-west applying us-east's readings").await;
    assert_eq!(stored(a).await, (4_500, sum(&first)));
    assert_eq!(stored(b).await, (4_500, sum(&first)), "eu-west's readings");
    assert_queried(&cluster.regions[1], now, 4_500, sum(&first)).await;

    let (chunks, in_chunks, largest, other_ops): (i64, i64, i32, i64) = sqlx::query_as(
        "SELECT count(*), sum(jsonb_array_length(payload)), max(jsonb_array_length(payload)),
                count(*) FILTER (WHERE op <> 'append')
           FROM replication_outbox WHERE table_name = 'telemetry_readings' AND sequence > $1",
    )
    .bind(base_high)
    .fetch_one(a)
    .await
    .unwrap();
    assert!(chunks >= 5, "4,500 readings in {chunks} changes");
    assert_eq!((in_chunks, other_ops), (4_500, 0));
    assert!(largest <= 1_000, "a change of {largest} readings");
    let (logged, logged_for_c): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE table_name <> 'telemetry_readings')
           FROM replication_outbox WHERE sequence > $1",
    )
    .bind(base_high)
    .fetch_one(a)
    .await
    .unwrap();
    assert!(logged_for_c >= 1, "the tenant was logged");
    let now_b = applied(b, A).await;
    assert_eq!(
        (now_b.1 - base_b.1) + (now_b.2 - base_b.2),
        logged,
        "eu-west received each of us-east's changes once"
    );

    // ap-south returns; more readings follow, so the newest changes in
    // us-east's log are ones ap-south does not get.
    cluster.region(C).start_node().await;
    let second = readings(now, 4_500, 1_200);
    ingest(&cluster.regions[0], second.clone()).await;
    caught_up(b, a, A, "eu-west applying the second readings").await;
    caught_up(c, a, A, "ap-south moving past us-east's readings").await;
    let c_metrics = &format!("{}/metrics", cluster.regions[2].url());
    until(
        CONVERGE,
        "ap-south's lag behind us-east at 0",
        move || async move {
            metric(
                c_metrics,
                "meridian_replication_lag_changes",
                &[&format!("peer=\"{A}\"")],
            )
            .await
                == 0.0
        },
    )
    .await;
    assert_eq!(stored(c).await, (0, 0.0), "ap-south got no readings");
    let tenant: Option<String> =
        sqlx::query_scalar("SELECT id FROM tenants WHERE id = 'after-readings'")
            .fetch_optional(c)
            .await
            .unwrap();
    assert_eq!(tenant.as_deref(), Some("after-readings"));
    let now_c = applied(c, A).await;
    assert_eq!(
        (now_c.1 - base_c.1) + (now_c.2 - base_c.2),
        logged_for_c,
        "ap-south received us-east's changes for it, once"
    );
    // Every peer's acknowledgement is past the readings: they leave the log.
    let last = high(a).await;
    until(
        CONVERGE,
        "us-east trimming the replicated readings",
        move || async move {
            let (left, pruned): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM replication_outbox
                      WHERE table_name = 'telemetry_readings'),
                    pruned_through FROM replication_log",
            )
            .fetch_one(a)
            .await
            .unwrap();
            left == 0 && pruned >= last
        },
    )
    .await;

    // The same readings written in eu-west as well merge: once again, and
    // while us-east's copies of new ones are being applied there.
    let all = sum(&first) + sum(&second);
    ingest(&cluster.regions[1], first.clone()).await;
    assert_eq!(stored(b).await, (5_700, all));
    let third = readings(now, 5_700, 800);
    tokio::join!(
        ingest(&cluster.regions[0], third.clone()),
        ingest(&cluster.regions[1], third.clone()),
    );
    caught_up(b, a, A, "eu-west applying the third readings").await;
    let all = all + sum(&third);
    assert_eq!(stored(a).await, (6_500, all));
    assert_eq!(stored(b).await, (6_500, all), "eu-west: no duplicates");
    assert_queried(&cluster.regions[1], now, 6_500, all).await;
    caught_up(c, a, A, "ap-south moving past the third readings").await;
    assert_eq!(stored(c).await, (0, 0.0), "ap-south got no readings");
}
