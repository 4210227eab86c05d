//! Job throughput through one region: jobs submitted over HTTP as fast as
//! `BENCH_CONCURRENCY` clients can, run by the simulator at zero latency,
//! until every one has succeeded. Reports sustained jobs per second (first
//! submit to last completion) and the p50/p99 queue wait (submission to
//! start, from PostgreSQL's own timestamps). Run with `make bench` (or
//! `cargo bench -p meridian-tests --bench jobs`); `BENCH_JOBS` and
//! `BENCH_WORKERS` set the job count and the node's worker pool.

use std::time::{Duration, Instant};

use futures::StreamExt;
use meridian_tests::RegionSandbox;
use serde_json::json;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    // reqwest is built without a default TLS provider in this crate; plain
    // HTTP never uses it, but the client wants one installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let jobs = env("BENCH_JOBS", 5000);
    let workers = env("BENCH_WORKERS", 16);
    let concurrency = env("BENCH_CONCURRENCY", 64);
    let extra = format!("[jobs]\nworkers = {workers}\nmax_queued_per_tenant = {jobs}\n");
    let region = RegionSandbox::start_with_config("eu-west", &extra).await;
    let url = format!("{}/v1/jobs", region.url());
    let client = reqwest::Client::new();
    let db = sqlx::PgPool::connect(&region.postgres.url())
        .await
        .expect("postgres");

    let started = Instant::now();
    let submitted: usize = futures::stream::iter(0..jobs)
        .map(|i| {
            let (client, url) = (&client, &url);
            async move {
                let body = json!({ "model": "sim-fast", "max_tokens": 8,
                    "messages": [{ "role": "user", "content": format!("bench {i}") }] });
                let res = client.post(url).json(&body).send().await.expect("submit");
                assert_eq!(res.status(), 202);
                1
            }
        })
        .buffer_unordered(concurrency)
        .fold(0, |n, one| async move { n + one })
        .await;
    let submit_time = started.elapsed();
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
            .fetch_one(&db)
            .await
            .expect("count");
        if done as usize == submitted {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "jobs stalled at {done}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let total = started.elapsed();
    let (p50, p99, completions): (f64, f64, i64) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY w),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY w),
                sum(c)::bigint
         FROM (SELECT extract(epoch FROM started_at - created_at) * 1000 AS w,
                      completions::bigint AS c FROM jobs) t",
    )
    .fetch_one(&db)
    .await
    .expect("percentiles");
    assert_eq!(completions as usize, submitted, "each job completed once");

    println!("jobs: {submitted} jobs, {workers} workers, {concurrency} concurrent submitters");
    println!(
        "  submit: {:.0} jobs/s ({:.2} s)",
        submitted as f64 / submit_time.as_secs_f64(),
        submit_time.as_secs_f64()
    );
    println!(
        "  sustained (submit to last completion): {:.0} jobs/s ({:.2} s)",
        submitted as f64 / total.as_secs_f64(),
        total.as_secs_f64()
    );
    println!("  queue wait under that backlog: p50 {p50:.1} ms, p99 {p99:.1} ms");

    // The backlog above measures the queue's ceiling; at half of it the wait
    // is the dispatch latency itself (Postgres commit, XADD, XREADGROUP).
    let rate = (submitted as f64 / total.as_secs_f64() / 2.0).max(1.0);
    let seconds = env("BENCH_STEADY_SECONDS", 5) as f64;
    let steady = (rate * seconds) as usize;
    sqlx::query("TRUNCATE jobs")
        .execute(&db)
        .await
        .expect("truncate");
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(steady);
    for i in 0..steady {
        tokio::time::sleep_until((start + interval * i as u32).into()).await;
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({ "model": "sim-fast", "max_tokens": 8,
                "messages": [{ "role": "user", "content": format!("steady {i}") }] });
            let res = client.post(&url).json(&body).send().await.expect("submit");
            assert_eq!(res.status(), 202);
        }));
    }
    for t in tasks {
        t.await.expect("submit task");
    }
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
            .fetch_one(&db)
            .await
            .expect("count");
        if done as usize == steady {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "jobs stalled at {done}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (p50, p99): (f64, f64) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY w),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY w)
         FROM (SELECT extract(epoch FROM started_at - created_at) * 1000 AS w FROM jobs) t",
    )
    .fetch_one(&db)
    .await
    .expect("percentiles");
    println!(
        "  steady {rate:.0} jobs/s for {seconds:.0} s ({steady} jobs): queue wait p50 {p50:.1} ms, p99 {p99:.1} ms"
    );
}
