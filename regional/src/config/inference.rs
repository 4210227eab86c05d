//! Inference configuration beyond one simulated model: pools of
//! OpenAI-compatible upstreams, aliases that route between models, and the
//! per-request limits of the `[inference]` table.

use std::collections::{BTreeMap, HashSet};

use meridian_proto::config::Problems;
use serde::Deserialize;

use super::{BackendConfig, ModelConfig, UpstreamConfig, upstream};

/// The `[inference]` table: request deadlines and admission control.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Deadline of an HTTP inference request when it names none in
    /// `x-meridian-timeout-ms`, in milliseconds (gRPC uses `grpc-timeout`).
    pub request_timeout_ms: u64,
    /// Inference requests one tenant may have in flight on this node; 0
    /// means no limit besides `server.max_in_flight`. A quarter of the
    /// node's default capacity, so one tenant alone cannot take it all.
    pub max_in_flight_per_tenant: u32,
    /// What `Retry-After` tells a client refused by admission control, in
    /// milliseconds (rounded up to whole seconds on HTTP).
    pub retry_after_ms: u64,
    /// Messages one chat request may carry, the stored history of its
    /// conversation included.
    pub max_messages: u32,
    /// Bytes of message content a conversation may store; a turn that
    /// would grow it past this is refused (413) and stores nothing.
    pub max_conversation_bytes: u64,
    /// Days a stored response (`/v1/responses`) is kept after its
    /// creation; each region then erases its own copy. 0 keeps responses
    /// until they are deleted. 30, as OpenAI keeps them.
    pub response_retention_days: u32,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            request_timeout_ms: 60_000,
            max_in_flight_per_tenant: 256,
            retry_after_ms: 1_000,
            max_messages: 2_048,
            max_conversation_bytes: 4 << 20,
            response_retention_days: 30,
        }
    }
}

/// A pool of OpenAI-compatible HTTP servers (vLLM, Ollama, TGI, llama.cpp,
/// hosted APIs) serving one model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// The servers; requests are balanced across them.
    pub upstreams: Vec<UpstreamConfig>,
    /// Model name sent upstream; the model's `id` when absent.
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// Leading prompt bytes hashed for prefix affinity: requests sharing
    /// this many go to the same upstream while it is not overloaded. 0 turns
    /// affinity off (least outstanding requests only).
    #[serde(default = "default_affinity_prefix_bytes")]
    pub affinity_prefix_bytes: usize,
    /// An upstream counts as overloaded for affinity when its outstanding
    /// requests exceed this factor times the pool mean (a mean below 1
    /// counts as 1).
    #[serde(default = "default_affinity_overload_factor")]
    pub affinity_overload_factor: f64,
    /// Consecutive failures that open an upstream's circuit breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker keeps the upstream out before one probe
    /// request, in milliseconds.
    #[serde(default = "default_breaker_cooldown_ms")]
    pub breaker_cooldown_ms: u64,
    /// Interval of the active health check (`GET {base_url}/models`), in
    /// milliseconds.
    #[serde(default = "default_health_interval_ms")]
    pub health_interval_ms: u64,
    /// Attempts after the first one, each on another upstream when there is
    /// one, made only while the client has received nothing.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Base of the exponential backoff between attempts, in milliseconds
    /// (full jitter).
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// Time allowed to connect to an upstream (TLS handshake included), in
    /// milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time an attempt may wait for the upstream's response head, from its
    /// start, in milliseconds; past it the attempt fails like a connect
    /// error and the pool tries another upstream. Generous by default: a
    /// long prompt is prefilled before the head of a streamed answer.
    #[serde(default = "default_first_byte_timeout_ms")]
    pub first_byte_timeout_ms: u64,
    /// How long an idle keep-alive connection to an upstream stays open, in
    /// milliseconds.
    #[serde(default = "default_pool_idle_timeout_ms")]
    pub pool_idle_timeout_ms: u64,
    /// Idle keep-alive connections kept per upstream host; 0 closes each
    /// connection after its request.
    #[serde(default = "default_pool_max_idle_per_host")]
    pub pool_max_idle_per_host: usize,
    /// A PEM file of CA certificates trusted for `https://` upstreams besides
    /// the public roots (a private CA in front of vLLM, say).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// A PEM certificate chain presented to upstreams that ask for a client
    /// certificate; needs `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<String>,
    /// The PEM private key of `client_cert_file`.
    #[serde(default)]
    pub client_key_file: Option<String>,
    /// An answer whose first token took more than this factor times the
    /// typical first-token time of the pool's other upstreams (the median
    /// of their moving averages) counts as a failure for the breaker, so an
    /// upstream that turned slow is taken out like one that errs. 0 turns
    /// latency outliers off.
    #[serde(default = "default_outlier_latency_factor")]
    pub outlier_latency_factor: f64,
    /// First tokens faster than this are never slow, in milliseconds: a
    /// factor of a few milliseconds is noise.
    #[serde(default = "default_outlier_min_ttft_ms")]
    pub outlier_min_ttft_ms: u64,
    /// `kind = "anthropic"` only: the `anthropic-version` header sent on
    /// every request; `2023-06-01` when absent.
    #[serde(default)]
    pub anthropic_version: Option<String>,
    /// `kind = "anthropic"` only: the `max_tokens` sent when the client
    /// gives no limit, since the Messages API requires one; 4096 when
    /// absent.
    #[serde(default)]
    pub default_max_tokens: Option<u32>,
    /// `kind = "azure"` only, and required there: the `api-version` query
    /// parameter of every request, e.g. `2024-10-21`.
    #[serde(default)]
    pub api_version: Option<String>,
}

/// The `anthropic-version` of an Anthropic pool that names none.
pub(crate) const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";
/// The `max_tokens` of an Anthropic pool that names none.
pub(crate) const DEFAULT_ANTHROPIC_MAX_TOKENS: u32 = 4096;

fn default_affinity_prefix_bytes() -> usize {
    256
}
fn default_affinity_overload_factor() -> f64 {
    1.5
}
fn default_breaker_failures() -> u32 {
    3
}
fn default_breaker_cooldown_ms() -> u64 {
    2_000
}
fn default_health_interval_ms() -> u64 {
    1_000
}
fn default_retries() -> u32 {
    2
}
fn default_retry_backoff_ms() -> u64 {
    20
}
fn default_connect_timeout_ms() -> u64 {
    1_000
}
fn default_first_byte_timeout_ms() -> u64 {
    30_000
}
fn default_pool_idle_timeout_ms() -> u64 {
    90_000
}
fn default_pool_max_idle_per_host() -> usize {
    32
}
fn default_outlier_latency_factor() -> f64 {
    3.0
}
fn default_outlier_min_ttft_ms() -> u64 {
    50
}

/// A model name that routes to real models: by request size (`small` and
/// `large`) or by weight (`weights`), never both.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AliasConfig {
    /// The name clients send, e.g. `auto`.
    pub id: String,
    /// Model for simple requests.
    #[serde(default)]
    pub small: Option<String>,
    /// Model for complex requests: long prompts, tools, or hint `large`.
    #[serde(default)]
    pub large: Option<String>,
    /// Prompts of more tokens than this go to `large`.
    #[serde(default = "default_large_above_prompt_tokens")]
    pub large_above_prompt_tokens: u32,
    /// Traffic split between models by relative weight, e.g.
    /// `{ "sim-v1" = 90, "sim-v2" = 10 }`.
    #[serde(default)]
    pub weights: BTreeMap<String, u32>,
    /// Like a model's `fallbacks`, for requests to this alias; when empty,
    /// the chosen model's own list applies.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Like a model's `context_fallbacks`, for requests to this alias; when
    /// empty, the chosen model's own list applies.
    #[serde(default)]
    pub context_fallbacks: Vec<String>,
}

fn default_large_above_prompt_tokens() -> u32 {
    512
}

/// Checks the settings that belong to one protocol: each only on its own
/// kind, where a stray one would be silently ignored otherwise.
fn protocol_settings(
    i: usize,
    backend: &BackendConfig,
    pool: &OpenAiConfig,
    problems: &mut Problems,
) {
    let (kind, anthropic, azure) = match backend {
        BackendConfig::Anthropic(_) => ("anthropic", true, false),
        BackendConfig::Azure(_) => ("azure", false, true),
        _ => ("openai", false, false),
    };
    let only = |name: &str, on: &str, set: bool, problems: &mut Problems| {
        if set {
            problems.push(format!(
                "`models[{i}].backend.{name}` applies only to kind = \"{on}\", not \"{kind}\""
            ));
        }
    };
    if !anthropic {
        only(
            "anthropic_version",
            "anthropic",
            pool.anthropic_version.is_some(),
            problems,
        );
        only(
            "default_max_tokens",
            "anthropic",
            pool.default_max_tokens.is_some(),
            problems,
        );
    }
    if !azure {
        only("api_version", "azure", pool.api_version.is_some(), problems);
    }
    if anthropic {
        if pool.default_max_tokens == Some(0) {
            problems.push(format!(
                "`models[{i}].backend.default_max_tokens` must be at least 1"
            ));
        }
        if pool
            .anthropic_version
            .as_deref()
            .is_some_and(|v| v.trim().is_empty())
        {
            problems.push(format!(
                "`models[{i}].backend.anthropic_version` must not be empty"
            ));
        }
    }
    if azure {
        match pool.api_version.as_deref() {
            None => problems.push(format!(
                "`models[{i}].backend.api_version` is required for kind = \"azure\" \
                 (e.g. \"2024-10-21\")"
            )),
            Some(v)
                if v.is_empty()
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') =>
            {
                problems.push(format!(
                    "`models[{i}].backend.api_version` must be a version such as \"2024-10-21\", got {v:?}"
                ));
            }
            Some(_) => {}
        }
    }
}

/// Checks what `config.rs` does not: upstream pools and aliases.
pub(super) fn validate(models: &[ModelConfig], aliases: &[AliasConfig], problems: &mut Problems) {
    for (i, m) in models.iter().enumerate() {
        let Some(pool) = m.backend.pool() else {
            continue;
        };
        upstream::validate(i, pool, problems);
        protocol_settings(i, &m.backend, pool, problems);
        if pool.affinity_overload_factor < 1.0 {
            problems.push(format!(
                "`models[{i}].backend.affinity_overload_factor` must be at least 1"
            ));
        }
        if pool.breaker_failures == 0 {
            problems.push(format!(
                "`models[{i}].backend.breaker_failures` must be at least 1"
            ));
        }
        let factor = pool.outlier_latency_factor;
        if !(factor == 0.0 || (factor.is_finite() && factor > 1.0)) {
            problems.push(format!(
                "`models[{i}].backend.outlier_latency_factor` must be 0 (off) or more than 1"
            ));
        }
        if pool.health_interval_ms == 0 {
            problems.push(format!(
                "`models[{i}].backend.health_interval_ms` must be at least 1"
            ));
        }
    }
    let model_ids: HashSet<&str> = models.iter().map(|m| m.id.as_str()).collect();
    let lists = models
        .iter()
        .enumerate()
        .map(|(i, m)| {
            (
                format!("models[{i}]"),
                m.id.as_str(),
                &m.fallbacks,
                &m.context_fallbacks,
            )
        })
        .chain(aliases.iter().enumerate().map(|(i, a)| {
            (
                format!("aliases[{i}]"),
                a.id.as_str(),
                &a.fallbacks,
                &a.context_fallbacks,
            )
        }));
    for (at, id, fallbacks, context) in lists {
        for (key, list) in [("fallbacks", fallbacks), ("context_fallbacks", context)] {
            for target in list {
                if target == id {
                    problems.push(format!("`{at}.{key}` names {id:?} itself"));
                } else if !model_ids.contains(target.as_str()) {
                    problems.push(format!(
                        "`{at}.{key}` names {target:?}, which is not a model of this region \
                         (fallbacks name models, not aliases)"
                    ));
                }
            }
        }
    }
    let mut alias_ids = HashSet::new();
    for (i, a) in aliases.iter().enumerate() {
        if a.id.is_empty() {
            problems.push(format!("`aliases[{i}].id` must not be empty"));
        }
        if model_ids.contains(a.id.as_str()) || !alias_ids.insert(a.id.as_str()) {
            problems.push(format!(
                "`aliases[{i}].id` repeats the name {:?} of a model or alias",
                a.id
            ));
        }
        let by_size = a.small.is_some() || a.large.is_some();
        match (by_size, a.weights.is_empty()) {
            (true, false) => {
                problems.push(format!(
                    "`aliases[{i}]` routes by size (`small`, `large`) or by `weights`, not both"
                ));
            }
            (false, true) => {
                problems.push(format!(
                    "`aliases[{i}]` needs `small` and `large`, or `weights`"
                ));
            }
            (true, true) if a.small.is_none() || a.large.is_none() => {
                problems.push(format!("`aliases[{i}]` needs both `small` and `large`"));
            }
            _ => {}
        }
        if !a.weights.is_empty() && a.weights.values().all(|w| *w == 0) {
            problems.push(format!(
                "`aliases[{i}].weights` must give some model a weight above 0"
            ));
        }
        let targets = [("small", &a.small), ("large", &a.large)]
            .into_iter()
            .filter_map(|(k, t)| t.as_deref().map(|t| (k, t)))
            .chain(a.weights.keys().map(|t| ("weights", t.as_str())));
        for (key, target) in targets {
            if !model_ids.contains(target) {
                problems.push(format!(
                    "`aliases[{i}].{key}` names {target:?}, which is not a model of this region"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str = "region = \"eu-west\"\n[redis]\nurl = \"redis://127.0.0.1:1/\"\n\
        [postgres]\nurl = \"postgres://m@127.0.0.1:1/m\"\n[mesh]\nplaintext = true\n\
        [[models]]\nid = \"a\"\nbackend = { kind = \"sim\" }\n";

    fn err(extra: &str) -> String {
        Config::from_toml(&format!("{BASE}{extra}"), "t")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn pools_and_aliases_are_checked_by_key() {
        let e = err("[[models]]\nid = \"p\"\nbackend = { kind = \"openai\", upstreams = [] }\n");
        assert!(e.contains("`models[1].backend.upstreams`"), "{e}");
        let e = err(
            "[[models]]\nid = \"p\"\nbackend = { kind = \"openai\", upstreams = [{ base_url = \"ftp://x/v1\" }] }\n",
        );
        assert!(
            e.contains("`models[1].backend.upstreams[0].base_url`"),
            "{e}"
        );
        let e = err("[[aliases]]\nid = \"auto\"\nsmall = \"a\"\n");
        assert!(e.contains("`aliases[0]` needs both"), "{e}");
        let e = err("[[aliases]]\nid = \"auto\"\nsmall = \"a\"\nlarge = \"zz\"\n");
        assert!(e.contains("`aliases[0].large`"), "{e}");
        let e = err("[[aliases]]\nid = \"a\"\nweights = { a = 1 }\n");
        assert!(e.contains("`aliases[0].id`"), "{e}");
        let e = err("[[aliases]]\nid = \"w\"\nweights = { a = 0 }\n");
        assert!(e.contains("`aliases[0].weights`"), "{e}");
        let e = err("[inference]\nbogus = 1\n");
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn fallbacks_name_other_models() {
        let e = err("[[models]]\nid = \"b\"\nfallbacks = [\"b\"]\nbackend = { kind = \"sim\" }\n");
        assert!(
            e.contains("`models[1].fallbacks` names \"b\" itself"),
            "{e}"
        );
        let e = err(
            "[[models]]\nid = \"b\"\ncontext_fallbacks = [\"nope\"]\nbackend = { kind = \"sim\" }\n",
        );
        assert!(
            e.contains("`models[1].context_fallbacks` names \"nope\""),
            "{e}"
        );
        let e = err("[[aliases]]\nid = \"w\"\nweights = { a = 1 }\nfallbacks = [\"w\"]\n");
        assert!(e.contains("`aliases[0].fallbacks`"), "{e}");
        let ok = format!(
            "{BASE}[[models]]\nid = \"b\"\nfallbacks = [\"a\"]\ncontext_fallbacks = [\"a\"]\n\
             backend = {{ kind = \"sim\" }}\n"
        );
        Config::from_toml(&ok, "t").unwrap();
    }

    #[test]
    fn protocol_settings_belong_to_their_kind() {
        let pool = |kind: &str, extra: &str| {
            format!(
                "[[models]]\nid = \"p\"\nbackend = {{ kind = \"{kind}\", \
                 upstreams = [{{ base_url = \"https://x\" }}]{extra} }}\n"
            )
        };
        let e = err(&pool("azure", ""));
        assert!(
            e.contains("`models[1].backend.api_version` is required for kind = \"azure\""),
            "{e}"
        );
        let e = err(&pool("azure", ", api_version = \"2024-10-21&x=1\""));
        assert!(e.contains("`models[1].backend.api_version` must be"), "{e}");
        let e = err(&pool("openai", ", anthropic_version = \"2023-06-01\""));
        assert!(
            e.contains(
                "`models[1].backend.anthropic_version` applies only to kind = \"anthropic\""
            ),
            "{e}"
        );
        let e = err(&pool("anthropic", ", api_version = \"2024-10-21\""));
        assert!(
            e.contains("`models[1].backend.api_version` applies only"),
            "{e}"
        );
        let e = err(&pool("anthropic", ", default_max_tokens = 0"));
        assert!(
            e.contains("`models[1].backend.default_max_tokens` must be"),
            "{e}"
        );
        for ok in [
            pool("anthropic", ", default_max_tokens = 1024"),
            pool("azure", ", api_version = \"2024-10-21\""),
        ] {
            Config::from_toml(&format!("{BASE}{ok}"), "t").unwrap();
        }
    }
}
