//! Node configuration: a serde shape read from TOML, then validated into [`Config`].

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use meridian_proto::config::Problems;
use serde::Deserialize;

use crate::error::Error;

mod cache;
mod embeddings;
pub(crate) mod inference;
mod jobs;
mod replication;
pub(crate) mod spend;
mod stores;
mod task;
pub(crate) mod telemetry;
mod upstream;

pub use self::cache::{CacheConfig, DEFAULT_SEMANTIC_THRESHOLD, SemanticCacheConfig};
pub use self::embeddings::EmbeddingsConfig;
pub use self::inference::{AliasConfig, InferenceConfig, OpenAiConfig};
pub use self::jobs::JobsConfig;
pub(crate) use self::replication::MAX_BATCH_BYTES;
pub use self::replication::{PeerConfig, ReplicationConfig};
pub use self::spend::SpendConfig;
pub use self::stores::StoresConfig;
pub use self::task::{EmbeddingModelConfig, Task};
pub use self::telemetry::TelemetryConfig;
pub use self::upstream::{ApiKey, UpstreamConfig};

/// A validated regional node configuration. Its fields are readable only
/// inside this crate, so no other crate changes a config after validation;
/// [`Config::from_file`] and [`Config::from_toml`] are the ways to make one.
#[derive(Debug, Clone)]
pub struct Config {
    /// This region's name, e.g. `eu-west`.
    pub(crate) region: String,
    /// Address the HTTP and gRPC API listens on.
    pub(crate) listen: SocketAddr,
    /// How long in-flight requests may take to finish after shutdown starts.
    pub(crate) shutdown_grace: Duration,
    /// Requests the node is sized to hold at once.
    pub(crate) max_in_flight: u32,
    /// Largest JSON API body, in bytes (`server.max_body_bytes`).
    pub(crate) max_body_bytes: usize,
    /// How long a streamed answer waits for its reader
    /// (`server.stream_write_timeout_ms`).
    pub(crate) stream_write_timeout: Duration,
    /// Redis URL of this region.
    pub(crate) redis_url: String,
    /// PostgreSQL URL of this region.
    pub(crate) postgres_url: String,
    /// Most PostgreSQL connections this node holds.
    pub(crate) postgres_max_connections: u32,
    /// How long to wait for Redis and PostgreSQL at start.
    pub(crate) connect_timeout: Duration,
    /// Models served by this region.
    pub(crate) models: Vec<ModelConfig>,
    /// Names that route to models by request size or by weight.
    pub(crate) aliases: Vec<AliasConfig>,
    /// Request deadlines and per-tenant admission control.
    pub(crate) inference: InferenceConfig,
    /// The file this config was read from, if any: `POST /admin/reload`
    /// reads its models and aliases again.
    pub(crate) source: Option<std::path::PathBuf>,
    /// Time-series storage: partitions, retention, ingest and query limits.
    pub(crate) telemetry: TelemetryConfig,
    /// Asynchronous jobs: workers, retries, leases, queue limits.
    pub(crate) jobs: JobsConfig,
    /// The built-in embedding model; `None` when `[embeddings]` is absent
    /// or disabled.
    pub(crate) embeddings: Option<EmbeddingsConfig>,
    /// Mutual TLS on the node's port and who may call what (`[mesh]`).
    pub(crate) mesh: crate::mesh::Mesh,
    /// The response cache (`[cache]`).
    pub(crate) cache: CacheConfig,
    /// Traces exported to an OTLP collector (`[tracing]`); off by default.
    pub(crate) tracing: meridian_mesh::TraceConfig,
    /// Peers to pull changes from, and the log's limits (`[replication]`).
    pub(crate) replication: ReplicationConfig,
    /// Probes of this region's PostgreSQL and Redis (`[stores]`).
    pub(crate) stores: StoresConfig,
    /// Spend accounting for budgets, and model prices (`[spend]`).
    pub(crate) spend: SpendConfig,
}

/// The TOML shape of the configuration. Every field has a default except the
/// ones that name this region's own Redis and PostgreSQL.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// This region's name: lowercase letters, digits and dashes.
    region: String,
    #[serde(default)]
    server: RawServer,
    redis: RawRedis,
    postgres: RawPostgres,
    /// Models served by this region; one simulated model when absent.
    #[serde(default = "default_models")]
    models: Vec<ModelConfig>,
    /// Names that route to models; none by default.
    #[serde(default)]
    aliases: Vec<AliasConfig>,
    #[serde(default)]
    inference: InferenceConfig,
    #[serde(default)]
    telemetry: TelemetryConfig,
    #[serde(default)]
    jobs: JobsConfig,
    /// The built-in embedding model; off unless the section is present.
    #[serde(default)]
    embeddings: Option<EmbeddingsConfig>,
    #[serde(default)]
    cache: CacheConfig,
    /// Mutual TLS and policy; required unless `plaintext = true`.
    #[serde(default)]
    mesh: crate::mesh::MeshConfig,
    /// OpenTelemetry traces; off unless `otlp_endpoint` is set.
    #[serde(default)]
    tracing: meridian_mesh::TraceConfig,
    /// Cross-region replication; no peers by default.
    #[serde(default)]
    replication: ReplicationConfig,
    #[serde(default)]
    stores: StoresConfig,
    #[serde(default)]
    spend: SpendConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    /// Address for the HTTP and gRPC API.
    listen: SocketAddr,
    /// Grace period for in-flight requests at shutdown, in milliseconds.
    shutdown_grace_ms: u64,
    /// Requests the node is sized to hold at once; gateways weigh its load
    /// as in-flight requests over this.
    max_in_flight: u32,
    /// Largest request body of the JSON API, in bytes; telemetry ingest
    /// has its own (`telemetry.max_body_bytes`).
    max_body_bytes: usize,
    /// How long a streamed answer (SSE, gRPC server stream) waits for its
    /// reader to take more, in milliseconds, before it is cut and what it
    /// holds (admission slot, model work, watch slot) released.
    stream_write_timeout_ms: u64,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7100)),
            shutdown_grace_ms: 10_000,
            max_in_flight: 1024,
            max_body_bytes: 8 << 20,
            stream_write_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    /// `redis://host:port/db`.
    url: String,
    /// Time allowed to connect at start, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    connect_timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    /// `postgres://user@host:port/database`.
    url: String,
    /// Most connections in the pool.
    #[serde(default = "default_max_connections")]
    max_connections: u32,
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}

fn default_max_connections() -> u32 {
    10
}

fn default_models() -> Vec<ModelConfig> {
    vec![ModelConfig {
        id: "sim-small".into(),
        context_window_tokens: 8192,
        backend: BackendConfig::Sim(SimConfig::default()),
        fallbacks: vec![],
        context_fallbacks: vec![],
        task: Task::Chat,
        embeddings: None,
    }]
}

/// One model this region serves and the backend that serves it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The model name clients send, e.g. `sim-small`.
    pub id: String,
    /// Longest prompt plus completion the model accepts, in tokens.
    #[serde(default = "default_context_window")]
    pub context_window_tokens: u32,
    /// What serves the model.
    pub backend: BackendConfig,
    /// Models tried in order, in this region, when this one fails before
    /// its answer starts (429, 5xx, connect failure, first-byte timeout,
    /// refused credentials, no healthy upstream). Before the gateway's
    /// failover to another region.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Models tried in order when the request does not fit this one's
    /// context window: the first that fits serves it.
    #[serde(default)]
    pub context_fallbacks: Vec<String>,
    /// What the model serves: `chat` (the default) or `embeddings` (an
    /// OpenAI-compatible embedding server, `kind = "openai"` or `"azure"`).
    #[serde(default)]
    pub task: Task,
    /// `task = "embeddings"` only: input limit and batching of its requests;
    /// the defaults when absent.
    #[serde(default)]
    pub embeddings: Option<EmbeddingModelConfig>,
}

fn default_context_window() -> u32 {
    8192
}

/// The backend behind a model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackendConfig {
    /// The built-in simulated LLM: realistic timing without a GPU.
    Sim(SimConfig),
    /// A pool of OpenAI-compatible HTTP servers.
    #[serde(rename = "openai")]
    OpenAi(OpenAiConfig),
    /// A pool of servers speaking Anthropic's Messages API; OpenAI requests
    /// are translated to it and its answers back.
    Anthropic(OpenAiConfig),
    /// A pool of Azure OpenAI deployments: the OpenAI protocol at Azure's
    /// paths, with its `api-key` header and `api-version` parameter.
    Azure(OpenAiConfig),
}

impl BackendConfig {
    /// The pool settings of a backend that is a pool of upstreams.
    pub(crate) fn pool(&self) -> Option<&OpenAiConfig> {
        match self {
            Self::Sim(_) => None,
            Self::OpenAi(p) | Self::Anthropic(p) | Self::Azure(p) => Some(p),
        }
    }
}

/// Timing and limits of the built-in simulated LLM.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Prefill time per prompt token, in microseconds.
    pub prefill_us_per_token: u64,
    /// Fixed time before the first output token, in milliseconds.
    pub ttft_ms: u64,
    /// Time per output token after the first, in milliseconds.
    pub per_token_ms: u64,
    /// Requests generated at once; more wait in a queue.
    pub max_concurrency: u32,
    /// Completion length when the request gives no `max_tokens`.
    pub default_max_tokens: u32,
    /// Fraction (0 to 1) of whole (non-streamed) completions that fail with
    /// a retryable error, for testing failure handling; 0 in production.
    pub fail_rate: f64,
    /// Seed of the failure draws: the n-th completion of a backend fails or
    /// not depending only on this seed, n and `fail_rate`.
    pub fail_seed: u64,
    /// Prompt-prefix blocks the prefix cache holds (least recently used
    /// evicted first); 0 turns the cache off. Cached blocks cost no prefill.
    pub prefix_cache_blocks: u32,
    /// Prompt tokens per prefix-cache block; only whole blocks are cached.
    pub prefix_block_tokens: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            prefill_us_per_token: 50,
            ttft_ms: 20,
            per_token_ms: 5,
            max_concurrency: 64,
            default_max_tokens: 32,
            fail_rate: 0.0,
            fail_seed: 0,
            prefix_cache_blocks: 4096,
            prefix_block_tokens: 16,
        }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let mut config = meridian_proto::config::load(path, RawConfig::validate)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, Error> {
        Ok(meridian_proto::config::parse(
            text,
            origin,
            RawConfig::validate,
        )?)
    }
}

impl RawConfig {
    /// Checks every section, keeping every problem with its key; the files
    /// the node loads at start (its mesh certificate) are loaded here first.
    fn validate(self) -> Result<Config, Vec<String>> {
        let mut problems = Problems::new();
        if !valid_region_name(&self.region) {
            problems.push(format!(
                "`region` must be lowercase letters, digits and dashes, got {:?}",
                self.region
            ));
        }
        if !self.redis.url.starts_with("redis://") && !self.redis.url.starts_with("rediss://") {
            problems.push(format!(
                "`redis.url` must start with redis:// or rediss://, got {:?}",
                self.redis.url
            ));
        }
        if !self.postgres.url.starts_with("postgres://")
            && !self.postgres.url.starts_with("postgresql://")
        {
            problems.push(format!(
                "`postgres.url` must start with postgres://, got {:?}",
                self.postgres.url
            ));
        }
        if self.server.max_in_flight == 0 {
            problems.push("`server.max_in_flight` must be at least 1");
        }
        if self.postgres.max_connections == 0 {
            problems.push("`postgres.max_connections` must be at least 1");
        }
        if self.server.stream_write_timeout_ms < 10 {
            problems.push("`server.stream_write_timeout_ms` must be at least 10");
        }
        if self.server.max_body_bytes < 1024 {
            problems.push("`server.max_body_bytes` must be at least 1024");
        }
        if self.inference.max_messages == 0 {
            problems.push("`inference.max_messages` must be at least 1");
        }
        if self.inference.max_conversation_bytes == 0 {
            problems.push("`inference.max_conversation_bytes` must be at least 1");
        }
        check_models(&self.models, &mut problems);
        inference::validate(&self.models, &self.aliases, &mut problems);
        task::validate(&self.models, &self.aliases, &mut problems);
        self.telemetry.validate(&mut problems);
        self.spend.validate(&mut problems);
        self.jobs.validate(&mut problems);
        let embeddings = self.embeddings.filter(|e| e.enabled);
        if let Some(e) = &embeddings {
            e.validate(&mut problems);
        }
        self.cache.validate(embeddings.is_some(), &mut problems);
        let mesh = self.mesh.validate(&self.region, &mut problems);
        problems.check(self.tracing.validate());
        self.replication.validate(&self.region, &mut problems);
        self.stores.validate(&mut problems);
        // `None` comes with a problem, so the stand-in never reaches a Config.
        let mesh = mesh.unwrap_or(crate::mesh::Mesh::Plaintext);
        problems.finish(|| Config {
            region: self.region,
            listen: self.server.listen,
            shutdown_grace: Duration::from_millis(self.server.shutdown_grace_ms),
            max_in_flight: self.server.max_in_flight,
            max_body_bytes: self.server.max_body_bytes,
            stream_write_timeout: Duration::from_millis(self.server.stream_write_timeout_ms),
            redis_url: self.redis.url,
            postgres_url: self.postgres.url,
            postgres_max_connections: self.postgres.max_connections,
            connect_timeout: Duration::from_millis(self.redis.connect_timeout_ms),
            models: self.models,
            aliases: self.aliases,
            inference: self.inference,
            source: None,
            telemetry: self.telemetry,
            jobs: self.jobs,
            embeddings,
            mesh,
            cache: self.cache,
            tracing: self.tracing,
            replication: self.replication,
            stores: self.stores,
            spend: self.spend,
        })
    }
}

/// What is wrong with routing `aliases` to `models` in this region, as
/// config validation says it (the problems name `aliases[i]`); empty when
/// nothing is. Routes set through the management API are checked with it
/// against each region's own models.
pub(crate) fn routing_problems(models: &[ModelConfig], aliases: &[AliasConfig]) -> Vec<String> {
    let mut problems = Problems::new();
    inference::validate(models, aliases, &mut problems);
    task::validate(models, aliases, &mut problems);
    problems.finish(|| ()).err().unwrap_or_default()
}

/// A region's name: 1 to 63 lowercase letters, digits and dashes (a DNS
/// label, as region names become host and SRV names).
pub(crate) fn valid_region_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn check_models(models: &[ModelConfig], problems: &mut Problems) {
    if models.is_empty() {
        problems.push("`models` must name at least one model");
    }
    let mut seen = std::collections::HashSet::new();
    for (i, m) in models.iter().enumerate() {
        if m.id.is_empty() {
            problems.push(format!("`models[{i}].id` must not be empty"));
        } else if !seen.insert(m.id.as_str()) {
            problems.push(format!("`models[{i}].id` repeats model {:?}", m.id));
        }
        let BackendConfig::Sim(sim) = &m.backend else {
            continue;
        };
        if sim.max_concurrency == 0 {
            problems.push(format!(
                "`models[{i}].backend.max_concurrency` must be at least 1"
            ));
        }
        if !(0.0..=1.0).contains(&sim.fail_rate) {
            problems.push(format!(
                "`models[{i}].backend.fail_rate` must be between 0 and 1"
            ));
        }
        if sim.prefix_block_tokens == 0 {
            problems.push(format!(
                "`models[{i}].backend.prefix_block_tokens` must be at least 1"
            ));
        }
    }
}

#[cfg(test)]
mod tests;
