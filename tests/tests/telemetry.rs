//! Time-series storage against a real PostgreSQL per region, each test in
//! both modes (`<test>::pg_partman`, `<test>::timescaledb`): partitions or
//! chunks for every accepted timestamp and dropped at retention, ingest over
//! gRPC and HTTP (duplicates, late readings, per-item rejections), bucketed
//! aggregates checked against a brute-force computation, usage records of
//! inference requests, and TimescaleDB's own policies and compression.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use meridian_proto::v1::telemetry_client::TelemetryClient;
use meridian_proto::v1::{
    Aggregate, IngestRequest, IngestResponse, QueryRequest, QueryResponse, Reading,
};
use meridian_tests::{RegionSandbox, TimeSeries, in_both_time_series_modes, init_logging};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sqlx::PgPool;
use tonic::transport::Channel;

#[path = "telemetry/aggregates.rs"]
mod aggregates;
#[path = "telemetry/rejections.rs"]
mod rejections;
#[path = "telemetry/timescaledb.rs"]
mod timescaledb;
#[path = "telemetry/usage.rs"]
mod usage;

const TENANT: &str = "x-meridian-tenant";

in_both_time_series_modes!(
    partitions_cover_what_ingest_accepts_and_maintenance_runs_on_its_own,
    retention_drops_whole_expired_partitions,
    late_out_of_order_and_duplicate_readings,
);

/// Logging, and the TLS provider reqwest needs: the tests crate builds it
/// with `rustls-no-provider`, and only a gateway would install one.
fn setup() {
    init_logging();
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn db(region: &RegionSandbox) -> PgPool {
    PgPool::connect(&region.postgres.url()).await.unwrap()
}

async fn client(region: &RegionSandbox) -> TelemetryClient<Channel> {
    TelemetryClient::connect(region.url()).await.unwrap()
}

fn pb_ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn reading(device: &str, metric: &str, ts: DateTime<Utc>, value: f64) -> Reading {
    Reading {
        device_id: device.into(),
        ts: Some(pb_ts(ts)),
        metric: metric.into(),
        value,
        labels: Default::default(),
    }
}

async fn ingest(
    client: &mut TelemetryClient<Channel>,
    tenant: &str,
    batches: Vec<Vec<Reading>>,
) -> IngestResponse {
    let stream = futures::stream::iter(
        batches
            .into_iter()
            .map(|readings| IngestRequest { readings }),
    );
    let mut request = tonic::Request::new(stream);
    request
        .metadata_mut()
        .insert(TENANT, tenant.parse().unwrap());
    client.ingest(request).await.unwrap().into_inner()
}

/// Whole milliseconds, so that what PostgreSQL stores (microseconds) is
/// exactly what was sent.
fn now_ms() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap()
}

/// `?k=v&...`, percent-encoded.
fn query_string(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let joined: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect();
    format!("?{}", joined.join("&"))
}

/// Polls `check` until it holds; fails after 10 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The mode the node set the database up with.
async fn assert_mode(pool: &PgPool, mode: TimeSeries) {
    let stored: String = sqlx::query_scalar("SELECT mode FROM telemetry_storage")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(stored, mode.storage());
}

/// The partition (or chunk) holding the reading at `ts`.
async fn partition_of(pool: &PgPool, ts: DateTime<Utc>) -> String {
    sqlx::query_scalar("SELECT tableoid::regclass::text FROM telemetry_readings WHERE ts = $1")
        .bind(ts)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Every timestamp ingest accepts has a partition (pg_partman: made ahead
/// and back to the retention; TimescaleDB: a chunk made on demand, of the
/// configured width), and maintenance runs on its own.
async fn partitions_cover_what_ingest_accepts_and_maintenance_runs_on_its_own(mode: TimeSeries) {
    setup();
    let region = RegionSandbox::start_with_config(
        "eu-west",
        &mode.config("premake = 2\nretention_days = 4\nmaintenance_interval_ms = 100\n"),
    )
    .await;
    let pool = db(&region).await;
    assert_mode(&pool, mode).await;
    let now = Utc::now();
    if mode == TimeSeries::Partman {
        for table in ["telemetry_readings", "inference_usage"] {
            let parts = mode.partitions(&pool, table).await;
            let ahead = parts.iter().filter(|(_, lo, _)| *lo > now).count();
            // pg_partman rounds the time to the last partition when it counts
            // what is premade, so past mid-partition it makes one more. The
            // default premake (4) would give 4 or 5.
            assert!(
                (2..=3).contains(&ahead),
                "{table}: {ahead} ahead: {parts:?}"
            );
            // Late readings are accepted back to the retention; usage rows are
            // written as they happen.
            let (_, oldest, _) = &parts[0];
            if table == "telemetry_readings" {
                assert!(*oldest <= now - chrono::Duration::days(4), "{parts:?}");
            } else {
                let today = now - chrono::Duration::days(1);
                assert!(*oldest <= now && *oldest > today, "{parts:?}");
            }
            // Contiguous: every accepted timestamp has a partition.
            for pair in parts.windows(2) {
                assert_eq!(pair[0].2, pair[1].1, "{table}: {parts:?}");
            }
        }
    }

    // The oldest and the newest timestamps ingest accepts land in a
    // partition of their own table, never in a default one.
    let now = now_ms();
    let edges = [
        now - chrono::Duration::days(4) + chrono::Duration::minutes(5),
        now,
        now + chrono::Duration::seconds(200),
    ];
    let mut grpc = client(&region).await;
    let readings = edges.iter().map(|ts| reading("d1", "temp", *ts, 1.0));
    let res = ingest(&mut grpc, "acme", vec![readings.collect()]).await;
    assert_eq!(res.accepted_count, 3, "{res:?}");
    let parts = mode.partitions(&pool, "telemetry_readings").await;
    for ts in edges {
        let holder = partition_of(&pool, ts).await;
        let (_, lo, hi) = parts
            .iter()
            .find(|(name, _, _)| *name == holder)
            .unwrap_or_else(|| panic!("{ts} is in {holder}, not a partition: {parts:?}"));
        assert!(*lo <= ts && ts < *hi, "{ts} in {holder} {lo}..{hi}");
        // The configured width: partition_interval_hours (24) in both.
        assert_eq!(*hi - *lo, chrono::Duration::hours(24), "{holder}");
    }

    // Maintenance runs on its own: pg_partman makes a missing partition
    // ahead again; TimescaleDB drops a chunk past the retention that was
    // written behind ingest's back.
    let (gone, what) = match mode {
        TimeSeries::Partman => {
            let (newest, _, _) = parts.last().unwrap().clone();
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {newest}")))
                .execute(&pool)
                .await
                .unwrap();
            (newest, "maintenance to recreate the dropped partition")
        }
        TimeSeries::Timescaledb => {
            // In one transaction, so maintenance cannot drop the chunk before
            // its name is read.
            let expired = now - chrono::Duration::days(9);
            let mut tx = pool.begin().await.unwrap();
            sqlx::query(
                "INSERT INTO telemetry_readings (tenant, device_id, metric, ts, value)
                 VALUES ('acme', 'd1', 'temp', $1, 0)",
            )
            .bind(expired)
            .execute(&mut *tx)
            .await
            .unwrap();
            let chunk: String = sqlx::query_scalar(
                "SELECT tableoid::regclass::text FROM telemetry_readings WHERE ts = $1",
            )
            .bind(expired)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
            tx.commit().await.unwrap();
            (chunk, "maintenance to drop the expired chunk")
        }
    };
    let recreated = mode == TimeSeries::Partman;
    eventually(what, || {
        let pool = pool.clone();
        let gone = gone.clone();
        async move {
            let exists = mode
                .partitions(&pool, "telemetry_readings")
                .await
                .iter()
                .any(|(name, _, _)| *name == gone);
            exists == recreated
        }
    })
    .await;
}

/// Partitions (chunks) wholly past a shortened retention are dropped at the
/// next start, before the node serves; the rest keep every row.
async fn retention_drops_whole_expired_partitions(mode: TimeSeries) {
    setup();
    let mut region = RegionSandbox::start_with_config("eu-west", &mode.config("")).await;
    let pool = db(&region).await;
    assert_mode(&pool, mode).await;
    let now = now_ms();
    let old = now - chrono::Duration::days(8);
    let recent = now - chrono::Duration::hours(2);
    let mut grpc = client(&region).await;
    let res = ingest(
        &mut grpc,
        "acme",
        vec![vec![
            reading("d1", "temp", old, 1.0),
            reading("d1", "temp", recent, 2.0),
            reading("d1", "temp", now, 3.0),
        ]],
    )
    .await;
    assert_eq!(res.accepted_count, 3, "{res:?}");
    let old_partition = partition_of(&pool, old).await;
    let parts = mode.partitions(&pool, "telemetry_readings").await;
    assert!(
        parts.iter().any(|(name, _, _)| *name == old_partition),
        "{old_partition} is not one of {parts:?}"
    );
    region.stop_node().await;

    // The same region restarted with a 3-day retention: maintenance at start
    // applies it before the node serves.
    region.rewrite_config(&mode.config("retention_days = 3\n"));
    region.start_node().await;
    let gone: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(&old_partition)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(gone, None, "{old_partition} should be dropped");
    let left: Vec<DateTime<Utc>> =
        sqlx::query_scalar("SELECT ts FROM telemetry_readings ORDER BY ts")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(left, vec![recent, now]);
    let parts = mode.partitions(&pool, "telemetry_readings").await;
    let cutoff = Utc::now() - chrono::Duration::days(3);
    assert!(parts.iter().all(|(_, _, hi)| *hi > cutoff), "{parts:?}");
    // pg_partman keeps partitions back to the retention even when empty;
    // TimescaleDB has chunks only where rows are.
    if mode == TimeSeries::Partman {
        assert!(
            parts[0].1 <= cutoff,
            "the partition at the cutoff stays: {parts:?}"
        );
    }
}

async fn late_out_of_order_and_duplicate_readings(mode: TimeSeries) {
    setup();
    let region = RegionSandbox::start_with_config("eu-west", &mode.config("")).await;
    let pool = db(&region).await;
    assert_mode(&pool, mode).await;
    let now = now_ms();
    let h = chrono::Duration::hours;
    let mut grpc = client(&region).await;
    let res = ingest(
        &mut grpc,
        "acme",
        vec![
            vec![
                reading("d1", "temp", now - h(1), 1.0),
                reading("d1", "temp", now - h(3), 2.0),
                reading("d1", "temp", now - h(50), 3.0),
                reading("d1", "temp", now - h(1), 99.0),
            ],
            vec![
                reading("d1", "temp", now - h(1), 77.0),
                reading("d1", "temp", now - chrono::Duration::minutes(30), 4.0),
            ],
        ],
    )
    .await;
    assert_eq!((res.accepted_count, res.rejected_count), (6, 0), "{res:?}");
    let http = reqwest::Client::new();
    let body: Value = http
        .post(format!("{}/v1/telemetry", region.url()))
        .header(TENANT, "acme")
        .json(&json!([{"device_id": "d1", "metric": "temp", "value": 55.0,
                       "ts": (now - h(1)).to_rfc3339()}]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["accepted"], 1, "{body}");
    // Another tenant's identical key is its own reading.
    ingest(
        &mut grpc,
        "other",
        vec![vec![reading("d1", "temp", now - h(1), 5.0)]],
    )
    .await;

    let rows: Vec<(DateTime<Utc>, f64)> = sqlx::query_as(
        "SELECT ts, value FROM telemetry_readings WHERE tenant = 'acme' ORDER BY ts",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (now - h(50), 3.0),
            (now - h(3), 2.0),
            (now - h(1), 1.0),
            (now - chrono::Duration::minutes(30), 4.0),
        ],
        "the first reading of a key wins"
    );
    let other: f64 =
        sqlx::query_scalar("SELECT value FROM telemetry_readings WHERE tenant = 'other'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(other, 5.0);
}
