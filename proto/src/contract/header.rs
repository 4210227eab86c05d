//! Header names (and gRPC metadata keys) Meridian reads or writes. HTTP
//! header names are case-insensitive; these are the lowercase forms that
//! HTTP/2 and gRPC metadata require.

/// Request header naming the tenant a request acts for. Only the gateway
/// sets it towards regions (whatever a client sends is discarded); a region
/// treats a request without it as the [`DEFAULT_TENANT`](super::DEFAULT_TENANT)'s.
pub const TENANT: &str = "x-meridian-tenant";
/// The models (or route names) the caller's key and tenant may use,
/// comma-separated, as the gateway sets it from the key; absent: any. Only
/// gateways may set it, as [`TENANT`].
pub const ALLOWED_MODELS: &str = "x-meridian-allowed-models";
/// The id of the API key a request came with, as the gateway sets it.
/// Only gateways may set it, as [`TENANT`].
pub const KEY_ID: &str = "x-meridian-key-id";

/// Request header pinning a request to a region, and the response header in
/// which the gateway names the region it chose.
pub const REGION: &str = "x-meridian-region";

/// Response header saying why the gateway chose the region: `pin`,
/// `affinity`, `nearest`, `default` or `failover`.
pub const ROUTE: &str = "x-meridian-route";

/// Request header naming a session: requests of one session go to the same
/// region while it is healthy.
pub const SESSION: &str = "x-meridian-session";

/// Request header naming a conversation: the gateway routes its turns to the
/// region that stores them (an affinity key preferred to [`SESSION`]), and
/// the region loads and stores the conversation's history under it.
pub const CONVERSATION: &str = "x-meridian-conversation";

/// Response header naming the region (and node) that answered, set by the
/// region itself.
pub const SERVED_BY: &str = "x-meridian-served-by";

/// Request header asking for a durability of a stored turn (`local`,
/// `async`, `sync`), and the response header reporting the one reached. A
/// response that carries it stored a write: the gateway must not replay it
/// in another region.
pub const DURABILITY: &str = "x-meridian-durability";

/// Request header opting in or out of the response cache, and the response
/// header reporting what the cache did (`hit`, `miss`, ...).
pub const CACHE: &str = "x-meridian-cache";

/// Response header in which a region reports the tokens (prompt and
/// completion) a request used; the gateway corrects its rate-limit estimate
/// with it and removes it before the client sees the response.
///
/// A streamed answer knows its usage only at its end: it reports it in a
/// trailer of this name (HTTP/2), and [`PROMPT_TOKENS`] and [`MAX_TOKENS`] in
/// its head.
pub const USAGE_TOKENS: &str = "x-meridian-usage-tokens";

/// Response header, at the head of an answer whose usage comes later (a
/// stream, a queued job): the prompt's tokens as the region counted them,
/// conversation history included. The gateway charges them with
/// [`MAX_TOKENS`] (or its default completion charge) at once, whatever it
/// could read of the request itself.
pub const PROMPT_TOKENS: &str = "x-meridian-prompt-tokens";

/// Response header beside [`PROMPT_TOKENS`]: the completion tokens the
/// request may use (`max_tokens`), when it set a limit.
pub const MAX_TOKENS: &str = "x-meridian-max-tokens";

/// Request header with the client's country (ISO 3166 alpha-2), trusted only
/// from peers the gateway's `[geo]` config trusts.
pub const CLIENT_COUNTRY: &str = "x-meridian-client-country";

/// Request header with the client's position as `lat,lon`, trusted like
/// [`CLIENT_COUNTRY`].
pub const CLIENT_GEO: &str = "x-meridian-client-geo";

/// Request header with the request's deadline in milliseconds (gRPC uses
/// `grpc-timeout`).
pub const TIMEOUT_MS: &str = "x-meridian-timeout-ms";

/// Request header with the client's own view of which backend should serve.
pub const ROUTING_HINT: &str = "x-meridian-routing-hint";

/// Response header (and gRPC metadata) naming the model that answered.
pub const MODEL: &str = "x-meridian-model";

/// Response header (and gRPC metadata) present when a fallback model
/// answered instead of the one the request was routed to:
/// `from=<model>; reason=<context_window|unavailable|refused>`;
/// [`MODEL`] names the model that answered.
pub const FALLBACK: &str = "x-meridian-fallback";

/// Seconds to wait before retrying a refused request (RFC 9110).
pub const RETRY_AFTER: &str = "retry-after";

/// Requests per second the tenant may send, as OpenAI names it.
pub const RATELIMIT_LIMIT_REQUESTS: &str = "x-ratelimit-limit-requests";
/// Requests the tenant may still send at once.
pub const RATELIMIT_REMAINING_REQUESTS: &str = "x-ratelimit-remaining-requests";
/// Time until the requests limit is fully replenished (`120ms`, `1s`, ...).
pub const RATELIMIT_RESET_REQUESTS: &str = "x-ratelimit-reset-requests";
/// Tokens per minute the tenant may use.
pub const RATELIMIT_LIMIT_TOKENS: &str = "x-ratelimit-limit-tokens";
/// Tokens the tenant may still use at once.
pub const RATELIMIT_REMAINING_TOKENS: &str = "x-ratelimit-remaining-tokens";
/// Time until the tokens limit is fully replenished.
pub const RATELIMIT_RESET_TOKENS: &str = "x-ratelimit-reset-tokens";

/// Request header (and gRPC metadata key) naming a write so that repeating
/// it stores it once: a job submission or a conversation turn. The gateway
/// replays a write in another region after its bytes may have reached the
/// first only when it carries one.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Response header (and gRPC metadata) the gateway sets to `no` on an error
/// after a try whose write may have reached a region: the request was not
/// tried again elsewhere, and may or may not have been stored.
pub const REPLAYED: &str = "x-meridian-replayed";

/// Response header on a refusal (HTTP 503, gRPC `UNAVAILABLE`) naming the
/// store of the region the request needs and that is down now: `postgres`
/// or `redis`. The region stored nothing of the request, so the gateway
/// replays it in another region, and keeps sending the region what does not
/// need that store.
pub const UNAVAILABLE: &str = "x-meridian-unavailable";

/// Response header on an error (HTTP 502 or 503) whose cause is a model's
/// upstreams, not the region: none healthy, or they refused the region's
/// credentials. Its value is the model. The region itself is fine and
/// serves its other models, so the gateway counts the answer against no
/// region; a 503 is replayed in another region, whose upstreams may answer.
pub const MODEL_FAILED: &str = "x-meridian-model-failed";

/// Response header of the management API's reads: how far behind each peer
/// region this region's answer may be, as `peer=milliseconds` pairs
/// (`peer=unknown` until the region has caught up with the peer since it
/// started). A write made in another region within that time may be
/// missing from the answer.
pub const REPLICATION_BEHIND: &str = "x-meridian-replication-behind";
