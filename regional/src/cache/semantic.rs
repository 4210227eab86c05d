//! The semantic index of one node: per (tenant, partition) the vectors of
//! cached questions and their answers, searched exactly (a dot product per
//! entry; vectors are unit length, so the product is the cosine).
//!
//! Exact search is deliberate: partitions hold the questions that agree on
//! model, parameters and history, so they stay small in practice, and a
//! scan of a few thousand 384-float vectors takes well under a millisecond,
//! less than embedding the question does. Past tens of thousands of entries
//! per partition an approximate index (HNSW) would pay off.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use tokio::time::Instant;

use super::Answer;

/// Which questions may answer each other.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct PartKey {
    pub tenant: Arc<str>,
    pub digest: [u8; 32],
}

/// One stored question.
pub(super) struct Entry {
    pub id: [u8; 32],
    pub part: PartKey,
    /// The question, for the lexical checks of [`super::guard`].
    pub text: Arc<str>,
    pub vector: Vec<f32>,
    pub answer: Arc<Answer>,
    pub expires: Instant,
}

#[derive(Default)]
struct Part {
    ids: Vec<[u8; 32]>,
    texts: Vec<Arc<str>>,
    /// Row-major, `dims` floats per entry.
    vectors: Vec<f32>,
    answers: Vec<Arc<Answer>>,
    expires: Vec<Instant>,
}

impl Part {
    fn remove(&mut self, id: &[u8; 32], dims: usize) -> bool {
        let Some(i) = self.ids.iter().position(|x| x == id) else {
            return false;
        };
        let last = self.ids.len() - 1;
        self.ids.swap_remove(i);
        self.texts.swap_remove(i);
        self.answers.swap_remove(i);
        self.expires.swap_remove(i);
        if i != last {
            let (head, tail) = self.vectors.split_at_mut(last * dims);
            head[i * dims..(i + 1) * dims].copy_from_slice(&tail[..dims]);
        }
        self.vectors.truncate(last * dims);
        true
    }
}

/// The index: bounded by entry count, oldest evicted first.
pub(super) struct Index {
    dims: usize,
    max_entries: usize,
    parts: HashMap<PartKey, Part>,
    /// Insertion order, for eviction; may name entries already removed.
    order: VecDeque<(PartKey, [u8; 32])>,
    ids: HashSet<[u8; 32]>,
}

/// The best match of a search.
pub(super) struct Found {
    pub similarity: f32,
    pub answer: Option<Arc<Answer>>,
}

impl Index {
    pub(super) fn new(dims: usize, max_entries: usize) -> Self {
        Self {
            dims,
            max_entries,
            parts: HashMap::new(),
            order: VecDeque::new(),
            ids: HashSet::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    pub(super) fn contains(&self, id: &[u8; 32]) -> bool {
        self.ids.contains(id)
    }

    /// The best similarity among the live entries of `part`, and the
    /// answer of the most similar entry that reaches `threshold` and passes
    /// the lexical checks against `text`.
    pub(super) fn search(
        &self,
        part: &PartKey,
        text: &str,
        vector: &[f32],
        threshold: f32,
    ) -> Found {
        let Some(p) = self.parts.get(part) else {
            return Found {
                similarity: 0.0,
                answer: None,
            };
        };
        let now = Instant::now();
        let mut best = 0.0f32;
        let mut candidates = Vec::new();
        for (i, row) in p.vectors.chunks_exact(self.dims).enumerate() {
            if p.expires[i] <= now {
                continue;
            }
            let s: f32 = row.iter().zip(vector).map(|(a, b)| a * b).sum();
            best = best.max(s);
            if s >= threshold {
                candidates.push((s, i));
            }
        }
        candidates.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let answer = candidates
            .into_iter()
            .find(|(_, i)| super::guard::compatible(&p.texts[*i], text))
            .map(|(_, i)| p.answers[i].clone());
        Found {
            similarity: best,
            answer,
        }
    }

    /// Adds an entry (ignored when its id is already in, or its vector has
    /// the wrong length), then evicts expired and excess entries.
    pub(super) fn insert(&mut self, entry: Entry) {
        if entry.vector.len() != self.dims || !self.ids.insert(entry.id) {
            return;
        }
        let part = self.parts.entry(entry.part.clone()).or_default();
        part.ids.push(entry.id);
        part.texts.push(entry.text);
        part.vectors.extend_from_slice(&entry.vector);
        part.answers.push(entry.answer);
        part.expires.push(entry.expires);
        self.order.push_back((entry.part, entry.id));
        self.evict();
    }

    fn evict(&mut self) {
        let now = Instant::now();
        while let Some((part, id)) = self.order.front() {
            if !self.ids.contains(id) {
                self.order.pop_front();
                continue;
            }
            let p = self.parts.get(part);
            let expired = p
                .and_then(|p| {
                    p.ids
                        .iter()
                        .position(|x| x == id)
                        .map(|i| p.expires[i] <= now)
                })
                .unwrap_or(true);
            if self.ids.len() <= self.max_entries && !expired {
                break;
            }
            let (part, id) = self.order.pop_front().expect("front exists");
            self.remove(&part, &id);
        }
    }

    fn remove(&mut self, part: &PartKey, id: &[u8; 32]) {
        self.ids.remove(id);
        if let Some(p) = self.parts.get_mut(part) {
            p.remove(id, self.dims);
            if p.ids.is_empty() {
                self.parts.remove(part);
            }
        }
    }

    /// Drops every entry of `tenant`; returns how many.
    pub(super) fn purge(&mut self, tenant: &str) -> usize {
        let mut removed = 0;
        self.parts.retain(|k, p| {
            if &*k.tenant != tenant {
                return true;
            }
            for id in &p.ids {
                self.ids.remove(id);
            }
            removed += p.ids.len();
            false
        });
        removed
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::inference::Finish;

    fn answer(text: &str) -> Arc<Answer> {
        Arc::new(Answer {
            text: text.into(),
            finish: Finish::Stop,
            prompt_tokens: 1,
            completion_tokens: 1,
            extras: Default::default(),
            fallback: None,
        })
    }

    fn part(tenant: &str) -> PartKey {
        PartKey {
            tenant: Arc::from(tenant),
            digest: [0; 32],
        }
    }

    fn entry(n: u8, tenant: &str, vector: [f32; 2]) -> Entry {
        Entry {
            id: [n; 32],
            part: part(tenant),
            text: Arc::from("q"),
            vector: vector.to_vec(),
            answer: answer(&n.to_string()),
            expires: Instant::now() + Duration::from_secs(60),
        }
    }

    #[test]
    fn finds_the_nearest_above_the_threshold_within_a_tenant() {
        let mut index = Index::new(2, 10);
        index.insert(entry(1, "a", [1.0, 0.0]));
        index.insert(entry(2, "a", [0.0, 1.0]));
        let found = index.search(&part("a"), "q", &[0.8, 0.6], 0.7);
        assert_eq!(found.answer.unwrap().text, "1");
        assert!((found.similarity - 0.8).abs() < 1e-6);
        assert!(
            index
                .search(&part("a"), "q", &[0.8, 0.6], 0.9)
                .answer
                .is_none()
        );
        assert!(
            index
                .search(&part("b"), "q", &[1.0, 0.0], 0.5)
                .answer
                .is_none()
        );
    }

    #[test]
    fn evicts_the_oldest_beyond_the_bound_and_purges_by_tenant() {
        let mut index = Index::new(2, 2);
        index.insert(entry(1, "a", [1.0, 0.0]));
        index.insert(entry(2, "b", [0.0, 1.0]));
        index.insert(entry(3, "a", [0.6, 0.8]));
        assert_eq!(index.len(), 2);
        assert!(!index.contains(&[1; 32]));
        // Entry 3 took over the slot of the evicted entry 1.
        assert_eq!(
            index
                .search(&part("a"), "q", &[1.0, 0.0], 0.5)
                .answer
                .unwrap()
                .text,
            "3"
        );
        assert_eq!(index.purge("a"), 1);
        assert_eq!(index.len(), 1);
        assert!(
            index
                .search(&part("a"), "q", &[0.6, 0.8], 0.5)
                .answer
                .is_none()
        );
        assert!(
            index
                .search(&part("b"), "q", &[0.0, 1.0], 0.5)
                .answer
                .is_some()
        );
    }
}
