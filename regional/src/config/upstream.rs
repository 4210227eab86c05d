//! One OpenAI-compatible server of a pool: where it is, how Meridian proves
//! who it is to it (a key from the environment, a file or the config), and
//! the headers every request to it carries.

use std::collections::BTreeMap;

use meridian_proto::config::Problems;
use serde::Deserialize;

use super::OpenAiConfig;

/// One OpenAI-compatible server.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL up to and including the API version, e.g.
    /// `https://api.openai.com/v1` or `http://10.0.0.5:8000/v1`; requests
    /// go to `{base_url}/chat/completions`.
    pub base_url: String,
    /// Bearer token sent as `Authorization`, written in the config file.
    /// Prefer `api_key_env` or `api_key_file`, which keep it out of the file.
    #[serde(default)]
    pub api_key: Option<ApiKey>,
    /// Name of an environment variable holding the bearer token, read when
    /// the pool is built (at start and at a reload that rebuilds it).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// A file whose content, trimmed, is the bearer token, read when the
    /// pool is built.
    #[serde(default)]
    pub api_key_file: Option<String>,
    /// Headers sent on every request to this upstream, chat and health
    /// check alike, e.g. `{ "OpenAI-Organization" = "org-1" }`. Not
    /// secrets: put a key in `api_key_env` or `api_key_file`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// An upstream's bearer token. Config structs are `Debug` and errors quote
/// what they are given, so the token lives in a type that never shows it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct ApiKey(String);

impl ApiKey {
    pub(crate) fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The token itself, for the `Authorization` header and for scrubbing.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// Checks the upstreams and the TLS settings of the pool of `models[i]`.
pub(super) fn validate(i: usize, pool: &OpenAiConfig, problems: &mut Problems) {
    let key = |name: &str| format!("`models[{i}].backend.{name}`");
    if pool.upstreams.is_empty() {
        problems.push(format!(
            "{} must name at least one upstream",
            key("upstreams")
        ));
    }
    for (j, u) in pool.upstreams.iter().enumerate() {
        let at = |name: &str| key(&format!("upstreams[{j}].{name}"));
        if let Err(why) = check_base_url(&u.base_url) {
            problems.push(format!("{} {why}", at("base_url")));
        }
        let sources = [
            u.api_key.is_some(),
            u.api_key_env.is_some(),
            u.api_key_file.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() > 1 {
            problems.push(format!(
                "`models[{i}].backend.upstreams[{j}]` takes at most one of `api_key`, \
                 `api_key_env` and `api_key_file`"
            ));
        }
        if u.api_key_env.as_deref().is_some_and(str::is_empty) {
            problems.push(format!("{} must not be empty", at("api_key_env")));
        }
        if u.api_key_file.as_deref().is_some_and(str::is_empty) {
            problems.push(format!("{} must not be empty", at("api_key_file")));
        }
        for (name, value) in &u.headers {
            // Only the name is quoted: values are not secrets, but they are
            // not for logs either.
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                problems.push(format!(
                    "{} has an invalid header name {name:?}",
                    at("headers")
                ));
            } else if name.eq_ignore_ascii_case("authorization") {
                problems.push(format!(
                    "{} must not set authorization: give the key in `api_key_env` or \
                     `api_key_file`",
                    at("headers")
                ));
            }
            if reqwest::header::HeaderValue::from_str(value).is_err() {
                problems.push(format!(
                    "{} has an invalid value for header {name:?} (control characters or \
                     non-ASCII)",
                    at("headers")
                ));
            }
        }
    }
    if pool.client_cert_file.is_some() != pool.client_key_file.is_some() {
        problems.push(format!(
            "{} and {} go together: give both or neither",
            key("client_cert_file"),
            key("client_key_file")
        ));
    }
    for (name, ms) in [
        ("connect_timeout_ms", pool.connect_timeout_ms),
        ("first_byte_timeout_ms", pool.first_byte_timeout_ms),
        ("pool_idle_timeout_ms", pool.pool_idle_timeout_ms),
    ] {
        if ms == 0 {
            problems.push(format!("{} must be at least 1", key(name)));
        }
    }
}

/// A URL the pool can call: http or https, a host, and no credentials, which
/// would end up in metric labels and logs (so that error does not quote it).
fn check_base_url(url: &str) -> Result<(), String> {
    let parsed =
        reqwest::Url::parse(url).map_err(|_| format!("must be an absolute URL, got {url:?}"))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(
            "must not carry credentials (they would show in metrics and logs): \
             use `api_key_env` or `api_key_file`"
                .into(),
        );
    }
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("must start with http:// or https://, got {url:?}"));
    }
    if !parsed.has_host() {
        return Err(format!("must name a host, got {url:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str = "region = \"eu-west\"\n[redis]\nurl = \"redis://127.0.0.1:1/\"\n\
        [postgres]\nurl = \"postgres://m@127.0.0.1:1/m\"\n[mesh]\nplaintext = true\n\
        [[models]]\nid = \"p\"\n[models.backend]\nkind = \"openai\"\n";

    fn load(backend: &str) -> Result<Config, String> {
        Config::from_toml(&format!("{BASE}{backend}"), "t").map_err(|e| e.to_string())
    }

    fn err(backend: &str) -> String {
        load(backend).unwrap_err()
    }

    #[test]
    fn upstream_settings_are_checked_by_key() {
        let e = err(
            "upstreams = [{ base_url = \"https://x/v1\", api_key = \"k\", \
             api_key_env = \"K\" }]\n",
        );
        assert!(
            e.contains("`models[0].backend.upstreams[0]` takes at most one"),
            "{e}"
        );
        let e =
            err("upstreams = [{ base_url = \"https://x/v1\", headers = { \"a b\" = \"v\" } }]\n");
        assert!(
            e.contains("`models[0].backend.upstreams[0].headers`"),
            "{e}"
        );
        assert!(e.contains("\"a b\""), "{e}");
        let e = err("upstreams = [{ base_url = \"https://x/v1\", headers = { x = \"a\\nb\" } }]\n");
        assert!(e.contains("invalid value for header \"x\""), "{e}");
        assert!(!e.contains("a\\nb"), "values are not quoted: {e}");
        let e = err("upstreams = [{ base_url = \"https://x/v1\" }]\nclient_cert_file = \"/c\"\n");
        assert!(
            e.contains("`models[0].backend.client_cert_file` and"),
            "{e}"
        );
        let e = err("upstreams = [{ base_url = \"https://x/v1\" }]\nfirst_byte_timeout_ms = 0\n");
        assert!(
            e.contains("`models[0].backend.first_byte_timeout_ms`"),
            "{e}"
        );
        let e = err("upstreams = [{ base_url = \"https://u:hunter2@x/v1\" }]\n");
        assert!(
            e.contains("`models[0].backend.upstreams[0].base_url` must not carry"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn https_and_http_upstreams_load_and_debug_hides_the_key() {
        let config = load(
            "upstreams = [{ base_url = \"https://api.example.com/v1\", api_key = \"sk-secret-1\", \
             headers = { \"OpenAI-Organization\" = \"org-1\" } }, \
             { base_url = \"http://10.0.0.5:8000/v1\", api_key_env = \"K\" }]\n",
        )
        .unwrap();
        let Some(pool) = config.models[0].backend.pool() else {
            panic!("an openai backend");
        };
        assert_eq!(pool.first_byte_timeout_ms, 30_000);
        let debug = format!("{config:?}");
        assert!(!debug.contains("sk-secret-1"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }
}
