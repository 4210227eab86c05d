//! The management API's tenants, keys and audit log as `meridian.v1.Admin`
//! methods: the same functions as the HTTP routes, the same audit, the
//! same durability (metadata `x-meridian-durability`).

use meridian_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{actor, audit_after, cut_page, no_tenant, page_limit, parse_id, pool, settle};
use crate::api::AppState;
use crate::error::Error;
use crate::replication::{DURABILITY_HEADER, Durability};
use crate::tenancy::TenantLimits;
use crate::tenancy::manage::{self, AuditView, KeyView, TenantView};
use crate::tenancy::operators::{self, Role, TokenView};

pub(super) fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    std::time::SystemTime::from(t).into()
}

fn tenant_pb(t: TenantView) -> pb::Tenant {
    pb::Tenant {
        id: t.id,
        display_name: t.display_name,
        requests_per_second: t.requests_per_second.and_then(|r| u32::try_from(r).ok()),
        tokens_per_minute: t.tokens_per_minute.and_then(|r| u64::try_from(r).ok()),
        allowed_regions: t.allowed_regions.unwrap_or_default(),
        budget: t.budget.map(|b| pb::Budget {
            tokens: b.tokens.and_then(|t| u64::try_from(t).ok()),
            usd: b.usd,
            period: b.period,
        }),
        allowed_models: t.allowed_models.unwrap_or_default(),
        live_keys: u64::try_from(t.live_keys).unwrap_or(0),
        created_at: Some(timestamp(t.created_at)),
        updated_at: Some(timestamp(t.updated_at)),
        deleted_at: t.deleted_at.map(timestamp),
        purge_at: t.purge_at.map(timestamp),
    }
}

fn key_pb(k: KeyView) -> pb::ApiKey {
    pb::ApiKey {
        id: k.id.to_string(),
        tenant: k.tenant,
        prefix: k.prefix,
        created_at: Some(timestamp(k.created_at)),
        revoked_at: k.revoked_at.map(timestamp),
        name: k.name.unwrap_or_default(),
        labels: k.labels.into_iter().collect(),
        expires_at: k.expires_at.map(timestamp),
        allowed_models: k.allowed_models.unwrap_or_default(),
    }
}

fn audit_pb(r: AuditView) -> pb::AuditRecord {
    pb::AuditRecord {
        id: r.id.to_string(),
        at: Some(timestamp(r.at)),
        actor: r.actor,
        action: r.action,
        resource: r.resource,
        source: r.source,
        region: r.region,
        detail_json: r.detail.to_string(),
    }
}

/// A page size: 0 (proto3's unset) is the default.
fn limit(asked: u32) -> Result<i64, Error> {
    page_limit((asked != 0).then_some(i64::from(asked)))
}

pub(super) fn durability<T>(state: &AppState, request: &Request<T>) -> Result<Durability, Error> {
    let asked = request.metadata().get(DURABILITY_HEADER);
    super::durability(state, asked.map(|v| v.as_bytes()))
}

pub(in crate::api) async fn put_tenant(
    state: &AppState,
    request: Request<pb::PutTenantRequest>,
) -> Result<Response<pb::PutTenantResponse>, Status> {
    let actor = actor(request.extensions(), &state.region);
    let sync = durability(state, &request)?;
    let req = request.into_inner();
    let spec = manage::TenantSpec {
        display_name: req.display_name.as_deref(),
        limits: TenantLimits {
            requests_per_second: req.requests_per_second,
            tokens_per_minute: req.tokens_per_minute,
        },
        // Empty: anywhere, as proto3 cannot tell an empty list from none.
        allowed_regions: Some(req.allowed_regions).filter(|r| !r.is_empty()),
        budget: req.budget.map(|b| manage::BudgetSpec {
            tokens: b.tokens,
            usd: b.usd,
            period: Some(b.period).filter(|p| !p.is_empty()),
        }),
        allowed_models: Some(req.allowed_models).filter(|m| !m.is_empty()),
    };
    let created = manage::put_tenant(pool(state), &actor, &req.id, spec)
        .await
        .map_err(Error::from)?;
    settle(state, sync).await?;
    let tenant = manage::get_tenant(pool(state), &req.id)
        .await
        .map_err(Error::from)?
        .ok_or_else(|| no_tenant(&req.id))?;
    Ok(Response::new(pb::PutTenantResponse {
        tenant: Some(tenant_pb(tenant)),
        created,
    }))
}

pub(in crate::api) async fn get_tenant(
    state: &AppState,
    request: Request<pb::GetTenantRequest>,
) -> Result<Response<pb::Tenant>, Status> {
    let id = request.into_inner().id;
    let tenant = manage::get_tenant(pool(state), &id)
        .await
        .map_err(Error::from)?
        .ok_or_else(|| no_tenant(&id))?;
    Ok(Response::new(tenant_pb(tenant)))
}

pub(in crate::api) async fn list_tenants(
    state: &AppState,
    request: Request<pb::ListTenantsRequest>,
) -> Result<Response<pb::ListTenantsResponse>, Status> {
    let req = request.into_inner();
    let limit = limit(req.limit)?;
    let after = Some(req.after).filter(|a| !a.is_empty());
    let mut tenants = manage::list_tenants(
        pool(state),
        after.as_deref(),
        limit + 1,
        req.include_deleted,
    )
    .await
    .map_err(Error::from)?;
    let has_more = cut_page(&mut tenants, limit);
    Ok(Response::new(pb::ListTenantsResponse {
        tenants: tenants.into_iter().map(tenant_pb).collect(),
        has_more,
    }))
}

pub(in crate::api) async fn delete_tenant(
    state: &AppState,
    request: Request<pb::DeleteTenantRequest>,
) -> Result<Response<pb::Tenant>, Status> {
    let actor = actor(request.extensions(), &state.region);
    let sync = durability(state, &request)?;
    let req = request.into_inner();
    let retention = req
        .retention_seconds
        .map_or(super::DEFAULT_RETENTION, std::time::Duration::from_secs);
    let tenant = manage::delete_tenant(pool(state), &actor, &req.id, retention)
        .await
        .map_err(Error::from)?
        .ok_or_else(|| no_tenant(&req.id))?;
    settle(state, sync).await?;
    Ok(Response::new(tenant_pb(tenant)))
}

pub(in crate::api) async fn create_api_key(
    state: &AppState,
    request: Request<pb::CreateApiKeyRequest>,
) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
    let actor = actor(request.extensions(), &state.region);
    let sync = durability(state, &request)?;
    let req = request.into_inner();
    let expires_at = match req.expires_at {
        None => None,
        Some(t) => Some(
            chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
                .ok_or_else(|| {
                    Error::invalid("`expires_at` is out of range", Some("expires_at"))
                })?,
        ),
    };
    let spec = manage::KeySpec {
        name: req.name,
        labels: req.labels.into_iter().collect(),
        expires_at,
        allowed_models: Some(req.allowed_models).filter(|m| !m.is_empty()),
    };
    let (view, secret) = manage::create_key(pool(state), &actor, &req.tenant, &spec)
        .await
        .map_err(Error::from)?;
    settle(state, sync).await?;
    Ok(Response::new(pb::CreateApiKeyResponse {
        key: Some(key_pb(view)),
        secret,
    }))
}

pub(in crate::api) async fn rotate_api_key(
    state: &AppState,
    request: Request<pb::RotateApiKeyRequest>,
) -> Result<Response<pb::RotateApiKeyResponse>, Status> {
    let actor = actor(request.extensions(), &state.region);
    let sync = durability(state, &request)?;
    let req = request.into_inner();
    let id = parse_id(&req.id, "key", None)?;
    let grace = req
        .grace_seconds
        .map_or(super::DEFAULT_GRACE, std::time::Duration::from_secs);
    let (new, secret, old) = manage::rotate_key(pool(state), &actor, id, grace)
        .await
        .map_err(Error::from)?
        .ok_or_else(|| Error::NotFound(format!("no key {id}")))?;
    settle(state, sync).await?;
    Ok(Response::new(pb::RotateApiKeyResponse {
        key: Some(key_pb(new)),
        secret,
        rotated: Some(key_pb(old)),
    }))
}

pub(in crate::api) async fn list_api_keys(
    state: &AppState,
    request: Request<pb::ListApiKeysRequest>,
) -> Result<Response<pb::ListApiKeysResponse>, Status> {
    let tenant = request.into_inner().tenant;
    let keys = manage::list_keys(pool(state), &tenant)
        .await
        .map_err(Error::from)?
        .ok_or_else(|| no_tenant(&tenant))?;
    Ok(Response::new(pb::ListApiKeysResponse {
        keys: keys.into_iter().map(key_pb).collect(),
    }))
}

pub(in crate::api) async fn revoke_api_key(
    state: &AppState,
    request: Request<pb::RevokeApiKeyRequest>,
) -> Result<Response<pb::ApiKey>, Status> {
    let actor = actor(request.extensions(), &state.region);
    let sync = durability(state, &request)?;
    let id = request.into_inner().id;
    let uuid = parse_id(&id, "key", Some("id"))?;
    let view = manage::revoke_key(pool(state), &actor, uuid)
        .await
        .map_err(Error::from)?
        .ok_or_else(|| Error::NotFound(format!("no key {id}")))?;
    settle(state, sync).await?;
    Ok(Response::new(key_pb(view)))
}

pub(in crate::api) async fn list_audit(
    state: &AppState,
    request: Request<pb::ListAuditRequest>,
) -> Result<Response<pb::ListAuditResponse>, Status> {
    let req = request.into_inner();
    let limit = limit(req.limit)?;
    let after = audit_after(Some(req.after.as_str()).filter(|a| !a.is_empty()))?;
    let mut records = manage::list_audit(pool(state), after, limit + 1)
        .await
        .map_err(Error::from)?;
    let has_more = cut_page(&mut records, limit);
    Ok(Response::new(pb::ListAuditResponse {
        records: records.into_iter().map(audit_pb).collect(),
        has_more,
    }))
}

fn operator_token_pb(t: TokenView) -> pb::OperatorToken {
    pb::OperatorToken {
        id: t.id.to_string(),
        name: t.name,
        role: t.role,
        prefix: t.prefix,
        created_at: Some(timestamp(t.created_at)),
        expires_at: t.expires_at.map(timestamp),
        revoked_at: t.revoked_at.map(timestamp),
    }
}

pub(in crate::api) async fn create_operator_token(
    state: &AppState,
    request: Request<pb::CreateOperatorTokenRequest>,
) -> Result<Response<pb::CreateOperatorTokenResponse>, Status> {
    let actor = actor(request.extensions(), &state.region);
    let sync = durability(state, &request)?;
    let req = request.into_inner();
    let role = Role::parse(&req.role).map_err(Error::from)?;
    let expires_at = req
        .expires_at
        .map(|t| {
            chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
                .ok_or_else(|| Error::invalid("expires_at is out of range", Some("expires_at")))
        })
        .transpose()?;
    let (view, secret) = operators::create(pool(state), &actor, &req.name, role, expires_at)
        .await
        .map_err(Error::from)?;
    settle(state, sync).await?;
    Ok(Response::new(pb::CreateOperatorTokenResponse {
        token: Some(operator_token_pb(view)),
        secret,
    }))
}

pub(in crate::api) async fn list_operator_tokens(
    state: &AppState,
    _request: Request<pb::ListOperatorTokensRequest>,
) -> Result<Response<pb::ListOperatorTokensResponse>, Status> {
    let tokens = operators::list(pool(state)).await.map_err(Error::from)?;
    Ok(Response::new(pb::ListOperatorTokensResponse {
        tokens: tokens.into_iter().map(operator_token_pb).collect(),
    }))
}

pub(in crate::api) async fn revoke_operator_token(
    state: &AppState,
    request: Request<pb::RevokeOperatorTokenRequest>,
) -> Result<Response<pb::OperatorToken>, Status> {
    let actor = actor(request.extensions(), &state.region);
    let sync = durability(state, &request)?;
    let id = request.into_inner().id;
    let uuid = parse_id(&id, "token", Some("id"))?;
    let view = operators::revoke(pool(state), &actor, uuid)
        .await
        .map_err(Error::from)?
        .ok_or_else(|| Error::NotFound(format!("no operator token {id}")))?;
    settle(state, sync).await?;
    Ok(Response::new(operator_token_pb(view)))
}
