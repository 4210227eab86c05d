//! Gray failures, through the gateway: a region whose PostgreSQL is killed
//! (kill -9) while conversation turns, jobs and plain chat flow keeps
//! serving plain chat, refuses what needs its database at once (503 or
//! `UNAVAILABLE`, naming the store), and the gateway replays that in the
//! other region, so no request fails. Every acknowledged turn and job
//! survives, and the region takes its conversations back once its database
//! returns, without a restart.
//!
//! Seeded: the seed picks when the database dies and names the
//! conversations; `GRAY_FAILURE_SEED=<n>` replays one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use meridian_proto::v1::inference_client::InferenceClient;
use meridian_proto::v1::{ChatMessage, GenerateRequest};
use meridian_tests::replicated::{job_rows, pool, seed, until};
use meridian_tests::{ClusterSandbox, RegionProcess, TEST_MODEL, init_logging};
use rand::{Rng, SeedableRng};

use serde_json::{Value, json};
use tokio::sync::Mutex;

const REGIONS: [&str; 2] = ["us-east", "eu-west"];
const VICTIM: &str = "eu-west";
const OTHER: &str = "us-east";
const PATIENCE: Duration = Duration::from_secs(30);

fn chat_body(content: &str) -> Value {
    json!({ "model": TEST_MODEL, "max_tokens": 4,
            "messages": [{ "role": "user", "content": content }] })
}

/// Status, the region the gateway chose, and the region that answered.
async fn post(
    http: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, String, String) {
    let mut req = http.post(url).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.expect("the gateway answers");
    let header = |name: &str| {
        res.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (region, served_by) = (header("x-meridian-region"), header("x-meridian-served-by"));
    let status = res.status().as_u16();
    let _ = res.bytes().await;
    (status, region, served_by)
}

/// A session id starting with `prefix` whose home, by the gateway's
/// affinity, is the victim.
async fn session_homed_in_victim(http: &reqwest::Client, chat_url: &str, prefix: &str) -> String {
    for i in 0..200 {
        let candidate = format!("{prefix}-{i}");
        let (status, region, _) = post(
            http,
            chat_url,
            &[("x-meridian-session", &candidate)],
            &chat_body("where is home"),
        )
        .await;
        assert_eq!(status, 200);
        if region == VICTIM {
            return candidate;
        }
    }
    panic!("no session lands in {VICTIM}");
}

/// What the traffic saw: acknowledged writes and every unexpected answer.
#[derive(Default)]
struct Seen {
    /// (when, conversation, content, region that stored it)
    turns: Vec<(Instant, String, String, String)>,
    /// (job id, region that accepted it)
    jobs: Vec<(String, String)>,
    /// Plain chats pinned to the victim and who served them.
    plain: Vec<(Instant, String)>,
    failures: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_postgres_sends_what_needs_it_elsewhere_and_keeps_plain_chat() {
    init_logging();
    let seed = seed("GRAY_FAILURE_SEED");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut cluster = ClusterSandbox::start_replicated(&REGIONS, "", |_, _| {}).await;
    let gateway = cluster.gateway_url();
    let http = reqwest::Client::new();
    let chat_url = format!("{gateway}/v1/chat/completions");

    // Conversations and a session whose home (by the gateway's affinity)
    // is the victim.
    let mut conversations = Vec::new();
    for i in 0.. {
        if conversations.len() == 3 {
            break;
        }
        assert!(i < 200, "no conversation id lands in {VICTIM}");
        let id = format!("gray-{seed:x}-{i}");
        let (status, region, _) = post(
            &http,
            &chat_url,
            &[("x-meridian-conversation", &id)],
            &chat_body(&format!("{id} opens")),
        )
        .await;
        assert_eq!(status, 200);
        if region == VICTIM {
            conversations.push(id);
        }
    }
    let session =
        session_homed_in_victim(&http, &chat_url, &format!("gray-session-{seed:x}")).await;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut traffic = tokio::task::JoinSet::new();
    {
        let (http, url, seen, stop) = (http.clone(), chat_url.clone(), seen.clone(), stop.clone());
        let conversations = conversations.clone();
        traffic.spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let id = &conversations[n % conversations.len()];
                let content = format!("{id} turn {n}");
                let (status, region, served_by) = post(
                    &http,
                    &url,
                    &[("x-meridian-conversation", id)],
                    &chat_body(&content),
                )
                .await;
                let mut seen = seen.lock().await;
                if status == 200 && region == served_by {
                    seen.turns
                        .push((Instant::now(), id.clone(), content, served_by));
                } else {
                    seen.failures.push(format!(
                        "turn {content}: {status} via {region} by {served_by}"
                    ));
                }
                n += 1;
            }
        });
    }
    {
        let (http, url, seen, stop) = (
            http.clone(),
            format!("{gateway}/v1/jobs"),
            seen.clone(),
            stop.clone(),
        );
        let session = session.clone();
        traffic.spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let res = http
                    .post(&url)
                    .header("x-meridian-session", &session)
                    .json(&chat_body(&format!("job {n}")))
                    .send()
                    .await
                    .expect("the gateway answers");
                let status = res.status().as_u16();
                let region = res
                    .headers()
                    .get("x-meridian-region")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let body: Value = res.json().await.unwrap_or_default();
                let mut seen = seen.lock().await;
                match body["id"].as_str() {
                    Some(id) if status == 202 => seen.jobs.push((id.to_string(), region)),
                    _ => seen.failures.push(format!("job {n}: {status} {body}")),
                }
                n += 1;
                drop(seen);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    {
        let (http, url, seen, stop) = (http.clone(), chat_url.clone(), seen.clone(), stop.clone());
        traffic.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (status, _, served_by) = post(
                    &http,
                    &url,
                    &[("x-meridian-region", VICTIM)],
                    &chat_body("plain chat needs no database"),
                )
                .await;
                let mut seen = seen.lock().await;
                if status == 200 {
                    seen.plain.push((Instant::now(), served_by));
                } else {
                    seen.failures.push(format!("plain chat: {status}"));
                }
                drop(seen);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }

    tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
    let victim_url = cluster.region(VICTIM).url();
    let killed = Instant::now();
    cluster.region(VICTIM).postgres.kill();

    // Detected: the region's readiness names its database as down.
    let mut detected = None;
    while killed.elapsed() < PATIENCE {
        let ready: Value = http
            .get(format!("{victim_url}/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ready["unavailable_stores"] == json!(["postgres"]) {
            // Its models still serve: plain chat stays.
            assert_eq!(ready["models"][TEST_MODEL]["serving"], true, "{ready}");
            detected = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let detected = detected.expect("the region notices its database is gone");

    // gRPC refusals are replayed too: a turn of a victim's conversation.
    let channel = tonic::transport::Endpoint::from_shared(gateway.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut req = tonic::Request::new(GenerateRequest {
        model: TEST_MODEL.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: format!("{} over grpc", conversations[0]),
            ..Default::default()
        }],
        max_tokens: Some(4),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-meridian-conversation", conversations[0].parse().unwrap());
    let res = InferenceClient::new(channel)
        .generate(req)
        .await
        .expect("the gRPC turn is served by the other region");
    assert_eq!(res.into_inner().region, OTHER);

    // Once its status says so, the gateway no longer tries the region for
    // what needs its database.
    let gateway_metrics = format!("{}/metrics", cluster.admin_url());
    until(PATIENCE, "the gateway routes past the region", || async {
        meridian_tests::metric(
            &gateway_metrics,
            "meridian_gateway_store_reroutes_total",
            &[&format!("region=\"{VICTIM}\"")],
        )
        .await
            > 0.0
    })
    .await;
    until(PATIENCE, "turns and jobs are served elsewhere", || async {
        let seen = seen.lock().await;
        seen.turns
            .iter()
            .any(|(at, _, _, by)| *at > killed && by == OTHER)
            && seen.jobs.iter().filter(|(_, r)| r == OTHER).count() >= 3
    })
    .await;
    let first_elsewhere = {
        let seen = seen.lock().await;
        seen.turns
            .iter()
            .filter(|(at, _, _, by)| *at > killed && by == OTHER)
            .map(|(at, ..)| *at - killed)
            .min()
            .unwrap()
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "postgres killed: detected in {} ms, first turn served in {OTHER} {} ms after the kill",
        detected.as_millis(),
        first_elsewhere.as_millis()
    );

    // The database returns: the region takes its conversations back.
    cluster
        .region(VICTIM)
        .postgres
        .restart()
        .await
        .expect("postgres restarts");
    let restarted = Instant::now();
    until(
        PATIENCE,
        "a turn of its own conversation is served by the region again",
        || {
            let seen = seen.clone();
            async move {
                seen.lock()
                    .await
                    .turns
                    .iter()
                    .any(|(at, _, _, by)| *at > restarted && by == VICTIM)
            }
        },
    )
    .await;
    println!(
        "postgres back: turns served in {VICTIM} again after {} ms",
        restarted.elapsed().as_millis()
    );
    stop.store(true, Ordering::Relaxed);
    while let Some(done) = traffic.join_next().await {
        done.expect("traffic task");
    }

    let seen = seen.lock().await;
    assert!(
        seen.failures.is_empty(),
        "requests failed: {:?}",
        seen.failures
    );
    // Plain chat stayed where it was pinned, database or not.
    let during: Vec<_> = seen
        .plain
        .iter()
        .filter(|(at, _)| *at > killed && *at < restarted)
        .collect();
    assert!(!during.is_empty(), "plain chat flowed during the outage");
    assert!(
        seen.plain.iter().all(|(_, by)| by == VICTIM),
        "plain chat is served by the pinned region"
    );

    // Every acknowledged turn is in its conversation, in both regions.
    let (victim, other) = (cluster.region(VICTIM).url(), cluster.region(OTHER).url());
    for id in &conversations {
        let wanted: Vec<&str> = seen
            .turns
            .iter()
            .filter(|(_, c, ..)| c == id)
            .map(|(_, _, content, _)| content.as_str())
            .collect();
        for url in [&victim, &other] {
            until(
                PATIENCE,
                &format!("{url} has every turn of {id}"),
                || async {
                    let res = http
                        .get(format!("{url}/v1/conversations/{id}"))
                        .send()
                        .await
                        .unwrap();
                    if res.status() != 200 {
                        return false;
                    }
                    let body: Value = res.json().await.unwrap();
                    let stored: Vec<&str> = body["messages"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter_map(|m| m["content"].as_str())
                        .collect();
                    wanted.iter().all(|w| stored.contains(w))
                },
            )
            .await;
        }
    }
    // Every acknowledged job finishes.
    for (id, region) in &seen.jobs {
        let url = cluster.region(region).url();
        until(PATIENCE, &format!("job {id} succeeds"), || async {
            let job: Value = http
                .get(format!("{url}/v1/jobs/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap_or_default();
            job["state"] == "succeeded"
        })
        .await;
    }
    let refused = cluster
        .region(VICTIM)
        .metric("meridian_store_refused_total", &["postgres"])
        .await;
    assert!(refused >= 1.0, "the victim refused what needed postgres");
}

/// Submits a job of the default tenant to the region at `url`: its id and
/// how long the region took to acknowledge it, or what it answered instead.
async fn submit(
    http: &reqwest::Client,
    url: &str,
    model: &str,
    n: usize,
) -> Result<(uuid::Uuid, Duration), String> {
    let started = Instant::now();
    let res = http
        .post(format!("{url}/v1/jobs"))
        .json(&json!({ "model": model, "max_tokens": 4,
                       "messages": [{ "role": "user", "content": format!("job {n}") }] }))
        .send()
        .await
        .expect("the region answers");
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or_default();
    match body["id"].as_str().and_then(|id| id.parse().ok()) {
        Some(id) if status == 202 => Ok((id, started.elapsed())),
        _ => Err(format!("job {n}: {status} {body}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_redis_still_takes_jobs_and_runs_each_once_when_it_returns() {
    init_logging();
    let seed = seed("GRAY_FAILURE_SEED");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Sweeps a minute apart: what the outage held back goes out because
    // Redis returned, not because a sweep came round.
    let mut region = meridian_tests::RegionSandbox::start_with_config(
        VICTIM,
        "[jobs]\nsweep_interval_ms = 60000\n",
    )
    .await;
    let (http, url) = (reqwest::Client::new(), region.url());
    let checks = pool(&region).await;

    // Jobs that ran, and jobs queued or running when Redis dies.
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(submit(&http, &url, TEST_MODEL, n).await.unwrap().0);
    }
    until(PATIENCE, "the first jobs run through Redis", || async {
        let rows = job_rows(&checks).await;
        ids.iter().all(|id| rows[id].0 == "succeeded")
    })
    .await;
    for n in 3..3 + rng.random_range(2..6) {
        ids.push(
            submit(&http, &url, meridian_tests::TEST_SLOW_MODEL, n)
                .await
                .unwrap()
                .0,
        );
    }

    let killed = Instant::now();
    region.redis.kill();
    until(PATIENCE, "the region notices its Redis is gone", || async {
        let ready: Value = http
            .get(format!("{url}/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ready["unavailable_stores"] == json!(["redis"])
    })
    .await;
    let detected = killed.elapsed();

    // Accepted while Redis is down: PostgreSQL holds them.
    let during = rng.random_range(4..10);
    let mut slowest = Duration::ZERO;
    let mut held = Vec::new();
    for n in 100..100 + during {
        let (id, took) = submit(&http, &url, TEST_MODEL, n)
            .await
            .expect("a job is acknowledged without Redis");
        slowest = slowest.max(took);
        held.push(id);
    }
    // Cacheable chat needs no Redis: its shared cache is skipped, repeats
    // included (they may come from the node's own cache).
    for n in 0..10 {
        let res = http
            .post(format!("{url}/v1/chat/completions"))
            .json(&json!({ "model": TEST_MODEL, "max_tokens": 4, "seed": 7,
                           "messages": [{ "role": "user", "content": format!("cached {}", n % 3) }] }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "chat {n} without redis");
    }
    let errors = region
        .metric("meridian_cache_redis_errors_total", &[])
        .await;
    println!("cache calls Redis failed or was too slow for: {errors}");
    assert!(
        errors >= 1.0,
        "the cache tried its Redis and went on without it"
    );
    let rows = job_rows(&checks).await;
    assert!(
        held.iter().all(|id| rows[id].0 == "queued"),
        "jobs taken during the outage wait for Redis"
    );

    region.redis.restart().await.expect("redis restarts");
    let back = Instant::now();
    ids.extend(held);
    until(PATIENCE, "every acknowledged job succeeds", || async {
        let rows = job_rows(&checks).await;
        ids.iter().all(|id| rows[id].0 == "succeeded")
    })
    .await;
    println!(
        "redis killed: detected in {} ms; {during} jobs acknowledged during the outage (slowest {} ms); \
         all {} done {} ms after redis returned",
        detected.as_millis(),
        slowest.as_millis(),
        ids.len(),
        back.elapsed().as_millis()
    );
    let rows = job_rows(&checks).await;
    for id in &ids {
        let (state, completions, attempts, ..) = &rows[id];
        assert_eq!(state, "succeeded", "job {id}");
        assert_eq!(*completions, 1, "job {id} finished once");
        assert_eq!(*attempts, 1, "job {id} ran once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_region_is_ejected_and_readmitted_when_it_thaws() {
    init_logging();
    let seed = seed("GRAY_FAILURE_SEED");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let other = meridian_tests::RegionSandbox::start(OTHER).await;
    let mut victim = meridian_tests::RegionSandbox::start(VICTIM).await;
    // Its node in a process of its own, to be stopped like a real one.
    let node = RegionProcess::start(env!("CARGO_BIN_EXE_region-process"), &mut victim).await;
    let config = meridian_tests::gateway_config([(OTHER, other.addr()), (VICTIM, node.addr())]);
    let gateway = meridian_tests::start_gateway(config).await;
    let chat_url = format!("http://{}/v1/chat/completions", gateway.local_addr());
    let metrics = format!("http://{}/metrics", gateway.admin_addr().unwrap());
    let http = reqwest::Client::new();

    let session = session_homed_in_victim(&http, &chat_url, &format!("frozen-{seed:x}")).await;

    // A request every 20 ms, each on its own: one the frozen region holds
    // does not hold back the others.
    let stop = Arc::new(AtomicBool::new(false));
    let results = Arc::new(Mutex::new(Vec::new()));
    let traffic = {
        let (http, url, stop, results) = (
            http.clone(),
            chat_url.clone(),
            stop.clone(),
            results.clone(),
        );
        tokio::spawn(async move {
            let mut sent = tokio::task::JoinSet::new();
            while !stop.load(Ordering::Relaxed) {
                let (http, url, session, results) =
                    (http.clone(), url.clone(), session.clone(), results.clone());
                sent.spawn(async move {
                    let at = Instant::now();
                    let answer = post(
                        &http,
                        &url,
                        &[("x-meridian-session", &session)],
                        &chat_body("are you there"),
                    )
                    .await;
                    results.lock().await.push((at, Instant::now(), answer));
                });
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            while sent.join_next().await.is_some() {}
        })
    };

    tokio::time::sleep(Duration::from_millis(rng.random_range(300..1000))).await;
    let frozen = Instant::now();
    node.signal("STOP");
    let healthy = |want: f64| {
        let metrics = metrics.clone();
        async move {
            meridian_tests::metric(
                &metrics,
                "meridian_gateway_region_healthy",
                &[&format!("region=\"{VICTIM}\"")],
            )
            .await
                == want
        }
    };
    until(PATIENCE, "the frozen region is ejected", || healthy(0.0)).await;
    let ejected = frozen.elapsed();
    until(
        PATIENCE,
        "requests sent after the freeze are served elsewhere",
        || async {
            results
                .lock()
                .await
                .iter()
                .any(|(at, _, (status, region, _))| {
                    *at > frozen && *status == 200 && region == OTHER
                })
        },
    )
    .await;
    let first_elsewhere = results
        .lock()
        .await
        .iter()
        .filter(|(at, _, (_, region, _))| *at > frozen && region == OTHER)
        .map(|(_, done, _)| *done - frozen)
        .min()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(rng.random_range(200..800))).await;

    node.signal("CONT");
    let thawed = Instant::now();
    until(PATIENCE, "the thawed region is readmitted", || healthy(1.0)).await;
    let readmitted = thawed.elapsed();
    until(PATIENCE, "its session comes back to it", || async {
        results
            .lock()
            .await
            .iter()
            .any(|(at, _, (status, region, _))| *at > thawed && *status == 200 && region == VICTIM)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    println!(
        "node frozen: ejected in {} ms, first answer from {OTHER} {} ms after the freeze; \
         thawed: readmitted in {} ms",
        ejected.as_millis(),
        first_elsewhere.as_millis(),
        readmitted.as_millis()
    );
    let results = results.lock().await;
    let failed: Vec<_> = results
        .iter()
        .filter(|(_, _, (status, ..))| *status != 200)
        .collect();
    assert!(failed.is_empty(), "requests failed: {failed:?}");
    // Held by the frozen node, answered once it thawed: late, not lost.
    let held = results
        .iter()
        .filter(|(at, done, (_, region, _))| *at > frozen && *done > thawed && region == VICTIM)
        .count();
    println!("{held} requests the frozen node held were answered after it thawed");
}
