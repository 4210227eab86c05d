//! Keeping this node's semantic index in step with the region's: every node
//! follows the Redis event stream of entries stored and tenants purged.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use tokio::time::Instant;

use super::ResponseCache;
use super::layout::{EVENTS, StoredEntry, id_of, now_ms, tenant_of};
use super::semantic::{Entry, PartKey};

/// How often a node reads new events: new entries reach the other nodes'
/// indexes within about this long.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(100);

impl ResponseCache {
    /// Follows the region's event stream until `shutdown`: loads the
    /// semantic entries other nodes stored (all of them at start, so a new
    /// node's index matches the region's) and applies purges.
    pub(crate) async fn follow(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut last = "0-0".to_string();
        let mut backoff = FOLLOW_INTERVAL;
        loop {
            let wait = match self.follow_once(&mut last).await {
                Ok(0) => {
                    backoff = FOLLOW_INTERVAL;
                    FOLLOW_INTERVAL
                }
                Ok(_) => Duration::ZERO,
                Err(e) => {
                    tracing::debug!(error = %e, "cache: cannot read the event stream, retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    backoff
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Reads and applies one batch of events after `last`; returns how many.
    async fn follow_once(&self, last: &mut String) -> redis::RedisResult<usize> {
        let mut conn = self.redis.clone();
        let opts = redis::streams::StreamReadOptions::default().count(500);
        let reply: Option<redis::streams::StreamReadReply> = conn
            .xread_options(&[EVENTS], &[last.as_str()], &opts)
            .await?;
        let events: Vec<_> = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect();
        // A restarted, empty Redis numbers its events from scratch, after
        // `last` only by its clock: reading on from `last` is still right.
        let mut adds = Vec::new();
        for event in &events {
            let field = |name: &str| event.get::<String>(name).unwrap_or_default();
            match field("op").as_str() {
                "add" => adds.push(field("key")),
                "purge" => {
                    // Entries added before the purge are gone from Redis;
                    // dropping the pending ones keeps the order right.
                    let tenant = field("key");
                    adds.retain(|k| tenant_of(k) != Some(tenant.as_str()));
                    self.purge_local(&tenant);
                }
                _ => {}
            }
        }
        if let Some(semantic) = &self.semantic {
            let fresh: Vec<String> = {
                let index = semantic.index.read().expect("index lock");
                adds.into_iter()
                    .filter(|k| id_of(k).is_none_or(|id| !index.contains(&id)))
                    .collect()
            };
            for chunk in fresh.chunks(200) {
                let values: Vec<Option<Vec<u8>>> = conn.mget(chunk).await?;
                let mut index = semantic.index.write().expect("index lock");
                for (key, value) in chunk.iter().zip(values) {
                    if let Some(entry) = value.and_then(|v| self.decode(key, &v)) {
                        index.insert(entry);
                    }
                }
            }
        }
        if let Some(e) = events.last() {
            last.clone_from(&e.id);
        }
        Ok(events.len())
    }

    fn decode(&self, key: &str, bytes: &[u8]) -> Option<Entry> {
        let stored: StoredEntry = serde_json::from_slice(bytes).ok()?;
        let left = stored.expires_ms.checked_sub(now_ms())?;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(&stored.partition, &mut digest).ok()?;
        Some(Entry {
            id: id_of(key)?,
            part: PartKey {
                tenant: Arc::from(stored.tenant.as_str()),
                digest,
            },
            text: Arc::from(stored.text.as_str()),
            vector: stored.vector,
            answer: Arc::new(stored.answer),
            expires: Instant::now() + Duration::from_millis(left),
        })
    }
}
