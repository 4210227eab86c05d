//! The tokens a request is charged before the region reports its usage.

/// Bodies up to this size are read before the decision to find `max_tokens`;
/// larger (or chunked) bodies are estimated from their length alone.
pub(crate) const SCAN_BODY_LIMIT: usize = 16 * 1024;

/// What the gateway reads of a small JSON request body before deciding.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scan {
    /// `max_tokens` (or `max_completion_tokens`, the larger when both are
    /// given).
    pub max_tokens: Option<u64>,
    /// `"stream": true`: the usage of the answer comes only at its end.
    pub stream: bool,
}

/// The top-level keys only, so a key of that name inside a message or a
/// tool schema is not read as the request's. A body that is not a JSON
/// object, or a value of the wrong type, gives none (the region refuses such
/// a body anyway).
pub(crate) fn scan(body: &[u8]) -> Scan {
    #[derive(serde::Deserialize)]
    struct Keys {
        #[serde(default)]
        max_tokens: Option<serde_json::Value>,
        #[serde(default)]
        max_completion_tokens: Option<serde_json::Value>,
        #[serde(default)]
        stream: Option<serde_json::Value>,
    }
    let Ok(keys) = serde_json::from_slice::<Keys>(body) else {
        return Scan::default();
    };
    Scan {
        max_tokens: [keys.max_tokens, keys.max_completion_tokens]
            .iter()
            .flatten()
            .filter_map(whole_number)
            .max(),
        stream: keys.stream == Some(serde_json::Value::Bool(true)),
    }
}

/// A non-negative integer as JSON Schema reads one, `5.0` included: the
/// region accepts that spelling, so the estimate must read it too.
fn whole_number(v: &serde_json::Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=9_007_199_254_740_992.0).contains(f))
            .map(|f| f as u64)
    })
}

/// `max_tokens` of a JSON request body, as [`scan`] reads it.
pub fn scan_max_tokens(body: &[u8]) -> Option<u64> {
    scan(body).max_tokens
}

/// Tokens a request is charged before the region says: a quarter of the
/// body's bytes for the prompt, plus `max_tokens` or the default.
pub(crate) fn estimate(content_length: Option<u64>, max_tokens: Option<u64>, default: u64) -> u64 {
    // Saturating: both numbers come from the client.
    (content_length.unwrap_or(0) / 4).saturating_add(max_tokens.unwrap_or(default))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_tokens_is_found_without_parsing() {
        assert_eq!(
            scan_max_tokens(br#"{"model":"m","max_tokens": 512,"x":1}"#),
            Some(512)
        );
        assert_eq!(scan_max_tokens(br#"{"max_completion_tokens":7}"#), Some(7));
        assert_eq!(scan_max_tokens(br#"{"model":"max_tokens"}"#), None);
        assert_eq!(scan_max_tokens(b"{}"), None);
        // The region takes `512.0` as 512; the estimate must too.
        assert_eq!(scan_max_tokens(br#"{"max_tokens":512.0}"#), Some(512));
        assert_eq!(scan_max_tokens(br#"{"max_tokens":512.5}"#), None);
        assert_eq!(
            scan_max_tokens(br#"{"max_tokens":3,"max_completion_tokens":9}"#),
            Some(9)
        );
    }

    #[test]
    fn a_nested_key_is_not_the_requests_own() {
        let decoy = br#"{"model":"m","messages":[{"role":"user","content":"x",
            "max_tokens": 99999999}],"tools":[{"parameters":{"max_tokens":18446744073709551615}}],
            "max_tokens": 16}"#;
        assert_eq!(scan_max_tokens(decoy), Some(16));
        assert_eq!(scan_max_tokens(br#"{"metadata":{"max_tokens":5}}"#), None);
        assert_eq!(scan_max_tokens(br#"{"max_tokens":-1}"#), None);
        assert_eq!(scan_max_tokens(br#"{"max_tokens":1e30}"#), None);
        assert_eq!(scan_max_tokens(br#"[{"max_tokens":5}]"#), None);
    }

    #[test]
    fn only_a_true_stream_is_a_stream() {
        assert!(scan(br#"{"stream":true}"#).stream);
        assert!(!scan(br#"{"stream":"true"}"#).stream);
        assert!(!scan(br#"{"stream":false,"max_tokens":3}"#).stream);
        assert!(!scan(br#"{"messages":[{"stream":true}]}"#).stream);
    }

    #[test]
    fn client_numbers_cannot_overflow_the_estimate() {
        assert_eq!(estimate(Some(u64::MAX), Some(u64::MAX), 16), u64::MAX);
        assert_eq!(estimate(Some(400), None, 16), 116);
    }
}
