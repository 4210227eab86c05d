//! Bucketed aggregates against a brute-force computation over the same
//! rows, in both time-series modes.

use super::*;

in_both_time_series_modes!(bucketed_aggregates_match_brute_force);

/// One stored reading, as the brute force sees it.
pub(super) struct Row {
    pub(super) device: String,
    pub(super) metric: &'static str,
    pub(super) ts_us: i64,
    pub(super) value: f64,
    pub(super) labels: BTreeMap<String, String>,
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

pub(super) fn assert_matches(res: &QueryResponse, rows: &[Row], q: &QueryRequest, seed: u64) {
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
async fn bucketed_aggregates_match_brute_force(mode: TimeSeries) {
    setup();
    let seed: u64 = std::env::var("TELEMETRY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Utc::now().timestamp_micros() as u64);
    println!("seed {seed} (set TELEMETRY_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let region = RegionSandbox::start_with_config("eu-west", &mode.config("")).await;
    let pool = db(&region).await;
    assert_mode(&pool, mode).await;

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
