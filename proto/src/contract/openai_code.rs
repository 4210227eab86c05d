//! Values of the OpenAI error object's `code` field that Meridian sends;
//! the `type` comes from [`ErrorClass`](super::ErrorClass).

/// No API key, or one that is not valid.
pub const INVALID_API_KEY: &str = "invalid_api_key";
/// The gateway has not loaded the API keys yet.
pub const KEYS_UNAVAILABLE: &str = "keys_unavailable";
/// A tenant's requests or tokens limit refused the request.
pub const RATE_LIMIT_EXCEEDED: &str = "rate_limit_exceeded";
/// The request names a model the region does not serve.
pub const MODEL_NOT_FOUND: &str = "model_not_found";
/// The prompt (and `max_tokens`) does not fit the model's context window.
pub const CONTEXT_LENGTH_EXCEEDED: &str = "context_length_exceeded";
/// The region's mesh policy refused the calling identity.
pub const MESH_POLICY_DENIED: &str = "mesh_policy_denied";
/// A request's token estimate is above its tenant's whole tokens-per-minute
/// limit: no wait would let it through.
pub const REQUEST_TOO_LARGE: &str = "request_too_large";
/// A tenant's budget for the period is spent (OpenAI's code for a spent
/// quota).
pub const INSUFFICIENT_QUOTA: &str = "insufficient_quota";
/// The caller's key or tenant may not use the model it named.
pub const MODEL_NOT_ALLOWED: &str = "model_not_allowed";
/// The management API's operator token is missing where one is needed,
/// unknown, revoked or expired.
pub const INVALID_OPERATOR_TOKEN: &str = "invalid_operator_token";
