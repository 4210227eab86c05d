//! The simulator's prefix cache: a least-recently-used set of prompt-block
//! hashes with a fixed capacity, as an engine's KV-cache blocks are.

use std::collections::{BTreeMap, HashMap};

pub(super) struct PrefixCache {
    capacity: usize,
    /// Block hash → the tick it was last used at.
    used: HashMap<u64, u64>,
    /// Tick → block hash, oldest first: the eviction order.
    order: BTreeMap<u64, u64>,
    tick: u64,
}

impl PrefixCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            used: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
        }
    }

    /// How many leading blocks of `blocks` the cache holds; then every
    /// block is cached (most recent use now), as prefill leaves it.
    pub(super) fn lookup_insert(&mut self, blocks: &[u64]) -> usize {
        if self.capacity == 0 {
            return 0;
        }
        let hits = blocks
            .iter()
            .take_while(|b| self.used.contains_key(b))
            .count();
        for block in blocks {
            self.tick += 1;
            if let Some(old) = self.used.insert(*block, self.tick) {
                self.order.remove(&old);
            }
            self.order.insert(self.tick, *block);
            if self.used.len() > self.capacity
                && let Some((_, evicted)) = self.order.pop_first()
            {
                self.used.remove(&evicted);
            }
        }
        hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_blocks_hit_and_the_oldest_is_evicted() {
        let mut c = PrefixCache::new(3);
        assert_eq!(c.lookup_insert(&[1, 2]), 0);
        assert_eq!(c.lookup_insert(&[1, 2, 3]), 2);
        // A gap ends the prefix: block 3 after a miss does not count.
        assert_eq!(c.lookup_insert(&[9, 3]), 0);
        // Capacity 3: 1 and 2 were the oldest and are gone.
        assert_eq!(c.lookup_insert(&[1]), 0);
        assert_eq!(c.lookup_insert(&[9, 3, 1]), 3);
        assert!(c.used.len() <= 3 && c.order.len() == c.used.len());
        assert_eq!(PrefixCache::new(0).lookup_insert(&[1]), 0);
    }
}
