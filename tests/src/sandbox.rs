//! Regions and a gateway on free loopback ports, with their real stores.

use std::net::SocketAddr;

use meridian_gateway::{Gateway, RegionConfig};
use meridian_launcher::{PostgresOptions, PostgresServer, RedisOptions, RedisServer};
use meridian_regional::{Config, RegionalNode};

/// The model every sandbox region serves: the simulator without delays, so
/// tests wait for nothing but the system itself.
pub const TEST_MODEL: &str = "sim-fast";

/// One region: its Redis, its PostgreSQL and its node.
pub struct RegionSandbox {
    /// The region's name.
    pub name: String,
    /// The region's own Redis.
    pub redis: RedisServer,
    /// The region's own PostgreSQL.
    pub postgres: PostgresServer,
    node: Option<RegionalNode>,
    addr: Option<SocketAddr>,
    extra_config: String,
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
        };
        region.start_node().await;
        region
    }

    /// The node's config, as a TOML text pointing at this region's stores.
    pub fn config_toml(&self, listen: SocketAddr) -> String {
        format!(
            "region = \"{name}\"\n\
             [server]\nlisten = \"{listen}\"\nshutdown_grace_ms = 2000\n\
             [redis]\nurl = \"{redis}\"\nconnect_timeout_ms = 2000\n\
             [postgres]\nurl = \"{pg}\"\nmax_connections = 5\n\
             [[models]]\nid = \"{TEST_MODEL}\"\n\
             backend = {{ kind = \"sim\", prefill_us_per_token = 0, ttft_ms = 0, per_token_ms = 0 }}\n\
             {extra}",
            name = self.name,
            extra = self.extra_config,
            redis = self.redis.url(),
            pg = self.postgres.url(),
        )
    }

    /// Starts the node, on the port it had before if it ran already.
    pub async fn start_node(&mut self) {
        assert!(self.node.is_none(), "region {} already runs", self.name);
        let listen = self
            .addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let config = Config::from_toml(&self.config_toml(listen), "sandbox")
            .unwrap_or_else(|e| panic!("region {}: {e}", self.name));
        let node = RegionalNode::start(config)
            .await
            .unwrap_or_else(|e| panic!("region {}: {e}", self.name));
        self.addr = Some(node.local_addr());
        self.node = Some(node);
    }

    /// Shuts the node down gracefully; its stores keep running.
    pub async fn stop_node(&mut self) {
        if let Some(node) = self.node.take() {
            node.shutdown()
                .await
                .unwrap_or_else(|e| panic!("region {}: {e}", self.name));
        }
    }

    /// The node's API address (HTTP and gRPC).
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("the node started at least once")
    }

    /// `http://` URL of the node's API.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }
}

/// Several regions and a gateway in front of them.
pub struct ClusterSandbox {
    /// The regions, in the order given to [`ClusterSandbox::start`]; the first
    /// is the gateway's default region.
    pub regions: Vec<RegionSandbox>,
    gateway: Option<Gateway>,
}

impl ClusterSandbox {
    /// Starts every region (concurrently), then the gateway.
    pub async fn start(names: &[&str]) -> Self {
        let regions = futures_join(names).await;
        let mut sandbox = Self {
            regions,
            gateway: None,
        };
        sandbox.start_gateway().await;
        sandbox
    }

    async fn start_gateway(&mut self) {
        let regions: Vec<RegionConfig> = self
            .regions
            .iter()
            .map(|r| RegionConfig {
                name: r.name.clone(),
                address: r.addr(),
            })
            .collect();
        // A free port can be taken by a parallel test between the probe and
        // the bind; try a few.
        let mut last_error = None;
        for _ in 0..5 {
            let port = meridian_launcher::free_port().expect("a free port");
            let mut config = meridian_gateway::Config::new(
                SocketAddr::from(([127, 0, 0, 1], port)),
                regions.clone(),
            )
            .expect("a valid gateway config");
            config.threads = 1;
            config.shutdown_grace = std::time::Duration::from_secs(0);
            match tokio::task::spawn_blocking(move || Gateway::start(config))
                .await
                .expect("gateway start does not panic")
            {
                Ok(g) => {
                    self.gateway = Some(g);
                    return;
                }
                Err(e) => last_error = Some(e),
            }
        }
        panic!("gateway did not start: {}", last_error.expect("an error"));
    }

    /// The gateway's address.
    pub fn gateway_addr(&self) -> SocketAddr {
        self.gateway.as_ref().expect("gateway runs").local_addr()
    }

    /// `http://` URL of the gateway.
    pub fn gateway_url(&self) -> String {
        format!("http://{}", self.gateway_addr())
    }

    /// The region called `name`.
    pub fn region(&mut self, name: &str) -> &mut RegionSandbox {
        self.regions
            .iter_mut()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no region {name} in this sandbox"))
    }
}

async fn futures_join(names: &[&str]) -> Vec<RegionSandbox> {
    let handles: Vec<_> = names
        .iter()
        .map(|n| {
            let n = n.to_string();
            tokio::spawn(async move { RegionSandbox::start(&n).await })
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
