//! `meridian.v1.Admin`: the region's status for gateways and operators, and
//! drain. A draining region keeps serving everything it receives (in-flight
//! requests, sessions pinned to it); gateways stop sending it new work.

use std::sync::Arc;

use meridian_proto::v1::admin_server::{Admin, AdminServer};
use meridian_proto::v1::{
    DrainRequest, DrainResponse, ModelBackends, PurgeCacheRequest, PurgeCacheResponse, RegionState,
    RegionStatusRequest, RegionStatusResponse, TenantCacheStats,
};
use tonic::{Request, Response, Status};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;

use super::manage::grpc as manage;
use super::manage::grpc_ops as ops;
use super::{AppState, Tenant};
use crate::error::Error;
use meridian_proto::v1 as pb;

pub(super) fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/admin/replication/digest", get(digest))
        .route("/admin/reload", post(reload))
        .route("/admin/cache/{tenant}", delete(purge_cache))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// `GET /admin/replication/digest`: per replicated table, its row count and
/// a hash of its rows; equal in every region once replication converged.
async fn digest(State(state): State<Arc<AppState>>) -> Result<Json<serde_json::Value>, Error> {
    let tables = crate::replication::digest(state.replication.pool()).await?;
    Ok(Json(serde_json::json!({
        "region": state.region,
        "tables": tables,
    })))
}

/// `DELETE /admin/cache/{tenant}`: the tenant's response-cache entries
/// removed from the whole region (as `Admin.PurgeCache`).
async fn purge_cache(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(tenant): axum::extract::Path<String>,
) -> Result<axum::response::Response, Error> {
    let tenant = Tenant::parse(Some(&tenant))?;
    let removed = state.cache.purge(tenant.as_str()).await?;
    Ok(
        axum::Json(json!({ "tenant": tenant.as_str(), "removed_entries": removed }))
            .into_response(),
    )
}

/// `POST /admin/reload`: models and aliases read again from the config
/// file, swapped in whole.
async fn reload(State(state): State<Arc<AppState>>) -> Result<axum::response::Response, Error> {
    let models: Vec<_> = state
        .inference
        .reload()?
        .into_iter()
        .map(|m| json!({ "id": m.id, "alias": m.alias }))
        .collect();
    Ok(axum::Json(json!({ "reloaded": true, "models": models })).into_response())
}

/// `GET /metrics`: every part of the node in the Prometheus text format.
async fn metrics(State(state): State<Arc<AppState>>) -> axum::response::Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.jobs.metrics.render()
            + &state.inference.render_metrics()
            + &state.cache.render_metrics()
            + &state.replication.render_metrics()
            + &state.stores.render_metrics()
            + &state
                .embedder
                .as_ref()
                .map(|e| e.render_metrics())
                .unwrap_or_default(),
    )
        .into_response()
}

pub(super) fn service(state: Arc<AppState>) -> AdminServer<AdminApi> {
    AdminServer::new(AdminApi { state })
}

pub(super) struct AdminApi {
    state: Arc<AppState>,
}

impl AdminApi {
    fn state(&self) -> RegionState {
        if self.state.shutdown.is_cancelled() {
            RegionState::NotServing
        } else if self.state.status.draining() {
            RegionState::Draining
        } else {
            RegionState::Serving
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn region_status(
        &self,
        _request: Request<RegionStatusRequest>,
    ) -> Result<Response<RegionStatusResponse>, Status> {
        let status = &self.state.status;
        let models = self
            .state
            .inference
            .models()
            .filter(|m| !m.alias)
            .map(|m| ModelBackends {
                model: m.id,
                healthy_backends: m.healthy_backends,
                total_backends: m.total_backends,
            })
            .collect();
        let cache = self.state.cache.stats();
        let cache_tenants = cache
            .tenants
            .into_iter()
            .map(|t| {
                let hits = t.hits_l1 + t.hits_l2 + t.hits_semantic;
                let looked_up = hits + t.misses;
                TenantCacheStats {
                    hit_ratio: if looked_up == 0 {
                        0.0
                    } else {
                        hits as f64 / looked_up as f64
                    },
                    tenant: t.tenant,
                    hits_l1: t.hits_l1,
                    hits_l2: t.hits_l2,
                    hits_semantic: t.hits_semantic,
                    misses: t.misses,
                    bypassed: t.bypassed,
                }
            })
            .collect();
        Ok(Response::new(RegionStatusResponse {
            region: self.state.region.clone(),
            state: self.state().into(),
            // This call is itself in flight; report the others.
            in_flight_requests: status.in_flight().saturating_sub(1),
            capacity_requests: status.capacity,
            models,
            started_at: Some(status.started_at.into()),
            version: env!("CARGO_PKG_VERSION").to_string(),
            cache_tenants,
            cache_l1_entries: cache.l1_entries,
            cache_semantic_entries: cache.semantic_entries,
            replication_lag: self.state.replication.lag(),
            unavailable_stores: self
                .state
                .stores
                .down()
                .into_iter()
                .map(String::from)
                .collect(),
            ..Default::default()
        }))
    }

    async fn drain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        let drain = request.into_inner().drain;
        self.state.status.set_draining(drain);
        tracing::info!(region = %self.state.region, drain, "drain state changed");
        Ok(Response::new(DrainResponse {
            state: self.state().into(),
            region: self.state.region.clone(),
        }))
    }

    async fn put_tenant(
        &self,
        request: Request<pb::PutTenantRequest>,
    ) -> Result<Response<pb::PutTenantResponse>, Status> {
        manage::put_tenant(&self.state, request).await
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        manage::get_tenant(&self.state, request).await
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        manage::list_tenants(&self.state, request).await
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        manage::create_api_key(&self.state, request).await
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        manage::list_api_keys(&self.state, request).await
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        manage::revoke_api_key(&self.state, request).await
    }

    async fn rotate_api_key(
        &self,
        request: Request<pb::RotateApiKeyRequest>,
    ) -> Result<Response<pb::RotateApiKeyResponse>, Status> {
        manage::rotate_api_key(&self.state, request).await
    }

    async fn delete_tenant(
        &self,
        request: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        manage::delete_tenant(&self.state, request).await
    }

    async fn create_operator_token(
        &self,
        request: Request<pb::CreateOperatorTokenRequest>,
    ) -> Result<Response<pb::CreateOperatorTokenResponse>, Status> {
        manage::create_operator_token(&self.state, request).await
    }

    async fn list_operator_tokens(
        &self,
        request: Request<pb::ListOperatorTokensRequest>,
    ) -> Result<Response<pb::ListOperatorTokensResponse>, Status> {
        manage::list_operator_tokens(&self.state, request).await
    }

    async fn revoke_operator_token(
        &self,
        request: Request<pb::RevokeOperatorTokenRequest>,
    ) -> Result<Response<pb::OperatorToken>, Status> {
        manage::revoke_operator_token(&self.state, request).await
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        manage::list_audit(&self.state, request).await
    }

    async fn put_route(
        &self,
        request: Request<pb::PutRouteRequest>,
    ) -> Result<Response<pb::PutRouteResponse>, Status> {
        ops::put_route(&self.state, request).await
    }

    async fn list_routes(
        &self,
        _: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::ListRoutesResponse>, Status> {
        ops::list_routes(&self.state).await
    }

    async fn delete_route(
        &self,
        request: Request<pb::DeleteRouteRequest>,
    ) -> Result<Response<pb::DeleteRouteResponse>, Status> {
        ops::delete_route(&self.state, request).await
    }

    async fn control_region(
        &self,
        request: Request<pb::ControlRegionRequest>,
    ) -> Result<Response<pb::RegionControl>, Status> {
        ops::control_region(&self.state, request).await
    }

    async fn list_region_controls(
        &self,
        _: Request<pb::ListRegionControlsRequest>,
    ) -> Result<Response<pb::ListRegionControlsResponse>, Status> {
        ops::list_region_controls(&self.state).await
    }

    async fn put_price(
        &self,
        request: Request<pb::PutPriceRequest>,
    ) -> Result<Response<pb::ModelPrice>, Status> {
        ops::put_price(&self.state, request).await
    }

    async fn list_prices(
        &self,
        _: Request<pb::ListPricesRequest>,
    ) -> Result<Response<pb::ListPricesResponse>, Status> {
        ops::list_prices(&self.state).await
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        ops::get_usage(&self.state, request).await
    }

    async fn purge_cache(
        &self,
        request: Request<PurgeCacheRequest>,
    ) -> Result<Response<PurgeCacheResponse>, Status> {
        let tenant = request.into_inner().tenant;
        if tenant.is_empty() {
            return Err(Status::invalid_argument("`tenant` is required"));
        }
        let tenant = Tenant::parse(Some(&tenant))?;
        let removed = self.state.cache.purge(tenant.as_str()).await?;
        Ok(Response::new(PurgeCacheResponse {
            removed_entries: removed,
            region: self.state.region.clone(),
        }))
    }
}
