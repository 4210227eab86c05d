//! The Meridian service mesh: who a service is (a `spiffe://meridian/...`
//! URI SAN in its certificate), a development CA to issue such
//! certificates, certificate files reloaded on change, and the rustls
//! configurations every internal hop (gateway → region, health checks,
//! region → region) uses for mutual TLS; and the OpenTelemetry tracer each
//! component exports its spans with, with `traceparent` propagation
//! between them ([`trace`]).
//!
//! It is a crate of its own, at the top of the workspace beside `proto/`,
//! because it is runtime code that the regions and the gateway link, not a
//! part of the CLI; the CLI and the tests use it too. Keeping the identity
//! rules in one crate means the CA and the policy cannot drift apart.
//!
//! [`SrvWatch`] finds a service's nodes through DNS SRV records, for the
//! gateway's regions now and for region peers later.

mod discovery;
mod files;
mod identity;
mod issue;
mod tls;
pub mod trace;

pub use self::discovery::{
    Answer, Discovered, DiscoveryConfig, DiscoveryError, SrvNode, SrvResolver, SrvWatch,
};
pub use self::files::{CertFiles, Loaded, watch};
pub use self::identity::{
    Identity, Role, TRUST_DOMAIN, region_server_name, serial_of, validate_pattern,
};
pub use self::issue::{Ca, DEV_VALIDITY, Issued, file_stem, keep_private, write_private};
pub use self::tls::{
    ConfigSource, MeshConnector, client_config, peer_identity, provider, server_config,
};

pub use self::trace::{TraceConfig, Tracer};

pub use arc_swap::ArcSwap;
pub use rustls;
pub use tokio_rustls;
