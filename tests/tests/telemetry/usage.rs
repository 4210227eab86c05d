//! Usage records of inference requests and the summaries over them, in
//! both time-series modes.

use super::*;

in_both_time_series_modes!(inference_records_usage_and_summaries_match_the_records);

/// Percentile with linear interpolation, as PostgreSQL's `percentile_cont`.
fn percentile_cont(sorted: &[f64], p: f64) -> f64 {
    let pos = p * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

async fn inference_records_usage_and_summaries_match_the_records(mode: TimeSeries) {
    setup();
    let region = RegionSandbox::start_with_config("eu-west", &mode.config("")).await;
    let pool = db(&region).await;
    assert_mode(&pool, mode).await;
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
            ..Default::default()
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
