//! What a model of the table serves (`task`), and for embedding models
//! served by upstreams, how their requests are merged (`[models.embeddings]`).

use meridian_proto::config::Problems;
use serde::Deserialize;

use super::{AliasConfig, BackendConfig, ModelConfig};

/// What a model answers: chat (and completions), or embeddings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    #[default]
    Chat,
    /// `/v1/embeddings` and `Inference.Embed`, from an OpenAI-compatible
    /// embedding server (`kind = "openai"` or `"azure"`).
    Embeddings,
}

impl Task {
    /// What the model serves, as errors name it.
    pub(crate) fn serves(self) -> &'static str {
        match self {
            Self::Chat => "chat completions",
            Self::Embeddings => "embeddings",
        }
    }
}

/// Limits and batching of an embedding model served by upstreams. Every
/// key has a default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddingModelConfig {
    /// Most inputs in one upstream call: concurrent requests are merged
    /// until their inputs reach this. A request with more is sent alone.
    pub max_batch: usize,
    /// How long the first request of a batch waits for others to join it,
    /// in milliseconds; 0 sends every request alone.
    pub max_wait_ms: u64,
    /// Most inputs in one request (OpenAI allows 2048).
    pub max_inputs: usize,
}

impl Default for EmbeddingModelConfig {
    fn default() -> Self {
        Self {
            max_batch: 64,
            max_wait_ms: 5,
            max_inputs: 2048,
        }
    }
}

/// Checks tasks and their settings: an embedding model is an OpenAI or
/// Azure pool, takes no chat fallbacks, and no alias routes chat to it.
pub(super) fn validate(models: &[ModelConfig], aliases: &[AliasConfig], problems: &mut Problems) {
    for (i, m) in models.iter().enumerate() {
        if m.task == Task::Chat {
            if m.embeddings.is_some() {
                problems.push(format!(
                    "`models[{i}].embeddings` applies only to task = \"embeddings\""
                ));
            }
            continue;
        }
        if !matches!(
            m.backend,
            BackendConfig::OpenAi(_) | BackendConfig::Azure(_)
        ) {
            problems.push(format!(
                "`models[{i}].backend.kind` must be \"openai\" or \"azure\" for \
                 task = \"embeddings\" (an OpenAI-compatible embedding server)"
            ));
        }
        if !m.fallbacks.is_empty() || !m.context_fallbacks.is_empty() {
            problems.push(format!(
                "`models[{i}].fallbacks` and `context_fallbacks` are not supported for \
                 task = \"embeddings\""
            ));
        }
        let e = m.embeddings.clone().unwrap_or_default();
        if e.max_batch == 0 {
            problems.push(format!(
                "`models[{i}].embeddings.max_batch` must be at least 1"
            ));
        }
        // Longer waits would make every lone request that much slower.
        if e.max_wait_ms > 1_000 {
            problems.push(format!(
                "`models[{i}].embeddings.max_wait_ms` must be at most 1000"
            ));
        }
        if e.max_inputs == 0 {
            problems.push(format!(
                "`models[{i}].embeddings.max_inputs` must be at least 1"
            ));
        }
    }
    let embedding = |id: &str| {
        models
            .iter()
            .any(|m| m.id == id && m.task == Task::Embeddings)
    };
    for (at, id, list) in models
        .iter()
        .enumerate()
        .filter(|(_, m)| m.task == Task::Chat)
        .flat_map(|(i, m)| {
            [
                ("fallbacks", &m.fallbacks),
                ("context_fallbacks", &m.context_fallbacks),
            ]
            .map(|(key, list)| (format!("models[{i}].{key}"), &m.id, list))
        })
    {
        for target in list.iter().filter(|t| embedding(t)) {
            problems.push(format!(
                "`{at}` names {target:?}, an embedding model, for chat model {id:?}"
            ));
        }
    }
    for (i, a) in aliases.iter().enumerate() {
        let targets = a
            .small
            .iter()
            .chain(&a.large)
            .chain(a.weights.keys())
            .chain(&a.fallbacks)
            .chain(&a.context_fallbacks);
        for target in targets.filter(|t| embedding(t)) {
            problems.push(format!(
                "`aliases[{i}]` names {target:?}, an embedding model: aliases route chat"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str = "region = \"eu-west\"\n[redis]\nurl = \"redis://127.0.0.1:1/\"\n\
        [postgres]\nurl = \"postgres://m@127.0.0.1:1/m\"\n[mesh]\nplaintext = true\n\
        [[models]]\nid = \"a\"\nbackend = { kind = \"sim\" }\n";

    fn load(extra: &str) -> Result<Config, String> {
        Config::from_toml(&format!("{BASE}{extra}"), "t").map_err(|e| e.to_string())
    }

    fn embedding(kind: &str, extra: &str) -> String {
        format!(
            "[[models]]\nid = \"e\"\ntask = \"embeddings\"\n{extra}\
             backend = {{ kind = \"{kind}\", upstreams = [{{ base_url = \"https://x/v1\" }}] }}\n"
        )
    }

    #[test]
    fn an_embedding_model_is_an_openai_pool_with_defaults() {
        let config = load(&embedding("openai", "")).unwrap();
        assert_eq!(config.models[1].task, super::Task::Embeddings);
        assert!(config.models[1].embeddings.is_none());
    }

    #[test]
    fn embedding_settings_are_checked_by_key() {
        for (extra, key) in [
            (embedding("anthropic", ""), "`models[1].backend.kind`"),
            (
                embedding("openai", "embeddings = { max_batch = 0 }\n"),
                "`models[1].embeddings.max_batch`",
            ),
            (
                embedding("openai", "embeddings = { max_wait_ms = 5000 }\n"),
                "`models[1].embeddings.max_wait_ms`",
            ),
            (
                embedding("openai", "embeddings = { max_inputs = 0 }\n"),
                "`models[1].embeddings.max_inputs`",
            ),
            (
                embedding("openai", "fallbacks = [\"a\"]\n"),
                "`models[1].fallbacks`",
            ),
            (
                format!(
                    "{}[[aliases]]\nid = \"w\"\nweights = {{ e = 1 }}\n",
                    embedding("openai", "")
                ),
                "`aliases[0]` names \"e\"",
            ),
            (
                "[[models]]\nid = \"c\"\nembeddings = {}\nbackend = { kind = \"sim\" }\n".into(),
                "`models[1].embeddings` applies only",
            ),
            (
                embedding("openai", "embeddings = { batch = 3 }\n"),
                "unknown field",
            ),
        ] {
            let e = load(&extra).unwrap_err();
            assert!(e.contains(key), "{extra}: {e}");
        }
    }
}
