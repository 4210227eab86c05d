//! The Pingora proxy: plan the regions in `request_filter`, connect to a
//! node of the next one over h2c in `upstream_peer`, retry in the next region when a try
//! fails before any byte reached the client (a write that was sent only with
//! an idempotency key, see [`replay`]), name the region in
//! `response_filter`, and answer errors in the client's own protocol (OpenAI
//! JSON for HTTP, a status for gRPC) through [`crate::respond`]. What it
//! reports of each request (span, metrics, access log) is in [`observe`].

mod observe;
mod replay;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::{StatusCode, header};
use meridian_proto::ErrorClass;
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use meridian_mesh::Tracer;
use meridian_mesh::trace::{self, KeyValue, TraceContextExt};

use crate::auth::DEFAULT_TENANT;
use crate::auth::gate::{Admitted, Gate};
use crate::budget::RetryBudget;
use crate::config::{Config, HealthConfig, UpstreamProtocol};
use crate::geo::{COUNTRY_HEADER, LATLON_HEADER, Locator};
use crate::health;
use crate::metrics::Metrics;
use crate::regions::{Lease, Regions, Stores};
use crate::respond::ErrorReply;
use crate::route::{Plan, Reason, RequestFacts, Router};
use crate::{CONVERSATION_HEADER, DURABILITY_HEADER, REGION_HEADER, ROUTE_HEADER, SESSION_HEADER};
use meridian_proto::header::{
    IDEMPOTENCY_KEY as IDEMPOTENCY_KEY_HEADER, MODEL_FAILED, REPLAYED as REPLAYED_HEADER,
    UNAVAILABLE,
};

/// What a region answers when it cannot take a request now: the gateway
/// tries the next region, if there is one.
const SATURATED: StatusCode = StatusCode::SERVICE_UNAVAILABLE;

/// Most concurrent streams on one upstream HTTP/2 connection. Pingora's
/// default is 1, which would open a connection per request.
const MAX_H2_STREAMS: usize = 128;

pub(crate) struct Proxy {
    pub(crate) regions: Arc<Regions>,
    pub(crate) metrics: Arc<Metrics>,
    router: Router,
    locator: Locator,
    budget: RetryBudget,
    health: HealthConfig,
    max_attempts: usize,
    connect_timeout: Duration,
    http_upstream: UpstreamProtocol,
    read_timeout: Duration,
    /// API keys and rate limits.
    pub(crate) gate: Gate,
    /// mTLS to regions; plain text when `None`.
    mesh: Option<crate::mesh::Upstream>,
    tracer: Tracer,
}

/// Per-request state.
pub(crate) struct Ctx {
    started: Instant,
    grpc: bool,
    plan: Option<Plan>,
    /// Tries made so far; the next try uses `plan.order[attempts]`.
    attempts: usize,
    current: Option<usize>,
    /// The node of `current` this try went to; counts as outstanding on it
    /// until the request ends or a retry picks another.
    node: Option<Lease>,
    reason: Option<Reason>,
    /// Set once the response header is on its way to the client: no retry
    /// after that.
    responded: bool,
    /// The tenant and its rate-limit decision.
    admitted: Admitted,
    /// The request's span, when tracing is on; regions get it as their
    /// parent in `traceparent`.
    trace: Option<trace::Context>,
    /// Set when a try failed after its write may have reached the region
    /// and the write, carrying no idempotency key, was not replayed.
    not_replayed: bool,
    /// `upstream_response_filter` refused the region's answer as one to
    /// replay (saturated, or a store down) and paid for the retry.
    replay_decided: bool,
    /// The region stores this request needs, as far as its head tells.
    needs: Stores,
}

impl Proxy {
    pub(crate) fn new(
        config: &Config,
        regions: Arc<Regions>,
        metrics: Arc<Metrics>,
        mesh: Option<crate::mesh::Upstream>,
        tracer: Tracer,
    ) -> Result<Self, String> {
        Ok(Self {
            router: Router::new(config),
            locator: locator(config)?,
            budget: RetryBudget::new(&config.failover),
            health: config.health.clone(),
            max_attempts: config.failover.max_attempts as usize,
            connect_timeout: config.connect_timeout,
            http_upstream: config.http_upstream,
            read_timeout: config.read_timeout,
            gate: Gate::new(config, metrics.clone())?,
            mesh,
            tracer,
            regions,
            metrics,
        })
    }

    fn region_name(&self, ctx: &Ctx) -> &str {
        ctx.current
            .map(|i| self.regions.list[i].name.as_str())
            .unwrap_or("-")
    }

    fn passive_failure(&self, ctx: &Ctx, cause: &str) {
        if let (Some(i), Some(node)) = (ctx.current, &ctx.node) {
            let region = &self.regions.list[i];
            let t = node.failure(&self.health);
            health::apply(&self.metrics, region, node, t, cause);
        }
    }

    /// Whether another region is left to try and the client has seen
    /// nothing yet.
    fn may_try_another(&self, ctx: &Ctx) -> bool {
        let remaining = ctx
            .plan
            .as_ref()
            .is_some_and(|p| ctx.attempts < p.order.len().min(self.max_attempts));
        remaining && !ctx.responded
    }

    /// Whether another region may be tried now; spends from the retry budget.
    fn may_retry(&self, ctx: &Ctx) -> bool {
        if !self.may_try_another(ctx) {
            return false;
        }
        let allowed = self.budget.try_withdraw();
        self.metrics
            .retries
            .with_label_values(&[if allowed { "allowed" } else { "denied" }])
            .inc();
        allowed
    }
}

/// The `[geo]` config as a [`Locator`].
fn locator(config: &Config) -> Result<Locator, String> {
    let geo = &config.geo;
    let cidrs = geo
        .cidr
        .iter()
        .map(|c| {
            (
                c.cidr,
                crate::geo::LatLon {
                    lat: c.lat,
                    lon: c.lon,
                },
            )
        })
        .collect();
    Locator::new(
        geo.trusted_proxies.clone(),
        cidrs,
        geo.geoip_database.as_deref(),
        geo.default_location,
    )
}

fn header_str<'a>(session: &'a Session, name: &str) -> Option<&'a str> {
    session
        .req_header()
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        let now = Instant::now();
        Ctx {
            started: now,
            grpc: false,
            plan: None,
            attempts: 0,
            current: None,
            node: None,
            reason: None,
            responded: false,
            admitted: Admitted::default(),
            trace: None,
            not_replayed: false,
            replay_decided: false,
            needs: Stores::NONE,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.grpc = header_str(session, header::CONTENT_TYPE.as_str())
            .is_some_and(|v| v.starts_with("application/grpc"));
        ctx.trace = self.start_span(session, ctx.grpc);
        ctx.needs = needs(session.req_header());
        // Regions' operator endpoints are for operators on the mesh, never
        // for clients at the edge.
        let path = session.req_header().uri.path();
        if crate::admin::is_operator_path(path) && !crate::auth::is_management(path) {
            ErrorReply::new(
                ErrorClass::NotFound,
                "no such route at the edge: a region's /admin/ (but /admin/v1/, with an operator \
                 token), /metrics and Replication are for operators and peers on the mesh",
            )
            .send(session, ctx.grpc)
            .await?;
            return Ok(true);
        }
        match self.gate.admit(session, ctx.grpc).await? {
            Some(admitted) => ctx.admitted = admitted,
            None => return Ok(true),
        }
        if let Some(cx) = &ctx.trace {
            let tenant = ctx.admitted.tenant().unwrap_or(DEFAULT_TENANT);
            trace::set_attributes(cx, [KeyValue::new("meridian.tenant", tenant.to_string())]);
        }
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let location = self
            .locator
            .locate(
                peer,
                header_str(session, LATLON_HEADER),
                header_str(session, COUNTRY_HEADER),
            )
            .map(|(p, _)| p);
        let facts = RequestFacts {
            pin: header_str(session, REGION_HEADER),
            // The conversation wins over a session: its turns live in one
            // region, a session only warms caches.
            session: header_str(session, CONVERSATION_HEADER)
                .filter(|c| !c.is_empty())
                .or_else(|| header_str(session, SESSION_HEADER)),
            location,
        };
        match self.router.plan(&self.regions, facts) {
            Ok(mut plan) => {
                if let Some(allowed) = ctx.admitted.allowed_regions() {
                    // Data residency: the tenant's requests go only to its
                    // regions, failover included.
                    let names = &self.regions.list;
                    plan.order
                        .retain(|&i| allowed.iter().any(|r| *r == names[i].name));
                    if !plan.order.iter().any(|&i| names[i].is_available()) {
                        // A pin to another region asks for what the rule
                        // forbids; otherwise the tenant's regions are down.
                        let (class, why) = if plan.reason == Reason::Pin && plan.order.is_empty() {
                            (
                                ErrorClass::PermissionDenied,
                                format!("not in the region {REGION_HEADER} names"),
                            )
                        } else {
                            (
                                ErrorClass::Unavailable,
                                "and none of them is available now".to_string(),
                            )
                        };
                        let message = format!(
                            "tenant {} may be served only in {} (its allowed_regions), {why}",
                            ctx.admitted.tenant().unwrap_or(DEFAULT_TENANT),
                            allowed.join(", "),
                        );
                        ErrorReply::new(class, &message)
                            .send(session, ctx.grpc)
                            .await?;
                        return Ok(true);
                    }
                }
                ctx.reason = Some(plan.reason);
                ctx.plan = Some(plan);
                self.budget.deposit();
                // Keep the request body so a retry in another region can
                // replay it (Pingora buffers up to its retry limit and marks
                // larger bodies as not retryable).
                session.as_downstream_mut().enable_retry_buffering();
                Ok(false)
            }
            Err(unknown) => {
                let names: Vec<&str> = self.regions.list.iter().map(|r| r.name.as_str()).collect();
                let message = format!(
                    "unknown region {:?} in {REGION_HEADER}; known regions: {}",
                    unknown.0,
                    names.join(", ")
                );
                ErrorReply::new(ErrorClass::InvalidRequest, &message)
                    .send(session, ctx.grpc)
                    .await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let plan = ctx
            .plan
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no region planned"))?;
        // A region without nodes (its SRV name has none, or has not been
        // resolved yet) is passed over like one that refused to connect.
        let (index, node) = loop {
            let index = *plan
                .order
                .get(ctx.attempts)
                .ok_or_else(|| Error::explain(ErrorType::InternalError, "no region left to try"))?;
            ctx.attempts += 1;
            let last = ctx.attempts >= plan.order.len().min(self.max_attempts);
            if let Some(node) = self.regions.list[index].pick() {
                // A region whose store this request needs is down is passed
                // over while another is left; the last one is tried anyway
                // (its refusal then reaches the client with its reason).
                if node.serves(ctx.needs) || last {
                    break (index, node);
                }
                self.metrics
                    .store_reroutes
                    .with_label_values(&[self.regions.list[index].name.as_str()])
                    .inc();
                continue;
            }
            ctx.current = Some(index);
            if last {
                return Err(Error::explain(
                    ErrorType::ConnectNoRoute,
                    format!("region {} has no nodes", self.regions.list[index].name),
                ));
            }
        };
        if ctx.attempts > 1 {
            ctx.reason = Some(Reason::Failover);
        }
        ctx.current = Some(index);
        let region = &self.regions.list[index];
        if let Some(cx) = &ctx.trace {
            // The region of the latest try: the one that answered, or the
            // last that failed.
            let name = KeyValue::new("meridian.region", region.name.clone());
            cx.span().add_event("try region", vec![name.clone()]);
            trace::set_attributes(cx, [name]);
        }
        let mut peer = match &self.mesh {
            Some(mesh) => mesh.peer(node.address, &region.name),
            None => HttpPeer::new(node.address, false, String::new()),
        };
        ctx.node = Some(node);
        // gRPC needs HTTP/2 (trailers): prior knowledge (h2c), multiplexed
        // on pooled connections. Plain HTTP defaults to pooled HTTP/1.1,
        // which costs Pingora less per small request than HTTP/2 framing.
        // An answer that may stream its usage in a trailer takes HTTP/2 too.
        peer.options.alpn = if ctx.grpc
            || self.http_upstream == UpstreamProtocol::H2
            || ctx.admitted.usage_in_trailers()
        {
            ALPN::H2
        } else {
            ALPN::H1
        };
        peer.options.max_h2_streams = MAX_H2_STREAMS;
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.passive_failure(ctx, e.etype().as_str());
        e.set_retry(self.may_retry(ctx));
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("region {}", self.region_name(ctx)));
        if std::mem::take(&mut ctx.replay_decided) {
            // The region answered, and said it stored nothing: no fault of
            // its own to count, whatever the protocol's status code.
            e.set_retry(true);
            return e;
        }
        let upstream_fault = matches!(e.esource(), ErrorSource::Upstream);
        if upstream_fault {
            self.passive_failure(ctx, e.etype().as_str());
        }
        // Bodies are replayable unless Pingora's retry buffer overflowed;
        // nothing is retried once the client has seen a byte.
        let retry = if !upstream_fault
            || session.as_downstream().retry_buffer_truncated()
            || !self.may_try_another(ctx)
        {
            false
        } else if session.as_downstream().get_retry_buffer().is_none()
            && !session.as_downstream_mut().is_body_empty()
        {
            // Not a byte of the body has been read from the client (a
            // pooled connection that was dead when its request head was
            // written), so none reached the region: it cannot have stored
            // the request, whatever it is.
            self.may_retry(ctx)
        } else if replay::stores_without_key(
            session.req_header(),
            session.as_downstream().get_retry_buffer().as_ref(),
        ) {
            // The request was sent: the region may have stored it already.
            ctx.not_replayed = true;
            self.metrics
                .retries
                .with_label_values(&["not_replayed"])
                .inc();
            false
        } else {
            self.may_retry(ctx)
        };
        e.set_retry(retry);
        tracing::debug!(peer = %peer, retry, error = %e, "try failed");
        e
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        // A region whose store is down refuses what needs it at once and
        // serves the rest: that refusal counts against no node, and the
        // request goes to the next region whatever its protocol (a gRPC
        // refusal is a trailers-only 200 with `grpc-status: 14`).
        if let Some(store) = store_down(upstream_response) {
            self.metrics
                .store_refusals
                .with_label_values(&[self.region_name(ctx), store])
                .inc();
            if self.may_retry(ctx) {
                return Err(replay_elsewhere(ctx, status, "region store down"));
            }
            return Ok(());
        }
        // A model whose upstreams failed is not a failed region: the region
        // answered as it should, and its other models serve.
        let model_failed = upstream_response.headers.contains_key(MODEL_FAILED);
        if let Some(node) = &ctx.node {
            if model_failed {
                node.request_ok();
            } else if matches!(
                StatusCode::from_u16(status),
                Ok(StatusCode::INTERNAL_SERVER_ERROR
                    | StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT)
            ) {
                self.passive_failure(ctx, "5xx");
            } else {
                node.request_ok();
            }
        }
        // A saturated region says 503 before producing anything: try the
        // next one if there is one, or pass the 503 (and its Retry-After) on.
        // A 503 that reports a durability did store a write (a synchronous
        // turn no peer confirmed in time): replaying it elsewhere would store
        // it twice.
        let stored = upstream_response.headers.contains_key(DURABILITY_HEADER);
        if status == SATURATED.as_u16() && !stored && self.may_retry(ctx) {
            return Err(replay_elsewhere(ctx, status, "region saturated"));
        }
        Ok(())
    }

    fn upstream_response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.gate.trailers(&mut ctx.admitted, trailers);
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // The region's spans are children of this request's; a client's own
        // `traceparent` is replaced (its trace continues through ours).
        if let Some(value) = ctx.trace.as_ref().and_then(trace::traceparent) {
            upstream_request.insert_header(trace::TRACEPARENT, value)?;
        }
        self.gate.upstream_request(&ctx.admitted, upstream_request)
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.responded = true;
        self.gate.response(&mut ctx.admitted, upstream_response)?;
        if let Some(reason) = ctx.reason {
            upstream_response.insert_header(REGION_HEADER, self.region_name(ctx).to_string())?;
            upstream_response.insert_header(ROUTE_HEADER, reason.as_str())?;
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let region = self.region_name(ctx).to_string();
        let (class, message) = match e.etype() {
            _ if matches!(e.esource(), ErrorSource::Downstream) => {
                return FailToProxy {
                    error_code: 0,
                    can_reuse_downstream: false,
                };
            }
            ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectError
            | ErrorType::ConnectNoRoute => (
                ErrorClass::BadGateway,
                format!("region {region} is unreachable"),
            ),
            ErrorType::ReadTimedout => (
                ErrorClass::Timeout,
                format!("region {region} did not answer in time"),
            ),
            _ => (
                ErrorClass::BadGateway,
                format!("region {region} failed: {}", e.etype().as_str()),
            ),
        };
        tracing::warn!(region = %region, attempts = ctx.attempts, error = %e, "request failed in every region tried");
        let not_replayed = [(REPLAYED_HEADER, http::HeaderValue::from_static("no"))];
        let message = if ctx.not_replayed {
            format!(
                "{message}, possibly after storing the request: it was not replayed in another \
                 region because it carries no `{IDEMPOTENCY_KEY_HEADER}`; send one to make \
                 retries safe"
            )
        } else {
            message
        };
        let mut reply = ErrorReply::new(class, &message);
        if ctx.not_replayed {
            reply.headers = &not_replayed;
        }
        if !ctx.responded
            && let Err(write) = reply.send(session, ctx.grpc).await
        {
            tracing::debug!(error = %write, "could not send the error response");
        }
        FailToProxy {
            error_code: class.http_status(),
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        self.record(session, e, ctx);
    }
}

/// The error that turns a region's refusal (`status`, for `why`) into a
/// try in the next region; the retry is already paid for.
fn replay_elsewhere(ctx: &mut Ctx, status: u16, why: &'static str) -> Box<Error> {
    ctx.replay_decided = true;
    let mut e = Error::explain(ErrorType::HTTPStatus(status), why);
    e.set_retry(true);
    e
}

/// The store a region's refusal names as down, when the response is such a
/// refusal and says it stored nothing: a 503, or a gRPC `UNAVAILABLE` before
/// any message.
fn store_down(response: &ResponseHeader) -> Option<&'static str> {
    let store = response.headers.get(UNAVAILABLE)?;
    if response.headers.contains_key(DURABILITY_HEADER) {
        return None;
    }
    let refused = response.status == StatusCode::SERVICE_UNAVAILABLE
        || (response.status == StatusCode::OK
            && response
                .headers
                .get("grpc-status")
                .is_some_and(|s| s.as_bytes() == b"14"));
    if !refused {
        return None;
    }
    // Label values come from a fixed set, never from what a region sent.
    match store.as_bytes() {
        b"postgres" => Some("postgres"),
        b"redis" => Some("redis"),
        _ => Some("other"),
    }
}

/// The stores a request needs, from its head: job and telemetry calls,
/// conversation reads, stored responses (a create is stored unless it
/// says `store: false`, which the head does not show), and turns that name
/// their conversation in a header need the region's PostgreSQL. A turn that names it only in its body is
/// not known here; the region refuses it if it must, and it is replayed.
fn needs(req: &RequestHeader) -> Stores {
    let path = req.uri.path();
    let stored = [
        "/v1/jobs",
        "/v1/telemetry",
        "/v1/conversations",
        "/v1/responses",
        "/v1/usage",
        "/v1/tenant",
    ]
    .iter()
    .any(|p| {
        path == *p
            || path
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('/'))
    }) || path.starts_with("/meridian.v1.Jobs/")
        || path.starts_with("/meridian.v1.Telemetry/")
        || req
            .headers
            .get(CONVERSATION_HEADER)
            .is_some_and(|v| !v.is_empty());
    if stored {
        Stores::POSTGRES
    } else {
        Stores::NONE
    }
}
