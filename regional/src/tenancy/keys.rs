//! Creating and revoking API keys.

use meridian_proto::api_key::{KEY_PREFIX, hash_key};
use rand::Rng;
use sqlx::PgPool;

use super::Error;

/// Random characters after [`KEY_PREFIX`].
const KEY_RANDOM_CHARS: usize = 40;
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
    let mut rng = rand::rng();
    let mut key = String::with_capacity(KEY_PREFIX.len() + KEY_RANDOM_CHARS);
    key.push_str(KEY_PREFIX);
    for _ in 0..KEY_RANDOM_CHARS {
        key.push(URL_SAFE[rng.random_range(0..URL_SAFE.len())] as char);
    }
    let prefix = key[..DISPLAY_PREFIX_CHARS].to_string();
    (uuid::Uuid::now_v7(), key, prefix)
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
