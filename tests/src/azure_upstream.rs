//! An Azure OpenAI resource for tests: a proxy that answers only Azure's
//! paths (`/openai/deployments/{deployment}/chat/completions` and
//! `/openai/models`, each with `api-version` in the query) and only with
//! its `api-key` header, forwarding chats to a simulator.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::served::Served;
use crate::{SimServer, instant_sim};

/// The `api-version` the resource takes.
pub const AZURE_API_VERSION: &str = "2024-10-21";

/// An Azure-shaped proxy on a free port before a simulator; stopped on drop.
pub struct AzureUpstream {
    served: Served,
    _sim: SimServer,
}

struct Resource {
    key: String,
    deployment: String,
    sim: String,
    client: reqwest::Client,
}

impl AzureUpstream {
    /// A resource with one deployment, `deployment`, open to `key`.
    pub async fn start(key: &str, deployment: &str) -> Self {
        let sim = SimServer::start(instant_sim()).await;
        let resource = Arc::new(Resource {
            key: key.into(),
            deployment: deployment.into(),
            sim: format!("{}/chat/completions", sim.base_url()),
            client: reqwest::Client::new(),
        });
        let app = Router::new()
            .route(
                "/openai/deployments/{deployment}/chat/completions",
                post(chat),
            )
            .route("/openai/models", get(models))
            .with_state(resource);
        Self {
            served: Served::start(app).await,
            _sim: sim,
        }
    }

    /// The resource's endpoint, as an Azure `base_url` is written.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.served.addr())
    }
}

fn azure_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}

/// What Azure answers a request without its key or version: `None` when
/// the request has both.
fn refused(
    resource: &Resource,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Option<Response> {
    if headers.contains_key("authorization") {
        return Some(azure_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "bearer tokens are not keys here",
        ));
    }
    if headers
        .get("api-key")
        .is_none_or(|k| k != resource.key.as_str())
    {
        return Some(azure_error(
            StatusCode::UNAUTHORIZED,
            "401",
            "Access denied due to invalid subscription key or wrong API endpoint.",
        ));
    }
    if query.get("api-version").map(String::as_str) != Some(AZURE_API_VERSION) {
        return Some(azure_error(
            StatusCode::NOT_FOUND,
            "404",
            "Resource not found",
        ));
    }
    None
}

async fn models(
    State(resource): State<Arc<Resource>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(no) = refused(&resource, &headers, &query) {
        return no;
    }
    axum::Json(json!({ "object": "list", "data": [] })).into_response()
}

async fn chat(
    State(resource): State<Arc<Resource>>,
    Path(deployment): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    if let Some(no) = refused(&resource, &headers, &query) {
        return no;
    }
    if deployment != resource.deployment {
        return azure_error(
            StatusCode::NOT_FOUND,
            "DeploymentNotFound",
            "no such deployment",
        );
    }
    let answer = resource
        .client
        .post(&resource.sim)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = answer.status();
    let content_type = answer.headers().get("content-type").cloned();
    let mut response = Response::new(Body::from_stream(answer.bytes_stream()));
    *response.status_mut() = status;
    if let Some(ct) = content_type {
        response.headers_mut().insert("content-type", ct);
    }
    response
}
