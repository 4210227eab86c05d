//! The simulator's moderations (`POST /v1/moderations`, OpenAI's shape):
//! deterministic scores, so a deployment can be tried and load-tested with
//! moderation in its path and no hosted classifier. It is not a classifier:
//! a text is flagged for a category only when it carries one of that
//! category's few marker words below, which lets tests and demos produce a
//! flagged answer on purpose; every other score is a small number derived
//! from the text, stable across runs.

use serde_json::{Map, Value, json};

use super::Fnv;

/// OpenAI's categories, in its order, and whether images count for each
/// (`category_applied_input_types`).
const CATEGORIES: [(&str, bool); 13] = [
    ("hate", false),
    ("hate/threatening", false),
    ("harassment", false),
    ("harassment/threatening", false),
    ("illicit", false),
    ("illicit/violent", false),
    ("self-harm", true),
    ("self-harm/intent", true),
    ("self-harm/instructions", true),
    ("sexual", true),
    ("sexual/minors", false),
    ("violence", true),
    ("violence/graphic", true),
];

/// Words that flag a category, matched as whole lowercase words.
const MARKERS: &[(&str, &[&str])] = &[
    ("violence", &["kill", "murder", "attack"]),
    ("harassment", &["idiot", "loser"]),
    ("harassment/threatening", &["threaten"]),
    ("illicit", &["shoplift", "launder"]),
    ("self-harm", &["self-harm"]),
];

/// A score above which a category is flagged.
const FLAGGED: f64 = 0.5;

/// One result per input, as OpenAI answers: a text (or a text part) gets
/// its own, an image part counts toward the categories that apply to
/// images. `input` is a string, an array of strings, or an array of
/// `text` and `image_url` parts (one result for all of them).
pub(super) fn classify(input: &Value) -> Result<Vec<Value>, String> {
    match input {
        Value::String(text) => Ok(vec![result(&[text.as_str()], false)]),
        Value::Array(items) if items.is_empty() => Err("`input` must not be empty".into()),
        Value::Array(items) if items.iter().all(Value::is_string) => Ok(items
            .iter()
            .filter_map(Value::as_str)
            .map(|text| result(&[text], false))
            .collect()),
        Value::Array(parts) => {
            let mut texts = Vec::new();
            let mut image = false;
            for (i, part) in parts.iter().enumerate() {
                match part["type"].as_str() {
                    Some("text") => texts.push(
                        part["text"]
                            .as_str()
                            .ok_or(format!("`input[{i}].text` must be a string"))?,
                    ),
                    Some("image_url") if part["image_url"]["url"].is_string() => image = true,
                    Some("image_url") => {
                        return Err(format!("`input[{i}].image_url.url` must be a string"));
                    }
                    _ => {
                        return Err(format!(
                            "`input[{i}]` must be a string, or a part of type \"text\" or \"image_url\""
                        ));
                    }
                }
            }
            Ok(vec![result(&texts, image)])
        }
        _ => Err("`input` must be a string or an array".into()),
    }
}

fn result(texts: &[&str], image: bool) -> Value {
    let words: Vec<String> = texts
        .iter()
        .flat_map(|t| t.split(|c: char| !(c.is_alphanumeric() || c == '-')))
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let (mut categories, mut scores, mut applied) = (Map::new(), Map::new(), Map::new());
    let mut flagged = false;
    for (name, images) in CATEGORIES {
        let marked = MARKERS
            .iter()
            .any(|(c, marks)| *c == name && words.iter().any(|w| marks.contains(&w.as_str())));
        let mut hash = Fnv::new();
        hash.write(name.as_bytes());
        for t in texts {
            hash.write(t.as_bytes());
        }
        // Below 0.01 unless marked: clearly unflagged, but not all alike.
        let low = (hash.finish() % 10_000) as f64 / 1_000_000.0;
        let score = if marked { 0.9 + low } else { low };
        flagged |= score > FLAGGED;
        categories.insert(name.into(), Value::Bool(score > FLAGGED));
        scores.insert(name.into(), json!(score));
        let mut types = vec![];
        if !texts.is_empty() {
            types.push("text");
        }
        if image && images {
            types.push("image");
        }
        applied.insert(name.into(), json!(types));
    }
    json!({
        "flagged": flagged,
        "categories": categories,
        "category_scores": scores,
        "category_applied_input_types": applied,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_word_flags_its_category_and_nothing_else() {
        let results = classify(&json!("I want to kill them.")).unwrap();
        assert_eq!(results.len(), 1);
        let r = &results[0];
        assert_eq!(r["flagged"], true);
        assert_eq!(r["categories"]["violence"], true);
        assert!(r["category_scores"]["violence"].as_f64().unwrap() > 0.9);
        assert_eq!(r["categories"]["hate"], false);
        assert!(r["category_scores"]["hate"].as_f64().unwrap() < 0.01);
        assert_eq!(
            r["category_applied_input_types"]["violence"],
            json!(["text"])
        );
    }

    #[test]
    fn each_text_has_its_result_and_the_same_text_the_same_scores() {
        let a = classify(&json!(["a calm sentence", "kill", "a calm sentence"])).unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(a[0], a[2]);
        assert_eq!(a[0]["flagged"], false);
        assert_eq!(a[1]["flagged"], true);
    }

    #[test]
    fn parts_make_one_result_and_an_image_applies_where_images_count() {
        let r = &classify(&json!([
            {"type": "text", "text": "hello"},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
        ]))
        .unwrap()[0];
        assert_eq!(
            r["category_applied_input_types"]["violence"],
            json!(["text", "image"])
        );
        assert_eq!(r["category_applied_input_types"]["hate"], json!(["text"]));
        let e = classify(&json!([{"type": "audio"}])).unwrap_err();
        assert!(e.contains("input[0]"), "{e}");
    }
}
