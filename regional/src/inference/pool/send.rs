//! One POST of a JSON body to one upstream, whatever it asks for (a chat,
//! embeddings): the client span, the first-byte deadline, the mapping of
//! the upstream's status to a retry or a refusal, and the scrubbing of the
//! key from whatever the upstream said.

use std::future::Future;
use std::time::Duration;

use meridian_mesh::trace::{self, KeyValue};

use super::health::Down;
use super::{Failure, Pool, Upstream, client};
use crate::error::Error;
use crate::inference::openai;

impl Pool {
    /// A client span for one attempt at `up`; the upstream gets its
    /// `traceparent`, so an upstream that traces (the simulator can)
    /// continues the trace.
    pub(super) fn span(&self, name: &'static str, up: &Upstream) -> trace::Context {
        trace::child_span(
            name,
            trace::Kind::Client,
            vec![
                KeyValue::new("meridian.model", self.model.clone()),
                KeyValue::new("meridian.upstream", up.base_url.clone()),
            ],
        )
    }

    /// `work`, failed as a retryable error when it takes longer than
    /// `first_byte_timeout_ms`.
    pub(super) async fn within_first_byte<T>(
        &self,
        up: &Upstream,
        work: impl Future<Output = Result<T, Failure>>,
    ) -> Result<T, Failure> {
        let ms = self.config.first_byte_timeout_ms;
        tokio::time::timeout(Duration::from_millis(ms), work)
            .await
            .unwrap_or_else(|_| {
                Err(Failure::Retry(Error::Unavailable(format!(
                    "upstream {} sent no response head within {ms} ms (`first_byte_timeout_ms`)",
                    up.base_url
                ))))
            })
    }

    /// Ends an attempt's span: its error scrubbed of the key, a refusal of
    /// the key remembered as why the upstream is out.
    pub(super) fn settle<T>(
        &self,
        cx: &trace::Context,
        up: &Upstream,
        result: Result<T, Failure>,
    ) -> Result<T, Failure> {
        let key = up.key.as_ref();
        let result = result.map_err(|f| match f {
            Failure::Retry(e) => Failure::Retry(client::scrub_error(e, key)),
            Failure::Fatal(e) => Failure::Fatal(client::scrub_error(e, key)),
        });
        if let Err(Failure::Retry(Error::UpstreamRefused { status, said, .. })) = &result {
            *up.failure.lock().expect("failure lock") = Some(Down::Refused {
                status: *status,
                said: said.clone(),
            });
        }
        if let Err(Failure::Retry(e) | Failure::Fatal(e)) = &result {
            trace::set_error(cx, e.to_string());
        }
        trace::end(cx);
        result
    }

    /// POSTs `body` to `url` with the upstream's headers; a success status
    /// gives the response, any other the failure it stands for.
    pub(super) async fn post(
        &self,
        cx: &trace::Context,
        up: &Upstream,
        url: String,
        body: &serde_json::Value,
    ) -> Result<reqwest::Response, Failure> {
        let mut request = self.client.post(url).headers(up.headers.clone()).json(body);
        if let Some(traceparent) = trace::traceparent(cx) {
            request = request.header(trace::TRACEPARENT, traceparent);
        }
        let response = request.send().await.map_err(|e| {
            Failure::Retry(Error::Unavailable(format!("upstream {}: {e}", up.base_url)))
        })?;
        let status = response.status();
        trace::set_attributes(
            cx,
            [KeyValue::new(
                "http.response.status_code",
                i64::from(status.as_u16()),
            )],
        );
        if status.is_success() {
            return Ok(response);
        }
        let said = openai::error_message(&response.text().await.unwrap_or_default());
        let message = format!("upstream {} answered {status}: {said}", up.base_url);
        Err(match status.as_u16() {
            400 | 413 | 422 => Failure::Fatal(Error::invalid(message, None)),
            // Another upstream may hold a key that works; this one counts
            // as failing until its key is fixed.
            s @ (401 | 403) => Failure::Retry(Error::UpstreamRefused {
                upstream: up.base_url.clone(),
                status: s,
                said,
            }),
            // 429, 5xx and Anthropic's 529 (overloaded): another upstream
            // may take it.
            _ => Failure::Retry(Error::Unavailable(message)),
        })
    }
}
