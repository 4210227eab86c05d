//! The `meridian.v1` gRPC API shared by the Meridian gateway and regions.
//!
//! [`v1`] holds the Rust types generated from `proto/meridian/v1/*.proto`:
//! messages, enums, and a client (`v1::inference_client::InferenceClient`, ...)
//! and server (`v1::inference_server::InferenceServer`, ...) module for each
//! of the five services: `Inference`, `Jobs`, `Telemetry`, `Admin` and
//! `Replication`. [`FILE_DESCRIPTOR_SET`] describes them for gRPC server
//! reflection. The [`error`] module attaches a [`v1::ErrorDetail`] to a
//! [`tonic::Status`], reads it back, and maps gRPC codes to HTTP statuses and
//! OpenAI-style error types for the gateway's HTTP API. The [`contract`]
//! module holds what both sides of the wire must agree on: header names, the
//! tenant id rule and the table of error classes; [`api_key`] the API key
//! format and hash the gateway and regions agree on. [`config`] reads the
//! gateway's and the regions' TOML files: parse, validate, and report every
//! problem with its key.

pub mod api_key;
pub mod config;
pub mod contract;
pub mod error;

pub use contract::{DEFAULT_TENANT, ErrorClass, header, valid_tenant_id};
pub use error::{error_detail, http_status_for, openai_error_type, status_with_detail};

/// Generated code for the `meridian.v1` protobuf package.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    missing_docs,
    rustdoc::bare_urls,
    rustdoc::broken_intra_doc_links,
    rustdoc::invalid_html_tags
)]
pub mod v1 {
    tonic::include_proto!("meridian.v1");
}

/// Encoded `google.protobuf.FileDescriptorSet` of every `meridian.v1` proto
/// file and its imports, with source info (comments); pass it to
/// `tonic_reflection::server::Builder::register_encoded_file_descriptor_set`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("meridian_v1_descriptor");
