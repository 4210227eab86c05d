//! The tokens a request is charged before the region reports its usage.

/// Bodies up to this size are read before the decision to find `max_tokens`;
/// larger (or chunked) bodies are estimated from their length alone.
pub(crate) const SCAN_BODY_LIMIT: usize = 16 * 1024;

/// `max_tokens` (or `max_completion_tokens`) of a JSON request body, found
/// without parsing it: the largest number following either key.
pub fn scan_max_tokens(body: &[u8]) -> Option<u64> {
    let mut best = None;
    for key in [&b"\"max_tokens\""[..], &b"\"max_completion_tokens\""[..]] {
        let mut from = 0;
        while let Some(at) = find(&body[from..], key) {
            let mut rest = &body[from + at + key.len()..];
            rest = rest.trim_ascii_start();
            if let Some(r) = rest.strip_prefix(b":") {
                let r = r.trim_ascii_start();
                let digits = r.iter().take_while(|b| b.is_ascii_digit()).count();
                if let Some(n) = std::str::from_utf8(&r[..digits])
                    .ok()
                    .and_then(|d| d.parse::<u64>().ok())
                {
                    best = Some(best.map_or(n, |b: u64| b.max(n)));
                }
            }
            from += at + key.len();
        }
    }
    best
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Tokens a request is charged before the region says: a quarter of the
/// body's bytes for the prompt, plus `max_tokens` or the default.
pub(crate) fn estimate(content_length: Option<u64>, max_tokens: Option<u64>, default: u64) -> u64 {
    content_length.unwrap_or(0) / 4 + max_tokens.unwrap_or(default)
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
    }
}
