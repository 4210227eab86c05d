//! `POST /v1/moderations` (OpenAI's shape), answered by an upstream that
//! offers it: a model of the table with `task = "moderations"`. Meridian
//! has no moderation model of its own; a region without one says so with a
//! 404 naming the configuration it lacks.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Map, Value};

use super::body::JsonBody;
use super::{AppState, Tenant};
use crate::error::Error;
use crate::inference::Usage;

pub(super) fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/moderations", post(moderations))
        .with_state(state)
}

async fn moderations(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    JsonBody(body): JsonBody,
) -> Response {
    match moderate(&state, &tenant, &body).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    }
}

async fn moderate(state: &AppState, tenant: &Tenant, body: &[u8]) -> Result<Response, Error> {
    let body: Value = serde_json::from_slice(body)
        .map_err(|e| Error::invalid(format!("invalid request body: {e}"), None))?;
    let Value::Object(mut body) = body else {
        return Err(Error::invalid(
            "the request body must be a JSON object",
            None,
        ));
    };
    let model = match body.remove("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) if m.is_empty() => {
            return Err(Error::invalid("`model` must not be empty", Some("model")));
        }
        Some(Value::String(m)) => Some(m),
        Some(_) => return Err(Error::invalid("`model` must be a string", Some("model"))),
    };
    check_input(&body)?;
    let (model, pool) = state.inference.moderation_model(model.as_deref())?;
    let (mut answer, _) = super::embeddings::run(state, tenant, &model, async {
        // A moderation reports no tokens, and OpenAI charges none.
        Ok((pool.moderate(body).await?, Usage::default()))
    })
    .await?;
    // The model the client knows, as for every other answer.
    answer["model"] = Value::String(model);
    Ok((
        [(meridian_proto::header::USAGE_TOKENS, "0")],
        axum::Json(answer),
    )
        .into_response())
}

/// `input` is a string, a non-empty array of strings, or a non-empty array
/// of `text` and `image_url` parts, as OpenAI takes it.
fn check_input(body: &Map<String, Value>) -> Result<(), Error> {
    let invalid = |message: String| Error::invalid(message, Some("input"));
    match body.get("input") {
        None | Some(Value::Null) => Err(invalid("`input` is required".into())),
        Some(Value::String(_)) => Ok(()),
        Some(Value::Array(items)) if items.is_empty() => {
            Err(invalid("`input` must not be an empty array".into()))
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => Ok(()),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let ok = match item["type"].as_str() {
                    Some("text") => item["text"].is_string(),
                    Some("image_url") => item["image_url"]["url"].is_string(),
                    _ => false,
                };
                if !ok {
                    return Err(invalid(format!(
                        "`input[{i}]` must be a string (in an array of strings) or a part: \
                         {{\"type\": \"text\", \"text\": ...}} or \
                         {{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}"
                    )));
                }
            }
            Ok(())
        }
        Some(_) => Err(invalid(
            "`input` must be a string, an array of strings, or an array of text and image_url \
             parts"
                .into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    fn check(input: Value) -> Result<(), String> {
        let body = json!({ "input": input });
        super::check_input(body.as_object().unwrap()).map_err(|e| e.to_string())
    }

    use serde_json::Value;

    #[test]
    fn inputs_are_strings_or_parts_and_the_wrong_one_is_named() {
        assert!(check(json!("")).is_ok());
        assert!(check(json!(["a", "b"])).is_ok());
        assert!(
            check(json!([{"type": "text", "text": "a"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]))
            .is_ok()
        );
        for (input, named) in [
            (Value::Null, "`input` is required"),
            (json!([]), "empty array"),
            (
                json!([{"type": "text", "text": "a"}, {"type": "text"}]),
                "`input[1]`",
            ),
            (json!([{"type": "audio"}]), "`input[0]`"),
            (json!(5), "`input` must be"),
        ] {
            let e = check(input.clone()).unwrap_err();
            assert!(e.contains(named), "{input}: {e}");
        }
    }
}
