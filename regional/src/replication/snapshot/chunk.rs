//! Cutting a snapshot's rows into chunks: at most `batch_size` rows and
//! `max_batch_bytes` each, a row larger than that alone in its chunk.

use meridian_proto::v1::{Change, SnapshotChunk};

/// How much one snapshot chunk carries at most.
#[derive(Debug, Clone, Copy)]
pub(in crate::replication) struct Budget {
    pub rows: u32,
    /// Bytes as [`wire_bytes`](super::super::log::wire_bytes) counts
    /// them; a row larger than this goes alone in its chunk.
    pub bytes: u64,
}

/// The rows of the chunk being filled.
pub(super) struct Chunk {
    budget: Budget,
    pub(super) changes: Vec<Change>,
    bytes: u64,
}

impl Chunk {
    pub(super) fn new(budget: Budget) -> Self {
        Self {
            budget,
            changes: Vec::new(),
            bytes: 0,
        }
    }

    /// Adds `change`; returns the full chunk to send first, when `change`
    /// would take it past its rows or bytes.
    pub(super) fn push(&mut self, change: Change) -> Option<SnapshotChunk> {
        let size = super::super::log::wire_bytes(&change) as u64;
        let full = !self.changes.is_empty()
            && (self.changes.len() >= self.budget.rows.max(1) as usize
                || self.bytes.saturating_add(size) > self.budget.bytes);
        let out = full.then(|| {
            self.bytes = 0;
            SnapshotChunk {
                changes: std::mem::take(&mut self.changes),
                ..Default::default()
            }
        });
        self.bytes = self.bytes.saturating_add(size);
        self.changes.push(change);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(bytes: usize) -> Change {
        Change {
            payload: vec![b'x'; bytes],
            table: "jobs".into(),
            key: b"k".to_vec(),
            origin_region: "r".into(),
            ..Change::default()
        }
    }

    /// The sizes of the chunks `rows` are cut into.
    fn chunks(budget: Budget, rows: &[usize]) -> Vec<usize> {
        let mut chunk = Chunk::new(budget);
        let mut out: Vec<usize> = rows
            .iter()
            .filter_map(|&b| chunk.push(row(b)))
            .map(|c| c.changes.len())
            .collect();
        out.push(chunk.changes.len());
        out
    }

    #[test]
    fn chunks_hold_their_rows_and_bytes_and_a_large_row_goes_alone() {
        let rows = Budget {
            rows: 2,
            bytes: u64::MAX,
        };
        assert_eq!(chunks(rows, &[1, 1, 1, 1, 1]), [2, 2, 1]);
        let bytes = Budget {
            rows: 100,
            bytes: 1000,
        };
        assert_eq!(chunks(bytes, &[300, 300, 300, 5000, 10, 10]), [2, 1, 1, 2]);
    }
}
