//! The `x-ratelimit-*` headers OpenAI sends, from a decision.

use http::HeaderValue;
use meridian_proto::header;

use super::gcra::Decision;

/// The `x-ratelimit-*` headers of a decision, as OpenAI sends them.
pub(crate) fn headers(decision: &Decision) -> impl Iterator<Item = (&'static str, HeaderValue)> {
    const NAMES: [[&str; 3]; 2] = [
        [
            header::RATELIMIT_LIMIT_REQUESTS,
            header::RATELIMIT_REMAINING_REQUESTS,
            header::RATELIMIT_RESET_REQUESTS,
        ],
        [
            header::RATELIMIT_LIMIT_TOKENS,
            header::RATELIMIT_REMAINING_TOKENS,
            header::RATELIMIT_RESET_TOKENS,
        ],
    ];
    decision
        .status
        .into_iter()
        .zip(NAMES)
        .filter_map(|(s, names)| s.map(|s| (s, names)))
        .flat_map(|(s, [limit, remaining, reset])| {
            [
                (limit, HeaderValue::from(s.limit)),
                (remaining, HeaderValue::from(s.remaining)),
                (
                    reset,
                    HeaderValue::from_str(&duration_text(s.reset_us)).expect("durations are ASCII"),
                ),
            ]
        })
}

/// A duration as OpenAI (and Go) write it: `120ms`, `1s`, `1.5s`, `6m0s`,
/// `1h2m3s`; rounded up to the millisecond.
pub(crate) fn duration_text(us: u64) -> String {
    let ms = us.div_ceil(1000);
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m) = (ms / 3_600_000, ms / 60_000 % 60);
    let (s, frac) = (ms / 1000 % 60, ms % 1000);
    let mut out = String::with_capacity(12);
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if frac == 0 {
        out.push_str(&format!("{s}s"));
    } else {
        let frac = format!("{frac:03}");
        out.push_str(&format!("{s}.{}s", frac.trim_end_matches('0')));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_openai() {
        assert_eq!(duration_text(0), "0s");
        assert_eq!(duration_text(119_001), "120ms");
        assert_eq!(duration_text(1_000_000), "1s");
        assert_eq!(duration_text(1_500_000), "1.5s");
        assert_eq!(duration_text(360_000_000), "6m0s");
        assert_eq!(duration_text(3_723_000_000), "1h2m3s");
    }
}
