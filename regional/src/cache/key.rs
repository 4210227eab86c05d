//! Cache keys. A request's exact key hashes the parts of it that decide the
//! answer, in a fixed order, so two requests that differ only in JSON key
//! order, whitespace or fields Meridian does not pass to the model share an
//! entry; the tenant is part of every key, so tenants never share one.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::inference::ChatRequest;

/// Bumped when the canonical form changes, so old entries stop matching.
const VERSION: u8 = 2;

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
    /// Role, text, and the whole message when it carries more (parts, tool
    /// calls): an image changes the answer though the text stays the same.
    messages: Vec<Entry<'a>>,
    max_tokens: Option<u32>,
    max_completion_tokens: bool,
    seed: Option<u64>,
    stop: &'a [String],
    temperature: Option<f32>,
    /// Every passed-through field (`tools`, `response_format`, ...): they
    /// change the answer. A map with sorted keys, so their order in the
    /// request does not matter.
    extra: &'a Map<String, Value>,
    /// Whether the last message is left out (the semantic partition).
    partition: bool,
}

type Entry<'a> = (&'a str, &'a str, Option<&'a Map<String, Value>>);

fn digest(req: &ChatRequest, tenant: &str, messages: Vec<Entry<'_>>, partition: bool) -> [u8; 32] {
    let canonical = Canonical {
        v: VERSION,
        tenant,
        model: &req.model,
        messages,
        max_tokens: req.max_tokens,
        max_completion_tokens: req.max_completion_tokens,
        seed: req.seed,
        stop: &req.stop,
        temperature: req.temperature,
        extra: &req.extra,
        partition,
    };
    let bytes = serde_json::to_vec(&canonical).expect("plain data serializes");
    Sha256::digest(bytes).into()
}

/// The exact key of `req` (its model already resolved) for `tenant`, and
/// its semantic query when the last message is the user's and only text
/// (two questions with the same words about different images are not
/// alike).
pub(crate) fn keys(tenant: &str, req: &ChatRequest) -> (Key, Option<Query>) {
    let messages = || {
        req.messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str(), m.raw.as_deref()))
    };
    let key = Key {
        tenant: Arc::from(tenant),
        hash: digest(req, tenant, messages().collect(), false),
    };
    let query = match req.messages.last() {
        Some(last)
            if last.role == "user" && last.raw.is_none() && !last.content.trim().is_empty() =>
        {
            Some(Query {
                partition: digest(
                    req,
                    tenant,
                    messages().take(req.messages.len() - 1).collect(),
                    true,
                ),
                text: last.content.clone(),
            })
        }
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
                .map(|(r, c)| Message::text(*r, *c))
                .collect(),
            max_tokens: Some(8),
            max_completion_tokens: false,
            seed: None,
            stop: vec![],
            temperature: Some(0.0),
            extra: Arc::default(),
        }
    }

    fn with_extra(base: &ChatRequest, extra: serde_json::Value) -> ChatRequest {
        let serde_json::Value::Object(extra) = extra else {
            unreachable!()
        };
        ChatRequest {
            extra: Arc::new(extra),
            ..base.clone()
        }
    }

    #[test]
    fn passed_through_fields_change_the_key_but_not_their_order() {
        use serde_json::json;
        let base = req(&[("user", "weather in Oslo?")]);
        let tool = |name: &str| json!([{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}]);
        let a = with_extra(
            &base,
            json!({"tools": tool("get_weather"), "tool_choice": "auto"}),
        );
        let b = with_extra(
            &base,
            json!({"tools": tool("get_forecast"), "tool_choice": "auto"}),
        );
        let (ka, qa) = keys("t", &a);
        let (kb, qb) = keys("t", &b);
        assert_ne!(ka, kb, "tools");
        assert_ne!(
            qa.unwrap().partition,
            qb.unwrap().partition,
            "tools, semantic partition"
        );
        assert_ne!(keys("t", &base).0, ka, "tools against none");
        let json_mode = with_extra(&base, json!({"response_format": {"type": "json_object"}}));
        let schema = with_extra(
            &base,
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}}}),
        );
        assert_ne!(
            keys("t", &json_mode).0,
            keys("t", &schema).0,
            "response_format"
        );
        // The same fields in another order are the same request.
        let reordered: serde_json::Value =
            serde_json::from_str(r#"{"tool_choice": "auto", "tools": [{"function": {"parameters": {"type": "object"}, "name": "get_weather"}, "type": "function"}]}"#).unwrap();
        assert_eq!(keys("t", &with_extra(&base, reordered)).0, ka);
    }

    #[test]
    fn an_image_changes_the_key_and_leaves_the_semantic_cache() {
        use serde_json::json;
        let image = |url: &str| {
            let serde_json::Value::Object(m) = json!({"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": url}}]})
            else {
                unreachable!()
            };
            Message {
                raw: Some(Arc::new(m)),
                ..Message::text("user", "what is this?")
            }
        };
        let mut a = req(&[]);
        a.messages = vec![image("https://example.com/cat.png")];
        let mut b = a.clone();
        b.messages = vec![image("https://example.com/dog.png")];
        let (ka, qa) = keys("t", &a);
        assert_ne!(ka, keys("t", &b).0);
        assert!(
            qa.is_none(),
            "no semantic match on the text of a question about an image"
        );
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
