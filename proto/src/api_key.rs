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

/// The credential of an `Authorization: Bearer <credential>` value (scheme
/// case-insensitive, surrounding blanks dropped): an API key or an operator
/// token. One reading for the gateway and the regions, so that what one
/// passes on as a token the other reads as one.
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let key = rest.trim_ascii();
    (!key.is_empty()).then_some(key)
}

/// What every operator token starts with (`operator_tokens`): a gateway
/// tells one from an API key by it, and passes it on to a region instead
/// of checking it as a key.
pub const OPERATOR_TOKEN_PREFIX: &str = "mop-";

#[cfg(test)]
mod tests {
    use super::bearer;

    #[test]
    fn bearer_values() {
        assert_eq!(bearer(b"Bearer mk-abc"), Some(&b"mk-abc"[..]));
        assert_eq!(bearer(b"bearer  mk-abc "), Some(&b"mk-abc"[..]));
        assert_eq!(bearer(b"Basic mk-abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"mk-abc"), None);
    }
}
