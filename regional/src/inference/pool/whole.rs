//! Embeddings from a pool: one POST of an OpenAI embeddings body, its whole
//! answer read as JSON, with the pool's choice, retries and breakers.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::{Failure, Pool};
use crate::error::Error;

impl Pool {
    /// Sends `body` (an OpenAI embeddings request without `model`) under
    /// the pool's upstream model name; the upstream's answer, whole.
    pub(crate) async fn embed(
        self: &Arc<Self>,
        mut body: Map<String, Value>,
    ) -> Result<Value, Error> {
        body.insert("model".into(), Value::String(self.upstream_model.clone()));
        let body = Value::Object(body);
        let (answer, _done) = self
            .retrying(None, |i| {
                let body = &body;
                async move {
                    let up = &self.upstreams[i];
                    let cx = self.span("upstream.embeddings", up);
                    let url = self
                        .protocol
                        .embeddings_url(&up.base_url, &self.upstream_model);
                    // An embedding answer comes whole, so the deadline for
                    // its head covers its body too.
                    let result = self
                        .within_first_byte(up, async {
                            let response = self.post(&cx, up, url, body).await?;
                            let bytes = response.bytes().await.map_err(|e| {
                                Failure::Retry(Error::Unavailable(format!(
                                    "upstream {}: reading its answer: {e}",
                                    up.base_url
                                )))
                            })?;
                            answer(&bytes).map_err(|why| {
                                Failure::Retry(Error::Unavailable(format!(
                                    "upstream {} answered embeddings {why}",
                                    up.base_url
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

/// The upstream's answer, if it has the shape every caller relies on: an
/// object whose `data` is a list of objects with an `index`.
fn answer(bytes: &[u8]) -> Result<Value, String> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("that are not JSON: {e}"))?;
    let items = value["data"].as_array().ok_or("without a `data` list")?;
    if items.iter().any(|item| item["index"].as_u64().is_none()) {
        return Err("with an item that has no `index`".into());
    }
    Ok(value)
}
