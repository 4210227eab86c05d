//! TimescaleDB as an operator runs it: the chunk interval, compression and
//! retention policies come from `[telemetry]` and read back from
//! `timescaledb_information`, and compressed chunks still answer queries
//! and take late readings.

use super::aggregates::{Row, assert_matches};
use super::*;

/// Seconds in the interval `key` of the policy job `proc` on `table`.
async fn policy_seconds(pool: &PgPool, proc: &str, table: &str, key: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM (config->>$3)::interval)::bigint
           FROM timescaledb_information.jobs
          WHERE proc_name = $1 AND hypertable_name = $2",
    )
    .bind(proc)
    .bind(table)
    .bind(key)
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("{proc} on {table}: {e}"))
}

const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_read_back_as_configured() {
    TimeSeries::Timescaledb.require();
    setup();
    let mode = TimeSeries::Timescaledb;
    let mut region = RegionSandbox::start_with_config(
        "eu-west",
        &mode.config(
            "timescale_chunk_interval_hours = 6\nretention_days = 5\n\
             usage_retention_days = 20\ntimescale_compress_after_days = 2\n",
        ),
    )
    .await;
    let pool = db(&region).await;
    assert_mode(&pool, mode).await;
    let telemetry_level: String = sqlx::query_scalar("SHOW timescaledb.telemetry_level")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(telemetry_level, "off");

    let check = |chunk_h: i64, retention_d: i64, usage_d: i64, compress_d: Option<i64>| {
        let pool = pool.clone();
        async move {
            let chunks: Vec<(String, i64)> = sqlx::query_as(
                "SELECT hypertable_name::text, extract(epoch FROM time_interval)::bigint
                   FROM timescaledb_information.dimensions
                  WHERE column_name = 'ts' ORDER BY 1",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            assert_eq!(
                chunks,
                vec![
                    ("inference_usage".into(), chunk_h * HOUR),
                    ("telemetry_readings".into(), chunk_h * HOUR)
                ]
            );
            for (table, days) in [
                ("telemetry_readings", retention_d),
                ("inference_usage", usage_d),
            ] {
                let drop_after = policy_seconds(&pool, "policy_retention", table, "drop_after");
                assert_eq!(drop_after.await, days * DAY, "{table} retention");
            }
            let compression: Vec<i64> = sqlx::query_scalar(
                "SELECT extract(epoch FROM (config->>'compress_after')::interval)::bigint
                   FROM timescaledb_information.jobs
                  WHERE proc_name = 'policy_compression'
                    AND hypertable_name = 'telemetry_readings'",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            assert_eq!(
                compression,
                compress_d.map(|d| d * DAY).into_iter().collect::<Vec<_>>()
            );
        }
    };
    check(6, 5, 20, Some(2)).await;
    // Each compressed batch is one series, in time order: what queries read.
    let (segment_by, order_by): (String, String) = sqlx::query_as(
        "SELECT segmentby, orderby
           FROM timescaledb_information.hypertable_compression_settings
          WHERE hypertable = 'telemetry_readings'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (segment_by.as_str(), order_by.as_str()),
        ("tenant,device_id,metric", "ts")
    );

    // A restart applies changed keys: policies are replaced, not kept from
    // the first start, and compression can be turned off.
    region.stop_node().await;
    region.rewrite_config(&mode.config(
        "timescale_chunk_interval_hours = 12\nretention_days = 9\n\
         usage_retention_days = 30\ntimescale_compress_after_days = 0\n",
    ));
    region.start_node().await;
    check(12, 9, 30, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_chunks_answer_queries_and_take_late_readings() {
    TimeSeries::Timescaledb.require();
    setup();
    let mode = TimeSeries::Timescaledb;
    let region = RegionSandbox::start_with_config(
        "eu-west",
        &mode.config("timescale_chunk_interval_hours = 6\ntimescale_compress_after_days = 1\n"),
    )
    .await;
    let pool = db(&region).await;
    assert_mode(&pool, mode).await;

    // Four days of readings, one every 10 minutes from each of two devices;
    // all but the last day are old enough to be compressed.
    let now = now_ms();
    let start = now - chrono::Duration::days(4);
    let mut rows = Vec::new();
    for i in 0..(4 * 24 * 6) {
        for (d, device) in ["d0", "d1"].into_iter().enumerate() {
            let ts = start + chrono::Duration::minutes(10 * i + d as i64);
            rows.push(Row {
                device: device.into(),
                metric: "temp",
                ts_us: ts.timestamp_micros(),
                value: f64::from(((i * 7 + d as i64) % 101) as i32) * 0.5,
                labels: BTreeMap::new(),
            });
        }
    }
    let as_reading = |r: &Row| {
        let ts = DateTime::from_timestamp_micros(r.ts_us).unwrap();
        reading(&r.device, r.metric, ts, r.value)
    };
    let mut grpc = client(&region).await;
    let batches = rows.chunks(500).map(|c| c.iter().map(as_reading).collect());
    let res = ingest(&mut grpc, "acme", batches.collect()).await;
    assert_eq!(res.accepted_count, rows.len() as u64, "{res:?}");

    // The compression policy's own job, run now rather than on its schedule.
    let job: i32 = sqlx::query_scalar(
        "SELECT job_id FROM timescaledb_information.jobs
          WHERE proc_name = 'policy_compression' AND hypertable_name = 'telemetry_readings'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::query("CALL run_job($1)")
        .bind(job)
        .execute(&pool)
        .await
        .unwrap();
    let chunks: Vec<(DateTime<Utc>, bool)> = sqlx::query_as(
        "SELECT range_end, is_compressed FROM timescaledb_information.chunks
          WHERE hypertable_name = 'telemetry_readings' ORDER BY range_start",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    // Chunks ending more than a day ago are compressed, the rest not; a
    // minute's margin for the time between the job and this check.
    let cutoff = Utc::now() - chrono::Duration::days(1);
    let margin = chrono::Duration::minutes(1);
    let compressed = chunks.iter().filter(|(_, c)| *c).count();
    assert!(compressed >= 10, "{chunks:?}");
    for (end, is_compressed) in &chunks {
        if *end < cutoff - margin || *end > cutoff + margin {
            assert_eq!(*is_compressed, *end < cutoff, "{chunks:?}");
        }
    }

    // A late reading into a compressed chunk is taken, and a duplicate of a
    // compressed one still keeps the first value.
    let late = start + chrono::Duration::minutes(5);
    let duplicate = Row {
        device: rows[0].device.clone(),
        metric: "temp",
        ts_us: rows[0].ts_us,
        value: 1e6,
        labels: BTreeMap::new(),
    };
    let late_row = Row {
        device: "d0".into(),
        metric: "temp",
        ts_us: late.timestamp_micros(),
        value: 42.0,
        labels: BTreeMap::new(),
    };
    let res = ingest(
        &mut grpc,
        "acme",
        vec![vec![as_reading(&late_row), as_reading(&duplicate)]],
    )
    .await;
    assert_eq!((res.accepted_count, res.rejected_count), (2, 0), "{res:?}");
    rows.push(late_row);

    let queries = [
        QueryRequest {
            device_id: "d0".into(),
            metric: "temp".into(),
            start: Some(pb_ts(start - chrono::Duration::hours(1))),
            end: Some(pb_ts(now + chrono::Duration::hours(1))),
            bucket: Some(prost_types::Duration {
                seconds: 3 * HOUR,
                nanos: 0,
            }),
            ..Default::default()
        },
        QueryRequest {
            device_id: "d1".into(),
            metric: "temp".into(),
            start: Some(pb_ts(start)),
            end: Some(pb_ts(now)),
            bucket: Some(prost_types::Duration {
                seconds: DAY,
                nanos: 0,
            }),
            ..Default::default()
        },
    ];
    for q in &queries {
        let mut request = tonic::Request::new(q.clone());
        request
            .metadata_mut()
            .insert(TENANT, "acme".parse().unwrap());
        let res = grpc.query(request).await.unwrap().into_inner();
        assert_matches(&res, &rows, q, 0);
    }
}
