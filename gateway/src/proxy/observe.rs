//! What the proxy tells operators about a request: its span (continuing the
//! client's trace), its metrics and its access log line.

use pingora_error::Error;
use pingora_proxy::Session;

use meridian_mesh::trace::{self, KeyValue};

use super::{Ctx, Proxy};
use crate::route::Reason;

impl Proxy {
    /// Starts the request's span, continuing the client's trace when it
    /// sent a `traceparent`.
    pub(super) fn start_span(&self, session: &Session, grpc: bool) -> Option<trace::Context> {
        if !self.tracer.is_enabled() {
            return None;
        }
        let req = session.req_header();
        let parent = self.tracer.extract(&req.headers);
        let mut attributes = vec![
            KeyValue::new("http.request.method", req.method.to_string()),
            KeyValue::new("url.path", req.uri.path().to_string()),
        ];
        if grpc {
            attributes.push(KeyValue::new("rpc.system", "grpc"));
        }
        Some(
            self.tracer
                .start_span("gateway.request", trace::Kind::Server, &parent, attributes),
        )
    }

    /// Counts the request, ends its span and writes the access log line.
    pub(super) fn record(&self, session: &Session, e: Option<&Error>, ctx: &Ctx) {
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let region = self.region_name(ctx);
        let reason = ctx.reason.map(Reason::as_str).unwrap_or("-");
        let elapsed = ctx.started.elapsed();
        self.metrics
            .requests
            .with_label_values(&[region, reason, status.to_string().as_str()])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[region])
            .observe(elapsed.as_secs_f64());
        let log = match &ctx.trace {
            Some(cx) => {
                let mut attributes = vec![
                    KeyValue::new("http.response.status_code", i64::from(status)),
                    KeyValue::new("meridian.route", reason),
                    KeyValue::new("meridian.attempts", ctx.attempts as i64),
                ];
                if let Some(i) = ctx.current {
                    let name = self.regions.list[i].name.clone();
                    attributes.push(KeyValue::new("meridian.region", name));
                }
                trace::set_attributes(cx, attributes);
                if let Some(e) = e {
                    trace::set_error(cx, e.etype().as_str().to_string());
                } else if status >= 500 {
                    trace::set_error(cx, format!("answered {status}"));
                }
                trace::end(cx);
                trace::log_span(cx)
            }
            None => tracing::Span::none(),
        };
        let req = session.req_header();
        log.in_scope(|| {
            tracing::info!(
                target: "meridian_gateway::access",
                method = %req.method,
                path = %req.uri.path(),
                status,
                region,
                route = reason,
                attempts = ctx.attempts,
                grpc = ctx.grpc,
                duration_us = elapsed.as_micros() as u64,
                error = e.map(|e| e.etype().as_str()),
                "request"
            );
        });
    }
}
