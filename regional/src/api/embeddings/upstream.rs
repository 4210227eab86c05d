//! Embeddings from an upstream model (`task = "embeddings"`): the client's
//! body checked for what any model refuses, then sent on with every field
//! the upstream understands; its answer returned as it wrote it, under the
//! model id the client asked for.

use serde_json::{Map, Value};

use crate::error::Error;
use crate::inference::{EmbedCall, EmbedPool, Usage};

/// The call for the client's `body`: its inputs (texts, or token ids as
/// OpenAI takes them) and every other field but `model`.
pub(super) fn call(mut body: Map<String, Value>, model: &EmbedPool) -> Result<EmbedCall, Error> {
    body.remove("model");
    let input = body
        .remove("input")
        .ok_or_else(|| Error::invalid("`input` is required", Some("input")))?;
    let inputs = match input {
        Value::String(s) => vec![Value::String(s)],
        // One list of token ids is one input.
        Value::Array(ids) if !ids.is_empty() && ids.iter().all(Value::is_u64) => {
            vec![Value::Array(ids)]
        }
        Value::Array(items) => items,
        _ => return Err(shape()),
    };
    if inputs.is_empty() {
        return Err(Error::invalid(
            "`input` must contain at least one text",
            Some("input"),
        ));
    }
    if inputs.len() > model.max_inputs() {
        return Err(Error::invalid(
            format!(
                "`input` has {} texts; at most {} are allowed in one request",
                inputs.len(),
                model.max_inputs()
            ),
            Some("input"),
        ));
    }
    for (i, input) in inputs.iter().enumerate() {
        match input {
            Value::String(s) if s.is_empty() => {
                return Err(Error::invalid(
                    format!("`input[{i}]` is empty"),
                    Some("input"),
                ));
            }
            Value::Array(ids) if ids.is_empty() => {
                return Err(Error::invalid(
                    format!("`input[{i}]` is empty"),
                    Some("input"),
                ));
            }
            Value::String(_) => {}
            Value::Array(ids) if ids.iter().all(Value::is_u64) => {}
            _ => return Err(shape()),
        }
    }
    Ok(EmbedCall {
        params: body,
        inputs,
    })
}

fn shape() -> Error {
    Error::invalid(
        "`input` must be a string, an array of strings, or token ids (an array of integers, \
         or an array of such arrays)",
        Some("input"),
    )
}

/// The usage an upstream's answer reports.
pub(super) fn usage(answer: &Value) -> Usage {
    let prompt_tokens = answer["usage"]["prompt_tokens"]
        .as_u64()
        .map_or(0, |t| u32::try_from(t).unwrap_or(u32::MAX));
    Usage {
        prompt_tokens,
        completion_tokens: 0,
    }
}

/// The vectors of an answer asked for as floats, in input order.
pub(super) fn vectors(answer: &Value) -> Result<Vec<Vec<f32>>, Error> {
    let mut items: Vec<&Value> = answer["data"].as_array().into_iter().flatten().collect();
    items.sort_by_key(|item| item["index"].as_u64());
    items
        .into_iter()
        .map(|item| {
            item["embedding"]
                .as_array()
                .and_then(|v| v.iter().map(|x| x.as_f64().map(|x| x as f32)).collect())
                .ok_or_else(|| {
                    Error::Unavailable(
                        "the upstream answered an embedding that is not a list of numbers".into(),
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn vectors_follow_the_index() {
        let answer =
            json!({"data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1.0]}]});
        assert_eq!(vectors(&answer).unwrap(), vec![vec![1.0], vec![2.0]]);
        assert!(vectors(&json!({"data": [{"index": 0, "embedding": "AAAA"}]})).is_err());
    }
}
