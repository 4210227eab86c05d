//! The gateway's admin endpoints, on their own port so they are never
//! exposed with the client-facing one: `/healthz` (the process runs),
//! `/readyz` (some region can take work), `/metrics` (Prometheus, this
//! gateway's own registry), `/routing` (the live region table as JSON). It
//! also says which paths are for operators only ([`is_operator_path`]): the
//! regions' `/admin/*`, which the proxy refuses to clients at the edge.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode, header};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::json;

use crate::metrics::Metrics;
use crate::regions::Regions;

/// Whether `path` is a region's operator endpoint (`/admin/*`), for
/// operators on the mesh and never for clients at the edge.
pub(crate) fn is_operator_path(path: &str) -> bool {
    path.starts_with("/admin/")
}

pub(crate) struct Admin {
    pub regions: Arc<Regions>,
    pub metrics: Arc<Metrics>,
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
        match session.req_header().uri.path() {
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
