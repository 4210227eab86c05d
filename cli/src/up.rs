//! `meridian up`: a local three-region deployment with one gateway.
//!
//! Stores and nodes are child processes, each region's node started from
//! the config file written here, so a person can stop, kill and restart one
//! region's node while the rest keep serving. Pid files in the state
//! directory let the next start find whatever a killed run left behind.

mod banner;
pub(crate) mod node;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use meridian_gateway::{Gateway, RegionConfig};
use meridian_launcher::{
    MeshSection, PostgresOptions, PostgresServer, RedisOptions, RedisServer, RegionConfigFile,
    SimModel,
};

/// A region's node config, in `<state>/<region>/`.
const REGION_CONFIG_FILE: &str = "regional.toml";
/// The pid of a region's node, in `<state>/<region>/`.
const NODE_PID_FILE: &str = "node.pid";

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
    /// How long a region's node may take to start (migrations, loading the
    /// embedding model) before `meridian up` gives up.
    #[arg(long, default_value_t = 120)]
    node_start_timeout_secs: u64,
    /// How long a node gets to stop after SIGTERM before it is killed; also
    /// the bound for a node a previous run left behind.
    #[arg(long, default_value_t = 10)]
    node_stop_timeout_secs: u64,
    /// A TOML file of `[[models]]` and `[[aliases]]` every region serves
    /// besides the simulated ones: a hosted provider, a local vLLM. Keys
    /// named by `api_key_env` are read from the environment `meridian up`
    /// runs in, which the nodes inherit.
    #[arg(long)]
    models: Option<PathBuf>,
}

struct Region {
    name: String,
    redis: RedisServer,
    postgres: PostgresServer,
    node: Option<node::Node>,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("cannot create {}", args.state_dir.display()))?;
    let state_dir = args
        .state_dir
        .canonicalize()
        .with_context(|| format!("cannot open {}", args.state_dir.display()))?;
    let node_stop_timeout = Duration::from_secs(args.node_stop_timeout_secs);
    futures::future::try_join_all(
        args.regions
            .iter()
            .map(|name| stop_leftovers(&state_dir, name, node_stop_timeout)),
    )
    .await?;

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
    let models = match &args.models {
        Some(path) => extra_models(path)?,
        None => String::new(),
    };
    let mut configs = Vec::new();
    for (i, region) in regions.iter().enumerate() {
        let listen = addresses[i].1;
        let identity = meridian_mesh::Identity::region(&region.name).map_err(anyhow::Error::msg)?;
        let mesh = crate::certs::files(&certs_dir, &identity);
        let peers: Vec<_> = addresses
            .iter()
            .filter(|(n, _)| *n != region.name)
            .collect();
        configs.push(write_region_config(
            &state_dir,
            region,
            listen,
            &mesh,
            args.otlp_endpoint.as_deref(),
            &peers,
            &models,
        )?);
    }
    // Started here, not in spawned tasks: the parent-death signal a node
    // asks for follows the thread that forked it, and this one lives as
    // long as `meridian up`.
    let start_timeout = Duration::from_secs(args.node_start_timeout_secs);
    let nodes =
        futures::future::try_join_all(regions.iter().zip(&configs).map(|(r, config)| {
            let pid_file = state_dir.join(&r.name).join(NODE_PID_FILE);
            async move {
                node::start(&r.name, config, &pid_file, start_timeout, node_stop_timeout).await
            }
        }))
        .await?;
    for (region, node) in regions.iter_mut().zip(nodes) {
        let mut entry = RegionConfig::new(region.name.clone(), node.addr);
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

    let stop = crate::shutdown_signal()?;
    banner::print(&gateway, &regions, &state_dir, &api_key);
    stop.await;

    println!("stopping...");
    // Nodes first, while their stores still answer, then the gateway, then
    // the stores.
    futures::future::join_all(
        regions
            .iter_mut()
            .filter_map(|r| r.node.take())
            .map(|n| n.stop(node_stop_timeout)),
    )
    .await;
    gateway.shutdown();
    for region in &mut regions {
        region.postgres.stop().await.ok();
        region.redis.stop().await.ok();
    }
    println!("stopped");
    Ok(())
}

/// Stops what a killed earlier run left in the region's state directory:
/// the node first, while its stores still answer, then the stores.
async fn stop_leftovers(
    state_dir: &Path,
    name: &str,
    node_timeout: Duration,
) -> anyhow::Result<()> {
    let dir = state_dir.join(name);
    let found = [
        meridian_launcher::stop_leftover_node(
            &dir.join(NODE_PID_FILE),
            &dir.join(REGION_CONFIG_FILE),
            node_timeout,
        )
        .await,
        RedisServer::stop_leftover(&dir.join("redis")).await,
        PostgresServer::stop_leftover(&dir.join("postgres")).await,
    ];
    for leftover in found {
        if let Some(leftover) = leftover.with_context(|| format!("region {name}"))? {
            println!("{name}: {leftover}");
        }
    }
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
    models: &str,
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
    if !models.is_empty() {
        file = file.extra(models);
    }
    let path = state_dir.join(&region.name).join(REGION_CONFIG_FILE);
    let text = format!(
        "# Written by `meridian up`; rewritten at every start.\n{}",
        file.to_toml()
    );
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The `--models` file, checked before any node starts: TOML holding only
/// `models` and `aliases` (a node checks the tables themselves, naming the
/// key at fault).
fn extra_models(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --models {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("--models {} is not TOML", path.display()))?;
    if let Some(other) = table.keys().find(|k| *k != "models" && *k != "aliases") {
        anyhow::bail!(
            "--models {} may hold only [[models]] and [[aliases]] tables, not `{other}`",
            path.display()
        );
    }
    Ok(text)
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
