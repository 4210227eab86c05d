//! Ingest refuses bad readings one by one and keeps the rest.

use super::*;

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
