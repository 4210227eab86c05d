//! Model routes over HTTP (`/admin/v1/routes`): aliases set through the
//! API, replicated to every region, served over each region's config.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::super::AppState;
use super::super::body::JsonBody;
use super::{Caller, Durable, pool};
use crate::config::AliasConfig;
use crate::error::Error;
use crate::inference::routes;
use crate::replication::DURABILITY_HEADER;
use crate::tenancy::manage::Actor;

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/v1/routes", get(list_routes))
        .route(
            "/admin/v1/routes/{id}",
            get(get_route).put(put_route).delete(delete_route),
        )
}

/// `GET /admin/v1/routes`: every route of this region, its source (`api`
/// or `config`) and whether this region serves it.
async fn list_routes(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "object": "list", "data": state.inference.route_views() }))
}

/// `GET /admin/v1/routes/{id}`: the route (an API route and a config alias
/// of one name are both shown; the API's is served).
async fn get_route(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Error> {
    let views: Vec<_> = state
        .inference
        .route_views()
        .into_iter()
        .filter(|v| v.id == id)
        .collect();
    if views.is_empty() {
        return Err(no_route(&id));
    }
    Ok(Json(json!({ "object": "list", "data": views })))
}

/// `PUT /admin/v1/routes/{id}`: sets a route for every region. This region
/// must be able to serve it; another region that cannot leaves it out and
/// says why in its `GET /admin/v1/routes`.
async fn put_route(
    State(state): State<Arc<AppState>>,
    Caller(actor): Caller,
    Path(id): Path<String>,
    durability: Durable,
    JsonBody(body): JsonBody,
) -> Result<Response, Error> {
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| Error::invalid(format!("invalid request body: {e}"), None))?;
    let route = routes::parse(&id, body)
        .map_err(|e| Error::invalid(format!("invalid route: {e}"), None))?;
    let (created, view) = set(&state, &actor, &route).await?;
    let sync = durability.settle(&state).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        [(DURABILITY_HEADER, sync.header())],
        Json(json!(view)),
    )
        .into_response())
}

/// Stores `route` once this region can serve it, and serves it here at
/// once (other regions once it has replicated to them): whether it was
/// new, and how this region serves it.
pub(super) async fn set(
    state: &AppState,
    actor: &Actor,
    route: &AliasConfig,
) -> Result<(bool, routes::RouteView), Error> {
    let id = &route.id;
    if id.is_empty() || id.len() > 256 || id.contains('\0') {
        return Err(Error::invalid(
            "a route id is 1 to 256 bytes with no NUL",
            None,
        ));
    }
    if let Some(problem) = state.inference.route_problem(route) {
        return Err(Error::invalid(
            format!("region {} cannot serve this route: {problem}", state.region),
            None,
        ));
    }
    let created = routes::put(pool(state), actor, route).await?;
    state
        .inference
        .set_api_routes(routes::load(pool(state)).await?);
    let view = state
        .inference
        .route_views()
        .into_iter()
        .find(|v| &v.id == id && v.source == "api")
        .ok_or_else(|| Error::Unavailable(format!("route {id:?} was stored but is not listed")))?;
    Ok((created, view))
}

/// Removes the API's route `id` in every region, and here at once.
pub(super) async fn remove(state: &AppState, actor: &Actor, id: &str) -> Result<(), Error> {
    if !routes::delete(pool(state), actor, id).await? {
        return Err(no_route(id));
    }
    state
        .inference
        .set_api_routes(routes::load(pool(state)).await?);
    Ok(())
}

/// `DELETE /admin/v1/routes/{id}`: the API's route goes in every region;
/// a config alias of the name, if any, is served again.
async fn delete_route(
    State(state): State<Arc<AppState>>,
    Caller(actor): Caller,
    Path(id): Path<String>,
    durability: Durable,
) -> Result<Response, Error> {
    remove(&state, &actor, &id).await?;
    let sync = durability.settle(&state).await?;
    Ok((
        [(DURABILITY_HEADER, sync.header())],
        Json(json!({ "id": id, "deleted": true })),
    )
        .into_response())
}

pub(super) fn no_route(id: &str) -> Error {
    Error::NotFound(format!("no route {id:?}"))
}
