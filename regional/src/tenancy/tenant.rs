//! The tenant a request acts for. The gateway authenticates the client and
//! names its tenant in `x-meridian-tenant`; requests without one belong to the
//! `default` tenant (direct local use). Only the gateway may set the header:
//! enforcing that on the connection's identity is the mesh's job.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use tonic::metadata::MetadataMap;

use crate::error::Error;

pub(crate) use meridian_proto::DEFAULT_TENANT;
/// Header (and gRPC metadata key) naming the tenant.
pub(crate) use meridian_proto::header::TENANT as TENANT_HEADER;

/// A validated tenant id ([`meridian_proto::valid_tenant_id`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Tenant(String);

impl Tenant {
    pub(crate) fn parse(value: Option<&str>) -> Result<Self, Error> {
        let Some(v) = value else {
            return Ok(Self(DEFAULT_TENANT.to_string()));
        };
        if !meridian_proto::valid_tenant_id(v) {
            return Err(Error::invalid(
                format!("`{TENANT_HEADER}` must be 1 to 64 letters, digits, '-', '_' or '.'"),
                None,
            ));
        }
        Ok(Self(v.to_string()))
    }

    /// Reads the tenant from gRPC request metadata.
    pub(crate) fn from_metadata(metadata: &MetadataMap) -> Result<Self, Error> {
        match metadata.get(TENANT_HEADER) {
            None => Self::parse(None),
            Some(v) => Self::parse(Some(v.to_str().map_err(|_| {
                Error::invalid(format!("`{TENANT_HEADER}` must be ASCII"), None)
            })?)),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Error> {
        match parts.headers.get(TENANT_HEADER) {
            None => Self::parse(None),
            Some(v) => Self::parse(Some(v.to_str().map_err(|_| {
                Error::invalid(format!("`{TENANT_HEADER}` must be ASCII"), None)
            })?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_is_default_and_bad_values_are_refused() {
        assert_eq!(Tenant::parse(None).unwrap().as_str(), DEFAULT_TENANT);
        assert_eq!(
            Tenant::parse(Some("acme-1.prod")).unwrap().as_str(),
            "acme-1.prod"
        );
        assert!(Tenant::parse(Some("")).is_err());
        assert!(Tenant::parse(Some("a b")).is_err());
        assert!(Tenant::parse(Some(&"x".repeat(65))).is_err());
    }
}
