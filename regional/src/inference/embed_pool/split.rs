//! One upstream answer for a merged batch, cut back into each caller's
//! answer: its own vectors with its own `index` values, a share of the
//! usage, every other field of the answer as the upstream wrote it.

use serde_json::{Map, Value};

use crate::error::Error;

/// One caller's place in a merged batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Share {
    /// Index of its first input in the batch.
    pub offset: usize,
    /// Inputs it sent.
    pub len: usize,
    /// What its usage share is weighed by: the size of its inputs.
    pub weight: u64,
}

/// The weight of one input: its bytes for a text, its ids for token ids.
/// The upstream counts tokens per batch only; text length is what Meridian
/// can see that grows with them.
pub(super) fn weight(input: &Value) -> u64 {
    match input {
        Value::String(s) => s.len() as u64,
        Value::Array(ids) => ids.len() as u64,
        _ => 1,
    }
}

/// Each share's answer, in the order of `shares`: its items re-indexed from
/// 0, each integer of `usage` split by weight, the rest copied. A caller
/// whose items the upstream did not all return gets an error.
pub(super) fn split(answer: &Value, shares: &[Share]) -> Vec<Result<Value, Error>> {
    let mut items: Vec<Vec<Value>> = vec![Vec::new(); shares.len()];
    for item in answer["data"].as_array().into_iter().flatten() {
        let Some(index) = item["index"].as_u64().map(|i| i as usize) else {
            continue;
        };
        if let Some(s) = shares
            .iter()
            .position(|s| (s.offset..s.offset + s.len).contains(&index))
        {
            let mut item = item.clone();
            item["index"] = Value::from(index - shares[s].offset);
            items[s].push(item);
        }
    }
    let usage = split_usage(answer.get("usage"), shares);
    shares
        .iter()
        .zip(items)
        .zip(usage)
        .map(|((share, mut items), usage)| {
            if items.len() != share.len {
                return Err(Error::Unavailable(format!(
                    "the upstream answered {} of {} embeddings",
                    items.len(),
                    share.len
                )));
            }
            items.sort_by_key(|item| item["index"].as_u64());
            let mut out = answer.as_object().cloned().unwrap_or_default();
            out.insert("data".into(), Value::Array(items));
            if let Some(usage) = usage {
                out.insert("usage".into(), Value::Object(usage));
            }
            Ok(Value::Object(out))
        })
        .collect()
}

/// `usage` per share: each non-negative integer field split in proportion
/// to the weights by largest remainder, so the shares add up to the
/// upstream's count exactly; other fields copied.
fn split_usage(usage: Option<&Value>, shares: &[Share]) -> Vec<Option<Map<String, Value>>> {
    let Some(usage) = usage.and_then(Value::as_object) else {
        return vec![None; shares.len()];
    };
    let mut out = vec![usage.clone(); shares.len()];
    for (field, value) in usage {
        let Some(total) = value.as_u64() else {
            continue;
        };
        for (share, part) in out.iter_mut().zip(apportion(total, shares)) {
            share.insert(field.clone(), Value::from(part));
        }
    }
    out.into_iter().map(Some).collect()
}

/// `total` split by the shares' weights (equally when all weigh nothing),
/// by largest remainder: the parts add up to `total`.
fn apportion(total: u64, shares: &[Share]) -> Vec<u64> {
    let weights: Vec<u128> = if shares.iter().all(|s| s.weight == 0) {
        vec![1; shares.len()]
    } else {
        shares.iter().map(|s| u128::from(s.weight)).collect()
    };
    let sum: u128 = weights.iter().sum();
    let total = u128::from(total);
    let mut parts: Vec<u128> = weights.iter().map(|w| total * w / sum).collect();
    let mut left = total - parts.iter().sum::<u128>();
    let mut by_remainder: Vec<usize> = (0..shares.len()).collect();
    // Ties go to the earlier caller, so the split is the same every time.
    by_remainder.sort_by_key(|&i| std::cmp::Reverse(total * weights[i] % sum));
    for i in by_remainder {
        if left == 0 {
            break;
        }
        parts[i] += 1;
        left -= 1;
    }
    parts
        .into_iter()
        .map(|p| u64::try_from(p).unwrap_or(u64::MAX))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item(index: usize) -> Value {
        json!({"object": "embedding", "index": index, "embedding": [index as f64]})
    }

    #[test]
    fn each_caller_gets_its_own_items_reindexed_and_the_other_fields() {
        let shares = [
            Share {
                offset: 0,
                len: 1,
                weight: 3,
            },
            Share {
                offset: 1,
                len: 2,
                weight: 6,
            },
        ];
        // Out of order, as nothing in the protocol promises order.
        let answer = json!({"object": "list", "model": "up", "x_note": 1,
            "data": [item(2), item(0), item(1)],
            "usage": {"prompt_tokens": 9, "total_tokens": 9}});
        let out: Vec<Value> = split(&answer, &shares)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            out[0]["data"],
            json!([{"object": "embedding", "index": 0, "embedding": [0.0]}])
        );
        assert_eq!(
            out[1]["data"],
            json!([{"object": "embedding", "index": 0, "embedding": [1.0]},
                   {"object": "embedding", "index": 1, "embedding": [2.0]}])
        );
        assert_eq!(
            out[0]["usage"],
            json!({"prompt_tokens": 3, "total_tokens": 3})
        );
        assert_eq!(
            out[1]["usage"],
            json!({"prompt_tokens": 6, "total_tokens": 6})
        );
        assert_eq!(
            (&out[1]["x_note"], &out[1]["model"]),
            (&json!(1), &json!("up"))
        );
    }

    #[test]
    fn usage_shares_add_up_to_the_upstream_count() {
        let shares: Vec<Share> = [5, 5, 5, 1]
            .into_iter()
            .enumerate()
            .map(|(i, weight)| Share {
                offset: i,
                len: 1,
                weight,
            })
            .collect();
        let parts = apportion(10, &shares);
        assert_eq!(parts.iter().sum::<u64>(), 10);
        assert_eq!(parts, [3, 3, 3, 1]);
        assert_eq!(
            apportion(
                7,
                &[Share {
                    offset: 0,
                    len: 1,
                    weight: 0
                }; 3]
            ),
            [3, 2, 2]
        );
        assert_eq!(apportion(0, &shares), [0, 0, 0, 0]);
    }

    #[test]
    fn a_caller_missing_vectors_gets_an_error_the_others_their_answer() {
        let shares = [
            Share {
                offset: 0,
                len: 1,
                weight: 1,
            },
            Share {
                offset: 1,
                len: 1,
                weight: 1,
            },
        ];
        let answer = json!({"data": [item(0)], "usage": {"prompt_tokens": 2}});
        let out = split(&answer, &shares);
        assert!(out[0].is_ok());
        assert!(out[1].as_ref().unwrap_err().to_string().contains("0 of 1"));
    }

    #[test]
    fn weights_follow_the_inputs() {
        assert_eq!(weight(&json!("four")), 4);
        assert_eq!(weight(&json!([1, 2, 3])), 3);
    }
}
