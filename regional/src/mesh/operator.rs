//! Operator tokens on management calls: a call to `meridian.v1.Admin` (or
//! `/admin/*`) that carries `Authorization: Bearer mop-...` is made by the
//! token's holder, whatever connection it came on (an operator's, or a
//! gateway passing an operator's call on). Runs before the mesh policy,
//! which then lets a token holder's call through ([`Operator`] in the
//! request's extensions); the token's role decides what it may do. A call
//! without a token is left to the policy as before.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use meridian_proto::ErrorClass;
use meridian_proto::api_key::{OPERATOR_TOKEN_PREFIX, bearer};
use meridian_proto::contract::openai_code;
use sqlx::PgPool;

use super::policy::{ADMIN, classify, is_grpc, is_read, refuse};
use crate::tenancy::operators::{self, Operator, Role};

pub(crate) async fn authenticate(
    State(pool): State<PgPool>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    if classify(path).0 != ADMIN {
        return next.run(req).await;
    }
    // Read as the gateway reads it (`api_key::bearer`): what it passed on
    // as a token is one here.
    let Some(bearer) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer(v.as_bytes()))
        .map(|b| String::from_utf8_lossy(b).into_owned())
    else {
        return next.run(req).await;
    };
    let grpc = is_grpc(&req);
    let unauthenticated = |message: &str| {
        refuse(
            grpc,
            ErrorClass::Unauthenticated,
            openai_code::INVALID_OPERATOR_TOKEN,
            message,
        )
    };
    if !bearer.starts_with(OPERATOR_TOKEN_PREFIX) {
        return unauthenticated(&format!(
            "the management API takes an operator token (`Authorization: Bearer \
             {OPERATOR_TOKEN_PREFIX}...`) or an operator's mesh certificate; API keys may not \
             call it"
        ));
    }
    let operator = match operators::verify(&pool, &bearer).await {
        Ok(Some(operator)) => operator,
        Ok(None) => {
            tracing::warn!(
                path,
                "an unknown, revoked or expired operator token refused"
            );
            return unauthenticated("operator token not valid: unknown, revoked or expired");
        }
        Err(e) => {
            tracing::warn!(error = %e, "operator token not checked: PostgreSQL unavailable");
            return refuse(
                grpc,
                ErrorClass::Unavailable,
                openai_code::INVALID_OPERATOR_TOKEN,
                "operator tokens cannot be checked now: this region's PostgreSQL is unavailable",
            );
        }
    };
    if operator.role == Role::ReadOnly && !is_read(path, req.method()) {
        tracing::warn!(
            operator = operator.name,
            path,
            "a read-only token's write refused"
        );
        return refuse(
            grpc,
            ErrorClass::PermissionDenied,
            openai_code::MESH_POLICY_DENIED,
            &format!(
                "operator token {:?} may only read (role read-only): it may not call {} {}",
                operator.name,
                req.method(),
                path
            ),
        );
    }
    req.extensions_mut().insert::<Operator>(operator);
    next.run(req).await
}
