//! Regions and a gateway on free loopback ports, with their real stores.

use std::net::SocketAddr;

use meridian_gateway::{ConfigBuilder as GatewayConfig, Gateway, RegionConfig};
use meridian_launcher::{
    MeshSection, PostgresOptions, PostgresServer, RedisOptions, RedisServer, RegionConfigFile,
    SimModel,
};
use meridian_regional::{Config, RegionalNode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::fault_proxy::{FaultProxy, Link, Links};

/// The model every sandbox region serves: the simulator without delays, so
/// tests wait for nothing but the system itself.
pub const TEST_MODEL: &str = "sim-fast";
/// A second model that takes its time: 50 ms to the first token, 150 ms per
/// token after it, for tests of streaming and in-flight behaviour.
pub const TEST_SLOW_MODEL: &str = "sim-slow";

/// Where `infra/scripts/setup.sh` puts the built-in embedding model (the
/// node's default `embeddings.model_dir`), found from this crate so tests
/// get the same files whatever their working directory.
pub fn embedding_model_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.meridian/models/all-minilm-l6-v2")
}

/// One region: its Redis, its PostgreSQL and its node.
pub struct RegionSandbox {
    /// The region's name.
    pub name: String,
    // Fields drop in order: the node before the stores it uses, so it is
    // gone before they are, as when a region's host dies.
    node: Option<NodeHandle>,
    /// The region's own Redis.
    pub redis: RedisServer,
    /// The region's own PostgreSQL.
    pub postgres: PostgresServer,
    addr: Option<SocketAddr>,
    extra_config: String,
    /// Its peers and more `[replication]` keys, once the cluster named them.
    replication: Option<(Vec<(String, SocketAddr)>, String)>,
}

/// A node and the runtime it runs on.
struct NodeHandle {
    runtime: Option<tokio::runtime::Runtime>,
    node: Option<RegionalNode>,
    addr: SocketAddr,
}

/// How long a dropped node's threads get to drop its tasks; they only
/// drop futures, which takes milliseconds unless a task blocks.
const NODE_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Numbers the extra nodes' config files, so they never share one.
static EXTRA_NODES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Starts a node from its config file on a runtime of its own, so dropping
/// the handle ends it the way a crash would: every socket closed at once,
/// nothing flushed.
async fn spawn_node(region: &str, path: &std::path::Path) -> NodeHandle {
    let config = Config::from_file(path).unwrap_or_else(|e| panic!("region {region}: {e}"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(format!("region-{region}"))
        .enable_all()
        .build()
        .expect("a runtime for the node");
    let node = runtime
        .spawn(RegionalNode::start(config))
        .await
        .expect("node start does not panic")
        .unwrap_or_else(|e| panic!("region {region}: {e}"));
    NodeHandle {
        addr: node.local_addr(),
        runtime: Some(runtime),
        node: Some(node),
    }
}

/// Shuts a node down gracefully: in-flight requests finish, then it stops.
async fn stop_node(region: &str, mut handle: NodeHandle) {
    let node = handle.node.take().expect("a running node");
    let runtime = handle.runtime.as_ref().expect("a running node");
    runtime
        .spawn(node.shutdown())
        .await
        .expect("node shutdown does not panic")
        .unwrap_or_else(|e| panic!("region {region}: {e}"));
}

/// An extra node of a region, from [`RegionSandbox::start_extra_node`].
pub struct RegionNode {
    handle: Option<NodeHandle>,
    region: String,
}

impl RegionNode {
    /// The node's API address (HTTP and gRPC).
    pub fn addr(&self) -> SocketAddr {
        self.handle.as_ref().expect("the node runs").addr
    }

    /// `http://` URL of the node's API.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Shuts the node down gracefully.
    pub async fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            stop_node(&self.region, handle).await;
        }
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        // Dropping the runtime's tasks closes the node's listener and every
        // connection at once, as a crash would. The caller waits until the
        // node's threads have dropped them all, so no part of the node still
        // runs while the test (or the rest of the teardown) goes on; the
        // wait happens on a thread of its own because the caller may be on
        // the test's runtime, where tokio forbids blocking shutdowns.
        if let Some(runtime) = self.runtime.take() {
            std::thread::scope(|s| {
                s.spawn(|| runtime.shutdown_timeout(NODE_STOP_TIMEOUT));
            });
        }
        drop(self.node.take());
    }
}

impl RegionSandbox {
    /// Starts Redis, PostgreSQL and a node for `name`.
    pub async fn start(name: &str) -> Self {
        Self::start_with_config(name, "").await
    }

    /// Like [`RegionSandbox::start`], with `extra` TOML tables appended to the
    /// node's config (e.g. `"[jobs]\nworkers = 2\n"`).
    pub async fn start_with_config(name: &str, extra: &str) -> Self {
        let (redis, postgres) = tokio::join!(
            RedisServer::start(RedisOptions::default()),
            PostgresServer::start(PostgresOptions::default())
        );
        let mut region = Self {
            name: name.to_string(),
            redis: redis.unwrap_or_else(|e| panic!("region {name}: {e}")),
            postgres: postgres.unwrap_or_else(|e| panic!("region {name}: {e}")),
            node: None,
            addr: None,
            extra_config: extra.to_string(),
            replication: None,
        };
        region.start_node().await;
        region
    }

    /// The node's config, as a TOML text pointing at this region's stores.
    pub fn config_toml(&self, listen: SocketAddr) -> String {
        let sim = |id: &str, ttft_ms, per_token_ms| SimModel {
            prefill_us_per_token: Some(0),
            ..SimModel::new(id, ttft_ms, per_token_ms)
        };
        // Plain text unless the test brings its own `[mesh]`: most tests
        // are about something else and start faster without TLS.
        let mesh = if self
            .extra_config
            .lines()
            .any(|l| l.trim_start().starts_with("[mesh"))
        {
            MeshSection::Omitted
        } else {
            MeshSection::Plaintext
        };
        // A leading `[server]` table of the extra config joins the file's
        // own, which TOML allows only once.
        let (server, extra) = match self.extra_config.trim_start().strip_prefix("[server]") {
            Some(rest) => match rest.find("\n[") {
                Some(end) => (&rest[..end], &rest[end..]),
                None => (rest, ""),
            },
            None => ("", self.extra_config.as_str()),
        };
        let file =
            RegionConfigFile::new(&self.name, listen, &self.redis.url(), &self.postgres.url())
                .shutdown_grace_ms(2000)
                .connect_timeout_ms(2000)
                .postgres_max_connections(5)
                .model(sim(TEST_MODEL, 0, 0))
                .model(sim(TEST_SLOW_MODEL, 50, 150))
                .mesh(mesh)
                .server_keys(server.trim())
                .extra(extra);
        match &self.replication {
            Some((peers, settings)) => file.replication(peers.clone(), settings),
            None => file,
        }
        .to_toml()
    }

    /// Starts the node, on the port it had before if it ran already. The node
    /// gets a runtime of its own, so [`RegionSandbox::kill_node`] can end it
    /// the way a crash would: every socket closed at once, nothing flushed.
    pub async fn start_node(&mut self) {
        assert!(self.node.is_none(), "region {} already runs", self.name);
        let listen = self
            .addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        // From a file, as `meridian regional` reads it, so that
        // `POST /admin/reload` has one to read again.
        let path = self.config_path();
        std::fs::write(&path, self.config_toml(listen)).expect("the node's config is written");
        let handle = spawn_node(&self.name, &path).await;
        self.addr = Some(handle.addr);
        self.node = Some(handle);
    }

    /// Starts another node of this region on a free port: the same Redis,
    /// PostgreSQL and config, as a region scaled out runs. The region's own
    /// node is unaffected; dropping the handle kills the extra one.
    pub async fn start_extra_node(&self) -> RegionNode {
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let path = self.postgres.dir().join(format!(
            "regional-extra-{}.toml",
            EXTRA_NODES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&path, self.config_toml(listen)).expect("the node's config is written");
        RegionNode {
            handle: Some(spawn_node(&self.name, &path).await),
            region: self.name.clone(),
        }
    }

    /// The node's config file (in the region's PostgreSQL directory).
    pub fn config_path(&self) -> std::path::PathBuf {
        self.postgres.dir().join("regional.toml")
    }

    /// Replaces the extra TOML and rewrites the config file; the running
    /// node sees it at `POST /admin/reload` (models and aliases) or restart.
    pub fn rewrite_config(&mut self, extra: &str) {
        self.extra_config = extra.to_string();
        std::fs::write(self.config_path(), self.config_toml(self.addr()))
            .expect("the node's config is written");
    }

    /// Shuts the node down gracefully; its stores keep running.
    pub async fn stop_node(&mut self) {
        if let Some(handle) = self.node.take() {
            stop_node(&self.name, handle).await;
        }
    }

    /// Wipes the region's database: stops the node, replaces its PostgreSQL
    /// with a fresh, empty one and starts the node again on its port, as an
    /// operator rebuilding a lost region would. Redis is kept.
    pub async fn replace_postgres(&mut self) {
        self.stop_node().await;
        let fresh = PostgresServer::start(PostgresOptions::default())
            .await
            .unwrap_or_else(|e| panic!("region {}: {e}", self.name));
        drop(std::mem::replace(&mut self.postgres, fresh));
        self.start_node().await;
    }

    /// Ends the node at once, as a crash would; its stores keep running.
    pub fn kill_node(&mut self) {
        drop(self.node.take());
    }

    /// Exports the spans the node has ended (a no-op without `[tracing]`).
    pub async fn flush_traces(&self) {
        let tracer = self
            .node
            .as_ref()
            .and_then(|h| h.node.as_ref())
            .map(|n| n.tracer().clone());
        if let Some(tracer) = tracer {
            flush(tracer).await;
        }
    }

    /// Whether the node runs.
    pub fn node_running(&self) -> bool {
        self.node.is_some()
    }

    /// The node's API address (HTTP and gRPC).
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("the node started at least once")
    }

    /// `http://` URL of the node's API.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The sum of the samples of `name` on the node's `/metrics` whose labels
    /// contain every one of `labels`; 0 when there are none.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        crate::metric(&format!("{}/metrics", self.url()), name, labels).await
    }
}

/// Where the sandbox places well-known region names, so geography works.
pub fn region_location(name: &str) -> Option<(f64, f64)> {
    meridian_launcher::local_location(name)
}

/// Several regions and a gateway in front of them.
pub struct ClusterSandbox {
    // Declared first so it stops first: a gateway outliving its regions
    // would spend the teardown ejecting them.
    gateway: Option<Gateway>,
    /// The regions, in the order given to [`ClusterSandbox::start`]; the first
    /// is the gateway's default region.
    pub regions: Vec<RegionSandbox>,
    gateway_config: Option<GatewayConfig>,
    links: Links,
}

impl ClusterSandbox {
    /// Starts every region (concurrently), then the gateway with defaults
    /// tuned for tests (one thread, no shutdown grace, an admin port).
    pub async fn start(names: &[&str]) -> Self {
        Self::start_with(names, |_| {}).await
    }

    /// Like [`ClusterSandbox::start`], letting the test adjust the gateway's
    /// config (geo, health, failover) before it starts.
    pub async fn start_with(names: &[&str], adjust: impl FnOnce(&mut GatewayConfig)) -> Self {
        Self::start_with_regions(names, |_, config| adjust(config)).await
    }

    /// Like [`ClusterSandbox::start_with`], with the started regions at hand
    /// (to point the gateway at their PostgreSQL or Redis).
    pub async fn start_with_regions(
        names: &[&str],
        adjust: impl FnOnce(&[RegionSandbox], &mut GatewayConfig),
    ) -> Self {
        Self::start_configured(names, |_| String::new(), adjust).await
    }

    /// Like [`ClusterSandbox::start_with_regions`], with `region_extra(name)`
    /// appended to each region's config (e.g. a `[mesh]` section).
    pub async fn start_configured(
        names: &[&str],
        region_extra: impl Fn(&str) -> String,
        adjust: impl FnOnce(&[RegionSandbox], &mut GatewayConfig),
    ) -> Self {
        let regions = futures_join(names, region_extra).await;
        let mut config = gateway_config(regions.iter().map(|r| (r.name.as_str(), r.addr())));
        adjust(&regions, &mut config);
        let gateway = start_gateway(config.clone()).await;
        Self {
            regions,
            gateway_config: Some(config),
            gateway: Some(gateway),
            links: Links::default(),
        }
    }

    /// Like [`ClusterSandbox::start_configured`], with every region pulling
    /// every other region's changes (`[replication]` with test-sized
    /// intervals, plus `replication_extra`, e.g. more keys of that section).
    /// Nodes learn their peers' ports only once all have started, so each
    /// is started, then restarted on the same port with its peers.
    pub async fn start_replicated(
        names: &[&str],
        replication_extra: &str,
        adjust: impl FnOnce(&[RegionSandbox], &mut GatewayConfig),
    ) -> Self {
        Self::start_replicated_each(names, |_| replication_extra.to_string(), adjust).await
    }

    /// Like [`ClusterSandbox::start_replicated`], with `replication_extra(name)`
    /// added to each region's `[replication]` (keys that differ by region,
    /// e.g. `telemetry_peers`).
    pub async fn start_replicated_each(
        names: &[&str],
        replication_extra: impl Fn(&str) -> String,
        adjust: impl FnOnce(&[RegionSandbox], &mut GatewayConfig),
    ) -> Self {
        Self::start_replicated_configured(names, |_| String::new(), replication_extra, adjust).await
    }

    /// Like [`ClusterSandbox::start_replicated_each`], with `region_extra(name)`
    /// appended to each region's config, as in
    /// [`ClusterSandbox::start_configured`].
    pub async fn start_replicated_configured(
        names: &[&str],
        region_extra: impl Fn(&str) -> String,
        replication_extra: impl Fn(&str) -> String,
        adjust: impl FnOnce(&[RegionSandbox], &mut GatewayConfig),
    ) -> Self {
        let mut cluster = Self::start_configured(names, region_extra, adjust).await;
        cluster.restart_with_peers(&replication_extra).await;
        cluster
    }

    /// Like [`ClusterSandbox::start_replicated`], with every directed peer
    /// link through a [`FaultProxy`] of its own: region X's follower of
    /// peer Y connects to a proxy that forwards to Y, so a test can cut or
    /// slow each direction of each pair ([`ClusterSandbox::links`]).
    /// `seed` seeds the proxies' randomness, one derived seed per link.
    /// Only replication goes through the proxies; the gateway, the digest
    /// endpoint and each region's own stores are reached directly.
    pub async fn start_replicated_with_proxies(
        names: &[&str],
        replication_extra: &str,
        seed: u64,
        adjust: impl FnOnce(&[RegionSandbox], &mut GatewayConfig),
    ) -> Self {
        let mut cluster = Self::start_configured(names, |_| String::new(), adjust).await;
        let mut seeds = StdRng::seed_from_u64(seed);
        let mut links = Vec::new();
        for follower in &cluster.regions {
            for peer in cluster.regions.iter().filter(|p| p.name != follower.name) {
                let proxy = FaultProxy::start(peer.addr(), seeds.random())
                    .await
                    .expect("a fault proxy starts");
                links.push(Link {
                    follower: follower.name.clone(),
                    peer: peer.name.clone(),
                    proxy,
                });
            }
        }
        cluster.links = Links(links);
        cluster
            .restart_with_peers(&|_| replication_extra.to_string())
            .await;
        cluster
    }

    /// Restarts every node with `[replication]` naming the others as peers,
    /// through their proxies when the cluster has some.
    async fn restart_with_peers(&mut self, replication_extra: &dyn Fn(&str) -> String) {
        let addrs: Vec<(String, SocketAddr)> = self
            .regions
            .iter()
            .map(|r| (r.name.clone(), r.addr()))
            .collect();
        for region in &mut self.regions {
            let peers: Vec<(String, SocketAddr)> = addrs
                .iter()
                .filter(|(n, _)| *n != region.name)
                .map(|(n, a)| {
                    let a = self
                        .links
                        .find(&region.name, n)
                        .map_or(*a, FaultProxy::addr);
                    (n.clone(), a)
                })
                .collect();
            let settings = format!(
                "heartbeat_interval_ms = 200\nack_interval_ms = 100\nreconnect_backoff_ms = 50\n\
                 reconnect_backoff_max_ms = 500\n{}",
                replication_extra(&region.name),
            );
            region.stop_node().await;
            region.replication = Some((peers, settings));
            let extra = region.extra_config.clone();
            region.rewrite_config(&extra);
            region.start_node().await;
        }
    }

    /// The proxies between regions (empty unless started by
    /// [`ClusterSandbox::start_replicated_with_proxies`]).
    pub fn links(&self) -> &Links {
        &self.links
    }

    /// Starts one more gateway with the same config on other ports: gateways
    /// share nothing, so this is how a test sees two instances agree.
    pub async fn start_another_gateway(&self) -> Gateway {
        start_gateway(self.gateway_config.clone().expect("gateway config")).await
    }

    /// The gateway's address.
    pub fn gateway_addr(&self) -> SocketAddr {
        self.gateway.as_ref().expect("gateway runs").local_addr()
    }

    /// `http://` URL of the gateway.
    pub fn gateway_url(&self) -> String {
        format!("http://{}", self.gateway_addr())
    }

    /// `http://` URL of the gateway's admin endpoints.
    pub fn admin_url(&self) -> String {
        let addr = self
            .gateway
            .as_ref()
            .and_then(|g| g.admin_addr())
            .expect("the sandbox gateway has an admin port");
        format!("http://{addr}")
    }

    /// Exports the spans the gateway and every region have ended.
    pub async fn flush_traces(&self) {
        if let Some(gateway) = &self.gateway {
            flush(gateway.tracer().clone()).await;
        }
        for region in &self.regions {
            region.flush_traces().await;
        }
    }

    /// The region called `name`.
    pub fn region(&mut self, name: &str) -> &mut RegionSandbox {
        self.regions
            .iter_mut()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no region {name} in this sandbox"))
    }
}

/// A gateway config with the sandbox's test defaults (one thread, no
/// shutdown grace) before regions at these addresses, each placed where
/// [`region_location`] puts its name.
pub fn gateway_config<'a>(
    regions: impl IntoIterator<Item = (&'a str, SocketAddr)>,
) -> GatewayConfig {
    let regions = regions
        .into_iter()
        .map(|(name, addr)| {
            let region = RegionConfig::new(name.to_string(), addr);
            match region_location(name) {
                Some((lat, lon)) => region.at(lat, lon),
                None => region,
            }
        })
        .collect();
    let mut config =
        meridian_gateway::Config::builder(SocketAddr::from(([127, 0, 0, 1], 0)), regions);
    config.threads = 1;
    config.shutdown_grace = std::time::Duration::from_secs(0);
    config
}

/// Starts a gateway on free ports (client and admin). A free port can be
/// taken by a parallel test between the probe and the bind; try a few.
pub async fn start_gateway(mut config: GatewayConfig) -> Gateway {
    let mut last_error = None;
    for _ in 0..5 {
        let port = meridian_launcher::free_port().expect("a free port");
        config.listen = SocketAddr::from(([127, 0, 0, 1], port));
        let admin = meridian_launcher::free_port().expect("a free port");
        config.admin_listen = Some(SocketAddr::from(([127, 0, 0, 1], admin)));
        let attempt = config
            .clone()
            .build()
            .unwrap_or_else(|e| panic!("gateway config: {e}"));
        match tokio::task::spawn_blocking(move || Gateway::start(attempt))
            .await
            .expect("gateway start does not panic")
        {
            Ok(g) => return g,
            Err(e) => last_error = Some(e),
        }
    }
    panic!("gateway did not start: {}", last_error.expect("an error"));
}

/// `force_flush` blocks until the collector answered: off the runtime.
async fn flush(tracer: meridian_mesh::Tracer) {
    tokio::task::spawn_blocking(move || tracer.force_flush())
        .await
        .expect("flush does not panic")
        .expect("the collector takes the spans");
}

async fn futures_join(names: &[&str], extra: impl Fn(&str) -> String) -> Vec<RegionSandbox> {
    let handles: Vec<_> = names
        .iter()
        .map(|n| {
            let (n, extra) = (n.to_string(), extra(n));
            tokio::spawn(async move { RegionSandbox::start_with_config(&n, &extra).await })
        })
        .collect();
    let mut regions = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(r) => regions.push(r),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    regions
}
