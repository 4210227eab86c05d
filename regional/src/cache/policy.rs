//! Whether the cache answers a request and keeps its answer: the client's
//! directives weighed against whether the answer is reproducible.

use super::{OPT_IN_HEADER, ResponseCache};
use crate::inference::ChatRequest;

/// What the client asked of the cache, from `Cache-Control`,
/// `x-meridian-cache` or the gRPC `no_cache` field.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Directives {
    /// Neither read nor write (`no-store`, gRPC `no_cache`).
    pub no_store: bool,
    /// Do not read, but store the fresh answer (`no-cache`).
    pub no_cache: bool,
    /// Cache even a request that is not deterministic.
    pub opt_in: bool,
}

impl Directives {
    /// Reads the directives from request headers (or gRPC metadata).
    pub(crate) fn parse<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Self {
        let mut d = Self::default();
        for token in header("cache-control")
            .unwrap_or_default()
            .split(',')
            .map(|t| t.trim().to_ascii_lowercase())
        {
            match token.as_str() {
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = true,
                _ => {}
            }
        }
        d.opt_in = header(OPT_IN_HEADER).is_some_and(|v| v.trim().eq_ignore_ascii_case("allow"));
        d
    }
}

/// What to do with the cache for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    /// Neither read nor write.
    Bypass,
    /// Skip the lookup, store the fresh answer.
    Refresh,
    /// Look up, and store on a miss.
    Use,
}

impl ResponseCache {
    /// The policy for `req` (its model resolved) given the client's directives.
    pub(crate) fn policy(&self, req: &ChatRequest, d: Directives) -> Policy {
        let deterministic = req.temperature == Some(0.0) || req.seed.is_some();
        if !self.config.enabled || d.no_store || !(deterministic || d.opt_in) {
            Policy::Bypass
        } else if d.no_cache {
            Policy::Refresh
        } else {
            Policy::Use
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_read_cache_control_and_opt_in() {
        let d = Directives::parse(|name| match name {
            "cache-control" => Some("max-age=0, No-Cache"),
            OPT_IN_HEADER => Some("allow"),
            _ => None,
        });
        assert!(d.no_cache && d.opt_in && !d.no_store);
        let d = Directives::parse(|name| (name == "cache-control").then_some("no-store"));
        assert!(d.no_store && !d.opt_in);
    }
}
