//! What a sentence embedding misses. all-MiniLM-L6-v2 puts "convert miles
//! to km" and "convert km to miles", "foods safe for dogs" and "foods not
//! safe for dogs", "a 15% tip" and "a 20% tip" within 0.96 cosine of each
//! other (`tests/data/semantic_pairs.jsonl`): no threshold keeps those
//! apart while still matching real paraphrases. So a semantic hit must
//! also pass three lexical checks: the same numbers, the same count of
//! negations, and the words both questions share in the same order.

use std::collections::HashSet;

/// Words that carry no subject: left out of the order check.
const STOP: &[&str] = &[
    "a", "an", "the", "is", "are", "was", "were", "be", "been", "being", "do", "does", "did",
    "how", "what", "which", "who", "whom", "whose", "why", "when", "where", "can", "could",
    "should", "would", "will", "shall", "may", "might", "must", "i", "me", "my", "we", "our",
    "you", "your", "it", "its", "of", "in", "on", "at", "by", "for", "with", "to", "from", "into",
    "onto", "and", "or", "but", "if", "then", "than", "that", "this", "these", "those", "there",
    "here", "as", "about", "so", "up", "out", "over", "under", "again", "please", "tell", "show",
    "give", "explain", "way", "best", "good", "get", "make",
];

/// Numbers spelt out. Roman numerals are left out: "I" is a pronoun.
const NUMBER_WORDS: &[&str] = &[
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "twenty", "hundred", "thousand", "million", "billion", "half", "quarter",
    "double", "triple", "twice", "first", "second", "third",
];

const NEGATIONS: &[&str] = &[
    "not",
    "no",
    "never",
    "none",
    "nor",
    "cannot",
    "without",
    "non",
    "avoid",
    "avoided",
    "avoiding",
    "unsafe",
    "unhealthy",
];

/// Lowercase runs of letters, digits and inner apostrophes.
fn tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|t| t.trim_matches('\''))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

fn numbers(tokens: &[String]) -> Vec<&str> {
    let mut n: Vec<&str> = tokens
        .iter()
        .map(String::as_str)
        .filter(|t| t.bytes().any(|b| b.is_ascii_digit()) || NUMBER_WORDS.contains(t))
        .collect();
    n.sort_unstable();
    n
}

fn negations(tokens: &[String]) -> usize {
    tokens
        .iter()
        .filter(|t| NEGATIONS.contains(&t.as_str()) || t.ends_with("n't"))
        .count()
}

/// A crude stem, enough for "boil" and "boiling" to count as one word.
fn stem(t: &str) -> &str {
    for suffix in ["ing", "edly", "ed", "es", "s", "ly"] {
        if t.len() > 4
            && let Some(s) = t.strip_suffix(suffix)
        {
            return s;
        }
    }
    t
}

fn content(tokens: &[String]) -> Vec<&str> {
    tokens
        .iter()
        .map(String::as_str)
        .filter(|t| !STOP.contains(t) && !t.bytes().all(|b| b.is_ascii_digit()))
        .map(stem)
        .collect()
}

/// Whether two questions close in embedding space may share an answer.
pub fn compatible(a: &str, b: &str) -> bool {
    let (ta, tb) = (tokens(a), tokens(b));
    if numbers(&ta) != numbers(&tb) || negations(&ta) != negations(&tb) {
        return false;
    }
    let (ca, cb) = (content(&ta), content(&tb));
    let shared: HashSet<&str> = ca.iter().copied().filter(|t| cb.contains(t)).collect();
    fn order<'a>(c: &[&'a str], shared: &HashSet<&str>) -> Vec<&'a str> {
        let mut seen = HashSet::new();
        c.iter()
            .copied()
            .filter(|t| shared.contains(t) && seen.insert(*t))
            .collect()
    }
    order(&ca, &shared) == order(&cb, &shared)
}

#[cfg(test)]
mod tests {
    use super::compatible;

    #[test]
    fn paraphrases_pass() {
        assert!(compatible(
            "How do I reverse a list in Python?",
            "What is the way to reverse a list in Python?"
        ));
        assert!(compatible(
            "Please explain how to boil an egg",
            "how do I boil an egg?"
        ));
        // Reordered paraphrases are refused: the price of catching
        // "Paris to London" against "London to Paris".
        assert!(!compatible(
            "Is it safe to eat raw eggs?",
            "Is eating raw eggs safe?"
        ));
    }

    #[test]
    fn near_misses_fail() {
        // Direction.
        assert!(!compatible(
            "Convert Celsius to Fahrenheit.",
            "Convert Fahrenheit to Celsius."
        ));
        // Numbers, written or spelt.
        assert!(!compatible(
            "How much is a 20% tip on a $45 bill?",
            "How much is a 15% tip on a $45 bill?"
        ));
        assert!(!compatible(
            "How many tablespoons are in a cup?",
            "How many tablespoons are in half a cup?"
        ));
        // Negation, however spelt.
        assert!(!compatible(
            "Which browsers support WebGPU?",
            "Which browsers don't support WebGPU?"
        ));
        assert!(!compatible(
            "Which plants are toxic to cats?",
            "Which plants are non-toxic to cats?"
        ));
        assert!(!compatible(
            "Which fruits are allowed on a keto diet?",
            "Which fruits should be avoided on a keto diet?"
        ));
    }
}
