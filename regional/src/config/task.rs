//! What a model of the table serves (`task`), and for embedding models
//! served by upstreams, how their requests are merged (`[models.embeddings]`).
//! Moderation models (`task = "moderations"`) have no settings of their own.

use meridian_proto::config::Problems;
use serde::Deserialize;

use super::{AliasConfig, BackendConfig, ModelConfig};

/// What a model answers: chat (and completions), embeddings, or
/// moderations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    #[default]
    Chat,
    /// `/v1/embeddings` and `Inference.Embed`, from an OpenAI-compatible
    /// embedding server (`kind = "openai"` or `"azure"`).
    Embeddings,
    /// `/v1/moderations`, from an OpenAI-protocol server that offers it
    /// (`kind = "openai"`; Azure OpenAI has no moderations endpoint).
    Moderations,
}

impl Task {
    /// The value of `task` in config.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Embeddings => "embeddings",
            Self::Moderations => "moderations",
        }
    }

    /// What the model serves, as errors name it.
    pub(crate) fn serves(self) -> &'static str {
        match self {
            Self::Chat => "chat completions",
            Self::Embeddings => "embeddings",
            Self::Moderations => "moderations",
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
/// Azure pool, a moderation model an OpenAI pool; neither takes chat
/// fallbacks, and no alias or chat fallback names one.
pub(super) fn validate(models: &[ModelConfig], aliases: &[AliasConfig], problems: &mut Problems) {
    for (i, m) in models.iter().enumerate() {
        if m.task != Task::Embeddings && m.embeddings.is_some() {
            problems.push(format!(
                "`models[{i}].embeddings` applies only to task = \"embeddings\""
            ));
        }
        let kinds = match m.task {
            Task::Chat => continue,
            Task::Embeddings => matches!(
                m.backend,
                BackendConfig::OpenAi(_) | BackendConfig::Azure(_)
            )
            .then_some(())
            .ok_or("\"openai\" or \"azure\" for task = \"embeddings\" (an OpenAI-compatible embedding server)"),
            Task::Moderations => matches!(m.backend, BackendConfig::OpenAi(_))
                .then_some(())
                .ok_or("\"openai\" for task = \"moderations\" (an OpenAI-compatible server that offers /moderations)"),
        };
        if let Err(kinds) = kinds {
            problems.push(format!("`models[{i}].backend.kind` must be {kinds}"));
        }
        if !m.fallbacks.is_empty() || !m.context_fallbacks.is_empty() {
            problems.push(format!(
                "`models[{i}].fallbacks` and `context_fallbacks` are not supported for \
                 task = \"{}\"",
                m.task.name()
            ));
        }
        if m.task != Task::Embeddings {
            continue;
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
    let not_chat = |id: &str| {
        models
            .iter()
            .find(|m| m.id == id && m.task != Task::Chat)
            .map(|m| m.task.name())
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
        for (target, task) in list.iter().filter_map(|t| Some((t, not_chat(t)?))) {
            problems.push(format!(
                "`{at}` names {target:?}, a model of task = \"{task}\", for chat model {id:?}"
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
        for (target, task) in targets.filter_map(|t| Some((t, not_chat(t)?))) {
            problems.push(format!(
                "`aliases[{i}]` names {target:?}, a model of task = \"{task}\": aliases route chat"
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

    #[test]
    fn a_moderation_model_is_an_openai_pool_that_nothing_routes_chat_to() {
        let moderation = |kind: &str, extra: &str| {
            format!(
                "[[models]]\nid = \"m\"\ntask = \"moderations\"\n{extra}\
                 backend = {{ kind = \"{kind}\", upstreams = [{{ base_url = \"https://x/v1\" }}] }}\n"
            )
        };
        let config = load(&moderation("openai", "")).unwrap();
        assert_eq!(config.models[1].task, super::Task::Moderations);
        for (extra, key) in [
            (
                moderation("azure", ""),
                "`models[1].backend.kind` must be \"openai\"",
            ),
            (
                moderation("openai", "fallbacks = [\"a\"]\n"),
                "`models[1].fallbacks`",
            ),
            (
                moderation("openai", "embeddings = {}\n"),
                "`models[1].embeddings` applies only",
            ),
            (
                format!(
                    "{}[[aliases]]\nid = \"w\"\nweights = {{ m = 1 }}\n",
                    moderation("openai", "")
                ),
                "`aliases[0]` names \"m\", a model of task = \"moderations\"",
            ),
        ] {
            let e = load(&extra).unwrap_err();
            assert!(e.contains(key), "{extra}: {e}");
        }
    }
}
