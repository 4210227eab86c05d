//! Tenants: the tenant a request acts for ([`Tenant`], named by the
//! gateway), and tenants and API keys administered in a region's
//! PostgreSQL: the tables
//! (`tenants`, `api_keys`, `regional/migrations/0004_tenants.sql`) belong to
//! the region and replicate to every other region like any durable write.
//! `meridian keys` and the tests call these functions; gateways only read the
//! keys to authenticate requests.
//!
//! A key is [`KEY_PREFIX`] and 40 random URL-safe characters. PostgreSQL
//! keeps only its [`hash_key`] (and a short prefix for display), so a key
//! exists in clear only in what [`create_api_key`] returns.

mod keys;
pub(crate) mod manage;
pub(crate) mod operators;
pub(crate) mod prices;
pub(crate) mod regions;
pub(crate) mod spend;
mod tenant;
mod tenants;

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

pub use self::keys::{create_api_key, revoke_api_key};
pub(crate) use self::tenant::{DEFAULT_TENANT, TENANT_HEADER, Tenant};
pub use self::tenants::{TenantLimits, create_tenant};
pub use meridian_proto::api_key::{KEY_PREFIX, hash_key};

/// What managing tenants and keys can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database refused or could not be reached.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A tenant id must be 1 to 64 letters, digits, `-`, `_` or `.`.
    #[error("invalid tenant id {0:?}: use 1 to 64 letters, digits, '-', '_' or '.'")]
    InvalidTenant(String),
    /// Limits must be at least 1 (leave them out for the default).
    #[error("limits must be at least 1")]
    InvalidLimits,
    /// Allowed regions must be region names, at least one.
    #[error("{0}")]
    InvalidRegions(String),
    /// A budget must name tokens or dollars, each above zero, per `day`
    /// or `month`.
    #[error("{0}")]
    InvalidBudget(String),
    /// A price must be 0 to a million dollars per million tokens, for a
    /// named model.
    #[error("{0}")]
    InvalidPrice(String),
    /// A region control's weight is 0 to 100, its reason short.
    #[error("{0}")]
    InvalidControl(String),
    /// A key's name, labels, expiry or models are not valid.
    #[error("{0}")]
    InvalidKey(String),
    /// An operator token's name, role or expiry is not valid.
    #[error("{0}")]
    InvalidToken(String),
    /// A tenant's allowed models are not valid.
    #[error("{0}")]
    InvalidModels(String),
    /// No tenant with this id.
    #[error("no tenant {0:?}: create it first")]
    UnknownTenant(String),
    /// No peer region acknowledged the change in time (see
    /// [`wait_replicated`]).
    #[error(
        "no peer region applied the change within {waited_ms} ms: it is stored in this region \
         and replicates once a peer pulls it"
    )]
    NotReplicated { waited_ms: u64 },
}

/// A pool for the key-management functions (a few connections, for tools).
pub async fn connect(postgres_url: &str) -> Result<PgPool, Error> {
    Ok(PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect(postgres_url)
        .await?)
}

/// Waits until at least one peer region has applied this region's
/// replication log through its current end, which holds every change
/// committed before the call (a key made or revoked just now): the change
/// then survives the loss of this region. Peers report what they applied
/// in `replication_peers.acked_sequence`; polled every 50 ms, for at most
/// `timeout`. The synchronous durability of `meridian keys --sync`.
pub async fn wait_replicated(pool: &PgPool, timeout: Duration) -> Result<(), Error> {
    let end: Option<i64> = sqlx::query_scalar("SELECT max(sequence) FROM replication_outbox")
        .fetch_one(pool)
        .await?;
    // An empty log was trimmed whole, which only changes every peer applied.
    let Some(end) = end else { return Ok(()) };
    let started = std::time::Instant::now();
    loop {
        let acked: Option<i64> =
            sqlx::query_scalar("SELECT max(acked_sequence) FROM replication_peers")
                .fetch_one(pool)
                .await?;
        if acked.is_some_and(|a| a >= end) {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(Error::NotReplicated {
                waited_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
