//! The node's one error type and its mapping to the wire: gRPC status, HTTP
//! status and OpenAI error JSON are decided here and nowhere else.

use std::net::SocketAddr;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tonic::Code;

/// Everything that can go wrong in a regional node, at start or per request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration could not be read or is invalid.
    #[error("invalid config {origin}: {message}")]
    Config { origin: String, message: String },
    /// The API address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Redis did not answer at start.
    #[error("redis at {url} is unreachable: {message}")]
    RedisUnreachable { url: String, message: String },
    /// PostgreSQL did not answer at start.
    #[error("postgres at {url} is unreachable: {message}")]
    PostgresUnreachable { url: String, message: String },
    /// A schema migration failed.
    #[error("postgres migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database belongs to another region.
    #[error(
        "postgres database belongs to region {found:?}, not {expected:?}: check `postgres.url`"
    )]
    WrongRegion { expected: String, found: String },
    /// A query failed.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// The request is malformed; `param` names the offending field when known.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
    },
    /// The request names a model this region does not serve.
    #[error("the model `{0}` does not exist in this region")]
    ModelNotFound(String),
    /// No such route or resource.
    #[error("{0}")]
    NotFound(String),
    /// The node is shutting down or cannot take the request now.
    #[error("{0}")]
    Unavailable(String),
    /// An I/O failure not covered above.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub(crate) fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param,
        }
    }

    /// The gRPC code a client sees for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidRequest { .. } => Code::InvalidArgument,
            Self::ModelNotFound(_) | Self::NotFound(_) => Code::NotFound,
            Self::Unavailable(_)
            | Self::RedisUnreachable { .. }
            | Self::PostgresUnreachable { .. } => Code::Unavailable,
            _ => Code::Internal,
        }
    }

    /// The OpenAI `error.code` for this error, where OpenAI defines one.
    fn openai_code(&self) -> Option<&'static str> {
        match self {
            Self::ModelNotFound(_) => Some("model_not_found"),
            _ => None,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let code = self.code();
        let status = StatusCode::from_u16(meridian_proto::http_status_for(code))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let param = match &self {
            Self::InvalidRequest { param, .. } => *param,
            _ => None,
        };
        let body = serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": meridian_proto::openai_error_type(code),
                "param": param,
                "code": self.openai_code(),
            }
        });
        (status, axum::Json(body)).into_response()
    }
}
