//! `POST /v1/embeddings` (OpenAI's shape) and the work behind gRPC
//! `Inference.Embed`: both go by `model` to an upstream embedding model of
//! the table (`upstream.rs`) or to the node's built-in embedding model.

mod upstream;

use std::sync::Arc;

use axum::Router;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::body::JsonBody;
use super::{AppState, Tenant};
use crate::error::Error;
use crate::inference::{EMBEDDING_MODEL_ID, EmbedPool, Embedder, Usage};

pub(super) fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/embeddings", post(embeddings))
        .with_state(state)
}

/// An OpenAI embeddings request. Unknown fields are ignored, as the SDKs
/// send some Meridian has no use for.
#[derive(Debug, Deserialize)]
struct EmbeddingsBody {
    input: Input,
    model: String,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default, deserialize_with = "super::openai::integer")]
    dimensions: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
    /// Token ids, or anything else: refused with a message saying which.
    Other(serde_json::Value),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Float,
    /// Little-endian f32s, base64: what OpenAI's Python SDK asks for by default.
    Base64,
}

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<EmbeddingItem>,
    model: &'a str,
    usage: UsageOut,
}

#[derive(Serialize)]
struct EmbeddingItem {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct UsageOut {
    prompt_tokens: u32,
    total_tokens: u32,
}

impl EmbeddingsBody {
    #[cfg(test)]
    fn parse(bytes: &[u8]) -> Result<Self, Error> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::invalid(format!("invalid request body: {e}"), None))
    }

    fn from_value(body: serde_json::Value) -> Result<Self, Error> {
        serde_json::from_value(body)
            .map_err(|e| Error::invalid(format!("invalid request body: {e}"), None))
    }

    /// The texts and the encoding, once the request asks for nothing the
    /// model cannot do.
    fn check(self, dimensions: usize) -> Result<(String, Vec<String>, Encoding), Error> {
        let encoding = match self.encoding_format.as_deref() {
            None | Some("float") => Encoding::Float,
            Some("base64") => Encoding::Base64,
            Some(other) => {
                return Err(Error::invalid(
                    format!("`encoding_format` must be \"float\" or \"base64\", got {other:?}"),
                    Some("encoding_format"),
                ));
            }
        };
        if let Some(d) = self.dimensions
            && d != dimensions as u64
        {
            return Err(Error::invalid(
                format!(
                    "{EMBEDDING_MODEL_ID} gives {dimensions} dimensions and cannot shorten \
                     them: omit `dimensions` or send {dimensions}"
                ),
                Some("dimensions"),
            ));
        }
        let inputs = match self.input {
            Input::One(s) => vec![s],
            Input::Many(v) => v,
            Input::Other(v) => return Err(Error::invalid(input_problem(&v), Some("input"))),
        };
        Ok((self.model, inputs, encoding))
    }
}

fn input_problem(v: &serde_json::Value) -> String {
    let numbers = |v: &serde_json::Value| {
        v.as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(|x| x.is_number() || x.is_array()))
    };
    if numbers(v) {
        format!("`input` as token ids is not supported by {EMBEDDING_MODEL_ID}: send text")
    } else {
        "`input` must be a string or an array of strings".into()
    }
}

/// The upstream embedding model `model` names, if it names one; a chat
/// model is refused by name.
fn upstream_model(state: &AppState, model: &str) -> Result<Option<Arc<EmbedPool>>, Error> {
    if model.is_empty() {
        return Err(Error::invalid("`model` must not be empty", Some("model")));
    }
    state.inference.embedding_model(model)
}

fn embedder(state: &AppState, model: &str) -> Result<Arc<Embedder>, Error> {
    state
        .embedder
        .clone()
        .ok_or_else(|| Error::ModelNotFound(model.to_string()))
}

async fn embeddings(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    JsonBody(body): JsonBody,
) -> Response {
    match embed_http(&state, &tenant, &body).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    }
}

async fn embed_http(state: &AppState, tenant: &Tenant, body: &[u8]) -> Result<Response, Error> {
    let body: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Error::invalid(format!("invalid request body: {e}"), None))?;
    let model = body["model"].as_str().unwrap_or_default().to_string();
    if let Some(upstream) = upstream_model(state, &model)?
        && let serde_json::Value::Object(body) = body
    {
        let call = upstream::call(body, &upstream)?;
        let (answer, usage) = run(state, tenant, &model, async {
            let answer = upstream.embed(call).await?;
            let usage = upstream::usage(&answer);
            Ok((answer, usage))
        })
        .await?;
        // Tokens used, for the gateway's tokens-per-minute accounting.
        return Ok((
            [(
                meridian_proto::header::USAGE_TOKENS,
                usage.prompt_tokens.to_string(),
            )],
            axum::Json(answer),
        )
            .into_response());
    }
    let body = EmbeddingsBody::from_value(body)?;
    let embedder = embedder(state, &body.model)?;
    let (model, inputs, encoding) = body.check(embedder.dimensions())?;
    let (vectors, usage) = run_builtin(state, tenant, &embedder, &model, inputs).await?;
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| EmbeddingItem {
            object: "embedding",
            index,
            embedding: match encoding {
                Encoding::Float => Vector::Float(v),
                Encoding::Base64 => Vector::Base64(base64(&v)),
            },
        })
        .collect();
    let body = EmbeddingList {
        object: "list",
        data,
        model: &model,
        usage: UsageOut {
            prompt_tokens: usage.prompt_tokens,
            total_tokens: usage.prompt_tokens,
        },
    };
    // Tokens used, for the gateway's tokens-per-minute accounting.
    Ok((
        [(
            meridian_proto::header::USAGE_TOKENS,
            usage.prompt_tokens.to_string(),
        )],
        axum::Json(body),
    )
        .into_response())
}

/// Serves gRPC `Inference.Embed`.
pub(super) async fn embed_grpc(
    state: &AppState,
    request: tonic::Request<meridian_proto::v1::EmbedRequest>,
) -> Result<tonic::Response<meridian_proto::v1::EmbedResponse>, tonic::Status> {
    use meridian_proto::v1::{EmbedResponse, Embedding};
    let tenant = Tenant::from_metadata(request.metadata())?;
    let req = request.into_inner();
    let (vectors, usage) = match upstream_model(state, &req.model)? {
        Some(upstream) => {
            // The proto carries floats, so the upstream is asked for them.
            let body = serde_json::json!({"input": req.inputs, "encoding_format": "float"});
            let call = upstream::call(body.as_object().cloned().unwrap_or_default(), &upstream)?;
            run(state, &tenant, &req.model, async {
                let answer = upstream.embed(call).await?;
                let usage = upstream::usage(&answer);
                Ok((upstream::vectors(&answer)?, usage))
            })
            .await?
        }
        None => {
            let embedder = embedder(state, &req.model)?;
            run_builtin(state, &tenant, &embedder, &req.model, req.inputs).await?
        }
    };
    let mut response = tonic::Response::new(EmbedResponse {
        embeddings: vectors
            .into_iter()
            .zip(0u32..)
            .map(|(values, index)| Embedding { values, index })
            .collect(),
        model: req.model,
        usage: Some(meridian_proto::v1::Usage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: 0,
            total_tokens: usage.prompt_tokens,
        }),
        region: state.region.clone(),
    });
    response.metadata_mut().insert(
        meridian_proto::header::USAGE_TOKENS,
        usage.prompt_tokens.into(),
    );
    Ok(response)
}

/// Runs `work` under the tenant's admission slot and records its usage.
pub(super) async fn run<T>(
    state: &AppState,
    tenant: &Tenant,
    model: &str,
    work: impl Future<Output = Result<(T, Usage), Error>>,
) -> Result<(T, Usage), Error> {
    tenant.may_use(model)?;
    state.spend.check(tenant.as_str())?;
    let _permit = state.inference.admit(tenant.as_str())?;
    let record = state
        .telemetry
        .usage
        .begin(tenant.as_str(), tenant.key(), model);
    let (out, usage) = work.await.inspect_err(|e| record.failed(e))?;
    // An embedding has no first token: the whole call stands for it.
    record.completed(usage, record.elapsed(), "bypass");
    Ok((out, usage))
}

/// Embeds with the built-in model.
async fn run_builtin(
    state: &AppState,
    tenant: &Tenant,
    embedder: &Embedder,
    model: &str,
    inputs: Vec<String>,
) -> Result<(Vec<Vec<f32>>, Usage), Error> {
    run(state, tenant, model, async {
        let out = embedder.embed(model, inputs).await?;
        let usage = Usage {
            prompt_tokens: out.prompt_tokens,
            completion_tokens: 0,
        };
        Ok((out.vectors, usage))
    })
    .await
}

fn base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: serde_json::Value) -> Result<(String, Vec<String>, Encoding), Error> {
        EmbeddingsBody::parse(body.to_string().as_bytes())?.check(384)
    }

    #[test]
    fn a_string_or_strings_are_texts() {
        let (model, inputs, enc) = check(serde_json::json!({"model": "m", "input": "a"})).unwrap();
        assert_eq!(
            (model.as_str(), inputs, enc),
            ("m", vec!["a".into()], Encoding::Float)
        );
        let (_, inputs, enc) = check(
            serde_json::json!({"model": "m", "input": ["a", "b"], "encoding_format": "base64", "dimensions": 384}),
        )
        .unwrap();
        assert_eq!(
            (inputs, enc),
            (vec!["a".into(), "b".into()], Encoding::Base64)
        );
    }

    #[test]
    fn token_ids_other_dimensions_and_formats_are_refused_by_name() {
        let err = |body| check(body).unwrap_err().to_string();
        assert!(err(serde_json::json!({"model": "m", "input": [1, 2]})).contains("token ids"));
        assert!(err(serde_json::json!({"model": "m", "input": [[1], [2]]})).contains("token ids"));
        assert!(err(serde_json::json!({"model": "m", "input": 3})).contains("string"));
        assert!(
            err(serde_json::json!({"model": "m", "input": "a", "dimensions": 128})).contains("384")
        );
        assert!(
            err(serde_json::json!({"model": "m", "input": "a", "encoding_format": "int8"}))
                .contains("encoding_format")
        );
    }

    #[test]
    fn base64_is_little_endian_f32() {
        assert_eq!(base64(&[1.0]), "AACAPw==");
    }
}
