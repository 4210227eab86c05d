//! The wire contract between clients, the gateway and regions, defined once:
//! the `x-meridian-*` header names ([`header`]), the tenant id rule
//! ([`tenant`]) and the error classes with their HTTP status, gRPC code and
//! OpenAI error `type` ([`ErrorClass`]). The gateway and the regions both
//! read them from here, so the two sides cannot drift apart.

pub mod header;
pub mod openai_code;
pub mod tenant;

mod class;

pub use self::class::ErrorClass;
pub use self::tenant::{DEFAULT_TENANT, valid_tenant_id};
