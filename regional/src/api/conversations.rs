//! The Conversations API (`/v1/conversations`): create with items and
//! metadata, retrieve, update, delete; list, add, retrieve and delete
//! items. On the replicated conversation tables that chat's
//! `x-meridian-conversation` turns use, so both name one history, and a
//! response created with `conversation` appends to it.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::body::JsonBody;
use super::infer::{RequestFacts, durability_header};
use super::responses::{ListQuery, check_items, check_metadata, list};
use super::{AppState, Tenant};
use crate::conversation::items;
use crate::error::Error;
use crate::replication::Durability;
use crate::store::Store;

/// Items one create or add may carry, as OpenAI allows.
const MAX_ITEMS: usize = 20;

pub(super) fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/conversations", post(create))
        .route(
            "/v1/conversations/{id}",
            get(retrieve).post(update).delete(delete),
        )
        .route(
            "/v1/conversations/{id}/items",
            get(list_items).post(add_items),
        )
        .route(
            "/v1/conversations/{id}/items/{item_id}",
            get(retrieve_item).delete(delete_item),
        )
        .with_state(state)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(default)]
    items: Option<Vec<Value>>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    metadata: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemsBody {
    items: Vec<Value>,
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(body)
        .map_err(|e| Error::invalid(format!("invalid request body: {e}"), None))
}

fn checked(raw: Vec<Value>) -> Result<Vec<Value>, Error> {
    if raw.len() > MAX_ITEMS {
        return Err(Error::invalid(
            format!("`items` holds at most {MAX_ITEMS} items, got {}", raw.len()),
            Some("items"),
        ));
    }
    check_items(raw, "items")
}

/// Waits for a peer's apply when the write asked for `sync`.
async fn settle(
    state: &AppState,
    tenant: &Tenant,
    facts: &RequestFacts,
    sequence: u64,
) -> Result<Durability, Error> {
    let durability = state
        .replication
        .durability(tenant.as_str(), facts.durability())?;
    if durability == Durability::Sync {
        state.replication.wait_applied(sequence).await?;
    }
    Ok(durability)
}

async fn create(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    facts: RequestFacts,
    JsonBody(body): JsonBody,
) -> Result<Response, Error> {
    let body: CreateBody = parse(&body)?;
    let metadata = body.metadata.unwrap_or_default();
    check_metadata(&metadata)?;
    let items = checked(body.items.unwrap_or_default())?;
    state.stores.require(Store::Postgres)?;
    let (object, sequence) = items::create(
        &state.pool,
        &state.region,
        tenant.as_str(),
        &metadata,
        &items,
        &state.pipeline.limits(),
    )
    .await?;
    let durability = settle(&state, &tenant, &facts, sequence).await?;
    Ok((durability_header(Some(durability)), axum::Json(object)).into_response())
}

/// `GET /v1/conversations/{id}`: OpenAI's conversation object, with
/// Meridian's own fields: the home region and the stored turns.
async fn retrieve(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    state.stores.require(Store::Postgres)?;
    let mut object = items::object(&state.pool, tenant.as_str(), &id).await?;
    let transcript = crate::conversation::transcript(&state.pool, tenant.as_str(), &id).await?;
    object["messages"] = json!(transcript.messages);
    Ok(axum::Json(object).into_response())
}

async fn update(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    facts: RequestFacts,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, Error> {
    let body: UpdateBody = parse(&body)?;
    check_metadata(&body.metadata)?;
    state.stores.require(Store::Postgres)?;
    let (object, sequence) =
        items::update(&state.pool, tenant.as_str(), &id, &body.metadata).await?;
    let durability = settle(&state, &tenant, &facts, sequence).await?;
    Ok((durability_header(Some(durability)), axum::Json(object)).into_response())
}

async fn delete(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    facts: RequestFacts,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    state.stores.require(Store::Postgres)?;
    let sequence = items::delete(&state.pool, tenant.as_str(), &id).await?;
    let durability = settle(&state, &tenant, &facts, sequence).await?;
    Ok((
        durability_header(Some(durability)),
        axum::Json(json!({"id": id, "object": "conversation.deleted", "deleted": true})),
    )
        .into_response())
}

async fn list_items(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    Path(id): Path<String>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, Error> {
    let query = ListQuery::read(query)?;
    state.stores.require(Store::Postgres)?;
    let all = items::items(&state.pool, tenant.as_str(), &id).await?;
    Ok(axum::Json(list(all, &query)?).into_response())
}

async fn add_items(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    facts: RequestFacts,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, Error> {
    let body: ItemsBody = parse(&body)?;
    let added = checked(body.items)?;
    state.stores.require(Store::Postgres)?;
    let limits = state.pipeline.limits();
    let sequence = items::append(&state.pool, tenant.as_str(), &id, &added, &limits).await?;
    let durability = settle(&state, &tenant, &facts, sequence).await?;
    Ok((
        durability_header(Some(durability)),
        axum::Json(json!({
            "object": "list",
            "data": added,
            "first_id": added.first().map(|i| i["id"].clone()),
            "last_id": added.last().map(|i| i["id"].clone()),
            "has_more": false,
        })),
    )
        .into_response())
}

async fn retrieve_item(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    Path((id, item_id)): Path<(String, String)>,
) -> Result<Response, Error> {
    state.stores.require(Store::Postgres)?;
    let item = items::item(&state.pool, tenant.as_str(), &id, &item_id).await?;
    Ok(axum::Json(item).into_response())
}

/// Removes the item; answers with the conversation, as OpenAI does.
async fn delete_item(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    facts: RequestFacts,
    Path((id, item_id)): Path<(String, String)>,
) -> Result<Response, Error> {
    state.stores.require(Store::Postgres)?;
    let sequence = items::delete_item(&state.pool, tenant.as_str(), &id, &item_id).await?;
    let durability = settle(&state, &tenant, &facts, sequence).await?;
    let object = items::object(&state.pool, tenant.as_str(), &id).await?;
    Ok((durability_header(Some(durability)), axum::Json(object)).into_response())
}
