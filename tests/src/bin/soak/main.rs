//! `make soak` (or `SOAK_MINUTES=3 make soak`): three regions, each a
//! `meridian regional` process with its own Redis and PostgreSQL, and a
//! `meridian gateway` process in front, under mixed load (chat, streaming
//! chat, embeddings, telemetry ingest, jobs) for `SOAK_MINUTES` (default
//! 30), while a seeded schedule kills a region's node (SIGKILL) and starts
//! it again. Every `SOAK_SAMPLE_SECONDS` (default 10) it prints each
//! process's private memory (RssAnon), open descriptors and established TCP
//! connections (a process with its children: PostgreSQL's backends), and at
//! the end judges whether memory and descriptors stayed flat (`sample::flat`
//! states the rule), exiting 1 if not. `SOAK_SEED` replays a schedule;
//! `SOAK_KILL_SECONDS` (default 60) is the mean time between kills.

mod load;
mod sample;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meridian_launcher::{
    MeshSection, PostgresOptions, PostgresServer, RedisOptions, RedisServer, RegionConfigFile,
    SimModel,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use self::sample::Sample;

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A process the soak watches, and its readings since it last started.
struct Watched {
    name: String,
    pid: u32,
    series: Vec<Sample>,
    starts: u32,
}

impl Watched {
    fn new(name: &str, pid: u32) -> Self {
        Self {
            name: name.to_string(),
            pid,
            series: Vec::new(),
            starts: 1,
        }
    }
}

struct Region {
    name: String,
    config: PathBuf,
    url: String,
    node: Child,
    _redis: RedisServer,
    _postgres: PostgresServer,
}

fn spawn(bin: &Path, args: &[&str], log: &Path) -> std::io::Result<Child> {
    let log = std::fs::File::create(log)?;
    Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
}

async fn wait_healthy(http: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{url} did not become healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::main]
async fn main() {
    // The harness's reqwest is built without a crypto provider of its own.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let minutes = env_u64("SOAK_MINUTES", 30);
    let every = Duration::from_secs(env_u64("SOAK_SAMPLE_SECONDS", 10).max(1));
    let kill_mean = env_u64("SOAK_KILL_SECONDS", 60).max(10);
    let seed = env_u64("SOAK_SEED", rand::random());
    println!(
        "soak: {minutes} min, sample every {every:?}, a region killed every ~{kill_mean} s, seed {seed}"
    );
    let bin = std::env::var_os("MERIDIAN_BIN").map_or_else(
        || {
            std::env::current_exe()
                .expect("own path")
                .with_file_name("meridian")
        },
        PathBuf::from,
    );
    assert!(
        bin.exists(),
        "{} is missing: cargo build --bin meridian",
        bin.display()
    );
    let dir = tempfile::tempdir().expect("a state directory");
    let http = reqwest::Client::new();

    let ports: Vec<u16> = REGIONS
        .iter()
        .map(|_| meridian_launcher::free_port().expect("a free port"))
        .collect();
    let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let mut regions = Vec::new();
    for (i, name) in REGIONS.iter().enumerate() {
        let (redis, postgres) = tokio::join!(
            RedisServer::start(RedisOptions::default()),
            PostgresServer::start(PostgresOptions::default())
        );
        let (redis, postgres) = (
            redis.expect("redis starts"),
            postgres.expect("postgres starts"),
        );
        let peers = REGIONS
            .iter()
            .zip(&ports)
            .filter(|(n, _)| *n != name)
            .map(|(n, p)| (n.to_string(), addr(*p)))
            .collect();
        let toml = RegionConfigFile::new(name, addr(ports[i]), &redis.url(), &postgres.url())
            .mesh(MeshSection::Plaintext)
            .model(SimModel {
                prefill_us_per_token: Some(0),
                ..SimModel::new("sim-fast", 0, 0)
            })
            .model(SimModel::new("sim-slow", 20, 10))
            .embeddings(&meridian_tests::embedding_model_dir())
            .replication(peers, "")
            .to_toml();
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, toml).expect("the region's config is written");
        let node = spawn(
            &bin,
            &["regional", "--config", config.to_str().expect("utf-8")],
            &dir.path().join(format!("{name}.log")),
        )
        .expect("the node starts");
        regions.push(Region {
            name: name.to_string(),
            config,
            url: format!("http://{}", addr(ports[i])),
            node,
            _redis: redis,
            _postgres: postgres,
        });
    }
    for r in &regions {
        wait_healthy(&http, &r.url).await;
    }
    let (gw_port, admin_port) = (
        meridian_launcher::free_port().expect("a free port"),
        meridian_launcher::free_port().expect("a free port"),
    );
    let mut gw_toml = format!(
        "[server]\nlisten = \"127.0.0.1:{gw_port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n[mesh]\nplaintext = true\n"
    );
    for (name, port) in REGIONS.iter().zip(&ports) {
        gw_toml.push_str(&format!(
            "[[regions]]\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\n"
        ));
    }
    let gw_config = dir.path().join("gateway.toml");
    std::fs::write(&gw_config, gw_toml).expect("the gateway's config is written");
    let mut gateway = spawn(
        &bin,
        &["gateway", "--config", gw_config.to_str().expect("utf-8")],
        &dir.path().join("gateway.log"),
    )
    .expect("the gateway starts");
    wait_healthy(&http, &format!("http://127.0.0.1:{admin_port}")).await;

    let mut watched = vec![Watched::new("gateway", gateway.id())];
    for r in &regions {
        watched.push(Watched::new(&r.name, r.node.id()));
    }
    for r in &regions {
        watched.push(Watched::new(
            &format!("{}/redis", r.name),
            r._redis.pid().expect("redis runs"),
        ));
        watched.push(Watched::new(
            &format!("{}/pg", r.name),
            r._postgres.pid().expect("postgres runs"),
        ));
    }

    let started = Instant::now();
    let end = started + Duration::from_secs(minutes * 60);
    let counters = load::Counters::default();
    let load = load::run(format!("http://127.0.0.1:{gw_port}"), counters.clone(), end);

    let mut rng = StdRng::seed_from_u64(seed);
    let next_kill_in =
        |rng: &mut StdRng| Duration::from_secs(rng.random_range(kill_mean / 2..=kill_mean * 3 / 2));
    let mut next_kill = Instant::now() + next_kill_in(&mut rng);
    let mut next_sample = Instant::now();
    let mut kills = 0;
    while Instant::now() < end {
        if Instant::now() >= next_sample {
            next_sample += every;
            print_sample(started, &mut watched, &counters.take());
        }
        if Instant::now() >= next_kill {
            let i = rng.random_range(0..regions.len());
            let down_for = Duration::from_millis(rng.random_range(2_000..8_000));
            let r = &mut regions[i];
            println!(
                "t={:>5}s kill {} (down {:?})",
                started.elapsed().as_secs(),
                r.name,
                down_for
            );
            r.node.kill().ok();
            r.node.wait().ok();
            tokio::time::sleep(down_for).await;
            r.node = spawn(
                &bin,
                &["regional", "--config", r.config.to_str().expect("utf-8")],
                &dir.path().join(format!("{}.{kills}.log", r.name)),
            )
            .expect("the node starts again");
            wait_healthy(&http, &r.url).await;
            let w = watched
                .iter_mut()
                .find(|w| w.name == r.name)
                .expect("watched");
            *w = Watched {
                starts: w.starts + 1,
                ..Watched::new(&r.name, r.node.id())
            };
            kills += 1;
            next_kill = Instant::now() + next_kill_in(&mut rng);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let totals = load.await.expect("the load finishes");
    print_sample(started, &mut watched, &counters.take());

    println!("\nload: {totals}");
    println!(
        "verdict: per process, over its samples since it last started: the first third is \
         warm-up; the last third's median may exceed the second third's by max(20%, 16 MiB) of \
         private memory (RssAnon) and by max(20%, 16) descriptors, each per process of its tree"
    );
    let mut failed = !totals.every_kind_answered();
    if failed {
        println!("  FAIL: some kind of request never succeeded");
    }
    for w in &watched {
        match sample::flat(&w.series) {
            None => println!(
                "  {:<14} n/a: {} samples since its start #{} (6 needed)",
                w.name,
                w.series.len(),
                w.starts
            ),
            Some(Ok(())) => println!("  {:<14} flat ({} samples)", w.name, w.series.len()),
            Some(Err(e)) => {
                failed = true;
                println!("  {:<14} FAIL: {e}", w.name);
            }
        }
    }
    gateway.kill().ok();
    for r in &mut regions {
        r.node.kill().ok();
        r.node.wait().ok();
    }
    gateway.wait().ok();
    println!(
        "soak: {kills} region kills, seed {seed}: {}",
        if failed { "FAILED" } else { "passed" }
    );
    if failed {
        drop(regions);
        drop(dir);
        std::process::exit(1);
    }
}

fn print_sample(started: Instant, watched: &mut [Watched], interval: &load::Totals) {
    let tcp = sample::established();
    let children = sample::children();
    let mut line = format!("t={:>5}s", started.elapsed().as_secs());
    for w in watched.iter_mut() {
        match sample::tree(w.pid, &children, &tcp) {
            Some(s) => {
                w.series.push(s);
                line.push_str(&format!(
                    " | {} {:.0}M/{}p {}fd {}tcp",
                    w.name,
                    s.private_kb as f64 / 1024.0,
                    s.procs,
                    s.fds,
                    s.tcp
                ));
            }
            None => line.push_str(&format!(" | {} down", w.name)),
        }
    }
    println!("{line} || {interval}");
}
