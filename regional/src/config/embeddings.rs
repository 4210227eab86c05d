//! The `[embeddings]` section: the built-in embedding model (all-MiniLM-L6-v2
//! on the CPU) and how its requests are batched. The section's presence turns
//! the model on, so `[embeddings]` alone serves it with the defaults below.

use std::path::PathBuf;
use std::time::Duration;

use meridian_proto::config::Problems;
use serde::Deserialize;

/// Where `infra/scripts/setup.sh` puts the model, relative to the working
/// directory (the repository root for `make up`).
pub(crate) const DEFAULT_MODEL_DIR: &str = ".meridian/models/all-minilm-l6-v2";

/// The built-in embedding model. Every key has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddingsConfig {
    /// Serve the model; `false` keeps the section but skips the model (and
    /// its load time).
    pub enabled: bool,
    /// Directory holding `config.json`, `tokenizer.json` and
    /// `model.safetensors`; a relative path is taken from the working
    /// directory. The node refuses to start when a file is missing.
    pub model_dir: PathBuf,
    /// Most texts in one forward pass; a request with more is split.
    pub max_batch: usize,
    /// How long the first request of a batch waits for others to join it,
    /// in milliseconds: latency traded for throughput under concurrency.
    pub max_wait_ms: u64,
    /// Most texts in one request (OpenAI allows 2048).
    pub max_inputs: usize,
    /// Longest text, in tokens with the `[CLS]` and `[SEP]` the model adds;
    /// longer texts are refused, not truncated, as OpenAI does. The model was
    /// trained on 256 and its position table ends at 512.
    pub max_input_tokens: usize,
    /// Requests waiting for the model at most; more are refused with 503
    /// (UNAVAILABLE), which the gateway may retry in another region.
    pub max_queued: usize,
}

impl Default for EmbeddingsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            model_dir: PathBuf::from(DEFAULT_MODEL_DIR),
            max_batch: 32,
            max_wait_ms: 2,
            max_inputs: 2048,
            max_input_tokens: 256,
            max_queued: 256,
        }
    }
}

impl EmbeddingsConfig {
    pub(crate) fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }

    pub(crate) fn validate(&self, problems: &mut Problems) {
        if self.model_dir.as_os_str().is_empty() {
            problems.push("`embeddings.model_dir` must not be empty");
        }
        if self.max_batch == 0 {
            problems.push("`embeddings.max_batch` must be at least 1");
        }
        // Longer waits would make every lone request that much slower.
        if self.max_wait_ms > 1_000 {
            problems.push("`embeddings.max_wait_ms` must be at most 1000");
        }
        if self.max_inputs == 0 {
            problems.push("`embeddings.max_inputs` must be at least 1");
        }
        if !(3..=512).contains(&self.max_input_tokens) {
            problems.push("`embeddings.max_input_tokens` must be between 3 and 512");
        }
        if self.max_queued == 0 {
            problems.push("`embeddings.max_queued` must be at least 1");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<EmbeddingsConfig, String> {
        let config: EmbeddingsConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        Problems::of(|p| config.validate(p)).map(|()| config)
    }

    #[test]
    fn an_empty_section_serves_the_model_with_defaults() {
        let config = parse("").unwrap();
        assert!(config.enabled);
        assert_eq!(config.model_dir, PathBuf::from(DEFAULT_MODEL_DIR));
        assert_eq!(config.max_input_tokens, 256);
    }

    #[test]
    fn bad_values_are_named_and_unknown_keys_refused() {
        for (text, key) in [
            ("max_batch = 0", "embeddings.max_batch"),
            ("max_input_tokens = 513", "embeddings.max_input_tokens"),
            ("max_wait_ms = 5000", "embeddings.max_wait_ms"),
            ("model_dir = \"\"", "embeddings.model_dir"),
            ("batch = 3", "unknown field"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}
