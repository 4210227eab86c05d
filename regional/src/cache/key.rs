//! Cache keys. A request's exact key hashes the parts of it that decide the
//! answer, in a fixed order, so two requests that differ only in JSON key
//! order, whitespace or fields Meridian does not pass to the model share an
//! entry; the tenant is part of every key, so tenants never share one.

use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::inference::ChatRequest;

/// Bumped when the canonical form changes, so old entries stop matching.
const VERSION: u8 = 1;

/// An exact-cache key: the tenant (kept readable, for purging) and the hash
/// of the canonical request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub tenant: Arc<str>,
    pub hash: [u8; 32],
}

/// What the semantic cache compares: the last user message, within the
/// partition of requests that agree on everything else (tenant, model,
/// parameters and the earlier messages, hashed into `partition`).
#[derive(Debug, Clone)]
pub(crate) struct Query {
    pub partition: [u8; 32],
    pub text: String,
}

#[derive(Serialize)]
struct Canonical<'a> {
    v: u8,
    tenant: &'a str,
    model: &'a str,
    messages: Vec<(&'a str, &'a str)>,
    max_tokens: Option<u32>,
    seed: Option<u64>,
    stop: &'a [String],
    temperature: Option<f32>,
    /// Whether the last message is left out (the semantic partition).
    partition: bool,
}

fn digest(
    req: &ChatRequest,
    tenant: &str,
    messages: Vec<(&str, &str)>,
    partition: bool,
) -> [u8; 32] {
    let canonical = Canonical {
        v: VERSION,
        tenant,
        model: &req.model,
        messages,
        max_tokens: req.max_tokens,
        seed: req.seed,
        stop: &req.stop,
        temperature: req.temperature,
        partition,
    };
    let bytes = serde_json::to_vec(&canonical).expect("plain data serializes");
    Sha256::digest(bytes).into()
}

/// The exact key of `req` (its model already resolved) for `tenant`, and
/// its semantic query when the last message is the user's.
pub(crate) fn keys(tenant: &str, req: &ChatRequest) -> (Key, Option<Query>) {
    let messages = || {
        req.messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
    };
    let key = Key {
        tenant: Arc::from(tenant),
        hash: digest(req, tenant, messages().collect(), false),
    };
    let query = match req.messages.last() {
        Some(last) if last.role == "user" && !last.content.trim().is_empty() => Some(Query {
            partition: digest(
                req,
                tenant,
                messages().take(req.messages.len() - 1).collect(),
                true,
            ),
            text: last.content.clone(),
        }),
        _ => None,
    };
    (key, query)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::Message;

    fn req(messages: &[(&str, &str)]) -> ChatRequest {
        ChatRequest {
            model: "m".into(),
            messages: messages
                .iter()
                .map(|(r, c)| Message {
                    role: (*r).into(),
                    content: (*c).into(),
                })
                .collect(),
            max_tokens: Some(8),
            seed: None,
            stop: vec![],
            temperature: Some(0.0),
        }
    }

    #[test]
    fn every_answer_deciding_part_changes_the_key() {
        let base = req(&[("system", "be brief"), ("user", "hi")]);
        let (k, q) = keys("t", &base);
        assert_eq!(keys("t", &base).0, k);
        assert_ne!(keys("u", &base).0, k, "tenant");
        let mut other = base.clone();
        other.model = "n".into();
        assert_ne!(keys("t", &other).0, k, "model");
        let mut other = base.clone();
        other.max_tokens = Some(9);
        assert_ne!(keys("t", &other).0, k, "max_tokens");
        let mut other = base.clone();
        other.temperature = Some(0.5);
        assert_ne!(keys("t", &other).0, k, "temperature");
        let mut other = base.clone();
        other.stop = vec!["x".into()];
        assert_ne!(keys("t", &other).0, k, "stop");
        let mut other = base.clone();
        other.seed = Some(1);
        assert_ne!(keys("t", &other).0, k, "seed");
        // Moving text between messages is a different conversation.
        assert_ne!(
            keys("t", &req(&[("system", "be"), ("user", "brief hi")])).0,
            k
        );
        let q = q.unwrap();
        assert_eq!(q.text, "hi");
        // The partition ignores the last message and nothing else.
        let paraphrase = req(&[("system", "be brief"), ("user", "hello")]);
        let (pk, pq) = keys("t", &paraphrase);
        assert_ne!(pk, k);
        assert_eq!(pq.unwrap().partition, q.partition);
        assert_ne!(
            keys("t", &req(&[("system", "be long"), ("user", "hi")]))
                .1
                .unwrap()
                .partition,
            q.partition
        );
        assert_ne!(keys("u", &base).1.unwrap().partition, q.partition);
    }

    #[test]
    fn no_semantic_query_unless_the_user_speaks_last() {
        assert!(
            keys("t", &req(&[("user", "hi"), ("assistant", "yo")]))
                .1
                .is_none()
        );
        assert!(keys("t", &req(&[("user", "  ")])).1.is_none());
    }
}
