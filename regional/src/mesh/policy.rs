//! The authorisation table, enforced per request on the caller's identity
//! (a request extension set by the TLS accept loop).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use meridian_mesh::{Identity, Role};
use meridian_proto::ErrorClass;

use super::config::PolicyConfig;
use crate::tenancy::operators::Operator;

/// The verified identity of the connection a request came on.
#[derive(Debug, Clone)]
pub(crate) struct Peer(pub(crate) Arc<Identity>);

/// Services every authenticated peer may call: liveness and the API's own
/// description are no secret inside the mesh.
const OPEN: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// gRPC methods that change nothing, which read-only identities may call
/// (besides the [`OPEN`] services).
const READS: [&str; 10] = [
    "meridian.v1.Admin/RegionStatus",
    "meridian.v1.Admin/ListOperatorTokens",
    "meridian.v1.Admin/GetTenant",
    "meridian.v1.Admin/ListTenants",
    "meridian.v1.Admin/ListApiKeys",
    "meridian.v1.Admin/ListAudit",
    "meridian.v1.Admin/ListRoutes",
    "meridian.v1.Admin/ListRegionControls",
    "meridian.v1.Admin/ListPrices",
    "meridian.v1.Admin/GetUsage",
];

/// The compiled `[mesh.policy]`.
#[derive(Debug)]
pub(crate) struct Policy {
    rules: Vec<(String, Vec<String>)>,
    read_only: Vec<String>,
}

impl Policy {
    pub(crate) fn new(config: &PolicyConfig) -> Self {
        Self {
            rules: config
                .allow
                .iter()
                .map(|r| (r.identity.clone(), r.services.clone()))
                .collect(),
            read_only: config.read_only.clone(),
        }
    }

    /// Whether a call that `allows` let through is one `identity` may not
    /// make because it may only read: reads are HTTP `GET`/`HEAD` and the
    /// gRPC methods in [`READS`] (and the [`OPEN`] services).
    pub(crate) fn refuses_write(
        &self,
        identity: &Identity,
        path: &str,
        http_method: &axum::http::Method,
    ) -> bool {
        self.read_only.iter().any(|p| identity.matches(p)) && !is_read(path, http_method)
    }

    /// Whether `identity` may call `service` (and `method`, for gRPC).
    pub(crate) fn allows(&self, identity: &Identity, service: &str, method: Option<&str>) -> bool {
        if OPEN.contains(&service) {
            return true;
        }
        self.rules
            .iter()
            .filter(|(pattern, _)| identity.matches(pattern))
            .flat_map(|(_, services)| services)
            .any(|s| match (s.split_once('/'), method) {
                (Some((svc, m)), Some(method)) => svc == service && m == method,
                (Some(_), None) => false,
                (None, _) => s == service,
            })
    }
}

/// The service `/admin/*` routes count as.
pub(crate) const ADMIN: &str = "meridian.v1.Admin";

/// Whether a call changes nothing: HTTP `GET`/`HEAD`, the gRPC methods in
/// [`READS`], and the [`OPEN`] services.
pub(crate) fn is_read(path: &str, http_method: &axum::http::Method) -> bool {
    let (service, method) = classify(path);
    if OPEN.contains(&service) {
        return true;
    }
    // gRPC by path, as `classify` decides: a dotted first segment.
    let grpc = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .is_some_and(|first| first.contains('.'));
    if grpc {
        let call = format!("{service}/{}", method.unwrap_or(""));
        READS.contains(&call.as_str())
    } else {
        matches!(
            *http_method,
            axum::http::Method::GET | axum::http::Method::HEAD
        )
    }
}

/// The service a request path addresses: `/package.Service/Method` is
/// gRPC (by path, not content type: the router sends such paths to the
/// gRPC service whatever the content type says); anything else is `http`.
pub(crate) fn classify(path: &str) -> (&str, Option<&str>) {
    // The router mounts gRPC services at `/{Service}/{*rest}`, so any path
    // whose first segment is dotted reaches a service: classify it as one
    // (a method with a `/` then matches no method rule, only whole-service
    // rules, and tonic answers UNIMPLEMENTED).
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    match (parts.next(), parts.next()) {
        (Some(service), method) if service.contains('.') => (service, Some(method.unwrap_or(""))),
        // Operator actions over HTTP (`/admin/reload`) are Admin methods, so
        // the table governs them like `Admin/Drain`, never as plain `http`.
        (Some("admin"), method) => (ADMIN, Some(method.unwrap_or(""))),
        _ => ("http", None),
    }
}

/// Denies what the table does not allow, and a tenant header from anyone
/// but a gateway: the tenant is the gateway's finding after checking an API
/// key, so from another caller it would be a claim nobody checked. Refused
/// rather than ignored, so a misbehaving caller learns it at once instead
/// of acting on the `default` tenant's data.
pub(crate) async fn enforce(
    State(policy): State<Arc<Policy>>,
    req: Request,
    next: Next,
) -> Response {
    let grpc = is_grpc(&req);
    // Fail closed: the accept loop sets the identity on every TLS connection.
    let Some(Peer(identity)) = req.extensions().get::<Peer>().cloned() else {
        return deny(grpc, "no verified peer identity on this connection");
    };
    let (service, method) = classify(req.uri().path());
    // An operator token's holder (checked, and its role applied, by
    // `operator::authenticate`) may call the management API over any
    // connection: a gateway passes operators' calls on.
    let by_token = service == ADMIN && req.extensions().get::<Operator>().is_some();
    if !by_token && !policy.allows(&identity, service, method) {
        tracing::warn!(caller = %identity, service, method = method.unwrap_or("-"), path = req.uri().path(), "mesh policy denied a call");
        let what = match method {
            Some(m) => format!("{service}/{m}"),
            None => format!("HTTP {}", req.uri().path()),
        };
        return deny(grpc, &format!("{identity} may not call {what}"));
    }
    if !by_token && policy.refuses_write(&identity, req.uri().path(), req.method()) {
        tracing::warn!(caller = %identity, service, method = method.unwrap_or("-"), path = req.uri().path(), "a read-only identity's write refused");
        return deny(
            grpc,
            &format!(
                "{identity} may only read (`mesh.policy.read_only`): it may not call {} {}",
                req.method(),
                req.uri().path()
            ),
        );
    }
    let names_tenant = [
        crate::tenancy::TENANT_HEADER,
        meridian_proto::header::ALLOWED_MODELS,
        meridian_proto::header::KEY_ID,
    ]
    .iter()
    .any(|h| req.headers().contains_key(*h));
    if identity.role() != Role::Gateway && names_tenant {
        tracing::warn!(caller = %identity, path = req.uri().path(), "tenant header from a caller that is not a gateway refused");
        return deny(
            grpc,
            &format!(
                "{identity} may not name a tenant: only gateways set `{}`, `{}` and `{}`",
                crate::tenancy::TENANT_HEADER,
                meridian_proto::header::ALLOWED_MODELS,
                meridian_proto::header::KEY_ID,
            ),
        );
    }
    next.run(req).await
}

pub(crate) fn is_grpc(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

fn deny(grpc: bool, message: &str) -> Response {
    refuse(
        grpc,
        ErrorClass::PermissionDenied,
        meridian_proto::contract::openai_code::MESH_POLICY_DENIED,
        message,
    )
}

/// A refusal as the caller speaks: a gRPC status, or an OpenAI-style JSON
/// error.
pub(crate) fn refuse(grpc: bool, class: ErrorClass, code: &str, message: &str) -> Response {
    if grpc {
        return tonic::Status::new(class.grpc_code(), message)
            .into_http::<Body>()
            .into_response();
    }
    let body = serde_json::json!({ "error": {
        "message": message,
        "type": class.openai_type(),
        "param": null,
        "code": code,
    }});
    let status =
        StatusCode::from_u16(class.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = (status, body.to_string()).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table() {
        let p = Policy::new(&PolicyConfig::default());
        let gw = Identity::gateway("edge-1").unwrap();
        let region = Identity::region("eu-west").unwrap();
        let op = Identity::operator("alice").unwrap();
        let call = |id: &Identity, path: &str| {
            let (s, m) = classify(path);
            p.allows(id, s, m)
        };
        assert!(call(&gw, "/meridian.v1.Inference/Generate"));
        assert!(call(&gw, "/v1/chat/completions"));
        assert!(call(&gw, "/meridian.v1.Admin/RegionStatus"));
        assert!(!call(&gw, "/meridian.v1.Admin/Drain"));
        assert!(!call(&gw, "/meridian.v1.Replication/Pull"));
        assert!(call(&region, "/meridian.v1.Replication/Pull"));
        assert!(!call(&region, "/meridian.v1.Inference/Generate"));
        assert!(!call(&region, "/v1/models"));
        assert!(call(&op, "/meridian.v1.Admin/Drain"));
        assert!(!call(&op, "/v1/models"));
        for id in [&gw, &region, &op] {
            assert!(call(id, "/grpc.health.v1.Health/Check"));
        }
        assert_eq!(classify("/v1/jobs/abc"), ("http", None));
        assert_eq!(
            classify("/admin/reload"),
            ("meridian.v1.Admin", Some("reload"))
        );
        assert!(!call(&gw, "/admin/reload"));
        assert!(call(&op, "/admin/reload"));
        // The management API is operators' only: a gateway carries clients.
        assert!(!call(&gw, "/admin/v1/tenants/acme/keys"));
        assert!(!call(&region, "/admin/v1/tenants"));
        assert!(call(&op, "/admin/v1/tenants/acme/keys"));
        assert_eq!(classify("/a.B/C/d"), ("a.B", Some("C/d")));
        assert!(!call(&gw, "/meridian.v1.Admin/RegionStatus/x"));
    }

    #[test]
    fn read_only_identities_read_and_nothing_else() {
        let p = Policy::new(&PolicyConfig {
            read_only: vec!["spiffe://meridian/operator/viewer".into()],
            ..PolicyConfig::default()
        });
        let viewer = Identity::operator("viewer").unwrap();
        let admin = Identity::operator("admin").unwrap();
        let (get, put, delete) = (
            axum::http::Method::GET,
            axum::http::Method::PUT,
            axum::http::Method::DELETE,
        );
        let post = axum::http::Method::POST;
        assert!(!p.refuses_write(&viewer, "/admin/v1/tenants", &get));
        assert!(p.refuses_write(&viewer, "/admin/v1/tenants/acme", &put));
        assert!(p.refuses_write(&viewer, "/admin/v1/keys/x", &delete));
        assert!(p.refuses_write(&viewer, "/admin/reload", &post));
        assert!(!p.refuses_write(&viewer, "/meridian.v1.Admin/ListTenants", &post));
        assert!(!p.refuses_write(&viewer, "/meridian.v1.Admin/RegionStatus", &post));
        assert!(p.refuses_write(&viewer, "/meridian.v1.Admin/PutTenant", &post));
        assert!(p.refuses_write(&viewer, "/meridian.v1.Admin/Drain", &post));
        assert!(!p.refuses_write(&viewer, "/grpc.health.v1.Health/Check", &post));
        assert!(!p.refuses_write(&admin, "/meridian.v1.Admin/PutTenant", &post));
    }
}
