//! Operator tokens over HTTP (`/admin/v1/operator-tokens`): made, listed
//! and revoked by operators; a token is shown once, when made.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::super::AppState;
use super::super::body::JsonBody;
use super::{Caller, Durable, parse_id, pool};
use crate::error::Error;
use crate::replication::DURABILITY_HEADER;
use crate::tenancy::operators::{self, Role};

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/v1/operator-tokens", get(list).post(create))
        .route("/admin/v1/operator-tokens/{id}", delete(revoke))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    name: String,
    /// `admin` or `read-only`.
    role: String,
    /// RFC 3339; none: never.
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// `POST /admin/v1/operator-tokens`: a new token, in clear in this answer
/// only.
async fn create(
    State(state): State<Arc<AppState>>,
    Caller(actor): Caller,
    durability: Durable,
    JsonBody(body): JsonBody,
) -> Result<Response, Error> {
    let body: Body = serde_json::from_slice(&body)
        .map_err(|e| Error::invalid(format!("invalid request body: {e}"), None))?;
    let role = Role::parse(&body.role)?;
    let (view, token) =
        operators::create(pool(&state), &actor, &body.name, role, body.expires_at).await?;
    let sync = durability.settle(&state).await?;
    let mut answer = json!(view);
    answer["token"] = Value::String(token);
    Ok((
        StatusCode::CREATED,
        [(DURABILITY_HEADER, sync.header())],
        Json(answer),
    )
        .into_response())
}

/// `GET /admin/v1/operator-tokens`: every token, newest first (never the
/// token itself).
async fn list(State(state): State<Arc<AppState>>) -> Result<Json<Value>, Error> {
    let tokens = operators::list(pool(&state)).await?;
    Ok(Json(json!({ "object": "list", "data": tokens })))
}

/// `DELETE /admin/v1/operator-tokens/{id}`: revokes it in every region, as
/// replication reaches them.
async fn revoke(
    State(state): State<Arc<AppState>>,
    Caller(actor): Caller,
    Path(id): Path<String>,
    durability: Durable,
) -> Result<Response, Error> {
    let id = parse_id(&id, "token", None)?;
    let view = operators::revoke(pool(&state), &actor, id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no operator token {id}")))?;
    let sync = durability.settle(&state).await?;
    Ok(([(DURABILITY_HEADER, sync.header())], Json(json!(view))).into_response())
}
