//! How the cache names and encodes what it keeps in the region's Redis:
//! exact answers, semantic entries and the event stream every node follows.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Answer, Key, Query};

pub(super) const PREFIX: &str = "meridian:cache:v1";
/// The region's stream of semantic entries and purges, which every node
/// follows to keep its index in step with the others.
pub(super) const EVENTS: &str = "meridian:cache:v1:events";

/// A semantic entry as Redis keeps it.
#[derive(Serialize, Deserialize)]
pub(super) struct StoredEntry {
    pub(super) text: String,
    pub(super) tenant: String,
    pub(super) partition: String,
    pub(super) vector: Vec<f32>,
    pub(super) answer: Answer,
    pub(super) expires_ms: u64,
}

pub(super) fn exact_key(key: &Key) -> String {
    format!("{PREFIX}:{}:x:{}", key.tenant, hex::encode(key.hash))
}

pub(super) fn semantic_key(tenant: &str, id: &[u8; 32]) -> String {
    format!("{PREFIX}:{tenant}:s:{}", hex::encode(id))
}

/// One id per question of a partition, so the same question stored by two
/// nodes is one entry.
pub(super) fn entry_id(tenant: &str, query: &Query) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(tenant.as_bytes());
    h.update([0]);
    h.update(query.partition);
    h.update(query.text.as_bytes());
    h.finalize().into()
}

pub(super) fn tenant_of(key: &str) -> Option<&str> {
    key.strip_prefix(PREFIX)?
        .strip_prefix(':')?
        .split(':')
        .next()
}

pub(super) fn id_of(key: &str) -> Option<[u8; 32]> {
    let mut id = [0u8; 32];
    hex::decode_to_slice(key.rsplit(':').next()?, &mut id).ok()?;
    Some(id)
}

pub(super) fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_keys_name_their_tenant_and_id() {
        let id = [7u8; 32];
        let key = semantic_key("acme.prod", &id);
        assert_eq!(tenant_of(&key), Some("acme.prod"));
        assert_eq!(id_of(&key), Some(id));
    }
}
