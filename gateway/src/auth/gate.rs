//! The proxy's gate: who is calling (API key → tenant) and whether the
//! tenant's limits let the request through, before any region is involved;
//! then what the region is told (`x-meridian-tenant`, never the key) and what
//! the client is told (`x-ratelimit-*`).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, header};
use meridian_proto::ErrorClass;
use meridian_proto::api_key::{OPERATOR_TOKEN_PREFIX, bearer};
use meridian_proto::contract::openai_code;
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

use super::{Auth, Key, KeyLoader, Refusal, TENANT_HEADER, Tenant};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::ratelimit::{self, Decision, Limiter, SCAN_BODY_LIMIT};
use crate::respond::ErrorReply;
use meridian_proto::header::{ALLOWED_MODELS, KEY_ID, MAX_TOKENS, PROMPT_TOKENS, USAGE_TOKENS};

/// Paths open without a key: health checks and server reflection.
const OPEN_PREFIXES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The management API, which operators reach through a gateway with an
/// operator token, over HTTP and gRPC; the region checks the token.
pub(crate) const OPERATOR_API: &str = "/admin/v1/";
pub(crate) const OPERATOR_GRPC: &str = "/meridian.v1.Admin/";

/// Whether `path` is the management API, which the gate admits with an
/// operator token.
pub(crate) fn is_management(path: &str) -> bool {
    path.starts_with(OPERATOR_API) || path.starts_with(OPERATOR_GRPC)
}

/// What the gate decided for one request.
#[derive(Default)]
pub(crate) struct Admitted {
    /// None on open paths.
    tenant: Option<Arc<Tenant>>,
    /// The key the request came with; None on open paths.
    key: Option<Arc<Key>>,
    /// None when the tenant has no limits.
    decision: Option<Decision>,
    /// Tokens charged so far: the estimate, then what the region reported.
    charged: u64,
    /// The answer may be a stream, whose usage comes in a trailer: HTTP/2
    /// to the region, whatever `http_upstream` says (HTTP/1.1 has no
    /// trailers through Pingora).
    usage_in_trailers: bool,
    /// A management call with an operator token, which goes to the region
    /// as it came (no tenant, no limits).
    operator: bool,
}

impl Admitted {
    /// The tenant's id; `None` on open paths and when auth is off.
    pub(crate) fn tenant(&self) -> Option<&str> {
        self.tenant.as_ref().map(|t| &*t.id)
    }

    /// The regions the tenant may be served in, when it is bound to some.
    pub(crate) fn allowed_regions(&self) -> Option<&[String]> {
        self.tenant.as_ref()?.allowed_regions.as_deref()
    }

    /// Whether the region's report of usage may come in a trailer.
    pub(crate) fn usage_in_trailers(&self) -> bool {
        self.usage_in_trailers
    }
}

pub(crate) struct Gate {
    auth: Auth,
    limiter: Limiter,
    metrics: Arc<Metrics>,
}

impl Gate {
    pub(crate) fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Self, String> {
        Ok(Self {
            auth: Auth::new(config.auth.as_ref(), &config.rate_limit),
            limiter: Limiter::new(&config.rate_limit, metrics.clone())?,
            metrics,
        })
    }

    /// The background service reloading API keys, when auth is on.
    pub(crate) fn key_loader(&self) -> Option<KeyLoader> {
        self.auth.loader()
    }

    /// Authenticates and rate-limits a request. `None`: the gate answered
    /// (401, 429, 503) and the request goes no further.
    pub(crate) async fn admit(
        &self,
        session: &mut Session,
        grpc: bool,
    ) -> Result<Option<Admitted>> {
        let req = session.req_header();
        let path = req.uri.path();
        if OPEN_PREFIXES.iter().any(|p| path.starts_with(p)) {
            return Ok(Some(Admitted::default()));
        }
        if is_management(path) {
            return self.admit_operator(session, grpc).await;
        }
        let digest = Auth::digest(
            req.headers
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes),
        );
        let key = match self.auth.authenticate(digest).await {
            Ok(key) => key,
            Err(refusal) => {
                self.metrics
                    .auth_failures
                    .with_label_values(&[refusal.as_str()])
                    .inc();
                let (class, code, message) = match refusal {
                    Refusal::Missing => (
                        ErrorClass::InvalidApiKey,
                        openai_code::INVALID_API_KEY,
                        "You didn't provide an API key. Send it as `Authorization: Bearer <key>` \
                         (gRPC: `authorization` metadata).",
                    ),
                    Refusal::Invalid => (
                        ErrorClass::InvalidApiKey,
                        openai_code::INVALID_API_KEY,
                        "Incorrect API key provided.",
                    ),
                    Refusal::NotLoaded => (
                        ErrorClass::Unavailable,
                        openai_code::KEYS_UNAVAILABLE,
                        "API keys are not loaded yet; try again shortly.",
                    ),
                    Refusal::Expired => (
                        ErrorClass::InvalidApiKey,
                        openai_code::INVALID_API_KEY,
                        "This API key has expired: ask for a new one (a rotated key works \
                         only until its grace period ends).",
                    ),
                };
                ErrorReply {
                    code: Some(code),
                    ..ErrorReply::new(class, message)
                }
                .send(session, grpc)
                .await?;
                return Ok(None);
            }
        };
        let tenant = key.tenant.clone();
        if !Limiter::applies(&tenant.limits) {
            return Ok(Some(Admitted {
                tenant: Some(tenant),
                key: Some(key),
                ..Admitted::default()
            }));
        }
        let (tokens, usage_in_trailers) = if Limiter::counts_tokens(&tenant.limits) {
            let (tokens, scan) = self.estimate_tokens(session, grpc).await?;
            let req = session.req_header();
            // Chat and text completions are the answers that stream; a body
            // not read may be one.
            let may_stream = !grpc
                && req.method == Method::POST
                && req.uri.path().ends_with("/completions")
                && scan.is_none_or(|s| s.stream);
            (tokens, may_stream)
        } else {
            (0, false)
        };
        if let Some(limit) = tenant.limits.tokens_per_minute
            && tokens > limit
        {
            // No wait lets it through, so a 429 would have clients retry
            // it for ever: refused as a bad request, naming what to lower.
            self.metrics
                .rate_limited
                .with_label_values(&[&*tenant.id, ratelimit::Kind::Tokens.as_str()])
                .inc();
            let message = format!(
                "Request too large for tenant {}: it may use about {tokens} tokens (its prompt \
                 and `max_tokens`), more than the whole limit of {limit} tokens per minute, so \
                 it can never be served. Lower `max_tokens` or shorten the prompt.",
                tenant.id
            );
            ErrorReply {
                code: Some(openai_code::REQUEST_TOO_LARGE),
                ..ErrorReply::new(ErrorClass::InvalidRequest, &message)
            }
            .send(session, grpc)
            .await?;
            return Ok(None);
        }
        let decision = self.limiter.check(&tenant.id, &tenant.limits, tokens).await;
        if let Some(kind) = decision.rejected {
            self.metrics
                .rate_limited
                .with_label_values(&[&*tenant.id, kind.as_str()])
                .inc();
            let retry_after = decision.retry_after_us.div_ceil(1_000_000).max(1);
            let mut extra: Vec<(&'static str, HeaderValue)> = Vec::with_capacity(7);
            extra.push((
                meridian_proto::header::RETRY_AFTER,
                HeaderValue::from(retry_after),
            ));
            extra.extend(ratelimit::headers(&decision));
            let message = match kind {
                ratelimit::Kind::Requests => format!(
                    "Rate limit reached for requests of tenant {}: limit {} per second. \
                     Please try again in {}.",
                    tenant.id,
                    tenant.limits.requests_per_second.unwrap_or_default(),
                    ratelimit::duration_text(decision.retry_after_us),
                ),
                ratelimit::Kind::Tokens => format!(
                    "Rate limit reached for tokens of tenant {}: limit {} per minute, \
                     requested about {}. Please try again in {}.",
                    tenant.id,
                    tenant.limits.tokens_per_minute.unwrap_or_default(),
                    tokens,
                    ratelimit::duration_text(decision.retry_after_us),
                ),
            };
            ErrorReply {
                code: Some(openai_code::RATE_LIMIT_EXCEEDED),
                headers: &extra,
                ..ErrorReply::new(kind.class(), &message)
            }
            .send(session, grpc)
            .await?;
            return Ok(None);
        }
        Ok(Some(Admitted {
            tenant: Some(tenant),
            key: Some(key),
            charged: decision.tokens,
            decision: Some(decision),
            usage_in_trailers,
            operator: false,
        }))
    }

    /// Tokens to charge before the region reports usage: a quarter of the
    /// body's length plus `max_tokens`, and what was read of the body. Small
    /// JSON bodies are read here to find `max_tokens` (Pingora's retry
    /// buffer then replays them upstream); gRPC, chunked and large bodies
    /// are not read (a partial read could outgrow that buffer), and are
    /// charged their real shape when the region reports it, at the head of
    /// the answer.
    async fn estimate_tokens(
        &self,
        session: &mut Session,
        grpc: bool,
    ) -> Result<(u64, Option<ratelimit::Scan>)> {
        let length = session
            .req_header()
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let mut scan = None;
        if !grpc && length.is_some_and(|l| l > 0 && l <= SCAN_BODY_LIMIT as u64) {
            let downstream = session.as_downstream_mut();
            downstream.enable_retry_buffering();
            // Usually one chunk: scanned in place, copied only when split.
            let mut first: Option<Bytes> = None;
            let mut joined: Vec<u8> = Vec::new();
            while let Some(chunk) = downstream.read_request_body().await? {
                if first.is_none() && joined.is_empty() {
                    first = Some(chunk);
                } else {
                    if let Some(f) = first.take() {
                        joined.extend_from_slice(&f);
                    }
                    joined.extend_from_slice(&chunk);
                }
            }
            scan = Some(ratelimit::scan(first.as_deref().unwrap_or(&joined)));
        }
        let tokens = ratelimit::estimate(
            length,
            scan.and_then(|s| s.max_tokens),
            self.limiter.default_completion_tokens,
        );
        Ok((tokens, scan))
    }

    /// A management call: it must carry an operator token, which the
    /// region checks (gateways hold no operator secrets); an API key is
    /// refused here, before any region sees it.
    async fn admit_operator(&self, session: &mut Session, grpc: bool) -> Result<Option<Admitted>> {
        let has_token = session
            .req_header()
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()))
            .is_some_and(|t| t.starts_with(OPERATOR_TOKEN_PREFIX.as_bytes()));
        if has_token {
            return Ok(Some(Admitted {
                operator: true,
                ..Admitted::default()
            }));
        }
        self.metrics
            .auth_failures
            .with_label_values(&["operator_token"])
            .inc();
        ErrorReply {
            code: Some(openai_code::INVALID_OPERATOR_TOKEN),
            ..ErrorReply::new(
                ErrorClass::Unauthenticated,
                &format!(
                    "the management API ({OPERATOR_API}, meridian.v1.Admin) takes an operator \
                     token: `Authorization: Bearer {OPERATOR_TOKEN_PREFIX}...` (made with POST \
                     /admin/v1/operator-tokens); API keys may not call it"
                ),
            )
        }
        .send(session, grpc)
        .await?;
        Ok(None)
    }

    /// The request to the region: the tenant the gateway established, never
    /// the client's own claim, and never the key.
    pub(crate) fn upstream_request(
        &self,
        admitted: &Admitted,
        request: &mut RequestHeader,
    ) -> Result<()> {
        if !admitted.operator {
            request.remove_header(&header::AUTHORIZATION);
        }
        request.remove_header(TENANT_HEADER);
        request.remove_header(ALLOWED_MODELS);
        request.remove_header(KEY_ID);
        if self.auth.enabled()
            && let Some(key) = &admitted.key
        {
            request.insert_header(TENANT_HEADER, key.tenant.header.clone())?;
            if let Some(models) = &key.models {
                request.insert_header(ALLOWED_MODELS, models.clone())?;
            }
            if let Some(id) = &key.id {
                request.insert_header(KEY_ID, id.clone())?;
            }
        }
        Ok(())
    }

    /// The response to the client: `x-ratelimit-*`, and the charge
    /// corrected from what the region reported in the head of its answer:
    /// the usage of a whole answer, or the prompt and `max_tokens` of one
    /// whose usage comes later (see [`Gate::trailers`]).
    pub(crate) fn response(
        &self,
        admitted: &mut Admitted,
        response: &mut ResponseHeader,
    ) -> Result<()> {
        let number = |name: &str| {
            response
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        let used = number(USAGE_TOKENS);
        let shape = number(PROMPT_TOKENS).map(|prompt| {
            prompt.saturating_add(
                number(MAX_TOKENS).unwrap_or(self.limiter.default_completion_tokens),
            )
        });
        for name in [USAGE_TOKENS, PROMPT_TOKENS, MAX_TOKENS] {
            response.remove_header(name);
        }
        let Some(decision) = &admitted.decision else {
            return Ok(());
        };
        for (name, value) in ratelimit::headers(decision) {
            response.insert_header(name, value)?;
        }
        if let Some(tokens) = used.or(shape) {
            self.charge(admitted, tokens);
        }
        Ok(())
    }

    /// The trailers of a streamed answer: its usage, now known, replaces
    /// what its head charged. The client does not see it.
    pub(crate) fn trailers(&self, admitted: &mut Admitted, trailers: &mut HeaderMap) {
        let Some(used) = trailers.remove(USAGE_TOKENS) else {
            return;
        };
        if admitted.decision.is_some()
            && let Some(used) = used.to_str().ok().and_then(|v| v.parse::<u64>().ok())
        {
            self.charge(admitted, used);
        }
    }

    /// Makes `tokens` the request's charge, from what it was charged so far.
    fn charge(&self, admitted: &mut Admitted, tokens: u64) {
        let Some(tenant) = &admitted.tenant else {
            return;
        };
        if !Limiter::counts_tokens(&tenant.limits) {
            return;
        }
        let delta = i64::try_from(tokens).unwrap_or(i64::MAX)
            - i64::try_from(admitted.charged).unwrap_or(i64::MAX);
        admitted.charged = tokens;
        self.limiter
            .adjust_tokens(&tenant.id, &tenant.limits, delta);
    }
}
