//! The node's one error type and its mapping to the wire: gRPC status, HTTP
//! status and OpenAI error JSON are decided here and nowhere else.

use std::net::SocketAddr;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use meridian_proto::ErrorClass;
use meridian_proto::contract::openai_code;
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
    /// The server offers no extension to keep time series with.
    #[error(
        "postgres has neither timescaledb nor pg_partman: install one, e.g. \
         `apt-get install postgresql-15-partman` (or timescaledb, preloaded \
         through shared_preload_libraries)"
    )]
    NoTimeSeriesExtension,
    /// The database keeps time series with an extension the server lost.
    #[error(
        "the telemetry tables of this database use {0}, which this postgres server \
         no longer provides: install it again"
    )]
    TimeSeriesModeUnavailable(&'static str),
    /// The config asks for another time-series mode than the database has.
    #[error(
        "`telemetry.storage` asks for {configured}, but this database was set up with \
         {recorded}: set it to {recorded} or auto"
    )]
    TimeSeriesModeMismatch {
        recorded: &'static str,
        configured: &'static str,
    },
    /// The request is malformed; `param` names the offending field when known.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
    },
    /// The request is over a size limit; `param` names the field when one
    /// field is too large (or too long a list).
    #[error("{message}")]
    TooLarge {
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
    /// There is no such job for this tenant (or the id is malformed).
    /// The caller's key or tenant may not use this model.
    #[error("this API key may not use model {model:?}: its key or tenant allows only [{allowed}]")]
    ModelNotAllowed { model: String, allowed: String },

    /// The tenant's budget for the period is spent.
    #[error(
        "tenant {tenant} has spent its budget of {budget} for this {period}; it resets on \
         {resets} (UTC), or when an operator raises the budget"
    )]
    BudgetSpent {
        tenant: String,
        budget: String,
        period: &'static str,
        resets: chrono::NaiveDate,
    },

    #[error("no job {0:?}")]
    JobNotFound(String),
    /// No stored response of this tenant has the id; `param` names the
    /// field that named it (`previous_response_id`), if any.
    #[error(
        "response {id:?} not found: never stored, deleted, not this tenant's, or not yet \
         replicated to this region"
    )]
    UnknownResponse {
        id: String,
        param: Option<&'static str>,
    },
    /// The job queue of the tenant or the region is full.
    #[error("the {scope} job queue is full: retry later")]
    QueueFull {
        scope: &'static str,
        retry_after: std::time::Duration,
    },
    /// The tenant holds as many job watches open on this node as it may.
    #[error(
        "this tenant already holds {max} job watches open on this node, the limit set by \
         `jobs.max_watches_per_tenant`: close one first"
    )]
    TooManyWatches { max: u32 },
    /// An idempotency key was reused with a different request.
    #[error("idempotency key {0:?} was already used for a different request")]
    IdempotencyKeyReused(String),
    /// The job already reached a terminal state.
    #[error("job {id} already finished: {state}")]
    JobAlreadyFinished { id: String, state: &'static str },
    /// The prompt, plus `max_tokens` when given, does not fit the model.
    #[error(
        "this model's context window is {window} tokens; the request needs {tokens} \
         (prompt plus max_tokens)"
    )]
    ContextLengthExceeded { tokens: u64, window: u32 },
    /// The request's deadline passed before the answer was complete.
    #[error("the request deadline passed before the model finished")]
    DeadlineExceeded,
    /// Admission control: the region or the tenant has as many inference
    /// requests in flight as it may.
    #[error("too many inference requests in flight for this {scope}: retry later")]
    Overloaded {
        scope: &'static str,
        retry_after: std::time::Duration,
    },
    /// No upstream of the model could take the request.
    #[error("no healthy backend for model `{model}`{why}")]
    NoHealthyBackend {
        model: String,
        /// Why, when known: `: upstream <url>: <reason>`, else empty.
        why: String,
    },
    /// An upstream answered 401 or 403: it refused the key (or the client
    /// certificate) this region is configured with for it. The client's own
    /// key was fine, so this is a bad gateway, not a 401.
    #[error(
        "upstream {upstream} refused Meridian's credentials (HTTP {status}): the key this \
         region is configured with for it is wrong or lacks access; it said: {said}"
    )]
    UpstreamRefused {
        upstream: String,
        status: u16,
        /// What the upstream said, with the key scrubbed from it.
        said: String,
    },
    /// `[embeddings]` is on but its model files are not there.
    #[error(
        "the embedding model is missing {missing} in {dir}: run infra/scripts/setup.sh, \
         or point `embeddings.model_dir` at a directory with config.json, tokenizer.json \
         and model.safetensors"
    )]
    EmbeddingModelMissing {
        dir: std::path::PathBuf,
        missing: String,
    },
    /// The embedding model could not be loaded or failed to run.
    #[error("embedding model: {0}")]
    EmbeddingModel(String),
    /// A peer's clock is too far ahead of this region's to accept its changes.
    #[error("clock drift: {0}")]
    ClockDrift(String),
    /// A peer sent a change this region cannot apply.
    #[error("replication: {0}")]
    Replication(String),
    /// A peer sent what it may not (another origin's change, a position or
    /// epoch it cannot vouch for): refused, counted under `reason`.
    #[error("replication refused ({reason}): {message}")]
    Refused {
        reason: &'static str,
        message: String,
    },
    /// A peer asked for changes that were trimmed from the log.
    #[error(
        "changes after sequence {from} were trimmed from the log (kept from {pruned_through}): \
         the region needs a snapshot"
    )]
    LogTruncated { from: u64, pruned_through: u64 },
    /// A synchronous write was asked for, but no peer region is configured
    /// to confirm it.
    #[error(
        "synchronous durability (`x-meridian-durability: sync`) needs a peer region, and this \
         region has none configured in `replication.peers`"
    )]
    SyncUnavailable,
    /// A synchronous write committed here, but no peer confirmed having
    /// applied it in time.
    #[error(
        "the write was stored in this region but no peer region confirmed it within \
         {waited_ms} ms: it is not lost here and may still replicate, but it is not yet \
         safe from the loss of this region"
    )]
    SyncTimeout { waited_ms: u64 },
    /// A store the request needs (`postgres`, `redis`) is down: refused
    /// before anything of the request was stored, for another region.
    #[error(
        "this region's {0} is unavailable and the request needs it: nothing was stored; \
         retry, the gateway sends it to another region"
    )]
    StoreUnavailable(&'static str),
    /// An I/O failure not covered above.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// A copy of an error that several requests share (the waiters of one
    /// coalesced cache miss): the same variant for the errors a request can
    /// meet, else the message as [`Error::Unavailable`].
    pub(crate) fn shared(e: &std::sync::Arc<Error>) -> Self {
        match &**e {
            Self::InvalidRequest { message, param } => Self::InvalidRequest {
                message: message.clone(),
                param: *param,
            },
            Self::TooLarge { message, param } => Self::TooLarge {
                message: message.clone(),
                param: *param,
            },
            Self::ModelNotFound(m) => Self::ModelNotFound(m.clone()),
            Self::ContextLengthExceeded { tokens, window } => Self::ContextLengthExceeded {
                tokens: *tokens,
                window: *window,
            },
            Self::DeadlineExceeded => Self::DeadlineExceeded,
            Self::Overloaded { scope, retry_after } => Self::Overloaded {
                scope,
                retry_after: *retry_after,
            },
            Self::NoHealthyBackend { model, why } => Self::NoHealthyBackend {
                model: model.clone(),
                why: why.clone(),
            },
            Self::UpstreamRefused {
                upstream,
                status,
                said,
            } => Self::UpstreamRefused {
                upstream: upstream.clone(),
                status: *status,
                said: said.clone(),
            },
            other => match other.store_down() {
                Some(store) => Self::StoreUnavailable(store),
                None => Self::Unavailable(other.to_string()),
            },
        }
    }

    pub(crate) fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param,
        }
    }

    pub(crate) fn too_large(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::TooLarge {
            message: message.into(),
            param,
        }
    }

    /// The class of this error, which decides its gRPC code, HTTP status and
    /// OpenAI `type` (the table in [`ErrorClass`]).
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::InvalidRequest { .. } | Self::ContextLengthExceeded { .. } => {
                ErrorClass::InvalidRequest
            }
            Self::ModelNotFound(_)
            | Self::NotFound(_)
            | Self::JobNotFound(_)
            | Self::UnknownResponse { .. } => ErrorClass::NotFound,
            Self::TooLarge { .. } => ErrorClass::PayloadTooLarge,
            Self::QueueFull { .. } | Self::Overloaded { .. } | Self::TooManyWatches { .. } => {
                ErrorClass::RateLimited
            }
            Self::BudgetSpent { .. } => ErrorClass::QuotaExceeded,
            Self::ModelNotAllowed { .. } => ErrorClass::PermissionDenied,
            Self::DeadlineExceeded => ErrorClass::Timeout,
            Self::UpstreamRefused { .. } => ErrorClass::BadGateway,
            Self::IdempotencyKeyReused(_) => ErrorClass::Conflict,
            Self::JobAlreadyFinished { .. } | Self::LogTruncated { .. } => {
                ErrorClass::FailedPrecondition
            }
            Self::Unavailable(_)
            | Self::SyncUnavailable
            | Self::SyncTimeout { .. }
            | Self::NoHealthyBackend { .. }
            | Self::RedisUnreachable { .. }
            | Self::PostgresUnreachable { .. }
            | Self::StoreUnavailable(_) => ErrorClass::Unavailable,
            _ if self.store_down().is_some() => ErrorClass::Unavailable,
            _ => ErrorClass::Internal,
        }
    }

    /// The store this error says is down, if it says one is: a refusal by
    /// a probe's verdict, or a query that lost its connection or found none
    /// in time. Such a request stored nothing, unless the connection went
    /// during its commit; that window is left to idempotency keys.
    pub(crate) fn store_down(&self) -> Option<&'static str> {
        match self {
            Self::StoreUnavailable(store) => Some(store),
            Self::Postgres(
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_)
                | sqlx::Error::WorkerCrashed,
            ) => Some("postgres"),
            // Class 08 (connection exception) and 57P0x (the server is
            // shutting down or crashed).
            Self::Postgres(sqlx::Error::Database(e))
                if e.code()
                    .is_some_and(|c| c.starts_with("08") || c.starts_with("57P0")) =>
            {
                Some("postgres")
            }
            _ => None,
        }
    }

    /// The gRPC code a client sees for this error.
    pub fn code(&self) -> Code {
        self.class().grpc_code()
    }

    /// The OpenAI `error.code` for this error, where OpenAI defines one.
    fn openai_code(&self) -> Option<&'static str> {
        match self {
            Self::ModelNotFound(_) => Some(openai_code::MODEL_NOT_FOUND),
            Self::ContextLengthExceeded { .. } => Some(openai_code::CONTEXT_LENGTH_EXCEEDED),
            Self::BudgetSpent { .. } => Some(openai_code::INSUFFICIENT_QUOTA),
            Self::ModelNotAllowed { .. } => Some(openai_code::MODEL_NOT_ALLOWED),
            _ => None,
        }
    }
}

impl Error {
    /// The `ErrorDetail.reason` of errors that carry one on gRPC.
    fn reason(&self) -> Option<&'static str> {
        use meridian_proto::error::reason;
        match self {
            Self::JobNotFound(_) => Some(reason::JOB_NOT_FOUND),
            Self::QueueFull { .. } => Some(reason::QUEUE_FULL),
            Self::BudgetSpent { .. } => Some(reason::BUDGET_SPENT),
            Self::Overloaded { .. } | Self::TooManyWatches { .. } => Some(reason::RATE_LIMITED),
            Self::NoHealthyBackend { .. } => Some(reason::NO_HEALTHY_BACKEND),
            Self::IdempotencyKeyReused(_) => Some(reason::IDEMPOTENCY_KEY_REUSED),
            Self::JobAlreadyFinished { .. } => Some(reason::JOB_ALREADY_FINISHED),
            Self::LogTruncated { .. } => Some(reason::REPLICATION_LOG_TRUNCATED),
            Self::SyncTimeout { .. } => Some(reason::SYNC_NOT_CONFIRMED),
            Self::SyncUnavailable => Some(reason::SYNC_UNAVAILABLE),
            _ if self.store_down().is_some() => Some(reason::STORE_UNAVAILABLE),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Self::QueueFull { retry_after, .. } | Self::Overloaded { retry_after, .. } => {
                Some(*retry_after)
            }
            // The gateway retries at once elsewhere; a client that talks to
            // the region itself waits about a probe round.
            _ if self.store_down().is_some() => Some(std::time::Duration::from_secs(1)),
            _ => None,
        }
    }
}

/// The most of an error message a gRPC status carries: the message goes out
/// in a trailer (twice, with the detail), and one that echoes a long client
/// value (a model name) past the peer's header-list limit (16 KiB in hyper)
/// would reach the client as a protocol error instead of the status.
const MAX_STATUS_MESSAGE_BYTES: usize = 1024;

fn status_message(e: &Error) -> String {
    let mut message = e.to_string();
    if message.len() > MAX_STATUS_MESSAGE_BYTES {
        let mut end = MAX_STATUS_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    message
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let message = status_message(&e);
        match e.reason() {
            Some(reason) => {
                let retry_after = e.retry_after();
                let detail = meridian_proto::v1::ErrorDetail {
                    reason: reason.to_string(),
                    message: message.clone(),
                    retryable: retry_after.is_some(),
                    retry_after_ms: retry_after
                        .map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
                    region: String::new(),
                };
                let mut status = meridian_proto::status_with_detail(e.code(), message, detail);
                if let Some(store) = e.store_down() {
                    status.metadata_mut().insert(
                        meridian_proto::header::UNAVAILABLE,
                        tonic::metadata::MetadataValue::from_static(store),
                    );
                }
                status
            }
            None => tonic::Status::new(e.code(), message),
        }
    }
}

impl Error {
    /// The OpenAI error object, for a response body or a last stream event.
    pub(crate) fn openai_body(&self) -> serde_json::Value {
        let param = match self {
            Self::InvalidRequest { param, .. }
            | Self::TooLarge { param, .. }
            | Self::UnknownResponse { param, .. } => *param,
            _ => None,
        };
        serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.class().openai_type(),
                "param": param,
                "code": self.openai_code(),
            }
        })
    }
}

impl Error {
    /// The model (or, for a refused key, the upstream) whose failure this
    /// is, when the failure is its upstreams' rather than this region's.
    fn failed_model(&self) -> Option<&str> {
        match self {
            Self::NoHealthyBackend { model, .. } => Some(model),
            Self::UpstreamRefused { upstream, .. } => Some(upstream),
            _ => None,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.class().http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        // A store that is down is logged once by its probe, not once per
        // request it turns away.
        if status.is_server_error() && self.store_down().is_none() {
            tracing::error!(error = %self, "request failed");
        }
        let mut res = (status, axum::Json(self.openai_body())).into_response();
        if matches!(self, Self::SyncTimeout { .. }) {
            // Stored here, not confirmed elsewhere: the gateway must not
            // replay the request in another region (that would store the
            // turn twice), and the client learns what it got.
            res.headers_mut().insert(
                meridian_proto::header::DURABILITY,
                axum::http::HeaderValue::from_static("local"),
            );
        }
        if matches!(self, Self::BudgetSpent { .. }) {
            // The OpenAI SDKs retry a 429 unless told not to.
            res.headers_mut().insert(
                "x-should-retry",
                axum::http::HeaderValue::from_static("false"),
            );
        }
        if let Some(store) = self.store_down() {
            res.headers_mut().insert(
                meridian_proto::header::UNAVAILABLE,
                axum::http::HeaderValue::from_static(store),
            );
        }
        if let Some(model) = self.failed_model()
            && let Ok(value) = axum::http::HeaderValue::from_str(model)
        {
            res.headers_mut()
                .insert(meridian_proto::header::MODEL_FAILED, value);
        }
        if let Some(after) = self.retry_after() {
            // Whole seconds, rounded up: `Retry-After` has no finer unit.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            res.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.max(1).into());
        }
        res
    }
}

impl From<meridian_proto::config::ConfigError> for Error {
    fn from(e: meridian_proto::config::ConfigError) -> Self {
        Self::Config {
            message: e.message(),
            origin: e.origin,
        }
    }
}
