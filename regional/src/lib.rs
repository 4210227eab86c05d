//! The Meridian regional node.
//!
//! A region is a self-contained cluster that serves inference for the clients the
//! gateway sends it. One node serves the OpenAI-compatible HTTP API and the
//! `meridian.v1` gRPC services on a single port (HTTP/1.1 and HTTP/2 cleartext,
//! told apart per connection), backed by its own Redis and PostgreSQL.
//!
//! Start one with [`RegionalNode::start`] from a [`Config`], usually read with
//! [`Config::from_file`]. Tenants and API keys are administered through
//! [`tenancy`].

mod answer;
mod api;
mod cache;
mod config;
mod conversation;
mod error;
mod inference;
mod mesh;
mod node;
mod peers;
mod queue;
pub mod replication;
mod responses;
mod slow_reader;
mod status;
mod store;
mod telemetry;
pub mod tenancy;

#[doc(hidden)]
pub use self::api::check_chat_body;
pub use self::cache::compatible as semantic_questions_compatible;
pub use self::config::{
    AliasConfig, ApiKey, BackendConfig, CacheConfig, Config, DEFAULT_SEMANTIC_THRESHOLD,
    InferenceConfig, ModelConfig, OpenAiConfig, PeerConfig, ReplicationConfig, SemanticCacheConfig,
    SimConfig, TelemetryConfig, UpstreamConfig,
};
pub use self::error::Error;
pub use self::inference::{
    SimProtocol, serve_sim, serve_sim_as, serve_sim_requiring, serve_sim_traced,
};
pub use self::mesh::{AllowRule, Mesh, MeshConfig, PolicyConfig};
pub use self::node::RegionalNode;
