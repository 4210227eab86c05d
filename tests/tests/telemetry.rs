//! Time-series storage against a real PostgreSQL per region: partitions made
//! ahead and dropped at retention, ingest over gRPC and HTTP (duplicates,
//! late readings, per-item rejections), bucketed aggregates checked against
//! a brute-force computation, and usage records of inference requests.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use meridian_proto::v1::telemetry_client::TelemetryClient;
use meridian_proto::v1::{
    Aggregate, IngestRequest, IngestResponse, QueryRequest, QueryResponse, Reading,
};
use meridian_regional::{Config, RegionalNode};
use meridian_tests::{RegionSandbox, init_logging};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sqlx::PgPool;
use tonic::transport::Channel;

const TENANT: &str = "x-meridian-tenant";

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

/// Partitions of `table` other than the default one, with their bounds,
/// read from the catalog rather than from pg_partman's bookkeeping.
async fn partitions(pool: &PgPool, table: &str) -> Vec<(String, DateTime<Utc>, DateTime<Utc>)> {
    sqlx::query_as(
        r"SELECT c.relname::text,
                 substring(pg_get_expr(c.relpartbound, c.oid) FROM 'FROM \(''([^'']+)''\)')::timestamptz,
                 substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)')::timestamptz
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = $1::regclass
             AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'
           ORDER BY 2",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_are_made_ahead_back_to_retention_and_by_periodic_maintenance() {
    setup();
    let region = RegionSandbox::start_with_config(
        "eu-west",
        "[telemetry]\nstorage = \"pg_partman\"\npremake = 2\nretention_days = 4\nmaintenance_interval_ms = 100\n",
    )
    .await;
    let pool = db(&region).await;
    let mode: String = sqlx::query_scalar("SELECT mode FROM telemetry_storage")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mode, "pg_partman");
    let now = Utc::now();
    for table in ["telemetry_readings", "inference_usage"] {
        let parts = partitions(&pool, table).await;
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

    // Maintenance runs on its own: a missing future partition comes back.
    let parts = partitions(&pool, "telemetry_readings").await;
    let (newest, _, _) = parts.last().unwrap().clone();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {newest}")))
        .execute(&pool)
        .await
        .unwrap();
    eventually("maintenance to recreate the dropped partition", || {
        let pool = pool.clone();
        let newest = newest.clone();
        async move {
            partitions(&pool, "telemetry_readings")
                .await
                .iter()
                .any(|(name, _, _)| *name == newest)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_whole_expired_partitions() {
    setup();
    let mut region = RegionSandbox::start("eu-west").await;
    let pool = db(&region).await;
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
    let old_partition: String =
        sqlx::query_scalar("SELECT tableoid::regclass::text FROM telemetry_readings WHERE ts = $1")
            .bind(old)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        old_partition.starts_with("telemetry_readings_p"),
        "{old_partition}"
    );
    region.stop_node().await;

    // The same region restarted with a 3-day retention: maintenance at start
    // applies it before the node serves.
    let listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let toml = format!(
        "{}[telemetry]\nretention_days = 3\n",
        region.config_toml(listen)
    );
    let node = RegionalNode::start(Config::from_toml(&toml, "test").unwrap())
        .await
        .unwrap();
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
    let parts = partitions(&pool, "telemetry_readings").await;
    let cutoff = Utc::now() - chrono::Duration::days(3);
    assert!(parts.iter().all(|(_, _, hi)| *hi > cutoff), "{parts:?}");
    assert!(
        parts[0].1 <= cutoff,
        "the partition at the cutoff stays: {parts:?}"
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_out_of_order_and_duplicate_readings() {
    setup();
    let region = RegionSandbox::start("eu-west").await;
    let pool = db(&region).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_readings_are_rejected_one_by_one_and_the_rest_kept() {
    setup();
    let region = RegionSandbox::start_with_config("eu-west", "[telemetry]\nmax_batch = 8\n").await;
    let pool = db(&region).await;
    let now = now_ms();
    let ok = |device: &str| json!({"device_id": device, "ts": now.to_rfc3339(), "metric": "m", "value": 1.5});
    let mut future = ok("f");
    future["ts"] = (now + chrono::Duration::minutes(10)).to_rfc3339().into();
    let mut ancient = ok("a");
    ancient["ts"] = (now - chrono::Duration::days(40)).to_rfc3339().into();
    let mut unknown = ok("u");
    unknown["colour"] = "red".into();
    let mut nan = ok("n");
    nan["value"] = "NaN".into();
    let mut anonymous = ok("x");
    anonymous.as_object_mut().unwrap().remove("device_id");
    let mut bad_ts = ok("t");
    bad_ts["ts"] = "yesterday".into();
    let items = vec![
        ok("d1"),
        future,
        ancient,
        unknown,
        nan,
        anonymous,
        bad_ts,
        ok("d2"),
    ];
    let http = reqwest::Client::new();
    let post = |body: reqwest::Body, content_type: &'static str, tenant: &'static str| {
        http.post(format!("{}/v1/telemetry", region.url()))
            .header(TENANT, tenant)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let res = post(
        serde_json::to_vec(&items).unwrap().into(),
        "application/json",
        "http",
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(2), Some(6)),
        "{body}"
    );
    let reasons: Vec<(u64, String)> = body["rejections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected = [
        (1, "in the future"),
        (2, "older than the retention"),
        (3, "unknown field `colour`"),
        (4, "not finite"),
        (5, "missing device_id"),
        (6, "RFC 3339"),
    ];
    assert_eq!(reasons.len(), expected.len(), "{reasons:?}");
    for ((index, reason), (want_index, want)) in reasons.iter().zip(expected) {
        assert_eq!(*index, want_index, "{reasons:?}");
        assert!(
            reason.contains(want),
            "item {index}: {reason:?} should say {want:?}"
        );
    }

    // One more than max_batch: rejected whole.
    let oversized: Vec<Value> = (0..9).map(|i| ok(&format!("o{i}"))).collect();
    let body: Value = post(
        serde_json::to_vec(&oversized).unwrap().into(),
        "application/json",
        "oversized",
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(0), Some(9)),
        "{body}"
    );
    assert!(
        body["rejections"][8]["reason"]
            .as_str()
            .unwrap()
            .contains("over the limit of 8"),
        "{body}"
    );

    // NDJSON: a broken line costs only itself.
    let ndjson = format!("{}\n{{not json\n\n{}\n", ok("n1"), ok("n2"));
    let body: Value = post(ndjson.into(), "application/x-ndjson", "ndjson")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["accepted"], 2, "{body}");
    assert_eq!(body["rejections"][0]["index"], 1, "{body}");
    assert!(
        body["rejections"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );

    // Not JSON at all: the request fails, OpenAI style.
    let res = post("hello".into(), "application/json", "http")
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("JSON array"),
        "{body}"
    );

    // gRPC: NaN and infinity, a missing ts, and an oversized batch.
    let mut grpc = client(&region).await;
    let mut no_ts = reading("g4", "m", now, 1.0);
    no_ts.ts = None;
    let res = ingest(
        &mut grpc,
        "grpc",
        vec![
            vec![
                reading("g1", "m", now, 1.0),
                reading("g2", "m", now, f64::NAN),
                reading("g3", "m", now, f64::INFINITY),
                no_ts,
            ],
            (0..9)
                .map(|i| reading(&format!("o{i}"), "m", now, 1.0))
                .collect(),
            vec![reading("g5", "m", now, 2.0)],
        ],
    )
    .await;
    assert_eq!((res.accepted_count, res.rejected_count), (2, 12), "{res:?}");
    let first: Vec<_> = res.rejections[..3]
        .iter()
        .map(|r| (r.batch_index, r.item_index, r.reason.as_str()))
        .collect();
    assert_eq!(
        first,
        vec![
            (0, 1, "value is not finite"),
            (0, 2, "value is not finite"),
            (0, 3, "missing ts")
        ]
    );
    assert!(res.rejections[3..].iter().all(|r| r.batch_index == 1));

    let stored: Vec<(String, i64)> = sqlx::query_as(
        "SELECT tenant, count(*) FROM telemetry_readings GROUP BY tenant ORDER BY tenant",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        stored,
        vec![("grpc".into(), 2), ("http".into(), 2), ("ndjson".into(), 2)]
    );
}

/// One stored reading, as the brute force sees it.
struct Row {
    device: String,
    metric: &'static str,
    ts_us: i64,
    value: f64,
    labels: BTreeMap<String, String>,
}

/// What a bucket should hold: count, sum, min, max, and (ts, value) of the
/// latest reading.
#[derive(Default)]
struct Expected {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    last: (i64, f64),
}

fn brute_force(rows: &[Row], q: &QueryRequest) -> BTreeMap<(String, i64), Expected> {
    let us = |t: &prost_types::Timestamp| t.seconds * 1_000_000 + i64::from(t.nanos) / 1_000;
    let (start, end) = (us(q.start.as_ref().unwrap()), us(q.end.as_ref().unwrap()));
    let width = q.bucket.as_ref().map(|d| d.seconds * 1_000_000);
    let mut out: BTreeMap<(String, i64), Expected> = BTreeMap::new();
    for r in rows.iter().filter(|r| {
        r.metric == q.metric
            && (q.device_id.is_empty() || r.device == q.device_id)
            && q.labels.iter().all(|(k, v)| r.labels.get(k) == Some(v))
            && (start..end).contains(&r.ts_us)
    }) {
        let bucket = width.map_or(start, |w| r.ts_us.div_euclid(w) * w);
        let e = out.entry((r.device.clone(), bucket)).or_insert(Expected {
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            last: (i64::MIN, 0.0),
            ..Default::default()
        });
        e.count += 1;
        e.sum += r.value;
        e.min = e.min.min(r.value);
        e.max = e.max.max(r.value);
        if r.ts_us > e.last.0 {
            e.last = (r.ts_us, r.value);
        }
    }
    out
}

fn assert_matches(res: &QueryResponse, rows: &[Row], q: &QueryRequest, seed: u64) {
    let expected = brute_force(rows, q);
    assert!(
        !expected.is_empty(),
        "seed {seed}: the query should match rows: {q:?}"
    );
    let wants = |a: Aggregate| q.aggregates.is_empty() || q.aggregates.contains(&(a as i32));
    let devices: Vec<&str> = res.series.iter().map(|s| s.device_id.as_str()).collect();
    let mut sorted = devices.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(devices, sorted, "series sorted by device, one each");
    let mut got = 0;
    for series in &res.series {
        assert_eq!(series.metric, q.metric);
        let starts: Vec<i64> = series
            .buckets
            .iter()
            .map(|b| b.start.as_ref().unwrap().seconds)
            .collect();
        assert!(
            starts.windows(2).all(|w| w[0] < w[1]),
            "buckets in time order"
        );
        for b in &series.buckets {
            got += 1;
            let start = b.start.as_ref().unwrap();
            let key = (
                series.device_id.clone(),
                start.seconds * 1_000_000 + i64::from(start.nanos) / 1000,
            );
            let e = expected
                .get(&key)
                .unwrap_or_else(|| panic!("seed {seed}: unexpected bucket {key:?} for {q:?}"));
            let ctx = format!("seed {seed}, bucket {key:?}, query {q:?}");
            assert_eq!(b.count, wants(Aggregate::Count).then_some(e.count), "{ctx}");
            assert_eq!(b.min, wants(Aggregate::Min).then_some(e.min), "{ctx}");
            assert_eq!(b.max, wants(Aggregate::Max).then_some(e.max), "{ctx}");
            assert_eq!(b.last, wants(Aggregate::Last).then_some(e.last.1), "{ctx}");
            match (b.avg, wants(Aggregate::Avg)) {
                (Some(avg), true) => {
                    let want = e.sum / e.count as f64;
                    assert!(
                        (avg - want).abs() <= 1e-9 * want.abs().max(1.0),
                        "{ctx}: {avg} vs {want}"
                    );
                }
                (None, false) => {}
                (avg, _) => panic!("{ctx}: avg {avg:?}"),
            }
        }
    }
    assert_eq!(got, expected.len(), "seed {seed}: bucket count for {q:?}");
}

/// Random readings over the last two days, the same queries over gRPC and
/// HTTP, every answer compared with a computation over the same rows.
async fn aggregates_match_brute_force(storage: &str) {
    setup();
    let seed: u64 = std::env::var("TELEMETRY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Utc::now().timestamp_micros() as u64);
    println!("seed {seed} (set TELEMETRY_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let region = RegionSandbox::start_with_config(
        "eu-west",
        &format!("[telemetry]\nstorage = \"{storage}\"\n"),
    )
    .await;
    let pool = db(&region).await;
    let mode: String = sqlx::query_scalar("SELECT mode FROM telemetry_storage")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mode, storage);

    let base = now_ms() - chrono::Duration::hours(47);
    let span_ms = 46 * 3_600_000;
    let mut seen = HashSet::new();
    let mut rows = Vec::new();
    while rows.len() < 3_000 {
        let d = rng.random_range(0..3);
        let metric = if rng.random_bool(0.7) { "temp" } else { "hum" };
        let ts = base + chrono::Duration::milliseconds(rng.random_range(0..span_ms));
        if !seen.insert((d, metric, ts)) {
            continue;
        }
        let labels = BTreeMap::from([
            (
                "site".to_string(),
                if d == 1 { "b" } else { "a" }.to_string(),
            ),
            (
                "shift".to_string(),
                if rng.random_bool(0.5) { "day" } else { "night" }.to_string(),
            ),
        ]);
        rows.push(Row {
            device: format!("d{d}"),
            metric,
            ts_us: ts.timestamp_micros(),
            value: f64::from(rng.random_range(-100_000..100_000)) / 1000.0,
            labels,
        });
    }
    let mut grpc = client(&region).await;
    let batches: Vec<Vec<Reading>> = rows
        .chunks(500)
        .map(|chunk| {
            chunk
                .iter()
                .map(|r| Reading {
                    device_id: r.device.clone(),
                    ts: Some(pb_ts(DateTime::from_timestamp_micros(r.ts_us).unwrap())),
                    metric: r.metric.into(),
                    value: r.value,
                    labels: r.labels.clone().into_iter().collect(),
                })
                .collect()
        })
        .collect();
    let res = ingest(&mut grpc, "acme", batches).await;
    assert_eq!(res.accepted_count, rows.len() as u64, "{res:?}");

    let at = |offset_s: i64| pb_ts(base + chrono::Duration::seconds(offset_s));
    let secs = |s: i64| prost_types::Duration {
        seconds: s,
        nanos: 0,
    };
    let labels = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let queries = [
        QueryRequest {
            device_id: "d1".into(),
            metric: "temp".into(),
            start: Some(at(17)),
            end: Some(at(40 * 3600 + 3)),
            bucket: Some(secs(7 * 60)),
            ..Default::default()
        },
        QueryRequest {
            labels: labels(&[("site", "a")]),
            metric: "temp".into(),
            start: Some(at(-3600)),
            end: Some(at(50 * 3600)),
            bucket: Some(secs(3600)),
            aggregates: vec![Aggregate::Avg as i32, Aggregate::Last as i32],
            ..Default::default()
        },
        QueryRequest {
            labels: labels(&[("site", "b"), ("shift", "night")]),
            metric: "hum".into(),
            start: Some(at(5000)),
            end: Some(at(30 * 3600)),
            bucket: None,
            aggregates: vec![
                Aggregate::Count as i32,
                Aggregate::Min as i32,
                Aggregate::Max as i32,
            ],
            ..Default::default()
        },
        QueryRequest {
            device_id: "d0".into(),
            labels: labels(&[("shift", "day")]),
            metric: "temp".into(),
            start: Some(at(0)),
            end: Some(at(47 * 3600)),
            bucket: Some(secs(86_400)),
            ..Default::default()
        },
    ];
    for q in &queries {
        let mut request = tonic::Request::new(q.clone());
        request
            .metadata_mut()
            .insert(TENANT, "acme".parse().unwrap());
        let res = grpc.query(request).await.unwrap().into_inner();
        assert_matches(&res, &rows, q, seed);
        // Another tenant sees none of it.
        let mut request = tonic::Request::new(q.clone());
        request
            .metadata_mut()
            .insert(TENANT, "other".parse().unwrap());
        assert!(
            grpc.query(request)
                .await
                .unwrap()
                .into_inner()
                .series
                .is_empty()
        );
    }

    // The HTTP query gives the same buckets as gRPC.
    let q = &queries[1];
    let rfc = |t: &prost_types::Timestamp| {
        DateTime::from_timestamp(t.seconds, t.nanos as u32)
            .unwrap()
            .to_rfc3339()
    };
    let url = format!(
        "{}/v1/telemetry/query{}",
        region.url(),
        query_string(&[
            ("metric", "temp"),
            ("label.site", "a"),
            ("start", &rfc(q.start.as_ref().unwrap())),
            ("end", &rfc(q.end.as_ref().unwrap())),
            ("bucket", "1h"),
            ("aggregates", "avg,last"),
        ])
    );
    let body: Value = reqwest::Client::new()
        .get(url)
        .header(TENANT, "acme")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut request = tonic::Request::new(q.clone());
    request
        .metadata_mut()
        .insert(TENANT, "acme".parse().unwrap());
    let via_grpc = grpc.query(request).await.unwrap().into_inner();
    let series = body["series"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"));
    assert_eq!(series.len(), via_grpc.series.len());
    for (h, g) in series.iter().zip(&via_grpc.series) {
        assert_eq!(h["device_id"], g.device_id.as_str());
        let buckets = h["buckets"].as_array().unwrap();
        assert_eq!(buckets.len(), g.buckets.len());
        for (hb, gb) in buckets.iter().zip(&g.buckets) {
            let start: DateTime<Utc> = hb["start"].as_str().unwrap().parse().unwrap();
            assert_eq!(start.timestamp(), gb.start.as_ref().unwrap().seconds);
            // Summation order may differ between two plans of one query.
            let (ha, ga) = (hb["avg"].as_f64().unwrap(), gb.avg.unwrap());
            assert!((ha - ga).abs() <= 1e-9 * ga.abs().max(1.0), "{ha} vs {ga}");
            assert_eq!(hb["last"].as_f64(), gb.last);
            assert!(hb.get("count").is_none(), "not requested: {hb}");
        }
    }

    // Too many buckets is refused.
    let mut too_fine = queries[0].clone();
    too_fine.bucket = Some(secs(1));
    let e = grpc.query(too_fine).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bucketed_aggregates_match_brute_force_pg_partman() {
    aggregates_match_brute_force("pg_partman").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bucketed_aggregates_match_brute_force_timescaledb() {
    let installed = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .any(|v| v.path().join("lib/timescaledb.so").exists());
    if !installed {
        println!(
            "skipped: timescaledb is not installed (no /usr/lib/postgresql/*/lib/timescaledb.so; \
             Debian has no package for it), so only the pg_partman mode is tested here"
        );
        return;
    }
    aggregates_match_brute_force("timescaledb").await;
}

/// Percentile with linear interpolation, as PostgreSQL's `percentile_cont`.
fn percentile_cont(sorted: &[f64], p: f64) -> f64 {
    let pos = p * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_records_usage_and_summaries_match_the_records() {
    setup();
    let region = RegionSandbox::start("eu-west").await;
    let pool = db(&region).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(region.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "meridian.v1.Telemetry".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let http = reqwest::Client::new();
    let chat = |model: &str, stream: bool| {
        http.post(format!("{}/v1/chat/completions", region.url()))
            .header(TENANT, "acme")
            .json(&json!({"model": model, "stream": stream,
                          "messages": [{"role": "user", "content": "hello there"}]}))
            .send()
    };
    for stream in [false, true] {
        let res = chat(meridian_tests::TEST_MODEL, stream).await.unwrap();
        assert_eq!(res.status(), 200);
        res.bytes().await.unwrap();
    }
    assert_eq!(chat("nope", false).await.unwrap().status(), 404);
    let mut inference =
        meridian_proto::v1::inference_client::InferenceClient::connect(region.url())
            .await
            .unwrap();
    let mut request = tonic::Request::new(meridian_proto::v1::GenerateRequest {
        model: meridian_tests::TEST_MODEL.into(),
        messages: vec![meridian_proto::v1::ChatMessage {
            role: "user".into(),
            content: "hi".into(),
            name: String::new(),
        }],
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert(TENANT, "acme".parse().unwrap());
    let generated = inference.generate(request).await.unwrap().into_inner();
    let completion_tokens = generated.usage.unwrap().completion_tokens;

    eventually("four usage records", || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM inference_usage WHERE tenant = 'acme'",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
                == 4
        }
    })
    .await;
    let recorded: Vec<(String, String, String, i32)> = sqlx::query_as(
        "SELECT model, status, region, completion_tokens FROM inference_usage
          WHERE tenant = 'acme' ORDER BY model, completion_tokens",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        recorded[0],
        ("nope".into(), "not_found".into(), "eu-west".into(), 0)
    );
    for (model, status, _, tokens) in &recorded[1..] {
        assert_eq!(
            (model.as_str(), status.as_str()),
            (meridian_tests::TEST_MODEL, "ok")
        );
        assert!(*tokens > 0);
    }
    assert!(
        recorded[1..]
            .iter()
            .any(|r| r.3 == completion_tokens as i32)
    );

    // Summaries over records with known values.
    let seed = Utc::now().timestamp_micros() as u64;
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let start = now_ms() - chrono::Duration::hours(5);
    let mut latencies = Vec::new();
    let (mut hits, mut lookups, mut errors, mut prompt) = (0, 0, 0, 0i64);
    for i in 0..200 {
        let ok = rng.random_bool(0.9);
        let cache = ["hit_l1", "hit_l2", "miss", "bypass"][rng.random_range(0..4)];
        let latency = rng.random_range(1..5_000);
        let tokens = rng.random_range(1..500);
        if ok {
            latencies.push(f64::from(latency));
            lookups += i32::from(cache != "bypass");
            hits += i32::from(cache.starts_with("hit"));
        } else {
            errors += 1;
        }
        prompt += i64::from(tokens);
        sqlx::query(
            "INSERT INTO inference_usage VALUES ('synth', 'm1', 'eu-west', $1, $2, 0, 1, $3, $4, $5)",
        )
        .bind(start + chrono::Duration::seconds(i * 60))
        .bind(tokens)
        .bind(latency)
        .bind(cache)
        .bind(if ok { "ok" } else { "internal" })
        .execute(&pool)
        .await
        .unwrap();
    }
    latencies.sort_by(f64::total_cmp);
    let url = format!(
        "{}/v1/usage/summary{}",
        region.url(),
        query_string(&[
            ("start", &start.to_rfc3339()),
            ("end", &Utc::now().to_rfc3339()),
        ])
    );
    let body: Value = http
        .get(url)
        .header(TENANT, "synth")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let m = &body["models"][0];
    assert_eq!(body["models"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(m["model"], "m1");
    assert_eq!(m["requests"], 200);
    assert_eq!(m["errors"], errors);
    assert_eq!(m["prompt_tokens"], prompt);
    let p95 = m["p95_latency_ms"].as_f64().unwrap();
    assert!(
        (p95 - percentile_cont(&latencies, 0.95)).abs() < 1e-9,
        "{body}"
    );
    let rate = m["cache_hit_rate"].as_f64().unwrap();
    assert!(
        (rate - f64::from(hits) / f64::from(lookups)).abs() < 1e-12,
        "{body}"
    );
}
