//! The client side of Anthropic's Messages API: an OpenAI chat request
//! translated into a Messages body ([`request_body`]), and the upstream's
//! events read back into [`Chunk`](super::Chunk)s ([`chunks`]). The
//! simulator's Anthropic server uses the same vocabulary the other way
//! round. What a Messages API cannot carry is refused by name: nothing is
//! dropped on the way.

mod request;
mod stream;

pub(super) use self::request::request_body;
pub(super) use self::stream::chunks;

use super::Finish;

/// What the refusals name as the upstream's protocol.
pub(crate) const PROTOCOL: &str = "the Anthropic Messages API";

/// Anthropic's `stop_reason` as an OpenAI finish reason. `pause_turn`
/// (a server tool paused) ends the answer like `end_turn`; an unknown
/// reason is a stop.
pub(crate) fn finish(stop_reason: &str) -> Finish {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => Finish::Length,
        "tool_use" => Finish::ToolCalls,
        "refusal" => Finish::ContentFilter,
        _ => Finish::Stop,
    }
}

/// The `stop_reason` of a finish reason, for the simulator's answers.
pub(crate) fn stop_reason(finish: Finish) -> &'static str {
    match finish {
        Finish::Stop => "end_turn",
        Finish::Length => "max_tokens",
        Finish::ToolCalls | Finish::FunctionCall => "tool_use",
        Finish::ContentFilter => "refusal",
    }
}
