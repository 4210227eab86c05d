//! The management API's tenants and keys over HTTP (`/admin/v1/...`), for
//! operators: the mesh policy lets only operator identities reach
//! `/admin/*` (it classifies these routes as `meridian.v1.Admin`). Every
//! write is audited with its caller and replicates to every region; a
//! write may ask for `x-meridian-durability: sync`, and is then answered
//! once a peer region has applied it. Lists are paginated as OpenAI's are
//! (`limit`, `after`; answers carry `has_more` and `last_id`). The same
//! operations are `meridian.v1.Admin` methods ([`grpc`]).

pub(super) mod grpc;
pub(super) mod grpc_ops;
mod operators;
mod regions;
mod routes;
mod spend;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::body::JsonBody;
use super::{AppState, Tenant};
use crate::error::Error;
use crate::mesh::Peer;
use crate::replication::{DURABILITY_HEADER, Durability};
use crate::store::Store;
use crate::tenancy::TenantLimits;
use crate::tenancy::manage::{self, Actor};

/// Items in a page unless `limit` says otherwise, and the most it may say.
const DEFAULT_PAGE: i64 = 20;
const MAX_PAGE: i64 = 100;

pub(super) fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/admin/v1/tenants", get(list_tenants))
        .route(
            "/admin/v1/tenants/{id}",
            get(get_tenant).put(put_tenant).delete(delete_tenant),
        )
        .route(
            "/admin/v1/tenants/{id}/keys",
            post(create_key).get(list_keys),
        )
        .route("/admin/v1/keys/{id}", delete(revoke_key))
        .route("/admin/v1/keys/{id}/rotate", post(rotate_key))
        .route("/admin/v1/audit", get(list_audit))
        // A tenant's own view, through the gateway with its API key: the
        // tenant comes from the key, so no request can name another.
        .route("/v1/tenant", get(own_tenant))
        .route("/v1/tenant/keys", get(own_keys))
        .merge(spend::routes())
        .merge(routes::routes())
        .merge(regions::routes())
        .merge(operators::routes())
        .with_state(state)
}

/// `GET /v1/tenant`: the calling tenant's limits, regions and live keys.
async fn own_tenant(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
) -> Result<Json<Value>, Error> {
    state.stores.require(Store::Postgres)?;
    let id = tenant.as_str();
    let view = manage::get_tenant(pool(&state), id)
        .await?
        .ok_or_else(|| no_tenant(id))?;
    Ok(Json(json!(view)))
}

/// `GET /v1/tenant/keys`: the calling tenant's keys (ids and prefixes).
async fn own_keys(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
) -> Result<Json<Value>, Error> {
    state.stores.require(Store::Postgres)?;
    // A tenant known to the gateway but without a row here has no keys.
    let keys = manage::list_keys(pool(&state), tenant.as_str())
        .await?
        .unwrap_or_default();
    let limit = keys.len() as i64;
    Ok(Json(page(keys, limit, |k| k.id.to_string())))
}

/// Says on every management read (HTTP `GET`, the Admin methods that
/// change nothing) how far behind each peer region the answer may be
/// ([`REPLICATION_BEHIND`](meridian_proto::header::REPLICATION_BEHIND)):
/// reads are this region's, consistent within it, and a write made
/// elsewhere arrives with replication.
pub(super) async fn say_how_far_behind(
    State(replication): State<Arc<crate::replication::Replication>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    let read = crate::mesh::classify(path).0 == crate::mesh::ADMIN
        && crate::mesh::is_read(path, req.method());
    let mut res = next.run(req).await;
    if read {
        let behind = replication
            .behind()
            .into_iter()
            .map(|(peer, behind)| match behind {
                Some(d) => format!("{peer}={}", d.as_millis()),
                None => format!("{peer}=unknown"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        if !behind.is_empty()
            && let Ok(value) = axum::http::HeaderValue::from_str(&behind)
        {
            res.headers_mut()
                .insert(meridian_proto::header::REPLICATION_BEHIND, value);
        }
    }
    res
}

/// The caller of a write, for the audit log.
struct Caller(Actor);

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Error> {
        Ok(Self(actor(&parts.extensions, &state.region)))
    }
}

/// The caller as the mesh and the accept loop left it in the request's
/// extensions (HTTP and gRPC alike).
fn actor(extensions: &axum::http::Extensions, region: &str) -> Actor {
    let peer = extensions.get::<Peer>().map_or_else(
        || "unauthenticated".to_string(),
        |Peer(identity)| identity.to_string(),
    );
    // A token holder is who acted; the connection it came on is how.
    let who = match extensions.get::<crate::tenancy::operators::Operator>() {
        Some(operator) => format!("token:{} via {peer}", operator.name),
        None => peer,
    };
    let source = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_string(), |c| c.0.to_string());
    Actor {
        who,
        source,
        region: region.to_string(),
    }
}

#[derive(Deserialize)]
struct Page {
    limit: Option<i64>,
    after: Option<String>,
    /// Tenants only: deleted ones too.
    include_deleted: Option<bool>,
}

impl Page {
    fn limit(&self) -> Result<i64, Error> {
        page_limit(self.limit)
    }
}

/// A page size: [`DEFAULT_PAGE`] when none is asked, else 1 to [`MAX_PAGE`].
fn page_limit(asked: Option<i64>) -> Result<i64, Error> {
    match asked {
        None => Ok(DEFAULT_PAGE),
        Some(l) if (1..=MAX_PAGE).contains(&l) => Ok(l),
        Some(l) => Err(Error::invalid(
            format!("`limit` must be between 1 and {MAX_PAGE}, got {l}"),
            Some("limit"),
        )),
    }
}

/// Cuts `items`, read with one more than `limit` asked for, to the page;
/// whether more follow.
fn cut_page<T>(items: &mut Vec<T>, limit: i64) -> bool {
    let has_more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    has_more
}

/// The id after which an audit page starts (the last of the previous one).
fn audit_after(after: Option<&str>) -> Result<Option<uuid::Uuid>, Error> {
    after
        .map(uuid::Uuid::parse_str)
        .transpose()
        .map_err(|_| Error::invalid("`after` must be an audit record id", Some("after")))
}

/// A page of `items`, asked for one more than shown so `has_more` is known.
fn page<T: serde::Serialize>(mut items: Vec<T>, limit: i64, id: impl Fn(&T) -> String) -> Value {
    let has_more = cut_page(&mut items, limit);
    json!({
        "object": "list",
        "first_id": items.first().map(&id),
        "last_id": items.last().map(&id),
        "has_more": has_more,
        "data": items,
    })
}

async fn list_tenants(
    State(state): State<Arc<AppState>>,
    Query(q): Query<Page>,
) -> Result<Json<Value>, Error> {
    let limit = q.limit()?;
    let tenants = manage::list_tenants(
        pool(&state),
        q.after.as_deref(),
        limit + 1,
        q.include_deleted.unwrap_or(false),
    )
    .await?;
    Ok(Json(page(tenants, limit, |t| t.id.clone())))
}

/// How long a deleted tenant's data is kept unless the request says.
const DEFAULT_RETENTION: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    retention_seconds: Option<u64>,
}

/// `DELETE /admin/v1/tenants/{id}`: stops the tenant at once (its keys are
/// revoked) and erases its stored data in every region after
/// `retention_seconds` (default 30 days); a `PUT` restores it until then.
async fn delete_tenant(
    State(state): State<Arc<AppState>>,
    Caller(actor): Caller,
    Path(id): Path<String>,
    Query(q): Query<DeleteQuery>,
    durability: Durable,
) -> Result<Response, Error> {
    let retention = q
        .retention_seconds
        .map_or(DEFAULT_RETENTION, std::time::Duration::from_secs);
    let tenant = manage::delete_tenant(pool(&state), &actor, &id, retention)
        .await?
        .ok_or_else(|| no_tenant(&id))?;
    let sync = durability.settle(&state).await?;
    Ok(([(DURABILITY_HEADER, sync.header())], Json(json!(tenant))).into_response())
}

async fn get_tenant(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Error> {
    let tenant = manage::get_tenant(pool(&state), &id)
        .await?
        .ok_or_else(|| no_tenant(&id))?;
    Ok(Json(json!(tenant)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantBody {
    display_name: Option<String>,
    requests_per_second: Option<u32>,
    tokens_per_minute: Option<u64>,
    /// Where the tenant's requests may be served; left out: anywhere.
    allowed_regions: Option<Vec<String>>,
    /// What it may spend per period; left out: no budget.
    budget: Option<BudgetBody>,
    /// The models (or routes) its keys may use; left out: any.
    allowed_models: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetBody {
    tokens: Option<u64>,
    usd: Option<f64>,
    period: Option<String>,
}

/// `PUT /admin/v1/tenants/{id}`: creates the tenant (201) or replaces its
/// name and limits (200); a limit left out is the gateway's default.
async fn put_tenant(
    State(state): State<Arc<AppState>>,
    Caller(actor): Caller,
    Path(id): Path<String>,
    durability: Durable,
    JsonBody(body): JsonBody,
) -> Result<Response, Error> {
    let body: TenantBody = serde_json::from_slice(&body)
        .map_err(|e| Error::invalid(format!("invalid request body: {e}"), None))?;
    let spec = manage::TenantSpec {
        display_name: body.display_name.as_deref(),
        limits: TenantLimits {
            requests_per_second: body.requests_per_second,
            tokens_per_minute: body.tokens_per_minute,
        },
        allowed_regions: body.allowed_regions,
        budget: body.budget.map(|b| manage::BudgetSpec {
            tokens: b.tokens,
            usd: b.usd,
            period: b.period,
        }),
        allowed_models: body.allowed_models,
    };
    let created = manage::put_tenant(pool(&state), &actor, &id, spec).await?;
    let sync = durability.settle(&state).await?;
    let tenant = manage::get_tenant(pool(&state), &id)
        .await?
        .ok_or_else(|| no_tenant(&id))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        [(DURABILITY_HEADER, sync.header())],
        Json(json!(tenant)),
    )
        .into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KeyBody {
    name: Option<String>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    /// RFC 3339.
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    allowed_models: Option<Vec<String>>,
}

/// `POST /admin/v1/tenants/{id}/keys`: a new key, in clear in this answer
/// only. The body (optional) names it, labels it, and bounds its life and
/// models.
async fn create_key(
    State(state): State<Arc<AppState>>,
    Caller(actor): Caller,
    Path(tenant): Path<String>,
    durability: Durable,
    body: axum::body::Bytes,
) -> Result<Response, Error> {
    let body: KeyBody = if body.is_empty() {
        KeyBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Error::invalid(format!("invalid request body: {e}"), None))?
    };
    let spec = manage::KeySpec {
        name: body.name,
        labels: body.labels,
        expires_at: body.expires_at,
        allowed_models: body.allowed_models,
    };
    let (view, key) = manage::create_key(pool(&state), &actor, &tenant, &spec).await?;
    let sync = durability.settle(&state).await?;
    let mut body = json!(view);
    body["key"] = Value::String(key);
    Ok((
        StatusCode::CREATED,
        [(DURABILITY_HEADER, sync.header())],
        Json(body),
    )
        .into_response())
}

async fn list_keys(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, Error> {
    let keys = manage::list_keys(pool(&state), &tenant)
        .await?
        .ok_or_else(|| no_tenant(&tenant))?;
    let limit = keys.len() as i64;
    Ok(Json(page(keys, limit, |k| k.id.to_string())))
}

/// `DELETE /admin/v1/keys/{id}`: the key revoked; gateways stop accepting
/// it at their next reload. Revoking it again answers the same.
async fn revoke_key(
    State(state): State<Arc<AppState>>,
    Caller(actor): Caller,
    Path(id): Path<String>,
    durability: Durable,
) -> Result<Response, Error> {
    let id = parse_id(&id, "key", None)?;
    let view = manage::revoke_key(pool(&state), &actor, id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no key {id}")))?;
    let sync = durability.settle(&state).await?;
    Ok(([(DURABILITY_HEADER, sync.header())], Json(json!(view))).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    grace_seconds: Option<u64>,
}

/// How long a rotated key's old secret works unless the request says.
const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

/// `POST /admin/v1/keys/{id}/rotate`: a new key like this one, in clear in
/// this answer only; the old one works for `grace_seconds` more (default
/// one hour; 0 stops it at once).
async fn rotate_key(
    State(state): State<Arc<AppState>>,
    Caller(actor): Caller,
    Path(id): Path<String>,
    durability: Durable,
    body: axum::body::Bytes,
) -> Result<Response, Error> {
    let id = parse_id(&id, "key", None)?;
    let body: RotateBody = if body.is_empty() {
        RotateBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Error::invalid(format!("invalid request body: {e}"), None))?
    };
    let grace = body
        .grace_seconds
        .map_or(DEFAULT_GRACE, std::time::Duration::from_secs);
    let (new, secret, old) = manage::rotate_key(pool(&state), &actor, id, grace)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no key {id}")))?;
    let sync = durability.settle(&state).await?;
    let mut body = json!(new);
    body["key"] = Value::String(secret);
    body["rotated"] = json!(old);
    Ok((
        StatusCode::CREATED,
        [(DURABILITY_HEADER, sync.header())],
        Json(body),
    )
        .into_response())
}

/// `GET /admin/v1/audit`: the audit log, newest first; `after` is the id of
/// the last record of the previous page.
async fn list_audit(
    State(state): State<Arc<AppState>>,
    Query(q): Query<Page>,
) -> Result<Json<Value>, Error> {
    let limit = q.limit()?;
    let after = audit_after(q.after.as_deref())?;
    let records = manage::list_audit(pool(&state), after, limit + 1).await?;
    Ok(Json(page(records, limit, |r| r.id.to_string())))
}

/// The durability a write asks for; a sync write is answered once a peer
/// region applied it. Refused before any work when no peer could.
struct Durable(Durability);

impl FromRequestParts<Arc<AppState>> for Durable {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Error> {
        let asked = parts.headers.get(DURABILITY_HEADER).map(|v| v.as_bytes());
        durability(state, asked).map(Self)
    }
}

/// The durability a write asks for in its header (or metadata) `value`.
/// Management writes have no tenant default: async unless asked.
fn durability(state: &AppState, value: Option<&[u8]>) -> Result<Durability, Error> {
    state
        .replication
        .durability("", Durability::requested(value)?)
}

impl Durable {
    async fn settle(self, state: &AppState) -> Result<Durability, Error> {
        settle(state, self.0).await
    }
}

/// After a write: for a sync one, waits until a peer applied the log
/// through its end, which holds the write.
async fn settle(state: &AppState, durability: Durability) -> Result<Durability, Error> {
    if durability == Durability::Sync {
        state.replication.wait_logged(None).await?;
    }
    Ok(durability)
}

fn pool(state: &AppState) -> &sqlx::PgPool {
    state.replication.pool()
}

/// The id of a key, token or record in a path or request: a UUID, or a
/// 400 naming `what` it should have been (and `param`, when the request
/// has fields).
fn parse_id(id: &str, what: &str, param: Option<&'static str>) -> Result<uuid::Uuid, Error> {
    uuid::Uuid::parse_str(id)
        .map_err(|_| Error::invalid(format!("{id:?} is not a {what} id (a UUID)"), param))
}

fn no_tenant(id: &str) -> Error {
    Error::NotFound(format!("no tenant {id:?}"))
}

impl From<crate::tenancy::Error> for Error {
    fn from(e: crate::tenancy::Error) -> Self {
        use crate::tenancy::Error as T;
        match e {
            T::Database(e) => Self::Postgres(e),
            T::InvalidTenant(_) | T::InvalidLimits => Self::invalid(e.to_string(), None),
            T::InvalidRegions(_) => Self::invalid(e.to_string(), Some("allowed_regions")),
            T::InvalidBudget(_) => Self::invalid(e.to_string(), Some("budget")),
            T::InvalidPrice(_) | T::InvalidControl(_) | T::InvalidKey(_) | T::InvalidToken(_) => {
                Self::invalid(e.to_string(), None)
            }
            T::InvalidModels(_) => Self::invalid(e.to_string(), Some("allowed_models")),
            T::UnknownTenant(id) => no_tenant(&id),
            T::NotReplicated { waited_ms } => Self::SyncTimeout { waited_ms },
        }
    }
}
