//! Time from a region's crash to the first successful answer for the
//! clients it served, through the gateway: detection plus failover. Clients
//! near Dublin (eu-west) send one request after another; the region's node
//! is killed (every socket closed at once, as a crash does); the figure is
//! the time from the kill to the first 200 answered by another region for
//! a request sent after it. Repeated `BENCH_ROUNDS` times, restarting the
//! node between rounds; the baseline is the same clients' request latency
//! before any kill, measured in the same run. Also counts requests that
//! failed across all kills (the gateway retries those that reached no one).
//!
//! Then gray failures, next to the crash: the region's PostgreSQL killed
//! under job submissions from the same clients (detected when the region's
//! `/readyz` names it; recovered at the first submission acknowledged
//! elsewhere, and again by the region once PostgreSQL is back), and its
//! Redis killed under submissions (detected likewise; recovered when every
//! job acknowledged during the outage has run, after Redis is back). A
//! region's node frozen (SIGSTOP) under traffic: ejected, first success
//! elsewhere, readmitted after SIGCONT. And a pool upstream ten times slower
//! than its two peers: how long until it is out, and the pool's latency with
//! it in and out.
//! Run with `make bench` or `cargo bench -p meridian-tests --bench failover`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use meridian_tests::load::{env_or, ms, percentile};
use meridian_tests::{
    ClusterSandbox, RegionProcess, RegionSandbox, SimServer, TEST_MODEL, gateway_config, metric,
    start_gateway,
};
use serde_json::{Value, json};

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

/// One answer: when it was sent and answered, its status and region.
struct Outcome {
    sent: Instant,
    done: Instant,
    status: u16,
    region: String,
}

async fn send(client: &reqwest::Client, url: &str) -> Outcome {
    let body = json!({ "model": TEST_MODEL, "max_tokens": 4,
        "messages": [{ "role": "user", "content": "failover" }] });
    post_near_dublin(client, &format!("{url}/v1/chat/completions"), &body).await
}

/// Submits a job as a client near Dublin.
async fn submit(client: &reqwest::Client, url: &str) -> Outcome {
    let body = json!({ "model": TEST_MODEL, "max_tokens": 2,
        "messages": [{ "role": "user", "content": "failover job" }] });
    post_near_dublin(client, &format!("{url}/v1/jobs"), &body).await
}

/// POSTs `body` to `url` as a client in Ireland; a request that got no
/// answer at all is status 0.
async fn post_near_dublin(client: &reqwest::Client, url: &str, body: &Value) -> Outcome {
    let sent = Instant::now();
    let res = client
        .post(url)
        .header("x-meridian-client-country", "IE")
        .json(body)
        .send()
        .await;
    let (status, region) = match res {
        Ok(r) => {
            let region = r
                .headers()
                .get("x-meridian-region")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let status = r.status().as_u16();
            let _ = r.bytes().await;
            (status, region)
        }
        Err(_) => (0, String::new()),
    };
    Outcome {
        sent,
        done: Instant::now(),
        status,
        region,
    }
}

/// Waits until the region's `/readyz` names `store` among those down (or
/// not, with `down` false); the time it took.
async fn store_seen(region_url: &str, store: &str, down: bool) -> Duration {
    let started = Instant::now();
    loop {
        let ready: Value = reqwest::get(format!("{region_url}/readyz"))
            .await
            .expect("readyz")
            .json()
            .await
            .expect("readyz json");
        let listed = ready["unavailable_stores"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s == store));
        if listed == down {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{store} never seen"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn healthy(admin: &str, region: &str) -> bool {
    let routing: Value = reqwest::get(format!("{admin}/routing"))
        .await
        .expect("routing")
        .json()
        .await
        .expect("routing json");
    routing["regions"]
        .as_array()
        .expect("regions")
        .iter()
        .any(|r| r["name"] == region && r["healthy"] == true)
}

#[tokio::main]
async fn main() {
    // The regions' upstream clients (the slow-pool round) need a provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rounds = env_or("BENCH_ROUNDS", 10);
    let mut sandbox = ClusterSandbox::start_with(&REGIONS, |c| {
        c.geo.trusted_proxies = vec!["127.0.0.1/32".parse().expect("cidr")];
    })
    .await;
    let (url, admin) = (sandbox.gateway_url(), sandbox.admin_url());
    let client = reqwest::Client::new();

    let mut base = Vec::new();
    for _ in 0..300 {
        let o = send(&client, &url).await;
        assert_eq!((o.status, o.region.as_str()), (200, "eu-west"));
        base.push(o.done - o.sent);
    }
    base.sort();

    let mut failovers = Vec::new();
    let mut failed = 0usize;
    let mut total = 0usize;
    for _ in 0..rounds {
        while !healthy(&admin, "eu-west").await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        out.push(send(&client, &url).await);
                    }
                    out
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let killed = Instant::now();
        sandbox.region("eu-west").kill_node();
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        let mut first = None::<Duration>;
        for c in clients {
            for o in c.await.expect("client task") {
                total += 1;
                if o.status != 200 {
                    failed += 1;
                }
                if o.sent >= killed && o.status == 200 && o.region != "eu-west" {
                    let t = o.done - killed;
                    first = Some(first.map_or(t, |f| f.min(t)));
                }
            }
        }
        failovers.push(first.expect("some request succeeded elsewhere after the kill"));
        sandbox.region("eu-west").start_node().await;
    }
    failovers.sort();
    let (b50, b99) = (percentile(&base, 0.5), percentile(&base, 0.99));
    let (f50, f99) = (percentile(&failovers, 0.5), percentile(&failovers, 0.99));
    println!(
        "region kill to first success elsewhere, {rounds} kills of eu-west, 4 clients near it:"
    );
    println!(
        "  baseline request  p50 {:7.3} ms  p99 {:7.3} ms",
        ms(b50),
        ms(b99)
    );
    println!(
        "  failover          p50 {:7.3} ms  p99 {:7.3} ms   ratio to baseline: p50 {:.1}  p99 {:.1}",
        ms(f50),
        ms(f99),
        f50.as_secs_f64() / b50.as_secs_f64(),
        f99.as_secs_f64() / b99.as_secs_f64()
    );
    println!("  requests across the kills: {total}, failed: {failed}");

    gray(&mut sandbox, &client, &url, rounds.min(5)).await;
    drop(sandbox);
    frozen(&client, rounds.min(5)).await;
    slow_upstream(&client).await;
}

/// The PostgreSQL and Redis rounds, printed beside the crash figures.
async fn gray(sandbox: &mut ClusterSandbox, client: &reqwest::Client, url: &str, rounds: u64) {
    let region_url = sandbox.region("eu-west").url();
    let (mut detect, mut elsewhere, mut back) = (Vec::new(), Vec::new(), Vec::new());
    let mut failed = 0usize;
    for _ in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(tokio::sync::Mutex::new(Vec::<Outcome>::new()));
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let (client, url, stop) = (client.clone(), url.to_string(), stop.clone());
                let seen = seen.clone();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let o = submit(&client, &url).await;
                        seen.lock().await.push(o);
                    }
                })
            })
            .collect();
        // The earliest answer that matches, measured from `since`.
        let first = |since: Instant, home: bool| {
            let seen = seen.clone();
            async move {
                seen.lock()
                    .await
                    .iter()
                    .filter(|o| o.sent >= since && o.status == 202)
                    .filter(|o| (o.region == "eu-west") == home)
                    .map(|o| o.done - since)
                    .min()
            }
        };
        let wait_for = |since: Instant, home: bool| async move {
            let limit = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(t) = first(since, home).await {
                    return t;
                }
                assert!(Instant::now() < limit, "no job acknowledged (home: {home})");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let killed = Instant::now();
        sandbox.region("eu-west").postgres.kill();
        detect.push(store_seen(&region_url, "postgres", true).await);
        elsewhere.push(wait_for(killed, false).await);
        sandbox
            .region("eu-west")
            .postgres
            .restart()
            .await
            .expect("postgres restarts");
        back.push(wait_for(Instant::now(), true).await);
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.await.expect("client task");
        }
        failed += seen.lock().await.iter().filter(|o| o.status != 202).count();
    }
    for v in [&mut detect, &mut elsewhere, &mut back] {
        v.sort();
    }
    println!(
        "postgres of eu-west killed under job submissions, {rounds} rounds, 4 clients near it:"
    );
    for (what, v) in [
        ("detected (readyz)", &detect),
        ("first job elsewhere", &elsewhere),
        ("back home after restart", &back),
    ] {
        println!(
            "  {what:<24} p50 {:7.3} ms  p99 {:7.3} ms",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99))
        );
    }
    println!("  submissions refused to the client: {failed}");

    let (mut detect, mut drained) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let killed = Instant::now();
        sandbox.region("eu-west").redis.kill();
        detect.push(killed.elapsed() + store_seen(&region_url, "redis", true).await);
        let mut ids = Vec::new();
        for _ in 0..20 {
            let res = client
                .post(format!("{region_url}/v1/jobs"))
                .json(&json!({ "model": TEST_MODEL, "max_tokens": 2,
                    "messages": [{ "role": "user", "content": "held job" }] }))
                .send()
                .await
                .expect("the region answers");
            assert_eq!(res.status(), 202, "a job is acknowledged without redis");
            let job: Value = res.json().await.expect("a job");
            ids.push(job["id"].as_str().expect("an id").to_string());
        }
        sandbox
            .region("eu-west")
            .redis
            .restart()
            .await
            .expect("redis restarts");
        let restarted = Instant::now();
        for id in &ids {
            loop {
                let job: Value = reqwest::get(format!("{region_url}/v1/jobs/{id}"))
                    .await
                    .expect("job")
                    .json()
                    .await
                    .expect("job json");
                if job["state"] == "succeeded" {
                    break;
                }
                assert!(
                    restarted.elapsed() < Duration::from_secs(60),
                    "job {id} never ran"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        drained.push(restarted.elapsed());
    }
    detect.sort();
    drained.sort();
    println!("redis of eu-west killed, 20 jobs acknowledged during each outage, {rounds} rounds:");
    println!(
        "  detected (readyz)        p50 {:7.3} ms  p99 {:7.3} ms",
        ms(percentile(&detect, 0.5)),
        ms(percentile(&detect, 0.99))
    );
    println!(
        "  all run after restart    p50 {:7.3} ms  p99 {:7.3} ms",
        ms(percentile(&drained, 0.5)),
        ms(percentile(&drained, 0.99))
    );
}

/// Rounds of SIGSTOP and SIGCONT of eu-west's node, in a process of its own,
/// behind a gateway of its own, under clients near it.
async fn frozen(client: &reqwest::Client, rounds: u64) {
    let other = RegionSandbox::start("us-east").await;
    let mut victim = RegionSandbox::start("eu-west").await;
    let node = RegionProcess::start(env!("CARGO_BIN_EXE_region-process"), &mut victim).await;
    let mut config = gateway_config([("us-east", other.addr()), ("eu-west", node.addr())]);
    config.geo.trusted_proxies = vec!["127.0.0.1/32".parse().expect("cidr")];
    let gateway = start_gateway(config).await;
    let url = format!("http://{}", gateway.local_addr());
    let admin = format!("http://{}", gateway.admin_addr().expect("an admin port"));
    let (mut ejected, mut elsewhere, mut readmitted) = (Vec::new(), Vec::new(), Vec::new());
    let mut failed = 0usize;
    for _ in 0..rounds {
        while !healthy(&admin, "eu-west").await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(tokio::sync::Mutex::new(Vec::<Outcome>::new()));
        // A request every 10 ms, each on its own: what the frozen node
        // holds does not hold back the rest.
        let traffic = {
            let (client, url) = (client.clone(), url.clone());
            let (stop, seen) = (stop.clone(), seen.clone());
            tokio::spawn(async move {
                let mut sent = tokio::task::JoinSet::new();
                while !stop.load(Ordering::Relaxed) {
                    let (client, url, seen) = (client.clone(), url.clone(), seen.clone());
                    sent.spawn(async move {
                        let o = send(&client, &url).await;
                        seen.lock().await.push(o);
                    });
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                while sent.join_next().await.is_some() {}
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stopped = Instant::now();
        node.signal("STOP");
        while healthy(&admin, "eu-west").await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ejected.push(stopped.elapsed());
        tokio::time::sleep(Duration::from_millis(300)).await;
        node.signal("CONT");
        let thawed = Instant::now();
        while !healthy(&admin, "eu-west").await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        readmitted.push(thawed.elapsed());
        stop.store(true, Ordering::Relaxed);
        traffic.await.expect("traffic task");
        let seen = seen.lock().await;
        failed += seen.iter().filter(|o| o.status != 200).count();
        elsewhere.push(
            seen.iter()
                .filter(|o| o.sent >= stopped && o.status == 200 && o.region != "eu-west")
                .map(|o| o.done - stopped)
                .min()
                .expect("a request served elsewhere during the freeze"),
        );
    }
    println!("eu-west's node frozen (SIGSTOP), a request every 10 ms near it, {rounds} rounds:");
    for (what, v) in [
        ("ejected", &mut ejected),
        ("first success elsewhere", &mut elsewhere),
        ("readmitted after SIGCONT", &mut readmitted),
    ] {
        v.sort();
        println!(
            "  {what:<24} p50 {:7.3} ms  p99 {:7.3} ms",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99))
        );
    }
    println!("  requests failed: {failed} (those it held are answered after the thaw)");
}

/// A pool of three upstreams, one answering its first token ten times
/// later than the others: how long until it is out, and what it cost.
async fn slow_upstream(client: &reqwest::Client) {
    let [a, b, slow] = SimServer::one_slow_of_three().await;
    let list = [&a, &b, &slow]
        .iter()
        .map(|u| format!("{{ base_url = \"{}\" }}", u.base_url()))
        .collect::<Vec<_>>()
        .join(", ");
    let extra = format!(
        "[[models]]\nid = \"pool\"\nbackend = {{ kind = \"openai\", upstreams = [{list}], \
         affinity_prefix_bytes = 0, breaker_cooldown_ms = 600000 }}\n"
    );
    let region = RegionSandbox::start_with_config("eu-west", &extra).await;
    let (url, metrics) = (
        format!("{}/v1/chat/completions", region.url()),
        format!("{}/metrics", region.url()),
    );
    let label = format!("upstream=\"{}\"", slow.base_url());
    let one = || async {
        let started = Instant::now();
        let res = client
            .post(&url)
            .json(&json!({ "model": "pool", "max_tokens": 2,
                "messages": [{ "role": "user", "content": "slow pool" }] }))
            .send()
            .await
            .expect("the region answers");
        assert_eq!(res.status(), 200);
        let _ = res.bytes().await;
        started.elapsed()
    };
    let started = Instant::now();
    let mut before = Vec::new();
    while metric(&metrics, "meridian_upstream_up", &[&label]).await != 0.0 {
        before.push(one().await);
    }
    let out = started.elapsed();
    let requests = before.len();
    let mut after = Vec::new();
    for _ in 0..200 {
        after.push(one().await);
    }
    before.sort();
    after.sort();
    println!("a pool upstream 10x slower than its two peers (200 vs 20 ms to first token):");
    println!("  taken out after {requests} requests, {:.3} ms", ms(out));
    println!(
        "  request latency while in  p50 {:7.3} ms  p99 {:7.3} ms",
        ms(percentile(&before, 0.5)),
        ms(percentile(&before, 0.99))
    );
    println!(
        "  request latency once out  p50 {:7.3} ms  p99 {:7.3} ms   ratio in/out: p50 {:.1}  p99 {:.1}",
        ms(percentile(&after, 0.5)),
        ms(percentile(&after, 0.99)),
        percentile(&before, 0.5).as_secs_f64() / percentile(&after, 0.5).as_secs_f64(),
        percentile(&before, 0.99).as_secs_f64() / percentile(&after, 0.99).as_secs_f64()
    );
}
