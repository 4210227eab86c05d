//! The gateway's admin endpoints, on their own port so they are never
//! exposed with the client-facing one: `/healthz` (the process runs),
//! `/readyz` (some region can take work), `/metrics` (Prometheus, this
//! gateway's own registry), `/routing` (the live region table as JSON). It
//! also says which paths are for operators only ([`is_operator_path`]): the
//! regions' `/admin/*`, `/metrics`, and Admin and Replication services,
//! which the proxy refuses to clients at the edge. With
//! `server.admin_token_file`, every endpoint but the probes asks for the
//! token.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode, header};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::json;

use crate::metrics::Metrics;
use crate::regions::Regions;

/// Whether `path` is a region's operator endpoint, for operators and peers
/// on the mesh and never for clients at the edge.
pub(crate) fn is_operator_path(path: &str) -> bool {
    // A region's metrics name its tenants; its Admin and Replication
    // services are for the mesh's operators and peers.
    path.starts_with("/admin/")
        || path == "/metrics"
        || path.starts_with("/metrics/")
        || path.starts_with("/meridian.v1.Admin/")
        || path.starts_with("/meridian.v1.Replication/")
}

pub(crate) struct Admin {
    pub regions: Arc<Regions>,
    pub metrics: Arc<Metrics>,
    /// `server.admin_token_file`'s token, asked of every endpoint but the
    /// probes.
    pub token: Option<String>,
}

/// Whether `request` carries `Authorization: Bearer <token>`, compared in
/// time that does not depend on where the first difference is.
fn authorized(token: &str, request: &pingora_http::RequestHeader) -> bool {
    let Some(given) = request
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("static response parts are valid")
}

impl Admin {
    /// Sets the gauges read from the region table, just before a scrape, so
    /// nothing on the request path keeps them.
    fn observe_regions(&self) {
        for r in &self.regions.list {
            let nodes = r.nodes();
            let healthy = nodes.iter().filter(|n| n.is_healthy()).count() as i64;
            self.metrics
                .set_region_nodes(&r.name, healthy, nodes.len() as i64 - healthy);
            if let Some(age) = r.refresh_age() {
                self.metrics.set_discovery_refresh_age(&r.name, age);
            }
        }
    }

    fn routing(&self) -> serde_json::Value {
        let regions: Vec<_> = self
            .regions
            .list
            .iter()
            .map(|r| {
                let nodes = r.nodes();
                json!({
                    "name": r.name,
                    // The first node's, as before regions had several.
                    "address": nodes.first().map(|n| n.address.to_string()),
                    "srv": r.srv,
                    "nodes": nodes.iter().map(|n| json!({
                        "address": n.address.to_string(),
                        "priority": n.priority(),
                        "weight": n.weight(),
                        "healthy": n.is_healthy(),
                        "draining": n.is_draining(),
                        "outstanding": n.outstanding(),
                    })).collect::<Vec<_>>(),
                    "healthy": r.is_healthy(),
                    "draining": r.is_draining(),
                    // An operator's control (`PUT /admin/v1/regions/...`).
                    "operator": { "drained": r.is_held(), "weight": r.weight() },
                    "available": r.is_available(),
                    "ewma_latency_ms": r.ewma_ms(),
                    "load": r.load(),
                    "location": r.location.map(|l| json!({ "lat": l.lat, "lon": l.lon })),
                })
            })
            .collect();
        json!({ "regions": regions })
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path();
        if let Some(token) = &self.token
            && !matches!(path, "/healthz" | "/readyz")
            && !authorized(token, session.req_header())
        {
            return reply(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                b"this endpoint needs `Authorization: Bearer <server.admin_token_file's token>`\n"
                    .to_vec(),
            );
        }
        match path {
            "/healthz" => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                if self.regions.list.iter().any(|r| r.is_available()) {
                    reply(StatusCode::OK, "text/plain", b"ready\n".to_vec())
                } else {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        b"no region is available\n".to_vec(),
                    )
                }
            }
            "/metrics" => {
                self.observe_regions();
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.metrics.render(),
                )
            }
            "/routing" => reply(
                StatusCode::OK,
                "application/json",
                self.routing().to_string().into_bytes(),
            ),
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                b"try /healthz, /readyz, /metrics or /routing\n".to_vec(),
            ),
        }
    }
}
