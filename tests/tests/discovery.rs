//! A region's nodes found through DNS SRV: a real DNS server (hickory-server)
//! in the test, a region of several nodes sharing its Redis and PostgreSQL,
//! and the gateway following record changes while a load loop runs. Adding
//! a node's record brings it traffic within a TTL; removing one stops new
//! requests to it within a TTL, so it can be stopped without a failed
//! request. A DNS outage keeps the last good nodes; an authoritative "no
//! such records" empties the region.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meridian_gateway::{Config, ConfigBuilder as GatewayConfig, RegionConfig};
use meridian_tests::{RegionSandbox, SrvTarget, TEST_MODEL, TestDns, init_logging, start_gateway};
use serde_json::{Value, json};

const ZONE: &str = "meridian.test.";
const SRV_NAME: &str = "_meridian._tcp.us-east.meridian.test.";
/// The SRV records' TTL, in seconds.
const TTL: u32 = 1;
/// Slack on top of one TTL for a change to reach routing: the resolver's
/// retry floor (`min_refresh`) plus scheduling on a busy 2-core machine.
const MARGIN: Duration = Duration::from_secs(2);

fn target(n: u32, addr: SocketAddr) -> SrvTarget {
    SrvTarget::new(&format!("n{n}.us-east.{ZONE}"), addr)
}

fn gateway_config(dns: &TestDns) -> GatewayConfig {
    let mut config = Config::builder(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        vec![RegionConfig::srv("us-east", SRV_NAME)],
    );
    config.threads = 1;
    config.shutdown_grace = Duration::ZERO;
    config.discovery.nameservers = vec![dns.addr()];
    config.discovery.min_refresh = Duration::from_millis(200);
    config.discovery.timeout = Duration::from_millis(300);
    config.health.interval_ms = 100;
    config
}

/// Generations the node's simulator has started: one per chat completion it
/// served (each request's prompt is unique, so nothing is answered from a
/// cache).
async fn served(node: SocketAddr) -> u64 {
    let text = reqwest::get(format!("http://{node}/metrics"))
        .await
        .expect("the node answers")
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("meridian_sim_time_to_first_token_seconds_count{")
                && l.contains(&format!("model=\"{TEST_MODEL}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn routing(admin: SocketAddr) -> Value {
    reqwest::get(format!("http://{admin}/routing"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The node addresses the gateway routes `us-east` to.
async fn routed_nodes(admin: SocketAddr) -> Vec<SocketAddr> {
    let mut nodes: Vec<SocketAddr> = routing(admin).await["regions"][0]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["address"].as_str().unwrap().parse().unwrap())
        .collect();
    nodes.sort();
    nodes
}

async fn metric(admin: SocketAddr, line_prefix: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Polls `check` every 20 ms until it holds; fails after `limit`.
async fn within<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Chat completions through the gateway, two at a time, until stopped;
/// counts answers and keeps every failure.
struct Load {
    ok: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String) -> Self {
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..2)
            .map(|worker| {
                let (ok, failures, stop, url) =
                    (ok.clone(), failures.clone(), stop.clone(), url.clone());
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    let mut i = 0u64;
                    // Bounded: a test that hangs still stops sending.
                    while !stop.load(Ordering::Relaxed) && i < 100_000 {
                        i += 1;
                        let body = json!({
                            "model": TEST_MODEL,
                            "messages": [{ "role": "user", "content": format!("worker {worker} request {i}") }],
                            "max_tokens": 2,
                        });
                        let outcome = client
                            .post(format!("{url}/v1/chat/completions"))
                            .json(&body)
                            .send()
                            .await;
                        match outcome {
                            Ok(res) if res.status() == 200 => {
                                res.bytes().await.expect("a whole body");
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(res) => {
                                let status = res.status();
                                let text = res.text().await.unwrap_or_default();
                                failures.lock().unwrap().push(format!("{status}: {text}"));
                            }
                            Err(e) => failures.lock().unwrap().push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        Self {
            ok,
            failures,
            stop,
            tasks,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests have been answered.
    async fn wait_for(&self, n: u64) {
        let target = self.ok() + n;
        within(Duration::from_secs(30), "load progress", || async {
            self.ok() >= target
        })
        .await;
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("load workers do not panic");
        }
        self.failures.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_changes_reach_routing_within_a_ttl_without_failed_requests() {
    init_logging();
    let region = RegionSandbox::start("us-east").await;
    let mut second = region.start_extra_node().await;
    let third = region.start_extra_node().await;
    let (a, b, c) = (region.addr(), second.addr(), third.addr());
    let dns = TestDns::start(ZONE, TTL).await;
    dns.set_srv(SRV_NAME, TTL, &[target(1, a), target(2, b)])
        .await;

    let gateway = start_gateway(gateway_config(&dns)).await;
    let admin = gateway.admin_addr().expect("an admin port");
    let url = format!("http://{}", gateway.local_addr());
    let mut both = vec![a, b];
    both.sort();
    within(MARGIN, "the first answer reaching routing", || async {
        routed_nodes(admin).await == both
    })
    .await;

    let load = Load::start(url);
    load.wait_for(100).await;
    let (a0, b0) = (served(a).await, served(b).await);
    assert!(a0 > 0 && b0 > 0, "both nodes serve: {a0} and {b0}");
    assert_eq!(served(c).await, 0, "the third node has no record yet");

    // Add a node: it is routed to within a TTL, and takes requests once its
    // health checks pass.
    dns.set_srv(SRV_NAME, TTL, &[target(1, a), target(2, b), target(3, c)])
        .await;
    let mut all = vec![a, b, c];
    all.sort();
    within(
        Duration::from_secs(u64::from(TTL)) + MARGIN,
        "the added record reaching routing",
        || async { routed_nodes(admin).await == all },
    )
    .await;
    within(
        Duration::from_secs(10),
        "requests reaching the added node",
        || async { served(c).await > 0 },
    )
    .await;
    load.wait_for(100).await;

    // Remove a node: within a TTL routing drops it; what was in flight to it
    // finishes, and after that it gets nothing.
    dns.set_srv(SRV_NAME, TTL, &[target(1, a), target(3, c)])
        .await;
    let mut kept = vec![a, c];
    kept.sort();
    within(
        Duration::from_secs(u64::from(TTL)) + MARGIN,
        "the removed record reaching routing",
        || async { routed_nodes(admin).await == kept },
    )
    .await;
    // Requests picked before the change may still be on their way.
    load.wait_for(20).await;
    let b_after_removal = served(b).await;
    let (a1, c1) = (served(a).await, served(c).await);
    load.wait_for(200).await;
    assert_eq!(
        served(b).await,
        b_after_removal,
        "the removed node got no new requests"
    );
    assert!(
        served(a).await > a1 && served(c).await > c1,
        "the remaining nodes share the traffic"
    );

    // Drained: stopping it now costs no request.
    second.stop().await;
    load.wait_for(100).await;
    let total = load.ok();
    let failures = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        total + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );

    let nodes = |state: &str| {
        format!("meridian_gateway_region_nodes{{region=\"us-east\",state=\"{state}\"}}")
    };
    assert_eq!(metric(admin, &nodes("healthy")).await, Some(2.0));
    assert_eq!(metric(admin, &nodes("ejected")).await, Some(0.0));
    assert_eq!(
        metric(
            admin,
            "meridian_gateway_discovery_failures_total{region=\"us-east\"}"
        )
        .await,
        Some(0.0)
    );
    // The answer is asked again every TTL: its age keeps coming back under
    // a TTL and the margin. Polled, because a loaded machine may delay one
    // refresh; refreshes that stopped would never bring it back.
    let refresh_age = "meridian_gateway_discovery_last_refresh_age_seconds{region=\"us-east\"}";
    assert!(
        metric(admin, refresh_age).await.is_some(),
        "the refresh age is exported"
    );
    // Past a TTL and the margin since the last change, only routine
    // refreshes (same nodes) can bring the age back down.
    tokio::time::sleep(Duration::from_secs(u64::from(TTL)) + MARGIN).await;
    within(
        Duration::from_secs(10),
        "the refresh age back under a TTL and the margin",
        || async {
            metric(admin, refresh_age)
                .await
                .is_some_and(|age| age < f64::from(TTL) + MARGIN.as_secs_f64())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_outage_keeps_the_nodes_and_an_authoritative_empty_answer_removes_them() {
    init_logging();
    let region = RegionSandbox::start("us-east").await;
    let second = region.start_extra_node().await;
    let (a, b) = (region.addr(), second.addr());
    let mut dns = TestDns::start(ZONE, TTL).await;
    dns.set_srv(SRV_NAME, TTL, &[target(1, a), target(2, b)])
        .await;

    let gateway = start_gateway(gateway_config(&dns)).await;
    let admin = gateway.admin_addr().expect("an admin port");
    let url = format!("http://{}", gateway.local_addr());
    within(MARGIN, "the first answer reaching routing", || async {
        routed_nodes(admin).await.len() == 2
    })
    .await;

    let load = Load::start(url.clone());
    load.wait_for(50).await;
    dns.stop().await;
    let failures_metric = "meridian_gateway_discovery_failures_total{region=\"us-east\"}";
    within(
        Duration::from_secs(10),
        "resolution failures being counted",
        || async { metric(admin, failures_metric).await.unwrap_or(0.0) >= 2.0 },
    )
    .await;
    assert_eq!(
        routed_nodes(admin).await.len(),
        2,
        "a DNS outage keeps the last good nodes"
    );
    let (a0, b0) = (served(a).await, served(b).await);
    load.wait_for(100).await;
    assert!(
        served(a).await > a0 && served(b).await > b0,
        "both nodes still serve"
    );
    assert!(load.failures().is_empty(), "{:?}", load.failures());
    let failures = load.finish().await;
    assert!(failures.is_empty(), "{failures:?}");

    // The zone comes back without the service: an authoritative negative
    // answer, so the region has no node left.
    dns.set_srv(SRV_NAME, TTL, &[]).await;
    dns.restart().await;
    within(
        Duration::from_secs(10),
        "the empty answer reaching routing",
        || async { routed_nodes(admin).await.is_empty() },
    )
    .await;
    let res = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(
            &json!({ "model": TEST_MODEL, "messages": [{ "role": "user", "content": "anyone?" }] }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502, "a region without nodes cannot serve");
    let body: Value = res.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("us-east"),
        "{body}"
    );
}
