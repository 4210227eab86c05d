//! Looking a request up through the layers (L1, L2, the semantic index) and
//! storing its answer in each.

use std::future::Future;
use std::sync::Arc;

use redis::AsyncCommands;
use tokio::time::Instant;

use super::layout::{EVENTS, StoredEntry, entry_id, exact_key, now_ms, semantic_key};
use super::semantic::{Entry, PartKey};
use super::{Answer, Key, Outcome, Policy, Query, ResponseCache, keys};
use crate::error::Error;
use crate::inference::{ChatRequest, EMBEDDING_MODEL_ID};

/// A lookup's result: the hit, and the query's embedding when the semantic
/// layer computed one (a miss stores it with the answer).
struct Probe {
    hit: Option<(Arc<Answer>, Outcome)>,
    vector: Option<Vec<f32>>,
}

/// What [`ResponseCache::lookup`] found for a caller that streams its miss
/// itself.
pub(crate) struct Lookup {
    pub hit: Option<(Arc<Answer>, Outcome)>,
    /// What storing the answer of a miss needs, computed once by the lookup.
    pub pending: Pending,
}

/// The keys of a looked-up request and its query's embedding, kept until
/// its answer is known ([`ResponseCache::store_answer`]).
pub(crate) struct Pending {
    key: Key,
    query: Option<Query>,
    vector: Option<Vec<f32>>,
}

impl ResponseCache {
    /// Answers from the cache or with `compute`, as `policy` says. Under
    /// [`Policy::Use`], concurrent misses of one key make one call of
    /// `compute`; the others get its answer (or its error) and report a
    /// miss. A caller that goes away mid-call hands the call over to a
    /// waiting one.
    pub(crate) async fn get_or_compute<F>(
        &self,
        tenant: &str,
        req: &ChatRequest,
        policy: Policy,
        compute: F,
    ) -> Result<(Arc<Answer>, Outcome), Error>
    where
        F: Future<Output = Result<Answer, Error>>,
    {
        if policy == Policy::Bypass {
            self.metrics.count(tenant, Outcome::Bypass);
            return Ok((Arc::new(compute.await?), Outcome::Bypass));
        }
        let (key, query) = keys(tenant, req);
        if policy == Policy::Refresh {
            let vector = match &query {
                Some(q) => self.embed(tenant, q).await,
                None => None,
            };
            let answer = Arc::new(compute.await?);
            self.store(&key, query.as_ref(), vector, answer.clone())
                .await;
            self.metrics.count(tenant, Outcome::Miss);
            return Ok((answer, Outcome::Miss));
        }
        if let Some(answer) = self.l1.get(&key).await {
            self.metrics.count(tenant, Outcome::HitL1);
            return Ok((answer, Outcome::HitL1));
        }
        // Set by this caller's initialisation if it runs; left as is when
        // another caller's call answered.
        let mut outcome = None;
        let init = async {
            let probe = self.probe_shared(&key, query.as_ref()).await;
            if let Some((answer, layer)) = probe.hit {
                outcome = Some(layer);
                return Ok(answer);
            }
            outcome = Some(Outcome::Miss);
            let answer = Arc::new(compute.await?);
            // L1 is filled by the coalescing call itself.
            self.store_shared(&key, query.as_ref(), probe.vector, &answer)
                .await;
            Ok::<_, Error>(answer)
        };
        let result = self.l1.try_get_with(key.clone(), init).await;
        let outcome = outcome.unwrap_or_else(|| {
            self.metrics.coalesced.with_label_values(&[tenant]).inc();
            Outcome::Miss
        });
        self.metrics.count(tenant, outcome);
        result
            .map(|answer| (answer, outcome))
            .map_err(|e| Error::shared(&e))
    }

    /// Looks `req` up in every layer, for a caller that streams its miss
    /// itself and stores the answer afterwards with [`Self::store_answer`].
    pub(crate) async fn lookup(&self, tenant: &str, req: &ChatRequest, policy: Policy) -> Lookup {
        let (key, query) = keys(tenant, req);
        let probe = match policy {
            Policy::Bypass => Probe {
                hit: None,
                vector: None,
            },
            Policy::Refresh => Probe {
                hit: None,
                vector: match &query {
                    Some(q) => self.embed(tenant, q).await,
                    None => None,
                },
            },
            Policy::Use => match self.l1.get(&key).await {
                Some(answer) => Probe {
                    hit: Some((answer, Outcome::HitL1)),
                    vector: None,
                },
                None => {
                    let probe = self.probe_shared(&key, query.as_ref()).await;
                    if let Some((answer, _)) = &probe.hit {
                        self.l1.insert(key.clone(), answer.clone()).await;
                    }
                    probe
                }
            },
        };
        let outcome = match (&probe.hit, policy) {
            (Some((_, layer)), _) => *layer,
            (None, Policy::Bypass) => Outcome::Bypass,
            (None, _) => Outcome::Miss,
        };
        self.metrics.count(tenant, outcome);
        Lookup {
            hit: probe.hit,
            pending: Pending {
                key,
                query,
                vector: probe.vector,
            },
        }
    }

    /// Stores in every layer the answer of a request [`Self::lookup`]
    /// missed.
    pub(crate) async fn store_answer(&self, pending: Pending, answer: Answer) {
        self.store(
            &pending.key,
            pending.query.as_ref(),
            pending.vector,
            Arc::new(answer),
        )
        .await;
    }

    async fn store(
        &self,
        key: &Key,
        query: Option<&Query>,
        vector: Option<Vec<f32>>,
        answer: Arc<Answer>,
    ) {
        self.l1.insert(key.clone(), answer.clone()).await;
        self.store_shared(key, query, vector, &answer).await;
    }

    /// L2, then the semantic index.
    async fn probe_shared(&self, key: &Key, query: Option<&Query>) -> Probe {
        if let Some(answer) = self.l2_get(key).await {
            return Probe {
                hit: Some((answer, Outcome::HitL2)),
                vector: None,
            };
        }
        let (Some(semantic), Some(query)) = (&self.semantic, query) else {
            return Probe {
                hit: None,
                vector: None,
            };
        };
        let Some(vector) = self.embed(&key.tenant, query).await else {
            return Probe {
                hit: None,
                vector: None,
            };
        };
        let part = PartKey {
            tenant: key.tenant.clone(),
            digest: query.partition,
        };
        let threshold = self.config.threshold(&key.tenant);
        let found = semantic.index.read().expect("index lock").search(
            &part,
            &query.text,
            &vector,
            threshold,
        );
        self.metrics
            .similarity
            .with_label_values(&[&*key.tenant])
            .observe(f64::from(found.similarity));
        Probe {
            hit: found.answer.map(|a| (a, Outcome::HitSemantic)),
            vector: Some(vector),
        }
    }

    /// The unit-length embedding of the query, when the semantic layer is
    /// on for this tenant; `None` (a semantic miss) if the model fails.
    async fn embed(&self, tenant: &str, query: &Query) -> Option<Vec<f32>> {
        let semantic = self.semantic.as_ref()?;
        if self.config.threshold(tenant) > 1.0 {
            return None;
        }
        let mut vectors = semantic
            .embedder
            .embed(EMBEDDING_MODEL_ID, vec![query.text.clone()])
            .await
            .inspect_err(|e| tracing::debug!(error = %e, "semantic cache: embedding failed"))
            .ok()?
            .vectors;
        let mut v = vectors.pop()?;
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
        Some(v)
    }

    async fn l2_get(&self, key: &Key) -> Option<Arc<Answer>> {
        let mut conn = self.redis.clone();
        let bytes: Option<Vec<u8>> = self
            .bounded("get", conn.get(exact_key(key)))
            .await
            .flatten()?;
        match serde_json::from_slice::<Answer>(&bytes?) {
            Ok(a) => Some(Arc::new(a)),
            Err(e) => {
                tracing::warn!(error = %e, "cache: unreadable L2 entry, treated as a miss");
                None
            }
        }
    }

    /// L2 and the semantic layer (local index, Redis entry, event).
    async fn store_shared(
        &self,
        key: &Key,
        query: Option<&Query>,
        vector: Option<Vec<f32>>,
        answer: &Arc<Answer>,
    ) {
        let ttl = self.config.ttl_secs;
        let json = serde_json::to_vec(&**answer).expect("answers serialize");
        let mut conn = self.redis.clone();
        let _: Option<()> = self
            .bounded("set", conn.set_ex(exact_key(key), json, ttl))
            .await;
        let (Some(semantic), Some(query), Some(vector)) = (&self.semantic, query, vector) else {
            return;
        };
        let id = entry_id(&key.tenant, query);
        let expires_ms = now_ms() + ttl * 1000;
        let stored = StoredEntry {
            text: query.text.clone(),
            tenant: key.tenant.to_string(),
            partition: hex::encode(query.partition),
            vector: vector.clone(),
            answer: (**answer).clone(),
            expires_ms,
        };
        semantic.index.write().expect("index lock").insert(Entry {
            id,
            part: PartKey {
                tenant: key.tenant.clone(),
                digest: query.partition,
            },
            text: Arc::from(query.text.as_str()),
            vector,
            answer: answer.clone(),
            expires: Instant::now() + self.config.ttl(),
        });
        self.update_sizes();
        let entry_key = semantic_key(&key.tenant, &id);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .set_ex(
                &entry_key,
                serde_json::to_vec(&stored).expect("entries serialize"),
                ttl,
            )
            .ignore()
            .xadd_maxlen(
                EVENTS,
                redis::streams::StreamMaxlen::Approx(self.config.semantic.max_entries),
                "*",
                &[("op", "add"), ("key", entry_key.as_str())],
            )
            .ignore();
        let _: Option<()> = self.bounded("add", pipe.query_async(&mut conn)).await;
    }
}
