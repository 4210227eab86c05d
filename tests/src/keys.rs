//! Tenants with API keys and limits, for tests of the gateway's gate: a
//! cluster whose gateway reads its keys from the first region's PostgreSQL.

use meridian_gateway::AuthConfig;
use meridian_regional::tenancy::{self, TenantLimits};
use sqlx::PgPool;

use crate::ClusterSandbox;

/// A cluster of `regions` whose gateway reloads keys every `reload_ms`
/// from the first region's PostgreSQL and, when `shared_limits`, keeps
/// rate limits in the second region's Redis.
pub async fn keyed_cluster(
    regions: &[&str],
    reload_ms: u64,
    shared_limits: bool,
) -> ClusterSandbox {
    ClusterSandbox::start_with_regions(regions, |regions, config| {
        config.auth = Some(AuthConfig {
            reload_interval_ms: reload_ms,
            ..AuthConfig::new(regions[0].postgres.url())
        });
        if shared_limits {
            config.rate_limit.redis_url = Some(regions[1].redis.url());
        }
    })
    .await
}

/// The PostgreSQL the gateway of a [`keyed_cluster`] reads keys from.
pub async fn key_pool(sandbox: &ClusterSandbox) -> PgPool {
    tenancy::connect(&sandbox.regions[0].postgres.url())
        .await
        .expect("the key database accepts connections")
}

/// Creates tenant `id` with `limits` and returns a new API key of it.
pub async fn tenant_with_key(pool: &PgPool, id: &str, limits: TenantLimits) -> String {
    tenancy::create_tenant(pool, id, limits)
        .await
        .expect("the tenant is created");
    tenancy::create_api_key(pool, id)
        .await
        .expect("the key is created")
}
