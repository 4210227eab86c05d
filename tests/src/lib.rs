//! The Meridian test harness.
//!
//! Integration tests run against real parts: each [`RegionSandbox`] starts its
//! own `redis-server` and PostgreSQL cluster (through `meridian-launcher`) and a
//! regional node on a free port; a [`ClusterSandbox`] starts several regions and
//! the gateway in front of them; a [`TestDns`] serves the SRV records a
//! gateway discovers region nodes from; a [`FaultProxy`] sits between
//! regions to delay, drop or cut their traffic; [`conformance`] runs
//! schemathesis over OpenAI's API description against a deployment; an
//! [`AzureUpstream`] answers only Azure OpenAI's paths and key header. Every
//! handle can be stopped and restarted, and everything is torn down on drop,
//! even when a test panics.

mod azure_upstream;
mod collector;
pub mod conformance;
mod dns;
mod embedding_upstream;
pub mod fault_proxy;
pub mod keys;
pub mod load;
mod openai_upstream;
mod pki;
mod process;
mod python;
mod recording_upstream;
pub mod replicated;
mod sandbox;
mod served;
mod time_series;
mod tls_upstream;
mod upstream;

pub use meridian_launcher::{PostgresServer, RedisServer};

pub use self::azure_upstream::{AZURE_API_VERSION, AzureUpstream};
pub use self::collector::{OtlpCollector, ReceivedSpan};
pub use self::dns::{SrvTarget, TestDns};
pub use self::embedding_upstream::{
    EMBEDDING_UPSTREAM_DIMENSIONS, EMBEDDING_UPSTREAM_NOTE, EmbeddingUpstream, expected_vector,
};
pub use self::fault_proxy::{Direction, FaultProxy, Link, Links, ProxyStats};
pub use self::openai_upstream::{OPENAI_UPSTREAM_MODEL, OpenAiUpstream};
pub use self::pki::{TestPki, mesh_channel};
pub use self::process::RegionProcess;
pub use self::python::run_data_script;
pub use self::recording_upstream::{
    RECORDED_ARGUMENTS, RecordingUpstream, UPSTREAM_FINGERPRINT, UPSTREAM_ONLY_FIELD,
};
pub use self::sandbox::{
    ClusterSandbox, RegionNode, RegionSandbox, TEST_MODEL, TEST_SLOW_MODEL, embedding_model_dir,
    gateway_config, region_location, start_gateway,
};
pub use self::time_series::{TimeSeries, require_extension};
pub use self::tls_upstream::TlsUpstream;
pub use self::upstream::{FaultyUpstream, SimServer, instant_sim, metric};

/// Per-process test setup: sends the harness's and the system's logs to the
/// test output (`RUST_LOG` selects what is shown; default: warnings), and
/// installs rustls' ring provider, which HTTP clients built with
/// `rustls-no-provider` (the tests' TLS clients) need before first use.
pub fn init_logging() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
