//! Removing a tenant's entries from every node and layer of the region.

use std::sync::Arc;

use redis::AsyncCommands;

use super::ResponseCache;
use super::layout::{EVENTS, PREFIX};
use crate::error::Error;

impl ResponseCache {
    /// Removes every entry of `tenant` in the region: this node's L1 and
    /// index now, Redis's entries, and the other nodes' through the event
    /// stream. Returns the Redis entries removed.
    pub(crate) async fn purge(&self, tenant: &str) -> Result<u64, Error> {
        self.purge_local(tenant);
        let mut conn = self.redis.clone();
        let unavailable = |e: redis::RedisError| {
            Error::Unavailable(format!("cache purge: the region's redis failed: {e}"))
        };
        let pattern = format!("{PREFIX}:{tenant}:*");
        let mut cursor = 0u64;
        let mut removed = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if !keys.is_empty() {
                let n: u64 = conn.unlink(&keys).await.map_err(unavailable)?;
                removed += n;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let _: String = conn
            .xadd_maxlen(
                EVENTS,
                redis::streams::StreamMaxlen::Approx(self.config.semantic.max_entries),
                "*",
                &[("op", "purge"), ("key", tenant)],
            )
            .await
            .map_err(unavailable)?;
        tracing::info!(tenant, removed, "cache purged");
        Ok(removed)
    }

    pub(super) fn purge_local(&self, tenant: &str) {
        let owned: Arc<str> = Arc::from(tenant);
        // Only fails when the builder did not enable closures, which it does.
        let _ = self.l1.invalidate_entries_if(move |k, _| k.tenant == owned);
        if let Some(s) = &self.semantic {
            s.index.write().expect("index lock").purge(tenant);
        }
        self.update_sizes();
    }
}
