//! `meridian up`: a local three-region deployment with one gateway.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use meridian_gateway::{Gateway, RegionConfig};
use meridian_launcher::{
    MeshSection, PostgresOptions, PostgresServer, RedisOptions, RedisServer, RegionConfigFile,
    SimModel,
};
use meridian_regional::RegionalNode;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Where Redis and PostgreSQL keep their data between runs.
    #[arg(long, default_value = ".meridian")]
    state_dir: PathBuf,
    /// The gateway's port on 127.0.0.1.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The gateway's admin port (`/metrics`, `/routing`, `/readyz`).
    #[arg(long, default_value_t = 9080)]
    admin_port: u16,
    /// First regional API port; the regions take consecutive ports.
    #[arg(long, default_value_t = 7101)]
    region_port: u16,
    /// OTLP/gRPC collector the gateway and regions send traces to, e.g.
    /// http://127.0.0.1:4317 (a local Jaeger or OpenTelemetry Collector).
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Regions to start.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "us-east,eu-west,ap-south"
    )]
    regions: Vec<String>,
}

struct Region {
    name: String,
    redis: RedisServer,
    postgres: PostgresServer,
    node: Option<RegionalNode>,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("cannot create {}", args.state_dir.display()))?;
    let state_dir = args
        .state_dir
        .canonicalize()
        .with_context(|| format!("cannot open {}", args.state_dir.display()))?;

    // Stores start concurrently: initdb dominates and runs in child processes.
    let mut regions = futures::future::try_join_all(
        args.regions
            .iter()
            .map(|name| start_stores(&state_dir, name)),
    )
    .await?;

    // Internal hops use mutual TLS, as in production: a development CA and
    // certificates, made on the first run and kept in the state directory.
    let certs_dir = state_dir.join("certs");
    let gateway_identity = meridian_mesh::Identity::gateway("local").map_err(anyhow::Error::msg)?;
    let operator = meridian_mesh::Identity::operator("admin").map_err(anyhow::Error::msg)?;
    let mut identities = crate::certs::identities(&args.regions, &[], &[])?;
    identities.extend([gateway_identity.clone(), operator]);
    crate::certs::ensure_local(&certs_dir, &identities)?;

    let mut gateway_regions = Vec::new();
    let addresses: Vec<(String, SocketAddr)> = regions
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let port = args.region_port + i as u16;
            (r.name.clone(), SocketAddr::from(([127, 0, 0, 1], port)))
        })
        .collect();
    for (i, region) in regions.iter_mut().enumerate() {
        let listen = addresses[i].1;
        let identity = meridian_mesh::Identity::region(&region.name).map_err(anyhow::Error::msg)?;
        let mesh = crate::certs::files(&certs_dir, &identity);
        let peers: Vec<_> = addresses
            .iter()
            .filter(|(n, _)| *n != region.name)
            .collect();
        let config_path = write_region_config(
            &state_dir,
            region,
            listen,
            &mesh,
            args.otlp_endpoint.as_deref(),
            &peers,
        )?;
        let config = meridian_regional::Config::from_file(&config_path)?;
        let node = RegionalNode::start(config)
            .await
            .with_context(|| format!("region {}", region.name))?;
        let mut entry = RegionConfig::new(region.name.clone(), node.local_addr());
        if let Some((lat, lon)) = meridian_launcher::local_location(&region.name) {
            entry = entry.at(lat, lon);
        }
        gateway_regions.push(entry);
        region.node = Some(node);
    }
    let listen = SocketAddr::from(([127, 0, 0, 1], args.port));
    let mut gateway_config = meridian_gateway::Config::builder(listen, gateway_regions);
    gateway_config.shutdown_grace = std::time::Duration::from_secs(1);
    gateway_config.admin_listen = Some(SocketAddr::from(([127, 0, 0, 1], args.admin_port)));
    // Local clients may say where they are, to try geo routing by hand.
    gateway_config.geo.trusted_proxies = vec!["127.0.0.0/8".parse().expect("a valid network")];
    gateway_config.mesh =
        meridian_gateway::MeshConfig::tls(crate::certs::files(&certs_dir, &gateway_identity));
    // Keys and limits live in the first region's stores; replication
    // carries the keys to every region.
    let home = &regions[0];
    gateway_config.auth = Some(meridian_gateway::AuthConfig::new(home.postgres.url()));
    gateway_config.rate_limit.redis_url = Some(home.redis.url());
    if let Some(endpoint) = &args.otlp_endpoint {
        gateway_config.tracing = meridian_mesh::TraceConfig::otlp(endpoint.clone());
    }
    let api_key = local_api_key(&state_dir, &home.postgres.url()).await?;
    let gateway = Gateway::start(gateway_config.build()?)?;

    print_banner(&gateway, &regions, &api_key);
    if let Some(node) = regions.first().and_then(|r| r.node.as_ref()) {
        let c = certs_dir.display();
        println!("Regions accept mutual TLS only (certificates in {c}); as an operator:");
        println!(
            "  grpcurl -cacert {c}/ca.pem -cert {c}/operator-admin.pem -key {c}/operator-admin.key {} meridian.v1.Admin/RegionStatus",
            node.local_addr()
        );
        println!();
    }
    crate::shutdown_signal().await;

    println!("stopping...");
    gateway.shutdown();
    for region in &mut regions {
        if let Some(node) = region.node.take()
            && let Err(e) = node.shutdown().await
        {
            tracing::warn!(region = %region.name, error = %e, "node shutdown");
        }
        region.postgres.stop().await.ok();
        region.redis.stop().await.ok();
    }
    println!("stopped");
    Ok(())
}

async fn start_stores(state_dir: &Path, name: &str) -> anyhow::Result<Region> {
    let dir = state_dir.join(name);
    let redis = RedisServer::start(RedisOptions {
        dir: Some(dir.join("redis")),
        appendonly: true,
        ..RedisOptions::default()
    })
    .await
    .with_context(|| format!("region {name}: redis"))?;
    let postgres = PostgresServer::start(PostgresOptions {
        dir: Some(dir.join("postgres")),
        ..PostgresOptions::default()
    })
    .await
    .with_context(|| format!("region {name}: postgres"))?;
    Ok(Region {
        name: name.to_string(),
        redis,
        postgres,
        node: None,
    })
}

/// Writes the region's config where an operator can read (and copy) it.
fn write_region_config(
    state_dir: &Path,
    region: &Region,
    listen: SocketAddr,
    mesh: &meridian_mesh::CertFiles,
    otlp_endpoint: Option<&str>,
    peers: &[&(String, SocketAddr)],
) -> anyhow::Result<PathBuf> {
    let large = SimModel {
        context_window_tokens: Some(32_768),
        max_concurrency: Some(16),
        ..SimModel::new("sim-large", 80, 20)
    };
    let mut file = RegionConfigFile::new(
        &region.name,
        listen,
        &region.redis.url(),
        &region.postgres.url(),
    )
    .shutdown_grace_ms(1000)
    .mesh(MeshSection::Tls {
        ca: mesh.ca_path.clone(),
        cert: mesh.cert_path.clone(),
        key: mesh.key_path.clone(),
    })
    .model(SimModel::new("sim-small", 20, 5))
    .model(large)
    // Every region pulls every other region's changes (tenants, keys).
    .replication(peers.iter().map(|p| (p.0.clone(), p.1)).collect(), "");
    if let Some(dir) = embeddings_dir() {
        file = file.embeddings(&dir);
    }
    if let Some(endpoint) = otlp_endpoint {
        file = file.otlp_endpoint(endpoint);
    }
    let path = state_dir.join(&region.name).join("regional.toml");
    let text = format!(
        "# Written by `meridian up`; rewritten at every start.\n{}",
        file.to_toml()
    );
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The built-in embedding model, when `infra/scripts/setup.sh` has put its
/// weights where `make up` runs; without them the regions serve chat only.
fn embeddings_dir() -> Option<PathBuf> {
    let dir = Path::new(".meridian/models/all-minilm-l6-v2");
    match dir.canonicalize() {
        Ok(dir) if dir.join("model.safetensors").is_file() => Some(dir),
        _ => {
            tracing::warn!(dir = %dir.display(), "no embedding model; run infra/scripts/setup.sh for /v1/embeddings");
            None
        }
    }
}

/// The key of the `local` tenant: made once, then kept in the state
/// directory so it survives restarts along with the database that knows it.
async fn local_api_key(state_dir: &Path, postgres_url: &str) -> anyhow::Result<String> {
    let path = state_dir.join("api-key");
    if let Ok(key) = std::fs::read_to_string(&path) {
        // A key left by an older run may have been written with the umask.
        meridian_mesh::keep_private(&path).map_err(anyhow::Error::msg)?;
        return Ok(key.trim().to_string());
    }
    let pool = sqlx::PgPool::connect(postgres_url)
        .await
        .context("cannot reach the first region's postgres to create an API key")?;
    meridian_regional::tenancy::create_tenant(&pool, "local", Default::default()).await?;
    let key = meridian_regional::tenancy::create_api_key(&pool, "local").await?;
    pool.close().await;
    meridian_mesh::write_private(&path, &key).map_err(anyhow::Error::msg)?;
    Ok(key)
}

fn print_banner(gateway: &Gateway, regions: &[Region], api_key: &str) {
    let addr = gateway.local_addr();
    println!();
    println!(
        "Meridian is up: {} regions behind http://{addr}",
        regions.len()
    );
    println!();
    for r in regions {
        let api = r
            .node
            .as_ref()
            .map(|n| n.local_addr().to_string())
            .unwrap_or_default();
        let time_series = r.node.as_ref().map_or("-", |n| n.time_series_mode());
        println!(
            "  {:<10} api {api:<16} redis {:<28} postgres {}  time series {time_series}",
            r.name,
            r.redis.url(),
            r.postgres.url()
        );
    }
    if regions
        .iter()
        .any(|r| r.node.as_ref().map(|n| n.time_series_mode()) == Some("pg_partman"))
    {
        println!();
        println!(
            "Time series on pg_partman: TimescaleDB is not installed in this PostgreSQL \
             (infra/scripts/setup.sh installs it; see the README)."
        );
    }
    let body =
        r#"{"model":"sim-small","messages":[{"role":"user","content":"Hello from the edge"}]}"#;
    let auth = format!("-H 'authorization: Bearer {api_key}'");
    let json = "-H 'content-type: application/json'";
    let url = format!("http://{addr}/v1/chat/completions");
    let last = regions.last().map(|r| r.name.as_str()).unwrap_or("us-east");
    println!();
    println!("API key of the `local` tenant (kept in .meridian/api-key); for OpenAI SDKs:");
    println!("  export OPENAI_API_KEY={api_key} OPENAI_BASE_URL=http://{addr}/v1");
    println!("Chat completion (OpenAI-compatible):");
    println!("  curl -s {url} {auth} {json} -d '{body}'");
    println!("Pin a region and see which one served it:");
    let pin = meridian_gateway::REGION_HEADER;
    println!("  curl -si {url} {auth} -H '{pin}: {last}' {json} -d '{body}'");
    println!("Pretend to be in Paris (loopback is a trusted proxy here):");
    let country = meridian_gateway::COUNTRY_HEADER;
    println!("  curl -si {url} {auth} -H '{country}: FR' {json} -d '{body}'");
    println!("gRPC through the gateway:");
    println!(
        "  grpcurl -plaintext -H 'authorization: Bearer {api_key}' -d '{body}' {addr} meridian.v1.Inference/Generate"
    );
    if let Some(admin) = gateway.admin_addr() {
        println!("Gateway admin: http://{admin}/routing  /metrics  /readyz");
    }
    println!();
    println!("Ctrl-C stops everything.");
}
