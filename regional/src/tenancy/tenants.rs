//! Creating a tenant and setting its limits.

use sqlx::PgPool;

use super::Error;

/// A tenant's own limits; `None` means the gateway's `[rate_limit]` default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantLimits {
    /// Requests per second.
    pub requests_per_second: Option<u32>,
    /// Tokens (prompt and completion) per minute.
    pub tokens_per_minute: Option<u64>,
}

/// Creates tenant `id`, or updates its limits if it exists: limits given
/// replace the tenant's, limits left `None` keep what it had (a new tenant
/// then gets the gateway's defaults).
pub async fn create_tenant(pool: &PgPool, id: &str, limits: TenantLimits) -> Result<(), Error> {
    let (rps, tpm) = checked(id, limits)?;
    sqlx::query(
        "INSERT INTO tenants (id, display_name, requests_per_second, tokens_per_minute)
         VALUES ($1, $1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET
             requests_per_second = COALESCE(EXCLUDED.requests_per_second, tenants.requests_per_second),
             tokens_per_minute = COALESCE(EXCLUDED.tokens_per_minute, tenants.tokens_per_minute),
             updated_at = now()",
    )
    .bind(id)
    .bind(rps)
    .bind(tpm)
    .execute(pool)
    .await?;
    Ok(())
}

/// Checks tenant `id` and `limits`, and returns the limits as the `tenants`
/// table stores them (requests per second, tokens per minute).
pub(super) fn checked(id: &str, limits: TenantLimits) -> Result<(Option<i32>, Option<i64>), Error> {
    if !meridian_proto::valid_tenant_id(id) {
        return Err(Error::InvalidTenant(id.to_string()));
    }
    if limits.requests_per_second == Some(0) || limits.tokens_per_minute == Some(0) {
        return Err(Error::InvalidLimits);
    }
    Ok((
        limits
            .requests_per_second
            .map(|r| i32::try_from(r).unwrap_or(i32::MAX)),
        limits
            .tokens_per_minute
            .map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
    ))
}
