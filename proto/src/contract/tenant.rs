//! Tenant ids: what the gateway forwards in [`header::TENANT`](super::header::TENANT),
//! what a region accepts there, and what `meridian keys` lets an operator
//! create.

/// Tenant of requests that name none: every request when the gateway runs
/// without `[auth]`, and direct requests to a region.
pub const DEFAULT_TENANT: &str = "default";

/// Longest tenant id, in bytes.
pub const MAX_TENANT_ID_LEN: usize = 64;

/// Whether `id` is a tenant id: 1 to 64 ASCII letters, digits, `-`, `_` or
/// `.`, so it is safe in a header, a Redis key and a metric label.
pub fn valid_tenant_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_TENANT_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids() {
        assert!(valid_tenant_id("acme-1.prod_x"));
        assert!(valid_tenant_id(DEFAULT_TENANT));
        assert!(valid_tenant_id(&"x".repeat(64)));
        assert!(!valid_tenant_id(""));
        assert!(!valid_tenant_id("a b"));
        assert!(!valid_tenant_id("é"));
        assert!(!valid_tenant_id("a:b"));
        assert!(!valid_tenant_id(&"x".repeat(65)));
    }
}
