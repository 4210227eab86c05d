//! Creating and revoking API keys.

use meridian_proto::api_key::{KEY_PREFIX, hash_key};
use rand::Rng;
use sqlx::PgPool;

use super::Error;

/// Random characters after the prefix of a key or an operator token.
const RANDOM_CHARS: usize = 40;
/// Characters of a key stored in clear (`mk-` and six more): enough to tell
/// keys apart in a listing, 36 of 240 random bits.
const DISPLAY_PREFIX_CHARS: usize = 9;
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Creates a key for `tenant` and returns it: the only time the key exists
/// in clear.
pub async fn create_api_key(pool: &PgPool, tenant: &str) -> Result<String, Error> {
    let (id, key, prefix) = new_key();
    let inserted = sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, prefix, key_hash)
         SELECT $1, id, $3, $4 FROM tenants WHERE id = $2",
    )
    .bind(id)
    .bind(tenant)
    .bind(&prefix)
    .bind(&hash_key(key.as_bytes())[..])
    .execute(pool)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(Error::UnknownTenant(tenant.to_string()));
    }
    Ok(key)
}

/// A new key: its row id, the key in clear, and the prefix kept for display.
pub(super) fn new_key() -> (uuid::Uuid, String, String) {
    let (key, prefix) = new_secret(KEY_PREFIX, DISPLAY_PREFIX_CHARS);
    (uuid::Uuid::now_v7(), key, prefix)
}

/// A fresh secret (`prefix` and [`RANDOM_CHARS`] random URL-safe
/// characters) in clear, and its first `display_chars` kept for display.
/// Not async, so the thread-local generator is never held across an await.
pub(super) fn new_secret(prefix: &str, display_chars: usize) -> (String, String) {
    let mut rng = rand::rng();
    let mut secret = String::with_capacity(prefix.len() + RANDOM_CHARS);
    secret.push_str(prefix);
    for _ in 0..RANDOM_CHARS {
        secret.push(URL_SAFE[rng.random_range(0..URL_SAFE.len())] as char);
    }
    let shown = secret[..display_chars].to_string();
    (secret, shown)
}

/// Revokes `key`; returns whether a live key was revoked (false when it was
/// unknown or revoked already). Gateways stop accepting it at their next
/// reload.
pub async fn revoke_api_key(pool: &PgPool, key: &str) -> Result<bool, Error> {
    let done = sqlx::query(
        "UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1 AND revoked_at IS NULL",
    )
    .bind(&hash_key(key.trim().as_bytes())[..])
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}
