//! The Pingora proxy: choose the region in `request_filter`, connect to it over
//! h2c in `upstream_peer`, name it in `response_filter`, and answer errors in
//! the client's own protocol (OpenAI JSON for HTTP, a status for gRPC).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::config::Config;
use crate::route::{Reason, Router};
use crate::{REGION_HEADER, ROUTE_HEADER};

/// Most concurrent streams on one upstream HTTP/2 connection. Pingora's
/// default is 1, which would open a connection per request.
const MAX_H2_STREAMS: usize = 128;

pub(crate) struct Proxy {
    router: Router,
    addresses: Vec<SocketAddr>,
    connect_timeout: Duration,
    read_timeout: Duration,
}

/// Per-request state.
pub(crate) struct Ctx {
    started: Instant,
    grpc: bool,
    region: Option<(usize, Reason)>,
}

impl Proxy {
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            router: Router::new(config),
            addresses: config.regions.iter().map(|r| r.address).collect(),
            connect_timeout: config.connect_timeout,
            read_timeout: config.read_timeout,
        }
    }

    fn region_name(&self, ctx: &Ctx) -> &str {
        ctx.region
            .map(|(i, _)| self.router.names()[i].as_str())
            .unwrap_or("-")
    }
}

fn is_grpc(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Answers with an error the client understands: a trailers-only gRPC status
/// for gRPC, an OpenAI-shaped JSON error otherwise.
async fn respond_error(
    session: &mut Session,
    grpc: bool,
    http_status: u16,
    grpc_code: u8,
    kind: &str,
    message: &str,
) -> Result<()> {
    if grpc {
        let mut resp = ResponseHeader::build(200, Some(3))?;
        resp.insert_header(header::CONTENT_TYPE, "application/grpc")?;
        resp.insert_header("grpc-status", grpc_code.to_string())?;
        resp.insert_header("grpc-message", percent_encode(message))?;
        return session.write_response_header(Box::new(resp), true).await;
    }
    let body = serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": null }
    });
    let body = Bytes::from(body.to_string());
    let mut resp = ResponseHeader::build(http_status, Some(2))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec).
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            started: Instant::now(),
            grpc: false,
            region: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.grpc = is_grpc(session);
        let pin = session
            .req_header()
            .headers
            .get(REGION_HEADER)
            .and_then(|v| v.to_str().ok());
        match self.router.choose(pin) {
            Ok(choice) => {
                ctx.region = Some(choice);
                Ok(false)
            }
            Err(unknown) => {
                let message = format!(
                    "unknown region {:?} in {REGION_HEADER}; known regions: {}",
                    unknown.0,
                    self.router.names().join(", ")
                );
                // INVALID_ARGUMENT = 3
                respond_error(session, ctx.grpc, 400, 3, "invalid_request_error", &message).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let (index, _) = ctx
            .region
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no region chosen"))?;
        let mut peer = HttpPeer::new(self.addresses[index], false, String::new());
        // Regions speak HTTP/2 with prior knowledge (h2c): one pooled,
        // multiplexed connection carries HTTP and gRPC alike.
        peer.options.alpn = ALPN::H2;
        peer.options.max_h2_streams = MAX_H2_STREAMS;
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        Ok(Box::new(peer))
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some((_, reason)) = ctx.region {
            upstream_response.insert_header(REGION_HEADER, self.region_name(ctx).to_string())?;
            upstream_response.insert_header(ROUTE_HEADER, reason.as_str())?;
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let region = self.region_name(ctx).to_string();
        let (status, code, kind, message) = match e.etype() {
            ErrorType::ConnectTimedout | ErrorType::ConnectRefused | ErrorType::ConnectError => (
                502,
                14,
                "server_error",
                format!("region {region} is unreachable"),
            ),
            ErrorType::ReadTimedout => (
                504,
                4,
                "server_error",
                format!("region {region} did not answer in time"),
            ),
            _ if matches!(e.esource(), pingora_error::ErrorSource::Downstream) => {
                return FailToProxy {
                    error_code: 0,
                    can_reuse_downstream: false,
                };
            }
            _ => (
                502,
                14,
                "server_error",
                format!("region {region} failed: {}", e.etype().as_str()),
            ),
        };
        tracing::warn!(region = %region, error = %e, "proxy to region failed");
        if let Err(write) = respond_error(session, ctx.grpc, status, code, kind, &message).await {
            tracing::debug!(error = %write, "could not send the error response");
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let req = session.req_header();
        tracing::info!(
            target: "meridian_gateway::access",
            method = %req.method,
            path = %req.uri.path(),
            status,
            region = self.region_name(ctx),
            route = ctx.region.map(|(_, r)| r.as_str()).unwrap_or("-"),
            grpc = ctx.grpc,
            duration_us = ctx.started.elapsed().as_micros() as u64,
            error = e.map(|e| e.etype().as_str()),
            "request"
        );
    }
}
