//! Tool calls and structured output, simulated: a request that offers
//! tools gets calls whose arguments are valid against each tool's JSON
//! schema, and one that asks for `response_format` gets JSON valid against
//! its schema. Deterministic like the text, so agent traffic can be load
//! tested and replayed without a GPU.
//!
//! When the simulator calls: `tool_choice` naming a function calls it;
//! `required` calls; `auto` (the default when tools are offered) calls
//! unless the last message is a tool's result, which it answers in text,
//! so an agent loop of call, result and answer ends. With
//! `parallel_tool_calls` (the default) it calls every offered tool at once,
//! else the first.

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Map, Value, json};

use super::VOCABULARY;
use crate::inference::{ChatRequest, FunctionCall, ToolCall};

/// Nesting past which generated values stop growing, so a recursive
/// schema still ends.
const MAX_DEPTH: usize = 8;

/// What kind of answer a request asks for.
pub(super) enum Shape<'a> {
    Text,
    /// Calls of these tools: name and parameters schema.
    Calls(Vec<(&'a str, &'a Value)>),
    /// A JSON document valid against the schema; any object when `None`.
    Json(Option<&'a Value>),
}

static ANY_OBJECT: Value = Value::Null;

pub(super) fn shape(req: &ChatRequest) -> Shape<'_> {
    let tools: Vec<(&str, &Value)> = req
        .extra
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let f = t.get("function")?;
            Some((
                f.get("name")?.as_str()?,
                f.get("parameters").unwrap_or(&ANY_OBJECT),
            ))
        })
        .collect();
    if !tools.is_empty() {
        let parallel = req
            .extra
            .get("parallel_tool_calls")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let all = if parallel { tools.len() } else { 1 };
        match req.extra.get("tool_choice") {
            Some(Value::String(s)) if s == "none" => {}
            Some(Value::String(s)) if s == "required" => {
                return Shape::Calls(tools[..all].to_vec());
            }
            Some(Value::Object(o)) => {
                let named = o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str);
                if let Some(t) = tools.iter().find(|(name, _)| Some(*name) == named) {
                    return Shape::Calls(vec![*t]);
                }
            }
            _ => {
                let answered = req
                    .messages
                    .last()
                    .is_some_and(|m| m.role == "tool" || m.role == "function");
                if !answered {
                    return Shape::Calls(tools[..all].to_vec());
                }
            }
        }
    }
    match req.extra.get("response_format") {
        Some(f) if f["type"] == "json_schema" => Shape::Json(f["json_schema"].get("schema")),
        Some(f) if f["type"] == "json_object" => Shape::Json(None),
        _ => Shape::Text,
    }
}

/// Calls of `tools`, with ids and arguments drawn from `rng`.
pub(super) fn calls(tools: &[(&str, &Value)], rng: &mut StdRng) -> Vec<ToolCall> {
    tools
        .iter()
        .map(|(name, schema)| ToolCall {
            id: format!("call_{:016x}", rng.random::<u64>()),
            kind: "function".into(),
            function: FunctionCall {
                name: (*name).to_string(),
                arguments: document(schema, rng),
            },
        })
        .collect()
}

/// A JSON text valid against `schema` (an object when there is none).
pub(super) fn document(schema: &Value, rng: &mut StdRng) -> String {
    let value = match schema {
        Value::Null => {
            let mut o = Map::new();
            o.insert("answer".into(), words(rng, 3).into());
            Value::Object(o)
        }
        s => Example { root: s, rng }.of(s, 0),
    };
    value.to_string()
}

fn words(rng: &mut StdRng, n: usize) -> String {
    (0..n)
        .map(|_| VOCABULARY[rng.random_range(0..VOCABULARY.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

struct Example<'a, 'r> {
    root: &'a Value,
    rng: &'r mut StdRng,
}

impl Example<'_, '_> {
    fn of(&mut self, schema: &Value, depth: usize) -> Value {
        let Some(s) = schema.as_object() else {
            // `true` (or any non-object) accepts anything.
            return Value::String(words(self.rng, 1));
        };
        if let Some(target) = s.get("$ref").and_then(Value::as_str) {
            let root = self.root;
            return match resolve(root, target) {
                Some(t) if depth < MAX_DEPTH => self.of(t, depth + 1),
                _ => Value::Null,
            };
        }
        if let Some(c) = s.get("const") {
            return c.clone();
        }
        if let Some(options) = s.get("enum").and_then(Value::as_array)
            && !options.is_empty()
        {
            return options[self.rng.random_range(0..options.len())].clone();
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            if let Some(alternatives) = s.get(key).and_then(Value::as_array) {
                // The first alternative that is not null: a nullable field
                // (`anyOf: [{...}, {type: null}]`) still gets a value.
                let chosen = alternatives
                    .iter()
                    .find(|a| a["type"] != "null")
                    .or(alternatives.first());
                if let Some(a) = chosen {
                    return self.of(a, depth + 1);
                }
            }
        }
        let kind = match s.get("type") {
            Some(Value::String(t)) => t.as_str(),
            Some(Value::Array(ts)) => ts
                .iter()
                .filter_map(Value::as_str)
                .find(|t| *t != "null")
                .unwrap_or("null"),
            _ if s.contains_key("properties") => "object",
            _ if s.contains_key("items") => "array",
            _ => "string",
        };
        match kind {
            "object" => self.object(s, depth),
            "array" => self.array(s, depth),
            "integer" => self.integer(s),
            "number" => self.number(s),
            "boolean" => Value::Bool(self.rng.random()),
            "null" => Value::Null,
            _ => self.string(s),
        }
    }

    fn object(&mut self, s: &Map<String, Value>, depth: usize) -> Value {
        let mut out = Map::new();
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            // Every property: strict schemas require them all, and an
            // optional one present is still valid.
            for (name, p) in props {
                let v = if depth < MAX_DEPTH {
                    self.of(p, depth + 1)
                } else {
                    Value::Null
                };
                out.insert(name.clone(), v);
            }
        }
        Value::Object(out)
    }

    fn array(&mut self, s: &Map<String, Value>, depth: usize) -> Value {
        let min = s.get("minItems").and_then(Value::as_u64).unwrap_or(1);
        let max = s
            .get("maxItems")
            .and_then(Value::as_u64)
            .unwrap_or(3)
            .max(min);
        let n = if depth < MAX_DEPTH {
            self.rng.random_range(min..=max.min(min + 3))
        } else {
            min
        };
        let items = s.get("items").unwrap_or(&Value::Bool(true)).clone();
        Value::Array((0..n).map(|_| self.of(&items, depth + 1)).collect())
    }

    fn integer(&mut self, s: &Map<String, Value>) -> Value {
        let (low, high) = whole_range(s);
        json!(self.rng.random_range(low..=high))
    }

    fn number(&mut self, s: &Map<String, Value>) -> Value {
        let (low, high) = whole_range(s);
        // A half between whole bounds shows a client that reads floats.
        let n = self.rng.random_range(low..=high) as f64;
        json!(if n + 0.5 <= high as f64 { n + 0.5 } else { n })
    }

    fn string(&mut self, s: &Map<String, Value>) -> Value {
        let text = match s.get("format").and_then(Value::as_str) {
            Some("date-time") => "2026-01-01T00:00:00Z".to_string(),
            Some("date") => "2026-01-01".to_string(),
            Some("time") => "12:00:00Z".to_string(),
            Some("email") => format!("{}@example.com", words(self.rng, 1)),
            Some("uri") => format!("https://example.com/{}", words(self.rng, 1)),
            Some("uuid") => uuid::Uuid::from_u128(self.rng.random()).to_string(),
            _ => words(self.rng, 2),
        };
        let min = s.get("minLength").and_then(Value::as_u64).unwrap_or(0) as usize;
        let max = s
            .get("maxLength")
            .and_then(Value::as_u64)
            .map(|m| m as usize);
        let mut text = text;
        while text.chars().count() < min {
            text.push('x');
        }
        if let Some(max) = max {
            text = text.chars().take(max).collect();
        }
        Value::String(text)
    }
}

/// A `#/...` pointer into the root schema (`$defs`, `definitions`).
fn resolve<'a>(root: &'a Value, target: &str) -> Option<&'a Value> {
    root.pointer(target.strip_prefix('#')?)
}

/// Whole numbers within a number schema's bounds (an exclusive bound moved
/// one inward), a hundred wide where a side is open.
fn whole_range(s: &Map<String, Value>) -> (i64, i64) {
    let bound = |inclusive: &str, exclusive: &str, inward: f64| {
        s.get(inclusive)
            .and_then(Value::as_f64)
            .or_else(|| s.get(exclusive).and_then(Value::as_f64).map(|b| b + inward))
    };
    let low = bound("minimum", "exclusiveMinimum", 1.0).map(f64::ceil);
    let high = bound("maximum", "exclusiveMaximum", -1.0).map(f64::floor);
    let (low, high) = match (low, high) {
        (Some(l), Some(h)) => (l, h.max(l)),
        (Some(l), None) => (l, l + 100.0),
        (None, Some(h)) => (h - 100.0, h),
        (None, None) => (0.0, 100.0),
    };
    (low as i64, high as i64)
}
