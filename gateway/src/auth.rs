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

use meridian_proto::api_key::{bearer, hash_key};

use crate::ratelimit::{Limits, RateLimitConfig};
use crate::regions::Regions;

pub(crate) mod gate;
pub(crate) use self::gate::is_management;

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

/// One API key as the proxy sees it: its tenant, and what the key itself
/// adds (an id for regions, an expiry, the models it may use).
pub(crate) struct Key {
    pub(crate) tenant: Arc<Tenant>,
    /// The key's id, as sent to regions; `None` when auth is off.
    pub(crate) id: Option<HeaderValue>,
    /// When it stops working; `None`: never. Checked on every request, as
    /// keys reload only every interval; keys that expired in the last week
    /// stay loaded, so their callers are told why.
    expires_at: Option<std::time::SystemTime>,
    /// The models (or routes) the key and its tenant allow, comma-joined,
    /// for regions to enforce; `None`: any.
    pub(crate) models: Option<HeaderValue>,
}

/// The models a key may use: its own list within its tenant's.
fn allowed_models(tenant: Option<&[String]>, key: Option<&[String]>) -> Option<String> {
    let list: Vec<&String> = match (tenant, key) {
        (None, None) => return None,
        (Some(t), None) => t.iter().collect(),
        (None, Some(k)) => k.iter().collect(),
        (Some(t), Some(k)) => k.iter().filter(|m| t.contains(m)).collect(),
    };
    Some(
        list.iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>()
            .join(","),
    )
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

type KeyMap = HashMap<[u8; 32], Arc<Key>, BuildHasherDefault<DigestHasher>>;

/// Why a request was refused.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal {
    Missing,
    Invalid,
    NotLoaded,
    /// The key's expiry has passed (its reload has not dropped it yet).
    Expired,
}

impl Refusal {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Invalid => "invalid",
            Self::NotLoaded => "not_loaded",
            Self::Expired => "expired",
        }
    }
}

/// How long a request waits for the first load of the keys after start.
const FIRST_LOAD_WAIT: Duration = Duration::from_secs(5);

/// The proxy's view of authentication.
pub(crate) struct Auth {
    keys: Option<Arc<KeyStore>>,
    /// The tenant of every request when auth is off.
    default: Arc<Key>,
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
            default: Arc::new(Key {
                tenant: Arc::new(default),
                id: None,
                expires_at: None,
                models: None,
            }),
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

    /// The key of a request (and so its tenant), from the digest of its
    /// key.
    pub(crate) async fn authenticate(&self, digest: Option<[u8; 32]>) -> Result<Arc<Key>, Refusal> {
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
        let key = keys
            .snapshot
            .load()
            .get(&digest)
            .cloned()
            .ok_or(Refusal::Invalid)?;
        if key
            .expires_at
            .is_some_and(|at| at <= std::time::SystemTime::now())
        {
            return Err(Refusal::Expired);
        }
        Ok(key)
    }
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

#[derive(sqlx::FromRow)]
struct KeyRow {
    key_hash: Vec<u8>,
    tenant: String,
    requests_per_second: Option<i32>,
    tokens_per_minute: Option<i64>,
    allowed_regions: Option<Vec<String>>,
    tenant_models: Option<Vec<String>>,
    id: String,
    /// Unix milliseconds.
    expires_ms: Option<i64>,
    key_models: Option<Vec<String>>,
}

impl KeyStore {
    async fn reload(&self, pool: &PgPool) -> Result<usize, sqlx::Error> {
        let rows: Vec<KeyRow> = sqlx::query_as(
            "SELECT k.key_hash, t.id AS tenant, t.requests_per_second, t.tokens_per_minute,
                    t.allowed_regions, t.allowed_models AS tenant_models, k.id::text AS id,
                    (extract(epoch FROM k.expires_at) * 1000)::int8 AS expires_ms,
                    k.allowed_models AS key_models
               FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
              WHERE k.revoked_at IS NULL
                AND (k.expires_at IS NULL OR k.expires_at > now() - interval '7 days')",
        )
        .fetch_all(pool)
        .await?;
        let mut map = KeyMap::with_capacity_and_hasher(rows.len(), Default::default());
        let mut tenants: HashMap<&str, Arc<Tenant>> = HashMap::new();
        for row in &rows {
            let Ok(digest) = <[u8; 32]>::try_from(row.key_hash.as_slice()) else {
                continue;
            };
            let tenant = match tenants.get(row.tenant.as_str()) {
                Some(t) => t.clone(),
                None => {
                    let limits = Limits {
                        requests_per_second: row
                            .requests_per_second
                            .and_then(|r| u32::try_from(r).ok())
                            .or(self.defaults.requests_per_second),
                        tokens_per_minute: row
                            .tokens_per_minute
                            .and_then(|t| u64::try_from(t).ok())
                            .or(self.defaults.tokens_per_minute),
                    };
                    let Some(tenant) =
                        Tenant::new(&row.tenant, limits, row.allowed_regions.clone())
                    else {
                        continue;
                    };
                    let tenant = Arc::new(tenant);
                    tenants.insert(&row.tenant, tenant.clone());
                    tenant
                }
            };
            let models = allowed_models(row.tenant_models.as_deref(), row.key_models.as_deref())
                .and_then(|m| HeaderValue::from_str(&m).ok());
            let key = Key {
                tenant,
                id: HeaderValue::from_str(&row.id).ok(),
                expires_at: row.expires_ms.map(|ms| {
                    std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
                }),
                models,
            };
            map.insert(digest, Arc::new(key));
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
    fn a_keys_models_are_narrowed_by_its_tenants() {
        let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(allowed_models(None, None), None);
        assert_eq!(
            allowed_models(Some(&list(&["a", "b"])), None).as_deref(),
            Some("a,b")
        );
        assert_eq!(
            allowed_models(Some(&list(&["a", "b"])), Some(&list(&["b", "c"]))).as_deref(),
            Some("b")
        );
        // Nothing in common: nothing allowed, not anything.
        assert_eq!(
            allowed_models(Some(&list(&["a"])), Some(&list(&["c"]))).as_deref(),
            Some("")
        );
    }
}
