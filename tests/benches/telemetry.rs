//! Telemetry, in both time-series modes side by side (pg_partman, then
//! TimescaleDB where installed, with chunks past the compression age
//! compressed): sustained ingest through one region over gRPC client
//! streaming and over HTTP, and the latency of a one-day bucketed query over
//! many rows (`TELEMETRY_BENCH_QUERY_RUNS`, default 20: median and p99),
//! closing with a table and the ratios TimescaleDB / pg_partman.
//! Run with `make bench` (or `cargo bench -p meridian-tests --bench
//! telemetry`). `TELEMETRY_BENCH_INGEST_ROWS` (default 400,000) sets the
//! readings sent per protocol, `TELEMETRY_BENCH_QUERY_ROWS` (default
//! 10,000,000) the rows the query reads; those are generated in the database
//! with `generate_series`, not sent.
//!
//! The gRPC ingest is measured again in a region whose readings replicate to
//! a peer (`[replication] telemetry_peers`), against the single region above
//! in the same run; `TELEMETRY_BENCH_REPLICATED=0` leaves that out.

use std::time::{Duration, Instant};

use chrono::Utc;
use meridian_proto::v1::telemetry_client::TelemetryClient;
use meridian_proto::v1::{IngestRequest, QueryRequest, Reading};
use meridian_tests::{ClusterSandbox, RegionSandbox, TimeSeries};

const BATCH: usize = 5_000;
const CLIENTS: usize = 4;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ts(t: chrono::DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// `rows` readings of one client, one per millisecond back from now.
fn readings(client: usize, rows: usize) -> Vec<Reading> {
    let now = Utc::now();
    (0..rows)
        .map(|i| Reading {
            device_id: format!("dev-{client}-{}", i % 100),
            ts: Some(ts(now - chrono::Duration::milliseconds(i as i64))),
            metric: "temp_celsius".into(),
            value: (i % 1000) as f64 / 10.0,
            labels: [("site".to_string(), format!("lab-{}", client))].into(),
        })
        .collect()
}

async fn grpc_ingest(url: &str, rows: usize) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let url = url.to_string();
        let data = readings(c, rows / CLIENTS);
        tasks.push(tokio::spawn(async move {
            let mut client = TelemetryClient::connect(url).await.expect("connect");
            let batches: Vec<IngestRequest> = data
                .chunks(BATCH)
                .map(|b| IngestRequest {
                    readings: b.to_vec(),
                })
                .collect();
            let res = client
                .ingest(futures::stream::iter(batches))
                .await
                .expect("ingest")
                .into_inner();
            assert_eq!(res.rejected_count, 0, "{res:?}");
            res.accepted_count
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.expect("client task");
    }
    done as f64 / started.elapsed().as_secs_f64()
}

async fn http_ingest(url: &str, rows: usize) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let url = format!("{url}/v1/telemetry");
        let now = Utc::now();
        let bodies: Vec<Vec<u8>> = (0..rows / CLIENTS)
            .map(|i| {
                serde_json::json!({
                    "device_id": format!("http-{c}-{}", i % 100),
                    "ts": (now - chrono::Duration::milliseconds(i as i64)).to_rfc3339(),
                    "metric": "temp_celsius",
                    "value": (i % 1000) as f64 / 10.0,
                    "labels": {"site": format!("lab-{c}")},
                })
            })
            .collect::<Vec<_>>()
            .chunks(BATCH)
            .map(|b| serde_json::to_vec(b).expect("json"))
            .collect();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut accepted = 0;
            for body in bodies {
                let res: serde_json::Value = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .expect("post")
                    .json()
                    .await
                    .expect("answer");
                accepted += res["accepted"].as_u64().expect("accepted count");
            }
            accepted
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.expect("client task");
    }
    done as f64 / started.elapsed().as_secs_f64()
}

/// What one mode measured.
struct Measured {
    mode: TimeSeries,
    grpc: f64,
    http: f64,
    /// Sorted query latencies.
    query: Vec<Duration>,
}

/// Nearest-rank percentile of sorted `times`.
fn percentile(times: &[Duration], p: f64) -> Duration {
    let rank = ((p * times.len() as f64).ceil() as usize).clamp(1, times.len());
    times[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    // reqwest is built with `rustls-no-provider` in this crate.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ingest_rows = env("TELEMETRY_BENCH_INGEST_ROWS", 400_000);
    let query_rows = env("TELEMETRY_BENCH_QUERY_ROWS", 10_000_000);
    let query_runs = env("TELEMETRY_BENCH_QUERY_RUNS", 20).max(1);
    let mut measured = Vec::new();
    for mode in [TimeSeries::Partman, TimeSeries::Timescaledb] {
        if mode == TimeSeries::Timescaledb
            && !meridian_launcher::extension_installed("timescaledb", Some("timescaledb"))
        {
            println!(
                "timescaledb: not installed here, left out (infra/scripts/setup.sh installs it)"
            );
            continue;
        }
        println!("== {mode}");
        let m = one_mode(mode, ingest_rows, query_rows, query_runs).await;
        if env("TELEMETRY_BENCH_REPLICATED", 1) == 1 {
            replicated_ingest(mode, ingest_rows, m.grpc).await;
        }
        measured.push(m);
    }

    println!();
    println!(
        "{:<12} {:>14} {:>14} {:>12} {:>12} {:>12}",
        "mode", "gRPC rows/s", "HTTP rows/s", "query p50", "query p99", "query best"
    );
    for m in &measured {
        println!(
            "{:<12} {:>14.0} {:>14.0} {:>9.1} ms {:>9.1} ms {:>9.1} ms",
            m.mode.storage(),
            m.grpc,
            m.http,
            ms(percentile(&m.query, 0.5)),
            ms(percentile(&m.query, 0.99)),
            ms(m.query[0])
        );
    }
    if let [base, other] = &measured[..] {
        println!(
            "{} / {}: gRPC ingest {:.2} x, HTTP ingest {:.2} x, query p50 {:.2} x, p99 {:.2} x \
             ({query_runs} queries over {query_rows} rows, ingest {ingest_rows} rows per protocol)",
            other.mode,
            base.mode,
            other.grpc / base.grpc,
            other.http / base.http,
            ms(percentile(&other.query, 0.5)) / ms(percentile(&base.query, 0.5)),
            ms(percentile(&other.query, 0.99)) / ms(percentile(&base.query, 0.99)),
        );
    }
}

/// Ingest over both protocols, then the one-day bucketed query over
/// `query_rows` rows, in a region of its own keeping time series in `mode`.
async fn one_mode(
    mode: TimeSeries,
    ingest_rows: usize,
    query_rows: usize,
    query_runs: usize,
) -> Measured {
    let region = RegionSandbox::start_with_config(
        "eu-west",
        &mode.config("write_buffer_readings = 200000\n"),
    )
    .await;
    let url = region.url();

    let grpc = grpc_ingest(&url, ingest_rows).await;
    println!(
        "ingest gRPC stream: {grpc:>9.0} rows/s  ({ingest_rows} rows, {CLIENTS} streams, {BATCH} per batch)"
    );
    let http = http_ingest(&url, ingest_rows).await;
    println!(
        "ingest HTTP JSON:   {http:>9.0} rows/s  ({ingest_rows} rows, {CLIENTS} clients, {BATCH} per request)"
    );

    // One device, `query_rows` readings evenly over the last 28 days.
    let pool = sqlx::PgPool::connect(&region.postgres.url())
        .await
        .expect("postgres");
    let span = Duration::from_secs(28 * 86_400);
    let step_us = (span.as_micros() as u64 / query_rows as u64).max(1);
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO telemetry_readings (tenant, device_id, metric, ts, value)
         SELECT 'default', 'bench', 'temp_celsius',
                now() - make_interval(secs => i * $2::float8 / 1e6), (i % 1000) / 10.0
           FROM generate_series(1, $1::int8) AS i",
    )
    .bind(query_rows as i64)
    .bind(step_us as f64)
    .execute(&pool)
    .await
    .expect("generate rows");
    println!(
        "generated {query_rows} rows server-side in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if mode == TimeSeries::Timescaledb {
        // As an operator runs it: chunks past `timescale_compress_after_days`
        // compressed, by the policy's own job run now rather than on its
        // schedule (which could start in the middle of the measurement).
        let started = Instant::now();
        let job: i32 = sqlx::query_scalar(
            "SELECT job_id FROM timescaledb_information.jobs
              WHERE proc_name = 'policy_compression' AND hypertable_name = 'telemetry_readings'",
        )
        .fetch_one(&pool)
        .await
        .expect("compression policy");
        sqlx::query("CALL run_job($1)")
            .bind(job)
            .execute(&pool)
            .await
            .expect("compression job");
        let (compressed, total): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE is_compressed), count(*)
               FROM timescaledb_information.chunks WHERE hypertable_name = 'telemetry_readings'",
        )
        .fetch_one(&pool)
        .await
        .expect("chunks");
        let (before, after): (i64, i64) = sqlx::query_as(
            "SELECT before_compression_total_bytes, after_compression_total_bytes
               FROM hypertable_compression_stats('telemetry_readings')",
        )
        .fetch_one(&pool)
        .await
        .expect("compression stats");
        println!(
            "compressed {compressed} of {total} chunks in {:.1} s: {} MiB -> {} MiB",
            started.elapsed().as_secs_f64(),
            before >> 20,
            after >> 20
        );
    }
    sqlx::query("ANALYZE telemetry_readings")
        .execute(&pool)
        .await
        .expect("analyze");

    let mut client = TelemetryClient::connect(url).await.expect("connect");
    let now = Utc::now();
    let query = QueryRequest {
        device_id: "bench".into(),
        metric: "temp_celsius".into(),
        start: Some(ts(now - chrono::Duration::days(29))),
        end: Some(ts(now + chrono::Duration::minutes(1))),
        bucket: Some(prost_types::Duration {
            seconds: 86_400,
            nanos: 0,
        }),
        ..Default::default()
    };
    let mut times = Vec::new();
    for _ in 0..query_runs {
        let t = Instant::now();
        let res = client
            .query(query.clone())
            .await
            .expect("query")
            .into_inner();
        times.push(t.elapsed());
        let counted: u64 = res.series[0].buckets.iter().filter_map(|b| b.count).sum();
        assert_eq!(counted, query_rows as u64);
    }
    times.sort();
    println!(
        "query 1-day buckets, all aggregates, over {query_rows} rows: median {:.1} ms, p99 {:.1} ms, best {:.1} ms ({query_runs} runs)",
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.99)),
        ms(times[0])
    );
    Measured {
        mode,
        grpc,
        http,
        query: times,
    }
}

/// gRPC ingest in us-east, whose readings replicate to eu-west, against
/// `baseline` (rows/s of the same ingest in a region without replication),
/// and how long after the last commit eu-west held every reading.
async fn replicated_ingest(mode: TimeSeries, rows: usize, baseline: f64) {
    let cluster = ClusterSandbox::start_replicated_each(
        &["us-east", "eu-west"],
        // The same buffer as the single region's; a table after the
        // `[replication]` keys, which end the config.
        |name| {
            let peers = if name == "us-east" {
                "telemetry_peers = [\"eu-west\"]\n"
            } else {
                ""
            };
            format!("{peers}{}", mode.config("write_buffer_readings = 200000\n"))
        },
        |_, _| {},
    )
    .await;
    let url = cluster.regions[0].url();
    let replicated = grpc_ingest(&url, rows).await;
    let committed = Instant::now();
    println!(
        "ingest gRPC stream, replicated to 1 peer: {replicated:>9.0} rows/s  ({:.2} x the single region)",
        replicated / baseline
    );
    let peer = sqlx::PgPool::connect(&cluster.regions[1].postgres.url())
        .await
        .expect("postgres");
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry_readings")
            .fetch_one(&peer)
            .await
            .expect("count");
        if n as usize >= rows {
            break;
        }
        assert!(
            committed.elapsed() < Duration::from_secs(600),
            "the peer has {n} of {rows} readings after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "  peer held all {rows} readings {:.1} s after the last ingest commit",
        committed.elapsed().as_secs_f64()
    );
}
