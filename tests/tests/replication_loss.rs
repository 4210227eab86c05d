//! What a region's death costs, three regions each with its own Redis and
//! PostgreSQL and a fault proxy on every link between them:
//!
//! - what the dead region wrote reaches every survivor, also one whose own
//!   link from it was cut: the survivors relay its changes to each other;
//! - of its asynchronous writes, only those acknowledged within the
//!   replication lag measured before its death are lost, and what is lost
//!   is the tail of each conversation, never a turn from its middle.
//!
//! Randomised tests print their seed; `REPLICATION_SEED=<n>` replays one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_tests::replicated::{converged, conversation, seed, until};
use meridian_tests::{ClusterSandbox, Direction, TEST_MODEL, init_logging, metric};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::Mutex;

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const TENANT: &str = "default";
/// Relaying starts this long after a peer falls silent.
const RELAY_AFTER_MS: u64 = 1_000;
const LIMIT: Duration = Duration::from_secs(30);

/// Sends one turn of conversation `id` to the region at `url`; the answer's
/// status.
async fn turn(http: &reqwest::Client, url: &str, id: &str, content: &str, sync: bool) -> u16 {
    let mut req = http
        .post(format!("{url}/v1/chat/completions"))
        .header("x-meridian-tenant", TENANT)
        .header("x-meridian-conversation", id)
        .json(&json!({ "model": TEST_MODEL, "max_tokens": 4,
                       "messages": [{ "role": "user", "content": content }] }));
    if sync {
        req = req.header("x-meridian-durability", "sync");
    }
    match req.send().await {
        Ok(res) => {
            let status = res.status().as_u16();
            let _: Value = res.json().await.unwrap_or_default();
            status
        }
        Err(_) => 0,
    }
}

/// Three regions, every link proxied; the home, then the other two in a
/// seeded order.
async fn start(seed: u64, extra: &str) -> (ClusterSandbox, [&'static str; 3]) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order = REGIONS;
    order.shuffle(&mut rng);
    let extra = format!("relay_after_ms = {RELAY_AFTER_MS}\n{extra}");
    let cluster =
        ClusterSandbox::start_replicated_with_proxies(&REGIONS, &extra, seed, |_, _| {}).await;
    (cluster, order)
}

/// Returns once a turn written in `home` is in every region: each follows
/// every log (a region still bootstrapping copies whole snapshots instead).
async fn warm_up(cluster: &ClusterSandbox, home: &str, seed: u64) {
    let url = cluster
        .regions
        .iter()
        .find(|r| r.name == home)
        .expect("the home region")
        .url();
    let warm = format!("warm-up ({seed})");
    let http = reqwest::Client::new();
    assert_eq!(turn(&http, &url, "warm-up", &warm, false).await, 200);
    until(LIMIT, "every region has the warm-up turn", || {
        let (regions, warm) = (&cluster.regions, &warm);
        async move {
            for r in regions {
                let stored = conversation(&r.url(), TENANT, "warm-up").await;
                if !stored.is_some_and(|s| s.contains(warm)) {
                    return false;
                }
            }
            true
        }
    })
    .await;
}

/// Kills `home` as a lost data centre: its links go first (what was in
/// flight on them is lost), then its node and its PostgreSQL.
fn kill(cluster: &mut ClusterSandbox, home: &str) {
    cluster.links().partition(home);
    let dead = cluster.region(home);
    dead.kill_node();
    dead.postgres.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_regions_writes_reach_a_survivor_cut_off_from_it_through_the_other() {
    init_logging();
    let seed = seed("REPLICATION_SEED");
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut cluster, [home, reached, cut]) = start(seed, "sync_timeout_ms = 30000\n").await;
    println!("home {home}; {reached} hears it, {cut} does not");
    // First every region follows every log: one with an empty database
    // would otherwise copy a whole snapshot, turns included, from `reached`.
    warm_up(&cluster, home, seed).await;
    let http = reqwest::Client::new();
    let url = cluster.region(home).url();
    // Nothing from the home reaches `cut` from now on, directly.
    cluster.links().cut_one_way(home, cut);

    // Synchronous turns: each is confirmed by `reached`, the only peer that
    // can apply it.
    let conversations = rng.random_range(1..=3);
    let turns = rng.random_range(2..=6);
    let mut acknowledged: Vec<Vec<String>> = vec![Vec::new(); conversations];
    for n in 0..turns {
        let c = rng.random_range(0..conversations);
        let content = format!("turn {n} of relay-{c} ({seed})");
        let status = turn(&http, &url, &format!("relay-{c}"), &content, true).await;
        assert_eq!(status, 200, "turn {n}");
        acknowledged[c].push(content);
    }
    kill(&mut cluster, home);

    let survivors: Vec<_> = cluster.regions.iter().filter(|r| r.name != home).collect();
    let cut_url = survivors
        .iter()
        .find(|r| r.name == cut)
        .expect("a survivor")
        .url();
    until(
        LIMIT,
        "every acknowledged turn in the cut-off survivor",
        || {
            let (url, acknowledged) = (&cut_url, &acknowledged);
            async move {
                for (c, turns) in acknowledged.iter().enumerate() {
                    if turns.is_empty() {
                        continue;
                    }
                    let stored = conversation(url, TENANT, &format!("relay-{c}")).await;
                    let users: Vec<String> = stored
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|m| m.ends_with(&format!("({seed})")))
                        .collect();
                    if users != *turns {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    until(LIMIT, "the survivors converge", || {
        converged(survivors.iter().copied())
    })
    .await;
    // Through the relay: the direct link stayed cut.
    let relayed = metric(
        &format!("{cut_url}/metrics"),
        "meridian_replication_relayed_changes_total",
        &[&format!("origin=\"{home}\""), &format!("via=\"{reached}\"")],
    )
    .await;
    assert!(
        relayed > 0.0,
        "{cut} relayed nothing of {home} from {reached}"
    );
}

/// One acknowledged write: which writer, its content, and when its answer
/// came.
struct Acked {
    writer: usize,
    content: String,
    at: Instant,
}

/// The cumulative buckets (upper bound, count) of
/// `meridian_replication_apply_delay_seconds` for `peer` in the region at
/// `url`.
async fn apply_delays(url: &str, peer: &str) -> Vec<(f64, f64)> {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let label = format!("peer=\"{peer}\"");
    text.lines()
        .filter(|l| l.starts_with("meridian_replication_apply_delay_seconds_bucket{"))
        .filter(|l| l.contains(&label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// The longest apply delay among the samples taken between `before` and
/// `after` (two reads of [`apply_delays`]), rounded up to its bucket;
/// `None` when there were none.
fn longest_between(before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<f64> {
    let count = |buckets: &[(f64, f64)], le: f64| {
        buckets
            .iter()
            .find(|(b, _)| *b == le)
            .map_or(0.0, |(_, n)| *n)
    };
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| (*le, n - count(before, *le)))
        .collect();
    let total = count(&delta, f64::INFINITY);
    if total == 0.0 {
        return None;
    }
    delta
        .iter()
        .filter(|(_, n)| *n >= total)
        .map(|(le, _)| *le)
        .reduce(f64::min)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn asynchronous_losses_are_bounded_by_the_measured_lag() {
    init_logging();
    let seed = seed("REPLICATION_SEED");
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut cluster, [home, a, b]) = start(seed, "").await;
    // A slow way out of the home, so that at any moment a measurable tail of
    // its log is on the wire and dies with it.
    let delay = Duration::from_millis(rng.random_range(100..=150));
    for peer in [a, b] {
        cluster
            .links()
            .get(peer, home)
            .delay(Direction::BtoA, delay);
    }
    let writers = rng.random_range(3..=5);
    let run_for = Duration::from_millis(rng.random_range(1_500..=3_000));
    println!("home {home}, link delay {delay:?}, {writers} writers for {run_for:?}");

    warm_up(&cluster, home, seed).await;
    // The lag is measured over the run only: the catch-up after start is
    // not what the kill interrupts.
    let mut before = Vec::new();
    for peer in [a, b] {
        let s = cluster
            .regions
            .iter()
            .find(|r| r.name == peer)
            .expect("a peer");
        before.push(apply_delays(&s.url(), home).await);
    }
    let url = cluster.region(home).url();
    let acked = Arc::new(Mutex::new(Vec::<Acked>::new()));
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let (url, acked) = (url.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for n in 0.. {
                let content = format!("turn {n} of loss-{writer} ({seed})");
                let status = turn(&http, &url, &format!("loss-{writer}"), &content, false).await;
                if status != 200 {
                    // The region is gone; an unanswered turn was never
                    // acknowledged.
                    return;
                }
                let at = Instant::now();
                acked.lock().await.push(Acked {
                    writer,
                    content,
                    at,
                });
            }
        }));
    }
    tokio::time::sleep(run_for).await;
    let killed_at = Instant::now();
    kill(&mut cluster, home);
    for t in tasks {
        t.await.expect("a writer ends once its region is gone");
    }

    let survivors: Vec<_> = cluster.regions.iter().filter(|r| r.name != home).collect();
    until(LIMIT, "the survivors converge", || {
        converged(survivors.iter().copied())
    })
    .await;
    // The lag as the survivors measured it, over every change of the home
    // they applied during the run.
    let mut lag: f64 = 0.0;
    for (peer, before) in [a, b].iter().zip(&before) {
        let s = survivors
            .iter()
            .find(|r| r.name == *peer)
            .expect("a survivor");
        let after = apply_delays(&s.url(), home).await;
        let measured = longest_between(before, &after);
        lag = lag.max(measured.expect("the survivor applied the home's changes"));
    }
    assert!(lag.is_finite(), "a change took longer than every bucket");
    let lag = Duration::from_secs_f64(lag);

    let acked = acked.lock().await;
    let url = survivors[0].url();
    let (mut lost, mut oldest_lost) = (0, None::<Duration>);
    for writer in 0..writers {
        let id = format!("loss-{writer}");
        let stored: Vec<String> = conversation(&url, TENANT, &id)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.ends_with(&format!("({seed})")))
            .collect();
        let mine: Vec<&Acked> = acked.iter().filter(|w| w.writer == writer).collect();
        // Stored turns are a prefix of the acknowledged ones: a hole would
        // be a write lost while a later one survived.
        assert!(
            stored.len() <= mine.len() && stored.iter().zip(&mine).all(|(s, m)| *s == m.content),
            "{id}: stored {stored:?} is not a prefix of what was acknowledged"
        );
        for m in &mine[stored.len()..] {
            let before_kill = killed_at.saturating_duration_since(m.at);
            assert!(
                before_kill <= lag,
                "{id}: {:?}, acknowledged {before_kill:?} before the kill, is lost, \
                 but the measured lag was {lag:?}",
                m.content
            );
            lost += 1;
            oldest_lost = oldest_lost.max(Some(before_kill));
        }
    }
    println!(
        "{} writes acknowledged, {lost} lost (the oldest {oldest_lost:?} before the kill); \
         measured lag at most {lag:?}",
        acked.len()
    );
    assert!(!acked.is_empty(), "no write was acknowledged");
}
