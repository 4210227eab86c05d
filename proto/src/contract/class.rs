//! Error classes and their wire form: one row per class, read by the gateway
//! for its own refusals and by the regions for theirs, so a client sees the
//! same HTTP status, gRPC code and OpenAI error `type` for the same failure
//! wherever it happened.

use tonic::Code;

/// What kind of failure a client is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The request is malformed or names something unknown.
    InvalidRequest,
    /// The request is well formed but the state does not allow it (a
    /// finished job, a trimmed replication log).
    FailedPrecondition,
    /// The caller did not say who it is.
    Unauthenticated,
    /// The API key is missing or wrong: OpenAI answers this 401 as an
    /// `invalid_request_error` (code `invalid_api_key`), and so does the
    /// gateway.
    InvalidApiKey,
    /// The caller is known but may not do this.
    PermissionDenied,
    /// No such model, job, route or resource.
    NotFound,
    /// The request conflicts with an earlier one (a reused idempotency key).
    Conflict,
    /// The request is bigger than a limit allows (a body, a batch, a
    /// stored history): split it or shorten it. gRPC says
    /// `RESOURCE_EXHAUSTED`, as for a message over the size limit.
    PayloadTooLarge,
    /// The region is at capacity for this tenant or itself (admission,
    /// queue), or a quota without a more precise kind.
    RateLimited,
    /// A tenant's requests-per-second limit refused the request; OpenAI
    /// names the limit in the `type`.
    RequestsLimitExceeded,
    /// A tenant's tokens-per-minute limit refused the request.
    TokensLimitExceeded,
    /// A tenant's budget for the period is spent: waiting a moment will
    /// not help. OpenAI's `insufficient_quota`, which its SDKs do not
    /// retry when told so (`x-should-retry: false`).
    QuotaExceeded,
    /// The client went away.
    Cancelled,
    /// Not offered by this server.
    NotImplemented,
    /// Every region the gateway tried failed or could not be reached.
    BadGateway,
    /// The server cannot take the request now; a retry later may succeed.
    Unavailable,
    /// The request's deadline passed before the answer was complete.
    Timeout,
    /// An unexpected failure.
    Internal,
}

/// How one class looks on the wire.
struct Wire {
    http: u16,
    grpc: Code,
    openai_type: &'static str,
}

impl ErrorClass {
    /// Every class, in table order.
    pub const ALL: [Self; 18] = [
        Self::InvalidRequest,
        Self::FailedPrecondition,
        Self::Unauthenticated,
        Self::InvalidApiKey,
        Self::PermissionDenied,
        Self::NotFound,
        Self::Conflict,
        Self::PayloadTooLarge,
        Self::RateLimited,
        Self::RequestsLimitExceeded,
        Self::TokensLimitExceeded,
        Self::QuotaExceeded,
        Self::Cancelled,
        Self::NotImplemented,
        Self::BadGateway,
        Self::Unavailable,
        Self::Timeout,
        Self::Internal,
    ];

    /// The table: the one place a class meets its HTTP status, gRPC code
    /// and OpenAI `type`.
    const fn wire(self) -> Wire {
        let (http, grpc, openai_type) = match self {
            Self::InvalidRequest => (400, Code::InvalidArgument, "invalid_request_error"),
            Self::FailedPrecondition => (400, Code::FailedPrecondition, "invalid_request_error"),
            Self::Unauthenticated => (401, Code::Unauthenticated, "authentication_error"),
            Self::InvalidApiKey => (401, Code::Unauthenticated, "invalid_request_error"),
            Self::PermissionDenied => (403, Code::PermissionDenied, "permission_error"),
            Self::NotFound => (404, Code::NotFound, "not_found_error"),
            Self::Conflict => (409, Code::AlreadyExists, "conflict_error"),
            Self::PayloadTooLarge => (413, Code::ResourceExhausted, "invalid_request_error"),
            Self::RateLimited => (429, Code::ResourceExhausted, "rate_limit_error"),
            Self::RequestsLimitExceeded => (429, Code::ResourceExhausted, "requests"),
            Self::TokensLimitExceeded => (429, Code::ResourceExhausted, "tokens"),
            Self::QuotaExceeded => (429, Code::ResourceExhausted, "insufficient_quota"),
            Self::Cancelled => (499, Code::Cancelled, "request_cancelled_error"),
            Self::Internal => (500, Code::Internal, "server_error"),
            Self::NotImplemented => (501, Code::Unimplemented, "not_implemented_error"),
            Self::BadGateway => (502, Code::Unavailable, "server_error"),
            Self::Unavailable => (503, Code::Unavailable, "service_unavailable_error"),
            Self::Timeout => (504, Code::DeadlineExceeded, "timeout_error"),
        };
        Wire {
            http,
            grpc,
            openai_type,
        }
    }

    /// The HTTP status of an answer of this class.
    pub const fn http_status(self) -> u16 {
        self.wire().http
    }

    /// The gRPC code of an answer of this class.
    pub const fn grpc_code(self) -> Code {
        self.wire().grpc
    }

    /// The OpenAI error object's `type` for this class.
    pub const fn openai_type(self) -> &'static str {
        self.wire().openai_type
    }

    /// The class of a gRPC status a server answered with: the general class
    /// of each code (a region's `UNAVAILABLE` is [`Self::Unavailable`], not
    /// the gateway's own [`Self::BadGateway`]). Codes without a closer class
    /// (`UNKNOWN`, `ABORTED`, `OUT_OF_RANGE`, `DATA_LOSS`, and `OK`, which is
    /// no error) are [`Self::Internal`].
    pub const fn from_code(code: Code) -> Self {
        match code {
            Code::InvalidArgument => Self::InvalidRequest,
            Code::FailedPrecondition => Self::FailedPrecondition,
            Code::Unauthenticated => Self::Unauthenticated,
            Code::PermissionDenied => Self::PermissionDenied,
            Code::NotFound => Self::NotFound,
            Code::AlreadyExists => Self::Conflict,
            Code::ResourceExhausted => Self::RateLimited,
            Code::Cancelled => Self::Cancelled,
            Code::Unimplemented => Self::NotImplemented,
            Code::Unavailable => Self::Unavailable,
            Code::DeadlineExceeded => Self::Timeout,
            Code::Ok
            | Code::Unknown
            | Code::OutOfRange
            | Code::Aborted
            | Code::Internal
            | Code::DataLoss => Self::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table as clients see it; changing a row changes the API.
    #[test]
    fn each_class_has_its_wire_form() {
        let rows = [
            (
                ErrorClass::InvalidRequest,
                400,
                Code::InvalidArgument,
                "invalid_request_error",
            ),
            (
                ErrorClass::FailedPrecondition,
                400,
                Code::FailedPrecondition,
                "invalid_request_error",
            ),
            (
                ErrorClass::Unauthenticated,
                401,
                Code::Unauthenticated,
                "authentication_error",
            ),
            (
                ErrorClass::InvalidApiKey,
                401,
                Code::Unauthenticated,
                "invalid_request_error",
            ),
            (
                ErrorClass::PermissionDenied,
                403,
                Code::PermissionDenied,
                "permission_error",
            ),
            (ErrorClass::NotFound, 404, Code::NotFound, "not_found_error"),
            (
                ErrorClass::Conflict,
                409,
                Code::AlreadyExists,
                "conflict_error",
            ),
            (
                ErrorClass::PayloadTooLarge,
                413,
                Code::ResourceExhausted,
                "invalid_request_error",
            ),
            (
                ErrorClass::RateLimited,
                429,
                Code::ResourceExhausted,
                "rate_limit_error",
            ),
            (
                ErrorClass::RequestsLimitExceeded,
                429,
                Code::ResourceExhausted,
                "requests",
            ),
            (
                ErrorClass::TokensLimitExceeded,
                429,
                Code::ResourceExhausted,
                "tokens",
            ),
            (
                ErrorClass::QuotaExceeded,
                429,
                Code::ResourceExhausted,
                "insufficient_quota",
            ),
            (
                ErrorClass::Cancelled,
                499,
                Code::Cancelled,
                "request_cancelled_error",
            ),
            (
                ErrorClass::NotImplemented,
                501,
                Code::Unimplemented,
                "not_implemented_error",
            ),
            (
                ErrorClass::BadGateway,
                502,
                Code::Unavailable,
                "server_error",
            ),
            (
                ErrorClass::Unavailable,
                503,
                Code::Unavailable,
                "service_unavailable_error",
            ),
            (
                ErrorClass::Timeout,
                504,
                Code::DeadlineExceeded,
                "timeout_error",
            ),
            (ErrorClass::Internal, 500, Code::Internal, "server_error"),
        ];
        assert_eq!(rows.len(), ErrorClass::ALL.len(), "every class is pinned");
        for (class, http, grpc, kind) in rows {
            assert_eq!(class.http_status(), http, "{class:?}");
            assert_eq!(class.grpc_code(), grpc, "{class:?}");
            assert_eq!(class.openai_type(), kind, "{class:?}");
        }
    }

    #[test]
    fn a_class_read_back_from_its_code_keeps_status_and_type_where_the_code_is_its_own() {
        for class in ErrorClass::ALL {
            let back = ErrorClass::from_code(class.grpc_code());
            assert_eq!(back.grpc_code(), class.grpc_code(), "{class:?}");
        }
        // The general class of each code is the one that owns it.
        assert_eq!(
            ErrorClass::from_code(Code::Unavailable),
            ErrorClass::Unavailable
        );
        assert_eq!(
            ErrorClass::from_code(Code::ResourceExhausted),
            ErrorClass::RateLimited
        );
        assert_eq!(
            ErrorClass::from_code(Code::Unauthenticated),
            ErrorClass::Unauthenticated
        );
    }

    #[test]
    fn the_gateway_and_regions_agree_on_timeouts_and_overload() {
        // A region's DEADLINE_EXCEEDED and the gateway's own read timeout.
        assert_eq!(
            ErrorClass::from_code(Code::DeadlineExceeded).openai_type(),
            ErrorClass::Timeout.openai_type()
        );
        assert_eq!(
            ErrorClass::from_code(Code::Unavailable).openai_type(),
            ErrorClass::Unavailable.openai_type()
        );
    }
}
