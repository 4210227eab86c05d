//! The simulator's log probabilities, when a chat request asks for them
//! (`logprobs: true`, `top_logprobs: k`): for every piece of text, OpenAI's
//! `choices[].logprobs.content` entry, with made-up but stable numbers, so
//! clients and the completions API that read them can be tried without a
//! model. Drawn from a hash of the piece and its place, not from the
//! generation's random stream: asking for log probabilities does not change
//! the text.

use serde_json::{Value, json};

use super::{Fnv, VOCABULARY};
use crate::inference::{ChatRequest, Delta};

/// Most alternatives OpenAI gives per token.
const MAX_TOP: u64 = 20;

/// How many alternatives `req` asks for per token, if it asks for log
/// probabilities at all.
pub(super) fn asked(req: &ChatRequest) -> Option<u64> {
    (req.extra.get("logprobs") == Some(&Value::Bool(true))).then(|| {
        req.extra
            .get("top_logprobs")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            .min(MAX_TOP)
    })
}

/// Adds a `logprobs` entry to every piece that carries text.
pub(super) fn annotate(pieces: &mut [Delta], top: u64) {
    for (i, piece) in pieces.iter_mut().enumerate() {
        if piece.content.is_empty() {
            continue;
        }
        let logprob = |token: &str, rank: u64| {
            let mut hash = Fnv::new();
            hash.write(token.as_bytes());
            hash.write(&(i as u64).to_le_bytes());
            // The sampled token is the likeliest; each alternative less so.
            -((hash.finish() % 2_000) as f64 / 1_000.0) - rank as f64
        };
        let token = piece.content.as_str();
        let alternatives: Vec<Value> = std::iter::once(token)
            .chain(
                VOCABULARY
                    .iter()
                    .copied()
                    .filter(|w| *w != token.trim_start()),
            )
            .take(top as usize)
            .zip(0..)
            .map(|(t, rank)| entry(t, logprob(t, rank), None))
            .collect();
        piece.logprobs = Some(json!({
            "content": [entry(token, logprob(token, 0), Some(alternatives))],
            "refusal": null,
        }));
    }
}

fn entry(token: &str, logprob: f64, top: Option<Vec<Value>>) -> Value {
    let mut e = json!({ "token": token, "logprob": logprob, "bytes": token.as_bytes() });
    if let Some(top) = top {
        e["top_logprobs"] = Value::Array(top);
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_text_piece_gets_its_token_and_the_asked_alternatives() {
        let mut pieces = vec![Delta::text("edge"), Delta::text(" cache"), Delta::default()];
        annotate(&mut pieces, 2);
        let first = &pieces[0].logprobs.as_ref().unwrap()["content"][0];
        assert_eq!(first["token"], "edge");
        assert_eq!(first["bytes"], json!(b"edge".to_vec()));
        let top = first["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0]["token"], "edge");
        assert!(top[1]["logprob"].as_f64().unwrap() < top[0]["logprob"].as_f64().unwrap());
        assert_eq!(first["logprob"], top[0]["logprob"]);
        assert!(pieces[2].logprobs.is_none(), "a piece without text");
        let mut again = vec![Delta::text("edge")];
        annotate(&mut again, 2);
        assert_eq!(again[0].logprobs, pieces[0].logprobs, "stable");
    }
}
