//! What differs between the protocols a pool's upstreams may speak: the
//! URL of a chat and of a health check, how the key is presented, the body
//! sent and the reading of the answer stream. Everything else a pool does
//! (choice, retries, breakers, health, keys, TLS) is the same for all.

use reqwest::header::{AUTHORIZATION, HeaderName, HeaderValue};
use serde_json::Value;

use crate::config::inference::{DEFAULT_ANTHROPIC_MAX_TOKENS, DEFAULT_ANTHROPIC_VERSION};
use crate::config::{ApiKey, BackendConfig};
use crate::error::Error;
use crate::inference::{ChatRequest, ChunkStream, anthropic, openai};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// `POST {base_url}/chat/completions`, `Authorization: Bearer`.
    OpenAi,
    /// `POST {base_url}/messages`, `x-api-key` and `anthropic-version`.
    Anthropic { version: String, max_tokens: u32 },
    /// `POST {base_url}/openai/deployments/{deployment}/chat/completions`
    /// with `api-version` in the query, `api-key`.
    Azure { api_version: String },
}

impl Protocol {
    /// The protocol of a pool backend; `None` for the simulator.
    pub(crate) fn of(backend: &BackendConfig) -> Option<Self> {
        Some(match backend {
            BackendConfig::Sim(_) => return None,
            BackendConfig::OpenAi(_) => Self::OpenAi,
            BackendConfig::Anthropic(p) => Self::Anthropic {
                version: p
                    .anthropic_version
                    .clone()
                    .unwrap_or_else(|| DEFAULT_ANTHROPIC_VERSION.into()),
                max_tokens: p.default_max_tokens.unwrap_or(DEFAULT_ANTHROPIC_MAX_TOKENS),
            },
            BackendConfig::Azure(p) => Self::Azure {
                api_version: p.api_version.clone().unwrap_or_default(),
            },
        })
    }

    /// The body of a chat; a request the protocol cannot carry is refused
    /// here, before any upstream is tried.
    pub(super) fn body(&self, req: &ChatRequest, upstream_model: &str) -> Result<Value, Error> {
        match self {
            Self::OpenAi | Self::Azure { .. } => Ok(openai::request_body(req, upstream_model)),
            Self::Anthropic { max_tokens, .. } => {
                anthropic::request_body(req, upstream_model, *max_tokens)
            }
        }
    }

    pub(super) fn chat_url(&self, base_url: &str, upstream_model: &str) -> String {
        match self {
            Self::OpenAi => format!("{base_url}/chat/completions"),
            Self::Anthropic { .. } => format!("{base_url}/messages"),
            Self::Azure { api_version } => azure_url(
                base_url,
                &[
                    "openai",
                    "deployments",
                    upstream_model,
                    "chat",
                    "completions",
                ],
                api_version,
            ),
        }
    }

    /// Where embeddings are asked for; only OpenAI and Azure pools serve
    /// them (config validation sees to that).
    pub(super) fn embeddings_url(&self, base_url: &str, upstream_model: &str) -> String {
        match self {
            Self::OpenAi | Self::Anthropic { .. } => format!("{base_url}/embeddings"),
            Self::Azure { api_version } => azure_url(
                base_url,
                &["openai", "deployments", upstream_model, "embeddings"],
                api_version,
            ),
        }
    }

    /// Where moderations are asked for; only OpenAI pools serve them
    /// (config validation sees to that).
    pub(super) fn moderations_url(&self, base_url: &str) -> String {
        format!("{base_url}/moderations")
    }

    /// What the health check gets: the model list on OpenAI and Anthropic
    /// (cheap, and it checks the key); on Azure the resource's model list,
    /// the one cheap authenticated `GET` its data plane has (a deployment
    /// itself has no `GET` in current API versions).
    pub(super) fn health_url(&self, base_url: &str) -> String {
        match self {
            Self::OpenAi | Self::Anthropic { .. } => format!("{base_url}/models"),
            Self::Azure { api_version } => azure_url(base_url, &["openai", "models"], api_version),
        }
    }

    /// The headers that carry `key`, and the protocol's own.
    pub(super) fn auth_headers(
        &self,
        key: Option<&ApiKey>,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
        let secret = |value: String| {
            let mut value = HeaderValue::from_str(&value)
                .map_err(|_| "the key is not a valid header value".to_string())?;
            value.set_sensitive(true);
            Ok::<_, String>(value)
        };
        let mut headers = Vec::new();
        if let Self::Anthropic { version, .. } = self {
            let version = HeaderValue::from_str(version)
                .map_err(|_| "`anthropic_version` is not a valid header value".to_string())?;
            headers.push((HeaderName::from_static("anthropic-version"), version));
        }
        if let Some(key) = key {
            let key = key.expose();
            headers.push(match self {
                Self::OpenAi => (AUTHORIZATION, secret(format!("Bearer {key}"))?),
                Self::Anthropic { .. } => {
                    (HeaderName::from_static("x-api-key"), secret(key.into())?)
                }
                Self::Azure { .. } => (HeaderName::from_static("api-key"), secret(key.into())?),
            });
        }
        Ok(headers)
    }

    pub(super) fn chunks(
        &self,
        response: reqwest::Response,
        prompt_tokens: u32,
        origin: String,
    ) -> ChunkStream {
        match self {
            Self::OpenAi | Self::Azure { .. } => openai::chunks(response, prompt_tokens, origin),
            Self::Anthropic { .. } => anthropic::chunks(response, prompt_tokens, origin),
        }
    }
}

/// `base_url` with `segments` appended (each percent-encoded: a deployment
/// name is the operator's text) and `api-version` in the query.
fn azure_url(base_url: &str, segments: &[&str], api_version: &str) -> String {
    let Ok(mut url) = reqwest::Url::parse(base_url) else {
        // Validation parsed it already; never reached.
        return format!(
            "{base_url}/{}?api-version={api_version}",
            segments.join("/")
        );
    };
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url.query_pairs_mut()
        .append_pair("api-version", api_version);
    url.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_protocol_has_its_urls_and_headers() {
        let azure = Protocol::Azure {
            api_version: "2024-10-21".into(),
        };
        assert_eq!(
            azure.chat_url("https://r.openai.azure.com/", "gpt 4o"),
            "https://r.openai.azure.com/openai/deployments/gpt%204o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            azure.embeddings_url("https://r.openai.azure.com", "emb"),
            "https://r.openai.azure.com/openai/deployments/emb/embeddings?api-version=2024-10-21"
        );
        assert_eq!(
            Protocol::OpenAi.embeddings_url("https://api.openai.com/v1", "m"),
            "https://api.openai.com/v1/embeddings"
        );
        assert_eq!(
            Protocol::OpenAi.moderations_url("https://api.openai.com/v1"),
            "https://api.openai.com/v1/moderations"
        );
        assert_eq!(
            azure.health_url("https://r.openai.azure.com"),
            "https://r.openai.azure.com/openai/models?api-version=2024-10-21"
        );
        let key = ApiKey::new("k-1");
        let names = |p: &Protocol| -> Vec<(String, String)> {
            p.auth_headers(Some(&key))
                .unwrap()
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
                .collect()
        };
        assert_eq!(names(&azure), [("api-key".into(), "k-1".into())]);
        assert_eq!(
            names(&Protocol::OpenAi),
            [("authorization".into(), "Bearer k-1".into())]
        );
        let anthropic = Protocol::Anthropic {
            version: "2023-06-01".into(),
            max_tokens: 1,
        };
        assert_eq!(
            names(&anthropic),
            [
                ("anthropic-version".into(), "2023-06-01".into()),
                ("x-api-key".into(), "k-1".into())
            ]
        );
        assert_eq!(
            anthropic.chat_url("https://api.anthropic.com/v1", "m"),
            "https://api.anthropic.com/v1/messages"
        );
    }
}
