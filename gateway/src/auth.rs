//! Tenants and API keys, as the gateway authenticates them.
//!
//! Keys are created and revoked in a region (`meridian_regional::tenancy`);
//! PostgreSQL keeps only their hash (`meridian_proto::api_key::hash_key`).
//! The gateway loads every live key into an immutable snapshot every
//! `auth.reload_interval_ms` and swaps it in atomically ([`arc_swap`]), so a
//! request looks its key up without a lock and a revocation (`revoked_at`
//! set) takes effect at the next reload. The gateway only reads `api_keys`
//! and `tenants`: the schema is `regional/migrations/0004_tenants.sql`.
//!
//! A PostgreSQL outage keeps the last snapshot in force (keys keep working,
//! revocations wait), which is the choice that keeps an edge serving.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::HeaderValue;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::Deserialize;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::watch;

use meridian_proto::api_key::hash_key;

use crate::ratelimit::{Limits, RateLimitConfig};
use crate::regions::Regions;

pub(crate) mod gate;

/// Tenant of every request when `[auth]` is not configured.
pub use meridian_proto::DEFAULT_TENANT;
/// Request header (and gRPC metadata key) the gateway names the tenant in
/// towards regions. Whatever a client sends in it is discarded.
pub use meridian_proto::header::TENANT as TENANT_HEADER;

/// Where API keys come from (`[auth]`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// PostgreSQL database the keys are read from (any region's: keys
    /// replicate to every region). The gateway only reads; regions migrate.
    pub postgres_url: String,
    /// Time between reloads of the keys, in milliseconds; a new or revoked
    /// key takes effect within about this long.
    #[serde(default = "default_reload_interval_ms")]
    pub reload_interval_ms: u64,
}

fn default_reload_interval_ms() -> u64 {
    1_000
}

impl AuthConfig {
    /// Keys read from `postgres_url`, reloaded every second.
    pub fn new(postgres_url: impl Into<String>) -> Self {
        Self {
            postgres_url: postgres_url.into(),
            reload_interval_ms: default_reload_interval_ms(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        self.postgres_url
            .parse::<PgConnectOptions>()
            .map_err(|e| format!("`auth.postgres_url` is not a PostgreSQL URL: {e}"))?;
        if self.reload_interval_ms == 0 {
            return Err("`auth.reload_interval_ms` must be at least 1".into());
        }
        Ok(())
    }
}

// The URL may carry a password.
impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("postgres_url", &"<redacted>")
            .field("reload_interval_ms", &self.reload_interval_ms)
            .finish()
    }
}

/// A tenant as the proxy sees it: who it is (id, and the header value to
/// forward) and its limits resolved against the defaults. What the limiter
/// remembers of it, the limiter keeps.
pub(crate) struct Tenant {
    pub(crate) id: Arc<str>,
    pub(crate) header: HeaderValue,
    pub(crate) limits: Limits,
    /// The regions the tenant may be served in (data residency); `None`:
    /// any.
    pub(crate) allowed_regions: Option<Vec<String>>,
}

impl Tenant {
    fn new(id: &str, limits: Limits, allowed_regions: Option<Vec<String>>) -> Option<Self> {
        Some(Self {
            header: HeaderValue::from_str(id).ok()?,
            id: Arc::from(id),
            limits,
            allowed_regions,
        })
    }
}

/// SHA-256 digests are uniformly distributed already: their first bytes are
/// a good hash, no need to run SipHash over them.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= u64::from(*b) << (8 * i);
        }
    }
}

type KeyMap = HashMap<[u8; 32], Arc<Tenant>, BuildHasherDefault<DigestHasher>>;

/// Why a request was refused.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal {
    Missing,
    Invalid,
    NotLoaded,
}

impl Refusal {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Invalid => "invalid",
            Self::NotLoaded => "not_loaded",
        }
    }
}

/// How long a request waits for the first load of the keys after start.
const FIRST_LOAD_WAIT: Duration = Duration::from_secs(5);

/// The proxy's view of authentication.
pub(crate) struct Auth {
    keys: Option<Arc<KeyStore>>,
    /// The tenant of every request when auth is off.
    default: Arc<Tenant>,
}

pub(crate) struct KeyStore {
    snapshot: ArcSwap<KeyMap>,
    loaded: watch::Sender<bool>,
    config: AuthConfig,
    defaults: Limits,
}

impl Auth {
    pub(crate) fn new(auth: Option<&AuthConfig>, rate_limit: &RateLimitConfig) -> Self {
        let defaults = rate_limit.default_limits();
        let default = Tenant::new(DEFAULT_TENANT, defaults, None)
            .expect("the default tenant is a valid header value");
        Self {
            keys: auth.map(|config| {
                Arc::new(KeyStore {
                    snapshot: ArcSwap::from_pointee(KeyMap::default()),
                    loaded: watch::channel(false).0,
                    config: config.clone(),
                    defaults,
                })
            }),
            default: Arc::new(default),
        }
    }

    /// Whether clients must present a key.
    pub(crate) fn enabled(&self) -> bool {
        self.keys.is_some()
    }

    /// The background service that reloads the keys, when auth is on.
    pub(crate) fn loader(&self) -> Option<KeyLoader> {
        self.keys.clone().map(|store| KeyLoader {
            store,
            regions: None,
        })
    }

    /// The SHA-256 of the key in an `authorization` value (`Bearer <key>`).
    pub(crate) fn digest(authorization: Option<&[u8]>) -> Option<[u8; 32]> {
        authorization.and_then(bearer).map(hash_key)
    }

    /// The tenant of a request, from the digest of its key.
    pub(crate) async fn authenticate(
        &self,
        digest: Option<[u8; 32]>,
    ) -> Result<Arc<Tenant>, Refusal> {
        let Some(keys) = &self.keys else {
            return Ok(self.default.clone());
        };
        let digest = digest.ok_or(Refusal::Missing)?;
        if !*keys.loaded.borrow() {
            let mut rx = keys.loaded.subscribe();
            match tokio::time::timeout(FIRST_LOAD_WAIT, rx.wait_for(|l| *l)).await {
                Ok(Ok(_)) => {}
                _ => return Err(Refusal::NotLoaded),
            }
        }
        keys.snapshot
            .load()
            .get(&digest)
            .cloned()
            .ok_or(Refusal::Invalid)
    }
}

/// The key of `Bearer <key>` (scheme case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let key = rest.trim_ascii();
    (!key.is_empty()).then_some(key)
}

/// Reloads the keys every `reload_interval_ms` (a Pingora background
/// service), and with them the operators' region controls.
pub(crate) struct KeyLoader {
    store: Arc<KeyStore>,
    regions: Option<Arc<Regions>>,
}

impl KeyLoader {
    /// Applies the operators' drains and weights (`region_controls`) to
    /// `regions` at each reload.
    pub(crate) fn with_regions(self, regions: Arc<Regions>) -> Self {
        Self {
            regions: Some(regions),
            ..self
        }
    }
}

/// Reads the operators' region controls and applies them to `regions`: a
/// region with none takes traffic as usual.
async fn apply_controls(pool: &PgPool, regions: &Regions) -> Result<(), sqlx::Error> {
    let rows: Vec<(String, bool, i32)> =
        sqlx::query_as("SELECT region, drained, weight FROM region_controls")
            .fetch_all(pool)
            .await?;
    for region in &regions.list {
        let (drained, weight) = rows
            .iter()
            .find(|(name, _, _)| *name == region.name)
            .map_or((false, 100), |(_, d, w)| {
                (*d, u32::try_from(*w).unwrap_or(100))
            });
        if region.control(drained, weight) {
            tracing::warn!(region = %region.name, drained, weight, "an operator's control of the region applied");
        }
    }
    Ok(())
}

type KeyRow = (
    Vec<u8>,
    String,
    Option<i32>,
    Option<i64>,
    Option<Vec<String>>,
);

impl KeyStore {
    async fn reload(&self, pool: &PgPool) -> Result<usize, sqlx::Error> {
        let rows: Vec<KeyRow> = sqlx::query_as(
            "SELECT k.key_hash, t.id, t.requests_per_second, t.tokens_per_minute,
                    t.allowed_regions
               FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
              WHERE k.revoked_at IS NULL",
        )
        .fetch_all(pool)
        .await?;
        let mut map = KeyMap::with_capacity_and_hasher(rows.len(), Default::default());
        let mut tenants: HashMap<&str, Arc<Tenant>> = HashMap::new();
        for (hash, id, rps, tpm, allowed) in &rows {
            let Ok(digest) = <[u8; 32]>::try_from(hash.as_slice()) else {
                continue;
            };
            let tenant = match tenants.get(id.as_str()) {
                Some(t) => t.clone(),
                None => {
                    let limits = Limits {
                        requests_per_second: rps
                            .and_then(|r| u32::try_from(r).ok())
                            .or(self.defaults.requests_per_second),
                        tokens_per_minute: tpm
                            .and_then(|t| u64::try_from(t).ok())
                            .or(self.defaults.tokens_per_minute),
                    };
                    let Some(tenant) = Tenant::new(id, limits, allowed.clone()) else {
                        continue;
                    };
                    let tenant = Arc::new(tenant);
                    tenants.insert(id, tenant.clone());
                    tenant
                }
            };
            map.insert(digest, tenant);
        }
        let count = map.len();
        self.snapshot.store(Arc::new(map));
        self.loaded.send_replace(true);
        Ok(count)
    }
}

#[async_trait]
impl BackgroundService for KeyLoader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let store = &self.store;
        let interval = Duration::from_millis(store.config.reload_interval_ms);
        let pool = match PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(interval.max(Duration::from_secs(1)))
            .connect_lazy(&store.config.postgres_url)
        {
            Ok(pool) => pool,
            Err(e) => {
                tracing::error!(error = %e, "cannot use auth.postgres_url: no API key will work");
                return;
            }
        };
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let mut controls_failing = false;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => return,
            }
            match store.reload(&pool).await {
                Ok(count) => {
                    if failing {
                        tracing::info!(keys = count, "API keys reloaded again");
                    }
                    failing = false;
                }
                Err(e) => {
                    // Log the first failure of a run, not one per interval.
                    if !failing {
                        tracing::warn!(error = %e, "cannot reload API keys; the last ones loaded stay in force");
                    }
                    failing = true;
                }
            }
            if let Some(regions) = &self.regions {
                match apply_controls(&pool, regions).await {
                    Ok(()) => controls_failing = false,
                    Err(e) => {
                        if !controls_failing {
                            tracing::warn!(error = %e, "cannot read the region controls; the last ones stay in force");
                        }
                        controls_failing = true;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_values() {
        assert_eq!(bearer(b"Bearer mk-abc"), Some(&b"mk-abc"[..]));
        assert_eq!(bearer(b"bearer  mk-abc "), Some(&b"mk-abc"[..]));
        assert_eq!(bearer(b"Basic mk-abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"mk-abc"), None);
    }
}
