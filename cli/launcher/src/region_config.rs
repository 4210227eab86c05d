//! A local region's config file, written from typed fields: `meridian up`
//! and the test sandbox describe their regions with the same builder, so
//! the two cannot drift apart in what a local region is. The node reads
//! the file as any deployment's (and `POST /admin/reload` reads it again).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// How the region's node meets its callers (`[mesh]`).
#[derive(Debug, Clone, PartialEq)]
pub enum MeshSection {
    /// Plain text, no identities: quick to start, for tests about other
    /// things.
    Plaintext,
    /// Mutual TLS with these PEM files.
    Tls {
        /// The CA every caller's certificate must chain to.
        ca: PathBuf,
        /// The region's certificate.
        cert: PathBuf,
        /// Its private key.
        key: PathBuf,
    },
    /// No `[mesh]` from the builder: the extra TOML brings its own.
    Omitted,
}

/// A model served by the built-in simulator (`[[models]]`, `kind = "sim"`).
#[derive(Debug, Clone, PartialEq)]
pub struct SimModel {
    /// The model id clients name.
    pub id: String,
    /// Time to the first token, in milliseconds.
    pub ttft_ms: u64,
    /// Time per further token, in milliseconds.
    pub per_token_ms: u64,
    /// Prefill time per prompt token, in microseconds; the simulator's
    /// default when `None`.
    pub prefill_us_per_token: Option<u64>,
    /// Requests generated at once; the simulator's default when `None`.
    pub max_concurrency: Option<u32>,
    /// The model's context window; the node's default when `None`.
    pub context_window_tokens: Option<u32>,
}

impl SimModel {
    /// A simulated model with these latencies and defaults otherwise.
    pub fn new(id: &str, ttft_ms: u64, per_token_ms: u64) -> Self {
        Self {
            id: id.to_string(),
            ttft_ms,
            per_token_ms,
            prefill_us_per_token: None,
            max_concurrency: None,
            context_window_tokens: None,
        }
    }
}

/// The config file of one local region.
#[derive(Debug, Clone)]
pub struct RegionConfigFile {
    region: String,
    listen: SocketAddr,
    redis_url: String,
    postgres_url: String,
    shutdown_grace_ms: Option<u64>,
    redis_connect_timeout_ms: Option<u64>,
    postgres_max_connections: Option<u32>,
    mesh: MeshSection,
    models: Vec<SimModel>,
    embeddings_dir: Option<PathBuf>,
    otlp_endpoint: Option<String>,
    /// More `[server]` keys, one per line.
    server_extra: String,
    extra: String,
    replication: Option<Replication>,
}

#[derive(Debug, Clone)]
struct Replication {
    peers: Vec<(String, SocketAddr)>,
    settings: String,
}

impl RegionConfigFile {
    /// Region `region` listening on `listen`, with its own Redis and
    /// PostgreSQL, plain text, no models yet.
    pub fn new(region: &str, listen: SocketAddr, redis_url: &str, postgres_url: &str) -> Self {
        Self {
            region: region.to_string(),
            listen,
            redis_url: redis_url.to_string(),
            postgres_url: postgres_url.to_string(),
            shutdown_grace_ms: None,
            redis_connect_timeout_ms: None,
            postgres_max_connections: None,
            mesh: MeshSection::Plaintext,
            models: Vec::new(),
            embeddings_dir: None,
            otlp_endpoint: None,
            server_extra: String::new(),
            extra: String::new(),
            replication: None,
        }
    }

    /// How long in-flight requests get at shutdown (`server.shutdown_grace_ms`).
    pub fn shutdown_grace_ms(mut self, ms: u64) -> Self {
        self.shutdown_grace_ms = Some(ms);
        self
    }

    /// How long connecting to Redis and PostgreSQL may take at start
    /// (`redis.connect_timeout_ms`).
    pub fn connect_timeout_ms(mut self, ms: u64) -> Self {
        self.redis_connect_timeout_ms = Some(ms);
        self
    }

    /// The node's PostgreSQL pool size (`postgres.max_connections`).
    pub fn postgres_max_connections(mut self, n: u32) -> Self {
        self.postgres_max_connections = Some(n);
        self
    }

    /// The `[mesh]` section.
    pub fn mesh(mut self, mesh: MeshSection) -> Self {
        self.mesh = mesh;
        self
    }

    /// One more simulated model.
    pub fn model(mut self, model: SimModel) -> Self {
        self.models.push(model);
        self
    }

    /// The built-in embedding model, from this directory.
    pub fn embeddings(mut self, model_dir: &Path) -> Self {
        self.embeddings_dir = Some(model_dir.to_path_buf());
        self
    }

    /// Where every request's trace goes (`tracing.otlp_endpoint`).
    pub fn otlp_endpoint(mut self, endpoint: &str) -> Self {
        self.otlp_endpoint = Some(endpoint.to_string());
        self
    }

    /// TOML the typed fields do not cover, appended as it is (before
    /// `[replication]`, which the builder writes last).
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra = toml.to_string();
        self
    }

    /// The peer regions this one pulls changes from, and more
    /// `[replication]` keys (`settings`, TOML lines) after them.
    pub fn replication(mut self, peers: Vec<(String, SocketAddr)>, settings: &str) -> Self {
        self.replication = Some(Replication {
            peers,
            settings: settings.to_string(),
        });
        self
    }

    /// More keys of the `[server]` table, as TOML lines.
    pub fn server_keys(mut self, toml: &str) -> Self {
        self.server_extra = toml.to_string();
        self
    }

    /// The file's text.
    pub fn to_toml(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "region = {}", quote(&self.region));
        let _ = writeln!(t, "\n[server]\nlisten = \"{}\"", self.listen);
        if let Some(ms) = self.shutdown_grace_ms {
            let _ = writeln!(t, "shutdown_grace_ms = {ms}");
        }
        if !self.server_extra.is_empty() {
            let _ = writeln!(t, "{}", self.server_extra.trim_end());
        }
        let _ = writeln!(t, "\n[redis]\nurl = {}", quote(&self.redis_url));
        if let Some(ms) = self.redis_connect_timeout_ms {
            let _ = writeln!(t, "connect_timeout_ms = {ms}");
        }
        let _ = writeln!(t, "\n[postgres]\nurl = {}", quote(&self.postgres_url));
        if let Some(n) = self.postgres_max_connections {
            let _ = writeln!(t, "max_connections = {n}");
        }
        match &self.mesh {
            MeshSection::Plaintext => t.push_str("\n[mesh]\nplaintext = true\n"),
            MeshSection::Tls { ca, cert, key } => {
                let _ = writeln!(
                    t,
                    "\n# Mutual TLS: the gateway, other regions and operators must present a\n\
                     # certificate from this CA; `[mesh.policy]` says who may call what.\n\
                     [mesh]\nca_path = {}\ncert_path = {}\nkey_path = {}",
                    quote_path(ca),
                    quote_path(cert),
                    quote_path(key)
                );
            }
            MeshSection::Omitted => {}
        }
        for m in &self.models {
            let _ = writeln!(t, "\n[[models]]\nid = {}", quote(&m.id));
            if let Some(n) = m.context_window_tokens {
                let _ = writeln!(t, "context_window_tokens = {n}");
            }
            let mut backend = format!(
                "kind = \"sim\", ttft_ms = {}, per_token_ms = {}",
                m.ttft_ms, m.per_token_ms
            );
            if let Some(us) = m.prefill_us_per_token {
                let _ = write!(backend, ", prefill_us_per_token = {us}");
            }
            if let Some(n) = m.max_concurrency {
                let _ = write!(backend, ", max_concurrency = {n}");
            }
            let _ = writeln!(t, "backend = {{ {backend} }}");
        }
        if let Some(dir) = &self.embeddings_dir {
            let _ = writeln!(
                t,
                "\n# The built-in embedding model (all-MiniLM-L6-v2 on candle).\n\
                 [embeddings]\nmodel_dir = {}",
                quote_path(dir)
            );
        }
        if let Some(e) = &self.otlp_endpoint {
            let _ = writeln!(t, "\n[tracing]\notlp_endpoint = {}", quote(e));
        }
        if !self.extra.is_empty() {
            t.push('\n');
            t.push_str(&self.extra);
            if !self.extra.ends_with('\n') {
                t.push('\n');
            }
        }
        if let Some(r) = &self.replication {
            let peers: Vec<String> = r
                .peers
                .iter()
                .map(|(name, addr)| format!("{{ region = {}, address = \"{addr}\" }}", quote(name)))
                .collect();
            let _ = writeln!(
                t,
                "\n# Every region pulls every other region's changes.\n\
                 [replication]\npeers = [{}]",
                peers.join(", ")
            );
            t.push_str(&r.settings);
        }
        t
    }
}

/// `s` as a TOML basic string.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn quote_path(p: &Path) -> String {
    quote(&p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_typed_field_lands_in_its_section_and_extra_keys_follow_replication() {
        let listen: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let peer: SocketAddr = "127.0.0.1:7002".parse().unwrap();
        let mut model = SimModel::new("sim-small", 20, 5);
        model.max_concurrency = Some(16);
        let text = RegionConfigFile::new("eu-west", listen, "redis://x", "postgres://y \"q\"")
            .shutdown_grace_ms(1000)
            .mesh(MeshSection::Tls {
                ca: "/c/ca.pem".into(),
                cert: "/c/r.pem".into(),
                key: "/c/r.key".into(),
            })
            .model(model)
            .extra("[jobs]\nworkers = 2\n")
            .replication(vec![("us-east".into(), peer)], "adopt_after_ms = 4000\n")
            .to_toml();
        let v: toml::Table = text.parse().expect("valid TOML");
        assert_eq!(v["region"].as_str(), Some("eu-west"));
        assert_eq!(v["server"]["listen"].as_str(), Some("127.0.0.1:7001"));
        assert_eq!(v["server"]["shutdown_grace_ms"].as_integer(), Some(1000));
        assert_eq!(v["postgres"]["url"].as_str(), Some("postgres://y \"q\""));
        assert_eq!(v["mesh"]["cert_path"].as_str(), Some("/c/r.pem"));
        let models = v["models"].as_array().unwrap();
        assert_eq!(
            models[0]["backend"]["max_concurrency"].as_integer(),
            Some(16)
        );
        assert_eq!(v["jobs"]["workers"].as_integer(), Some(2));
        let r = &v["replication"];
        assert_eq!(r["peers"][0]["address"].as_str(), Some("127.0.0.1:7002"));
        assert_eq!(r["adopt_after_ms"].as_integer(), Some(4000));
    }

    #[test]
    fn omitted_mesh_leaves_it_to_the_extra() {
        let listen: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let text = RegionConfigFile::new("eu-west", listen, "redis://x", "postgres://y")
            .mesh(MeshSection::Omitted)
            .extra("[mesh]\nplaintext = false\n")
            .to_toml();
        let v: toml::Table = text.parse().expect("valid TOML");
        assert_eq!(v["mesh"]["plaintext"].as_bool(), Some(false));
    }
}
