//! Region controls over HTTP (`/admin/v1/regions`): drain, undrain and
//! weight, for every gateway.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::super::AppState;
use super::super::body::JsonBody;
use super::{Caller, Durable, pool};
use crate::error::Error;
use crate::replication::DURABILITY_HEADER;
use crate::tenancy::regions::{self, ControlSpec};

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/v1/regions", get(list))
        .route("/admin/v1/regions/{region}", put(put_control))
}

/// `GET /admin/v1/regions`: every region an operator has set a control
/// for (the others take traffic as usual).
async fn list(State(state): State<Arc<AppState>>) -> Result<Json<Value>, Error> {
    let controls = regions::list(pool(&state)).await?;
    Ok(Json(json!({ "object": "list", "data": controls })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    drained: Option<bool>,
    weight: Option<u32>,
    reason: Option<String>,
}

/// `PUT /admin/v1/regions/{region}`: changes what is given (`drained`,
/// `weight` 0 to 100, `reason`); every gateway applies it at its next
/// reload of keys.
async fn put_control(
    State(state): State<Arc<AppState>>,
    Caller(actor): Caller,
    Path(region): Path<String>,
    durability: Durable,
    JsonBody(body): JsonBody,
) -> Result<Response, Error> {
    let body: Body = serde_json::from_slice(&body)
        .map_err(|e| Error::invalid(format!("invalid request body: {e}"), None))?;
    let spec = ControlSpec {
        drained: body.drained,
        weight: body.weight,
        reason: body.reason,
    };
    let view = regions::put(pool(&state), &actor, &region, spec).await?;
    let sync = durability.settle(&state).await?;
    Ok(([(DURABILITY_HEADER, sync.header())], Json(json!(view))).into_response())
}
