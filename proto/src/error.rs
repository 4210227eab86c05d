//! Error helpers: attach a [`ErrorDetail`] to a [`tonic::Status`] and read
//! it back, and map gRPC codes to HTTP for the gateway's HTTP API.
//!
//! The detail travels the standard gRPC way: the status details bytes (sent
//! in the `grpc-status-details-bin` trailer) hold a serialized
//! `google.rpc.Status` whose `details` list contains one `google.protobuf.Any`
//! with type URL [`ERROR_DETAIL_TYPE_URL`]. Generic tools such as `grpcurl`
//! can therefore decode it (they resolve the type through server reflection).

use prost::Message;
use prost::bytes::Bytes;
use tonic::{Code, Status};

use crate::contract::ErrorClass;
use crate::v1::ErrorDetail;

/// Type URL of [`ErrorDetail`] inside a `google.protobuf.Any`.
pub const ERROR_DETAIL_TYPE_URL: &str = "type.googleapis.com/meridian.v1.ErrorDetail";

/// Fully qualified protobuf name of [`ErrorDetail`]: the last segment of any
/// type URL that denotes it.
const ERROR_DETAIL_FULL_NAME: &str = "meridian.v1.ErrorDetail";

/// Well-known values of [`ErrorDetail::reason`], as documented in
/// `meridian/v1/common.proto`.
pub mod reason {
    /// The requested model or alias does not exist (NOT_FOUND).
    pub const MODEL_NOT_FOUND: &str = "MODEL_NOT_FOUND";
    /// No healthy backend serves the model in this region (UNAVAILABLE).
    pub const NO_HEALTHY_BACKEND: &str = "NO_HEALTHY_BACKEND";
    /// The region was drained by an operator (UNAVAILABLE).
    pub const REGION_DRAINING: &str = "REGION_DRAINING";
    /// The region cannot serve, e.g. a dependency is down (UNAVAILABLE).
    pub const REGION_NOT_SERVING: &str = "REGION_NOT_SERVING";
    /// A store of the region the request needs (PostgreSQL, Redis) is down;
    /// nothing of the request was stored, another region may serve it
    /// (UNAVAILABLE, retryable).
    pub const STORE_UNAVAILABLE: &str = "STORE_UNAVAILABLE";
    /// A rate limit or quota was hit (RESOURCE_EXHAUSTED).
    pub const RATE_LIMITED: &str = "RATE_LIMITED";
    /// The tenant's budget for the period is spent; retrying before the
    /// period ends or the budget is raised will not help
    /// (RESOURCE_EXHAUSTED).
    pub const BUDGET_SPENT: &str = "BUDGET_SPENT";
    /// The job queue is full (RESOURCE_EXHAUSTED).
    pub const QUEUE_FULL: &str = "QUEUE_FULL";
    /// There is no job with the given id (NOT_FOUND).
    pub const JOB_NOT_FOUND: &str = "JOB_NOT_FOUND";
    /// The job already reached a terminal state (FAILED_PRECONDITION).
    pub const JOB_ALREADY_FINISHED: &str = "JOB_ALREADY_FINISHED";
    /// An idempotency key was reused with a different request (ALREADY_EXISTS).
    pub const IDEMPOTENCY_KEY_REUSED: &str = "IDEMPOTENCY_KEY_REUSED";
    /// The request is malformed (INVALID_ARGUMENT).
    pub const INVALID_REQUEST: &str = "INVALID_REQUEST";
    /// The requested replication sequence was trimmed from the log
    /// (FAILED_PRECONDITION).
    pub const REPLICATION_LOG_TRUNCATED: &str = "REPLICATION_LOG_TRUNCATED";
    /// A synchronous write was stored in the region but no peer region
    /// confirmed it in time; retrying may store it twice (UNAVAILABLE).
    pub const SYNC_NOT_CONFIRMED: &str = "SYNC_NOT_CONFIRMED";
    /// A synchronous write was asked of a region without peers
    /// (UNAVAILABLE).
    pub const SYNC_UNAVAILABLE: &str = "SYNC_UNAVAILABLE";
    /// A model backend failed (UNAVAILABLE or INTERNAL).
    pub const BACKEND_ERROR: &str = "BACKEND_ERROR";
    /// An unexpected failure (INTERNAL).
    pub const INTERNAL: &str = "INTERNAL";
}

/// Wire-compatible copy of `google.rpc.Status`, so that no googleapis protos
/// are needed.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    /// The gRPC status code.
    #[prost(int32, tag = "1")]
    code: i32,
    /// The error message.
    #[prost(string, tag = "2")]
    message: String,
    /// Typed details.
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// Builds a [`Status`] with `code` and `message` that carries `detail`.
pub fn status_with_detail(code: Code, message: impl Into<String>, detail: ErrorDetail) -> Status {
    let message = message.into();
    let rpc_status = RpcStatus {
        code: i32::from(code),
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: ERROR_DETAIL_TYPE_URL.to_owned(),
            value: detail.encode_to_vec(),
        }],
    };
    Status::with_details(code, message, Bytes::from(rpc_status.encode_to_vec()))
}

/// Reads the [`ErrorDetail`] carried by `status`, if any.
///
/// Returns `None` when the status has no details, when they are not a
/// `google.rpc.Status`, or when that holds no `meridian.v1.ErrorDetail`.
pub fn error_detail(status: &Status) -> Option<ErrorDetail> {
    let details = status.details();
    if details.is_empty() {
        return None;
    }
    let rpc_status = RpcStatus::decode(details).ok()?;
    rpc_status
        .details
        .iter()
        .find(|any| any.type_url.rsplit('/').next() == Some(ERROR_DETAIL_FULL_NAME))
        .and_then(|any| ErrorDetail::decode(any.value.as_slice()).ok())
}

/// The HTTP status code that corresponds to a gRPC status code: that of
/// its [`ErrorClass`], and 200 for `Ok`.
///
/// `Cancelled` maps to 499 (client closed request); codes without a closer
/// match map to 500.
pub fn http_status_for(code: Code) -> u16 {
    if code == Code::Ok {
        return 200;
    }
    ErrorClass::from_code(code).http_status()
}

/// The OpenAI-style `error.type` string for a gRPC status code, for the
/// gateway's OpenAI-compatible HTTP API: that of its [`ErrorClass`].
/// Consistent with [`http_status_for`]:
///
/// | gRPC code | type |
/// | --- | --- |
/// | InvalidArgument, FailedPrecondition | `invalid_request_error` |
/// | Unauthenticated | `authentication_error` |
/// | PermissionDenied | `permission_error` |
/// | NotFound | `not_found_error` |
/// | AlreadyExists | `conflict_error` |
/// | ResourceExhausted | `rate_limit_error` |
/// | Cancelled | `request_cancelled_error` |
/// | Unimplemented | `not_implemented_error` |
/// | Unavailable | `service_unavailable_error` |
/// | DeadlineExceeded | `timeout_error` |
/// | anything else | `server_error` |
pub fn openai_error_type(code: Code) -> &'static str {
    ErrorClass::from_code(code).openai_type()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_detail() -> ErrorDetail {
        ErrorDetail {
            reason: reason::REGION_DRAINING.to_owned(),
            message: "region eu-west is draining".to_owned(),
            retryable: true,
            retry_after_ms: 1500,
            region: "eu-west".to_owned(),
        }
    }

    #[test]
    fn detail_round_trips_through_status() {
        let status = status_with_detail(Code::Unavailable, "draining", sample_detail());
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "draining");
        assert_eq!(error_detail(&status), Some(sample_detail()));
    }

    #[test]
    fn detail_round_trips_through_http_trailers() {
        // What a client sees: the status serialized into headers and back.
        let status = status_with_detail(Code::ResourceExhausted, "slow down", sample_detail());
        let response = status.into_http::<()>();
        assert!(response.headers().contains_key("grpc-status-details-bin"));
        let received = Status::from_header_map(response.headers()).expect("a status");
        assert_eq!(received.code(), Code::ResourceExhausted);
        assert_eq!(received.message(), "slow down");
        assert_eq!(error_detail(&received), Some(sample_detail()));
    }

    #[test]
    fn details_are_a_google_rpc_status() {
        let status = status_with_detail(Code::NotFound, "no such model", sample_detail());
        let rpc = RpcStatus::decode(status.details()).expect("google.rpc.Status");
        assert_eq!(rpc.code, 5);
        assert_eq!(rpc.message, "no such model");
        assert_eq!(rpc.details.len(), 1);
        assert_eq!(rpc.details[0].type_url, ERROR_DETAIL_TYPE_URL);
        assert_eq!(
            ErrorDetail::decode(rpc.details[0].value.as_slice()).unwrap(),
            sample_detail()
        );
    }

    #[test]
    fn empty_detail_round_trips() {
        let status = status_with_detail(Code::Internal, "", ErrorDetail::default());
        assert_eq!(error_detail(&status), Some(ErrorDetail::default()));
    }

    #[test]
    fn no_detail_without_details() {
        assert_eq!(error_detail(&Status::not_found("nope")), None);
    }

    #[test]
    fn no_detail_from_garbage_or_foreign_details() {
        let garbage =
            Status::with_details(Code::Internal, "x", Bytes::from_static(&[0xff, 0xff, 0xff]));
        assert_eq!(error_detail(&garbage), None);

        let foreign = RpcStatus {
            code: 3,
            message: "bad".to_owned(),
            details: vec![prost_types::Any {
                type_url: "type.googleapis.com/google.rpc.BadRequest".to_owned(),
                value: vec![],
            }],
        };
        let foreign = Status::with_details(
            Code::InvalidArgument,
            "bad",
            Bytes::from(foreign.encode_to_vec()),
        );
        assert_eq!(error_detail(&foreign), None);
    }

    #[test]
    fn detail_found_under_any_type_url_prefix() {
        let rpc = RpcStatus {
            code: 14,
            message: "down".to_owned(),
            details: vec![
                prost_types::Any {
                    type_url: "type.googleapis.com/google.rpc.RetryInfo".to_owned(),
                    value: vec![],
                },
                prost_types::Any {
                    type_url: "example.com/types/meridian.v1.ErrorDetail".to_owned(),
                    value: sample_detail().encode_to_vec(),
                },
            ],
        };
        let status =
            Status::with_details(Code::Unavailable, "down", Bytes::from(rpc.encode_to_vec()));
        assert_eq!(error_detail(&status), Some(sample_detail()));
    }

    #[test]
    fn http_status_mapping() {
        let cases = [
            (Code::Ok, 200),
            (Code::Cancelled, 499),
            (Code::Unknown, 500),
            (Code::InvalidArgument, 400),
            (Code::DeadlineExceeded, 504),
            (Code::NotFound, 404),
            (Code::AlreadyExists, 409),
            (Code::PermissionDenied, 403),
            (Code::ResourceExhausted, 429),
            (Code::FailedPrecondition, 400),
            (Code::Aborted, 500),
            (Code::OutOfRange, 500),
            (Code::Unimplemented, 501),
            (Code::Internal, 500),
            (Code::Unavailable, 503),
            (Code::DataLoss, 500),
            (Code::Unauthenticated, 401),
        ];
        for (code, http) in cases {
            assert_eq!(http_status_for(code), http, "{code:?}");
        }
    }

    #[test]
    fn openai_error_type_mapping() {
        let cases = [
            (Code::InvalidArgument, "invalid_request_error"),
            (Code::FailedPrecondition, "invalid_request_error"),
            (Code::Unauthenticated, "authentication_error"),
            (Code::PermissionDenied, "permission_error"),
            (Code::NotFound, "not_found_error"),
            (Code::AlreadyExists, "conflict_error"),
            (Code::Aborted, "server_error"),
            (Code::OutOfRange, "server_error"),
            (Code::ResourceExhausted, "rate_limit_error"),
            (Code::Cancelled, "request_cancelled_error"),
            (Code::Unimplemented, "not_implemented_error"),
            (Code::Unavailable, "service_unavailable_error"),
            (Code::DeadlineExceeded, "timeout_error"),
            (Code::Internal, "server_error"),
            (Code::Unknown, "server_error"),
            (Code::DataLoss, "server_error"),
            (Code::Ok, "server_error"),
        ];
        for (code, kind) in cases {
            assert_eq!(openai_error_type(code), kind, "{code:?}");
        }
    }
}
