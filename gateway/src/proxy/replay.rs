//! Whether a request may be replayed in another region once its bytes may
//! have reached the first: a read timeout, a reset after sending, a write
//! that failed mid-body. The first region may then have stored the write
//! (a job, a conversation turn), and a replay would store it twice. A write
//! is replayed only when it carries an `Idempotency-Key`, which regions
//! honour for exactly these writes; everything else stores nothing or
//! ignores its own duplicates and is replayed as before.
//!
//! See `docs/ARCHITECTURE.md` (Failover and the retry budget).

use bytes::Bytes;
use http::Method;
use meridian_proto::header::{CONVERSATION, IDEMPOTENCY_KEY};
use pingora_http::RequestHeader;

/// Calls and routes that store nothing, or whose duplicates the region
/// drops by key (telemetry readings), whatever their method.
const NO_WRITE: &[&str] = &[
    "/v1/embeddings",
    "/v1/moderations",
    "/v1/telemetry",
    "/meridian.v1.Inference/Embed",
    "/meridian.v1.Inference/ListModels",
    "/meridian.v1.Telemetry/Ingest",
    "/meridian.v1.Telemetry/Query",
    "/meridian.v1.Jobs/Get",
    "/meridian.v1.Jobs/Watch",
    // Cancelling twice leaves the job as cancelling once does.
    "/meridian.v1.Jobs/Cancel",
];

/// Inference that stores a turn only when it names a conversation.
const HTTP_TURNS: &[&str] = &["/v1/chat/completions", "/v1/completions"];
const GRPC_TURNS: &[&str] = &[
    "/meridian.v1.Inference/Generate",
    "/meridian.v1.Inference/GenerateStream",
];

/// Whether `req` may store something a replay would store again. `body` is
/// what the retry buffer holds of the request body (the whole of it, or
/// the replay is refused anyway); the conversation a chat names in its body
/// is read from it, which costs only on this, the failure path.
pub(super) fn stores_without_key(req: &RequestHeader, body: Option<&Bytes>) -> bool {
    if matches!(req.method, Method::GET | Method::HEAD | Method::OPTIONS)
        // Cancelling a job (`DELETE /v1/jobs/{id}`) twice cancels it once.
        || req.method == Method::DELETE
    {
        return false;
    }
    if req
        .headers
        .get(IDEMPOTENCY_KEY)
        .is_some_and(|v| !v.is_empty())
    {
        return false;
    }
    let path = req.uri.path();
    if NO_WRITE.contains(&path) {
        return false;
    }
    let turn = HTTP_TURNS.contains(&path) || GRPC_TURNS.contains(&path);
    if !turn {
        // Job submission, and any route added later until it says otherwise.
        return true;
    }
    if req.headers.get(CONVERSATION).is_some_and(|v| !v.is_empty()) {
        return true;
    }
    let Some(body) = body else {
        return true;
    };
    if GRPC_TURNS.contains(&path) {
        grpc_names_conversation(body)
    } else {
        json_names_conversation(body)
    }
}

/// Whether a chat body names a conversation in `conversation_id`; a body
/// that does not parse may name one.
fn json_names_conversation(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(default)]
        conversation_id: Option<String>,
    }
    match serde_json::from_slice::<Probe>(body) {
        Ok(p) => p.conversation_id.is_some_and(|c| !c.is_empty()),
        Err(_) => true,
    }
}

/// Whether a gRPC `GenerateRequest` (one length-prefixed, uncompressed
/// message) names a conversation; anything else may name one.
fn grpc_names_conversation(body: &[u8]) -> bool {
    use prost::Message;
    let Some((&[0, a, b, c, d], message)) = body.split_first_chunk::<5>() else {
        return true;
    };
    if u32::from_be_bytes([a, b, c, d]) as usize != message.len() {
        return true;
    }
    match meridian_proto::v1::GenerateRequest::decode(message) {
        Ok(req) => !req.conversation_id.is_empty(),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, path.as_bytes(), None).unwrap();
        for (n, v) in headers {
            r.insert_header(n.to_string(), *v).unwrap();
        }
        r
    }

    fn frame(conversation: &str) -> Bytes {
        let msg = meridian_proto::v1::GenerateRequest {
            conversation_id: conversation.into(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        out.extend_from_slice(&msg);
        out.into()
    }

    #[test]
    fn writes_without_a_key_are_not_replayed() {
        let chat = Bytes::from_static(br#"{"model":"m","messages":[]}"#);
        let turn = Bytes::from_static(br#"{"model":"m","conversation_id":"c"}"#);
        assert!(stores_without_key(&req("POST", "/v1/jobs", &[]), None));
        assert!(!stores_without_key(
            &req("POST", "/v1/jobs", &[("idempotency-key", "k")]),
            None
        ));
        assert!(!stores_without_key(&req("GET", "/v1/jobs/x", &[]), None));
        assert!(!stores_without_key(
            &req("POST", "/v1/telemetry", &[]),
            None
        ));
        let chat_path = "/v1/chat/completions";
        assert!(!stores_without_key(
            &req("POST", chat_path, &[]),
            Some(&chat)
        ));
        assert!(stores_without_key(
            &req("POST", chat_path, &[]),
            Some(&turn)
        ));
        assert!(stores_without_key(&req("POST", chat_path, &[]), None));
        let named = req("POST", chat_path, &[("x-meridian-conversation", "c")]);
        assert!(stores_without_key(&named, Some(&chat)));
        let generate = "/meridian.v1.Inference/Generate";
        assert!(!stores_without_key(
            &req("POST", generate, &[]),
            Some(&frame(""))
        ));
        assert!(stores_without_key(
            &req("POST", generate, &[]),
            Some(&frame("c"))
        ));
        assert!(stores_without_key(
            &req("POST", "/meridian.v1.Jobs/Submit", &[]),
            None
        ));
    }
}
