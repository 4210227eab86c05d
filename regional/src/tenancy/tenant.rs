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
use meridian_proto::header::{ALLOWED_MODELS, KEY_ID};

/// A validated tenant id ([`meridian_proto::valid_tenant_id`]), and the
/// models its key may use when the gateway said
/// ([`meridian_proto::header::ALLOWED_MODELS`]). Equal, and hashed, by id.
#[derive(Debug, Clone)]
pub(crate) struct Tenant {
    id: String,
    /// Comma-separated names; `None`: any model.
    models: Option<std::sync::Arc<str>>,
    /// The id of the API key the gateway admitted the request with
    /// ([`meridian_proto::header::KEY_ID`]), for spend by key.
    key: Option<std::sync::Arc<str>>,
}

impl PartialEq for Tenant {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for Tenant {}

impl std::hash::Hash for Tenant {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl Tenant {
    pub(crate) fn parse(value: Option<&str>) -> Result<Self, Error> {
        let Some(v) = value else {
            return Ok(Self {
                id: DEFAULT_TENANT.to_string(),
                models: None,
                key: None,
            });
        };
        if !meridian_proto::valid_tenant_id(v) {
            return Err(Error::invalid(
                format!("`{TENANT_HEADER}` must be 1 to 64 letters, digits, '-', '_' or '.'"),
                None,
            ));
        }
        Ok(Self {
            id: v.to_string(),
            models: None,
            key: None,
        })
    }

    /// The tenant of a request's headers (or gRPC metadata, by the same
    /// names).
    fn from_values(
        tenant: Option<&[u8]>,
        models: Option<&[u8]>,
        key: Option<&[u8]>,
    ) -> Result<Self, Error> {
        let text = |name: &str, v: &[u8]| {
            std::str::from_utf8(v)
                .ok()
                .filter(|t| t.is_ascii())
                .map(str::to_string)
                .ok_or_else(|| Error::invalid(format!("`{name}` must be ASCII"), None))
        };
        let mut tenant = match tenant {
            None => Self::parse(None)?,
            Some(v) => Self::parse(Some(&text(TENANT_HEADER, v)?))?,
        };
        if let Some(v) = models {
            tenant.models = Some(text(ALLOWED_MODELS, v)?.into());
        }
        if let Some(v) = key {
            let key = text(KEY_ID, v)?;
            if key.is_empty() || key.len() > 64 {
                return Err(Error::invalid(
                    format!("`{KEY_ID}` must be 1 to 64 characters"),
                    None,
                ));
            }
            tenant.key = Some(key.into());
        }
        Ok(tenant)
    }

    /// Reads the tenant from gRPC request metadata.
    pub(crate) fn from_metadata(metadata: &MetadataMap) -> Result<Self, Error> {
        Self::from_values(
            metadata.get(TENANT_HEADER).map(|v| v.as_bytes()),
            metadata.get(ALLOWED_MODELS).map(|v| v.as_bytes()),
            metadata.get(KEY_ID).map(|v| v.as_bytes()),
        )
    }

    /// The id of the key the request came with, when the gateway said.
    pub(crate) fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.id
    }

    /// Refuses `model` (as the request names it: a model or a route) when
    /// the caller's key or tenant may not use it.
    pub(crate) fn may_use(&self, model: &str) -> Result<(), Error> {
        match &self.models {
            Some(allowed) if !allowed.split(',').any(|m| m == model) => {
                Err(Error::ModelNotAllowed {
                    model: model.to_string(),
                    allowed: allowed.to_string(),
                })
            }
            _ => Ok(()),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Error> {
        Self::from_values(
            parts.headers.get(TENANT_HEADER).map(|v| v.as_bytes()),
            parts.headers.get(ALLOWED_MODELS).map(|v| v.as_bytes()),
            parts.headers.get(KEY_ID).map(|v| v.as_bytes()),
        )
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

    #[test]
    fn a_key_limited_to_some_models_may_use_only_those() {
        let t = Tenant::from_values(Some(b"acme"), Some(b"sim-fast,assistant"), None).unwrap();
        assert!(t.may_use("sim-fast").is_ok() && t.may_use("assistant").is_ok());
        let e = t.may_use("sim").unwrap_err().to_string();
        assert!(
            e.contains("may not use model \"sim\"") && e.contains("sim-fast,assistant"),
            "{e}"
        );
        // An empty list allows nothing; no list, anything.
        assert!(
            Tenant::from_values(Some(b"acme"), Some(b""), None)
                .unwrap()
                .may_use("sim-fast")
                .is_err()
        );
        assert!(
            Tenant::from_values(Some(b"acme"), None, None)
                .unwrap()
                .may_use("x")
                .is_ok()
        );
    }

    #[test]
    fn the_key_id_is_kept_and_bad_ones_are_refused() {
        let t = Tenant::from_values(Some(b"acme"), None, Some(b"0190-key")).unwrap();
        assert_eq!(t.key(), Some("0190-key"));
        assert_eq!(
            Tenant::from_values(Some(b"acme"), None, None)
                .unwrap()
                .key(),
            None
        );
        assert!(Tenant::from_values(Some(b"acme"), None, Some(b"")).is_err());
        assert!(Tenant::from_values(Some(b"acme"), None, Some("caf\u{e9}".as_bytes())).is_err());
    }
}
