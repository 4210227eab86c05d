//! What an API key looks like and how it is stored, shared by the region
//! that creates and revokes keys and the gateway that checks them: both must
//! hash a key the same way or no key would ever match.

use sha2::{Digest, Sha256};

/// What every key starts with.
pub const KEY_PREFIX: &str = "mk-";

/// The SHA-256 of a key: all PostgreSQL keeps of it (`api_keys.key_hash`),
/// and what the gateway looks a presented key up by.
pub fn hash_key(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// What every operator token starts with (`operator_tokens`): a gateway
/// tells one from an API key by it, and passes it on to a region instead
/// of checking it as a key.
pub const OPERATOR_TOKEN_PREFIX: &str = "mop-";
