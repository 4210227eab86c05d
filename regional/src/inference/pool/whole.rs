//! Calls that answer with one JSON document, embeddings and moderations:
//! one POST of an OpenAI body, the whole answer read as JSON, with the
//! pool's choice, retries and breakers.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::{Failure, Pool};
use crate::error::Error;

/// An OpenAI call whose answer comes whole.
#[derive(Clone, Copy)]
enum Call {
    Embeddings,
    Moderations,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Self::Embeddings => "embeddings",
            Self::Moderations => "moderations",
        }
    }

    fn span(self) -> &'static str {
        match self {
            Self::Embeddings => "upstream.embeddings",
            Self::Moderations => "upstream.moderations",
        }
    }

    /// The answer, if it has the shape every caller relies on: for
    /// embeddings a `data` list of objects with an `index`, for moderations
    /// a `results` list.
    fn check(self, bytes: &[u8]) -> Result<Value, String> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("that are not JSON: {e}"))?;
        match self {
            Self::Embeddings => {
                let items = value["data"].as_array().ok_or("without a `data` list")?;
                if items.iter().any(|item| item["index"].as_u64().is_none()) {
                    return Err("with an item that has no `index`".into());
                }
            }
            Self::Moderations => {
                value["results"]
                    .as_array()
                    .ok_or("without a `results` list")?;
            }
        }
        Ok(value)
    }
}

impl Pool {
    /// Sends `body` (an OpenAI embeddings request without `model`) under
    /// the pool's upstream model name; the upstream's answer, whole.
    pub(crate) async fn embed(self: &Arc<Self>, body: Map<String, Value>) -> Result<Value, Error> {
        self.whole(Call::Embeddings, body).await
    }

    /// Sends `body` (an OpenAI moderations request without `model`) under
    /// the pool's upstream model name; the upstream's answer, whole.
    pub(crate) async fn moderate(
        self: &Arc<Self>,
        body: Map<String, Value>,
    ) -> Result<Value, Error> {
        self.whole(Call::Moderations, body).await
    }

    async fn whole(
        self: &Arc<Self>,
        call: Call,
        mut body: Map<String, Value>,
    ) -> Result<Value, Error> {
        body.insert("model".into(), Value::String(self.upstream_model.clone()));
        let body = Value::Object(body);
        let (answer, _done) = self
            .retrying(None, |i| {
                let body = &body;
                async move {
                    let up = &self.upstreams[i];
                    let cx = self.span(call.span(), up);
                    let url = match call {
                        Call::Embeddings => self
                            .protocol
                            .embeddings_url(&up.base_url, &self.upstream_model),
                        Call::Moderations => self.protocol.moderations_url(&up.base_url),
                    };
                    // The answer comes whole, so the deadline for its head
                    // covers its body too.
                    let result = self
                        .within_first_byte(up, async {
                            let response = self.post(&cx, up, url, body).await?;
                            let bytes = response.bytes().await.map_err(|e| {
                                Failure::Retry(Error::Unavailable(format!(
                                    "upstream {}: reading its answer: {e}",
                                    up.base_url
                                )))
                            })?;
                            call.check(&bytes).map_err(|why| {
                                Failure::Retry(Error::Unavailable(format!(
                                    "upstream {} answered {} {why}",
                                    up.base_url,
                                    call.name()
                                )))
                            })
                        })
                        .await;
                    self.settle(&cx, up, result)
                }
            })
            .await?;
        Ok(answer)
    }
}
