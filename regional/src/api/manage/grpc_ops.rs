//! Routes, region controls, prices and spend as `meridian.v1.Admin`
//! methods: the same steps as their HTTP routes ([`super::routes`],
//! [`super::regions`], [`super::spend`]), the same audit and durability.

use meridian_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::grpc::{durability, timestamp};
use super::{actor, pool, routes, settle, spend};
use crate::api::AppState;
use crate::config::AliasConfig;
use crate::config::spend::Price;
use crate::error::Error;
use crate::inference::routes::RouteView;
use crate::tenancy::prices::{self, MAX_USAGE_LINES, PriceView};
use crate::tenancy::regions::{self, ControlSpec, ControlView};

fn route_pb(route: AliasConfig) -> pb::Route {
    pb::Route {
        id: route.id,
        small: route.small,
        large: route.large,
        large_above_prompt_tokens: route.large_above_prompt_tokens,
        weights: route.weights.into_iter().collect(),
        fallbacks: route.fallbacks,
        context_fallbacks: route.context_fallbacks,
    }
}

fn route_status_pb(view: RouteView) -> pb::RouteStatus {
    pb::RouteStatus {
        route: Some(route_pb(view.route)),
        source: view.source.to_string(),
        applied: view.applied,
        problem: view.problem.unwrap_or_default(),
    }
}

fn control_pb(c: ControlView) -> pb::RegionControl {
    pb::RegionControl {
        region: c.region,
        drained: c.drained,
        weight: u32::try_from(c.weight).unwrap_or(100),
        reason: c.reason,
        updated_at: Some(timestamp(c.updated_at)),
    }
}

fn price_pb(p: PriceView) -> pb::ModelPrice {
    pb::ModelPrice {
        model: p.model,
        input_per_million: p.input_per_million,
        output_per_million: p.output_per_million,
        source: p.source.to_string(),
    }
}

pub(in crate::api) async fn put_route(
    state: &AppState,
    request: Request<pb::PutRouteRequest>,
) -> Result<Response<pb::PutRouteResponse>, Status> {
    let actor = actor(request.extensions(), &state.region);
    let sync = durability(state, &request)?;
    let route = request
        .into_inner()
        .route
        .ok_or_else(|| Error::invalid("`route` is required", Some("route")))?;
    let alias = AliasConfig {
        id: route.id,
        small: route.small,
        large: route.large,
        // proto3's unset is 0: the config's default.
        large_above_prompt_tokens: match route.large_above_prompt_tokens {
            0 => 512,
            n => n,
        },
        weights: route.weights.into_iter().collect(),
        fallbacks: route.fallbacks,
        context_fallbacks: route.context_fallbacks,
    };
    let (created, view) = routes::set(state, &actor, &alias).await?;
    settle(state, sync).await?;
    Ok(Response::new(pb::PutRouteResponse {
        route: Some(route_status_pb(view)),
        created,
    }))
}

pub(in crate::api) async fn list_routes(
    state: &AppState,
) -> Result<Response<pb::ListRoutesResponse>, Status> {
    Ok(Response::new(pb::ListRoutesResponse {
        routes: state
            .inference
            .route_views()
            .into_iter()
            .map(route_status_pb)
            .collect(),
    }))
}

pub(in crate::api) async fn delete_route(
    state: &AppState,
    request: Request<pb::DeleteRouteRequest>,
) -> Result<Response<pb::DeleteRouteResponse>, Status> {
    let actor = actor(request.extensions(), &state.region);
    let sync = durability(state, &request)?;
    routes::remove(state, &actor, &request.into_inner().id).await?;
    settle(state, sync).await?;
    Ok(Response::new(pb::DeleteRouteResponse {}))
}

pub(in crate::api) async fn control_region(
    state: &AppState,
    request: Request<pb::ControlRegionRequest>,
) -> Result<Response<pb::RegionControl>, Status> {
    let actor = actor(request.extensions(), &state.region);
    let sync = durability(state, &request)?;
    let req = request.into_inner();
    let spec = ControlSpec {
        drained: req.drained,
        weight: req.weight,
        reason: req.reason,
    };
    let view = regions::put(pool(state), &actor, &req.region, spec)
        .await
        .map_err(Error::from)?;
    settle(state, sync).await?;
    Ok(Response::new(control_pb(view)))
}

pub(in crate::api) async fn list_region_controls(
    state: &AppState,
) -> Result<Response<pb::ListRegionControlsResponse>, Status> {
    let controls = regions::list(pool(state)).await.map_err(Error::from)?;
    Ok(Response::new(pb::ListRegionControlsResponse {
        controls: controls.into_iter().map(control_pb).collect(),
    }))
}

pub(in crate::api) async fn put_price(
    state: &AppState,
    request: Request<pb::PutPriceRequest>,
) -> Result<Response<pb::ModelPrice>, Status> {
    let actor = actor(request.extensions(), &state.region);
    let sync = durability(state, &request)?;
    let req = request.into_inner();
    let price = Price {
        input_per_million: req.input_per_million,
        output_per_million: req.output_per_million,
    };
    prices::put_price(pool(state), &actor, &req.model, price)
        .await
        .map_err(Error::from)?;
    settle(state, sync).await?;
    Ok(Response::new(price_pb(PriceView::new(
        req.model,
        price.micros(),
        "api",
    ))))
}

pub(in crate::api) async fn list_prices(
    state: &AppState,
) -> Result<Response<pb::ListPricesResponse>, Status> {
    let prices = spend::price_list(state).await?;
    Ok(Response::new(pb::ListPricesResponse {
        prices: prices.into_iter().map(price_pb).collect(),
    }))
}

pub(in crate::api) async fn get_usage(
    state: &AppState,
    request: Request<pb::GetUsageRequest>,
) -> Result<Response<pb::GetUsageResponse>, Status> {
    let req = request.into_inner();
    let nonempty = |s: String| Some(s).filter(|s| !s.is_empty());
    let range = spend::Range {
        start: nonempty(req.start),
        end: nonempty(req.end),
        tenant: nonempty(req.tenant),
    };
    let (start, end) = range.days()?;
    let mut lines = prices::usage(
        pool(state),
        range.tenant.as_deref(),
        start,
        end,
        MAX_USAGE_LINES + 1,
    )
    .await
    .map_err(Error::from)?;
    let truncated = lines.len() as i64 > MAX_USAGE_LINES;
    lines.truncate(MAX_USAGE_LINES as usize);
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(Response::new(pb::GetUsageResponse {
        lines: lines
            .into_iter()
            .map(|l| pb::UsageLine {
                tenant: l.tenant,
                day: l.day.to_string(),
                region: l.region,
                model: l.model,
                requests: count(l.requests),
                input_tokens: count(l.input_tokens),
                output_tokens: count(l.output_tokens),
                cost_usd: l.cost_usd,
                key_id: l.key_id.unwrap_or_default(),
            })
            .collect(),
        truncated,
    }))
}
