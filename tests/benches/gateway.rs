//! Edge overhead, side by side in one run on one machine: the same chat
//! completion sent straight to a region, through HAProxy doing plain
//! round-robin proxying (HTTP/1.1 keep-alive upstream, like the gateway for HTTP), and through the
//! Meridian gateway. Reports added latency at a fixed request rate and the
//! saturation throughput of each.
//!
//! Run with `make bench` or `cargo bench -p meridian-tests --bench gateway`.
//! `BENCH_RATE` (default 2000 req/s), `BENCH_SECONDS` (default 5) and
//! `BENCH_CONCURRENCY` (default 32) tune it. HAProxy comes from Debian
//! (`infra/scripts/setup.sh` installs it); without it that column is skipped.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meridian_tests::ClusterSandbox;
use meridian_tests::load::{Load, env_or, ms, percentile};

struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_haproxy(region: SocketAddr) -> Option<Haproxy> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let dir = tempfile::tempdir().ok()?;
    let config = dir.path().join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n  nbthread 1\n  maxconn 4096\n\
             defaults\n  mode http\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n\
             frontend edge\n  bind 127.0.0.1:{port}\n  default_backend regions\n\
             backend regions\n  balance roundrobin\n  server r1 {region}\n"
        ),
    )
    .ok()?;
    let child = Command::new("haproxy")
        .arg("-f")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Some(Haproxy {
                child,
                _dir: dir,
                addr,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[tokio::main]
async fn main() {
    let rate = env_or("BENCH_RATE", 2000);
    let seconds = env_or("BENCH_SECONDS", 5);
    let concurrency = env_or("BENCH_CONCURRENCY", 32);
    // One proxy thread each, so neither takes the other's core. The gateway
    // does all its work: API keys, rate limits shared through Redis, health
    // checks, geo, metrics.
    let mut plain_config = None;
    let sandbox = ClusterSandbox::start_with_regions(&["us-east"], |regions, c| {
        c.threads = 1;
        plain_config = Some(c.clone());
        c.auth = Some(meridian_gateway::AuthConfig::new(regions[0].postgres.url()));
        c.rate_limit.redis_url = Some(regions[0].redis.url());
    })
    .await;
    // The same gateway without its optional work, and with limits kept
    // locally instead of in Redis, to show what each costs.
    let plain_config = plain_config.expect("the sandbox ran the closure");
    let plain = meridian_tests::start_gateway(plain_config.clone()).await;
    let mut local_config = plain_config;
    local_config.auth = Some(meridian_gateway::AuthConfig::new(
        sandbox.regions[0].postgres.url(),
    ));
    let local = meridian_tests::start_gateway(local_config).await;
    let pool = sqlx::PgPool::connect(&sandbox.regions[0].postgres.url())
        .await
        .unwrap();
    let limits = meridian_regional::tenancy::TenantLimits {
        requests_per_second: Some(1_000_000),
        tokens_per_minute: Some(1_000_000_000),
    };
    meridian_regional::tenancy::create_tenant(&pool, "bench", limits)
        .await
        .unwrap();
    let key = meridian_regional::tenancy::create_api_key(&pool, "bench")
        .await
        .unwrap();
    let load = Load::new().with_key(&key);
    // Wait for the gateway to load the key.
    let probe = reqwest::Client::new();
    for gateway in [sandbox.gateway_addr(), local.local_addr()] {
        let chat = format!("http://{gateway}/v1/chat/completions");
        while !load.one(&probe, &chat).await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let region = sandbox.regions[0].addr();
    let haproxy = start_haproxy(region);
    if haproxy.is_none() {
        println!(
            "haproxy not found or did not start: run infra/scripts/setup.sh; its column is skipped"
        );
    }
    let path = "/v1/chat/completions";
    let mut targets = vec![("direct", format!("http://{region}{path}"))];
    if let Some(h) = &haproxy {
        targets.push(("haproxy", format!("http://{}{path}", h.addr)));
    }
    targets.push(("gw-plain", format!("http://{}{path}", plain.local_addr())));
    targets.push(("gw-local", format!("http://{}{path}", local.local_addr())));
    targets.push(("gw-redis", format!("{}{path}", sandbox.gateway_url())));

    for (_, url) in &targets {
        load.saturation(url, 4, 1).await;
    }
    println!(
        "fixed rate {rate} req/s for {seconds} s each (sim at zero latency, 1 proxy thread)\n\
         gw-plain: routing, health, metrics; gw-local: + API keys and in-process limits; \
         gw-redis: + limits shared through Redis"
    );
    println!(
        "{:<9} {:>9} {:>9} {:>12} {:>12} {:>9}",
        "target", "p50 ms", "p99 ms", "added p50", "added p99", "failed"
    );
    let mut base = None;
    for (name, url) in &targets {
        let (lat, failed) = load.fixed_rate(url, rate, seconds).await;
        let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
        let (b50, b99) = *base.get_or_insert((p50, p99));
        println!(
            "{name:<9} {:>9.3} {:>9.3} {:>12.3} {:>12.3} {failed:>9}",
            ms(p50),
            ms(p99),
            ms(p50) - ms(b50),
            ms(p99) - ms(b99),
        );
    }
    println!("saturation, {concurrency} concurrent clients, {seconds} s each");
    let mut results = Vec::new();
    for (name, url) in &targets {
        let rps = load.saturation(url, concurrency, seconds).await;
        results.push((name, rps));
    }
    let direct = results[0].1;
    let haproxy_rps = results.iter().find(|(n, _)| **n == "haproxy").map(|r| r.1);
    for (name, rps) in &results {
        let vs_haproxy = haproxy_rps
            .map(|h| format!(" ({:.2} of haproxy)", rps / h))
            .unwrap_or_default();
        println!(
            "{name:<9} {rps:>9.0} req/s ({:.2} of direct){vs_haproxy}",
            rps / direct
        );
    }
}
