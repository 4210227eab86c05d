//! Embedding models served by a pool of OpenAI-compatible upstreams
//! (`task = "embeddings"`), with concurrent small requests merged into one
//! upstream call.
//!
//! A request with fewer inputs than `max_batch` goes to a collector task:
//! the first one opens a window of `max_wait_ms`, and requests that arrive
//! in it with the same parameters (every body field but `model` and
//! `input`) join its batch until the batch holds `max_batch` inputs. The
//! batch is sent by a task of its own, so a caller that goes away does not
//! cancel it for the others; each caller then gets its own vectors and a
//! share of the usage ([`split`]). A request of `max_batch` inputs or more,
//! or any request when `max_wait_ms` is 0, is sent alone.

mod split;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

use self::split::Share;
use super::metrics::EmbedBatchMetrics;
use super::pool::Pool;
use crate::config::EmbeddingModelConfig;
use crate::error::Error;

/// An embeddings request for an upstream model, as the API checked it.
#[derive(Debug, Clone)]
pub(crate) struct EmbedCall {
    /// Every field of the client's body but `model` and `input`, sent on.
    pub params: Map<String, Value>,
    /// Texts or token-id arrays, as the client sent them.
    pub inputs: Vec<Value>,
}

/// One embedding model's pool and the sender to its collector; the
/// collector ends when this is dropped (a reload replaced the model).
pub(crate) struct EmbedPool {
    model: String,
    pool: Arc<Pool>,
    config: EmbeddingModelConfig,
    jobs: mpsc::UnboundedSender<Job>,
}

struct Job {
    /// The parameters, written in a canonical order: jobs batch only with
    /// jobs of the same key.
    key: String,
    call: EmbedCall,
    reply: oneshot::Sender<Result<Value, Error>>,
}

impl EmbedPool {
    pub(super) fn start(
        model: &str,
        pool: Arc<Pool>,
        config: EmbeddingModelConfig,
        metrics: EmbedBatchMetrics,
    ) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        let collector = Collector {
            pool: pool.clone(),
            max_batch: config.max_batch,
            max_wait: Duration::from_millis(config.max_wait_ms),
            metrics,
        };
        tokio::spawn(collector.run(rx));
        Self {
            model: model.to_string(),
            pool,
            config,
            jobs,
        }
    }

    pub(super) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Most inputs one request may carry.
    pub(crate) fn max_inputs(&self) -> usize {
        self.config.max_inputs
    }

    /// The upstream's answer for `call`, with `model` naming this model.
    pub(crate) async fn embed(&self, call: EmbedCall) -> Result<Value, Error> {
        let alone = self.config.max_wait_ms == 0 || call.inputs.len() >= self.config.max_batch;
        let mut answer = if alone {
            let mut body = call.params;
            body.insert("input".into(), Value::Array(call.inputs));
            self.pool.embed(body).await?
        } else {
            let (reply, answer) = oneshot::channel();
            let key = canonical(&call.params);
            self.jobs
                .send(Job { key, call, reply })
                .map_err(|_| Error::Unavailable("the embedding batcher has stopped".into()))?;
            answer
                .await
                .map_err(|_| Error::Unavailable("the embedding batcher has stopped".into()))??
        };
        if let Some(answer) = answer.as_object_mut() {
            answer.insert("model".into(), Value::String(self.model.clone()));
        }
        Ok(answer)
    }
}

/// The parameters with keys sorted at the top level, so two clients that
/// write the same fields in another order still share a batch.
fn canonical(params: &Map<String, Value>) -> String {
    let sorted: std::collections::BTreeMap<_, _> = params.iter().collect();
    serde_json::to_string(&sorted).unwrap_or_default()
}

struct Collector {
    pool: Arc<Pool>,
    max_batch: usize,
    max_wait: Duration,
    metrics: EmbedBatchMetrics,
}

/// Jobs gathered for one upstream call.
#[derive(Default)]
struct Batch {
    jobs: Vec<Job>,
    inputs: usize,
}

impl Collector {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut flights = JoinSet::new();
        'windows: loop {
            let first = tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => job,
                    None => break 'windows,
                },
                Some(_) = flights.join_next(), if !flights.is_empty() => continue,
            };
            let deadline = Instant::now() + self.max_wait;
            let mut open: HashMap<String, Batch> = HashMap::new();
            self.add(first, &mut open, &mut flights);
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break,
                    job = rx.recv() => match job {
                        Some(job) => self.add(job, &mut open, &mut flights),
                        None => break,
                    },
                    Some(_) = flights.join_next(), if !flights.is_empty() => {}
                }
            }
            for (_, batch) in open.drain() {
                self.send(batch, &mut flights);
            }
        }
        // The batches already sent still answer their callers.
        while flights.join_next().await.is_some() {}
    }

    /// Puts `job` in the open batch of its key: first sending that batch if
    /// the job would overfill it, then sending it when the job fills it.
    fn add(&self, job: Job, open: &mut HashMap<String, Batch>, flights: &mut JoinSet<()>) {
        let n = job.call.inputs.len();
        if open
            .get(&job.key)
            .is_some_and(|b| b.inputs + n > self.max_batch)
            && let Some(full) = open.remove(&job.key)
        {
            self.send(full, flights);
        }
        let batch = open.entry(job.key.clone()).or_default();
        batch.inputs += n;
        let key = job.key.clone();
        batch.jobs.push(job);
        if batch.inputs >= self.max_batch
            && let Some(full) = open.remove(&key)
        {
            self.send(full, flights);
        }
    }

    /// Sends `batch` in a task of its own and answers each of its callers.
    fn send(&self, batch: Batch, flights: &mut JoinSet<()>) {
        // A caller gone before the call costs nothing upstream.
        let jobs: Vec<Job> = batch
            .jobs
            .into_iter()
            .filter(|j| !j.reply.is_closed())
            .collect();
        let Some(first) = jobs.first() else {
            return;
        };
        let mut body = first.call.params.clone();
        let mut inputs = Vec::new();
        let mut shares = Vec::with_capacity(jobs.len());
        for job in &jobs {
            shares.push(Share {
                offset: inputs.len(),
                len: job.call.inputs.len(),
                weight: job.call.inputs.iter().map(split::weight).sum(),
            });
            inputs.extend(job.call.inputs.iter().cloned());
        }
        self.metrics.batches.inc();
        self.metrics.inputs.observe(inputs.len() as f64);
        if jobs.len() > 1 {
            self.metrics.merged.inc_by(jobs.len() as u64);
        }
        body.insert("input".into(), Value::Array(inputs));
        let pool = self.pool.clone();
        flights.spawn(async move {
            let answers = match pool.embed(body).await {
                Ok(answer) => split::split(&answer, &shares),
                // One caller's bad input must not fail the others: each is
                // sent again alone, and only its own fault reaches it.
                Err(Error::InvalidRequest { .. }) if jobs.len() > 1 => {
                    futures::future::join_all(jobs.iter().map(|job| {
                        let mut body = job.call.params.clone();
                        body.insert("input".into(), Value::Array(job.call.inputs.clone()));
                        pool.embed(body)
                    }))
                    .await
                }
                Err(e) => {
                    let e = Arc::new(e);
                    shares.iter().map(|_| Err(Error::shared(&e))).collect()
                }
            };
            for (job, answer) in jobs.into_iter().zip(answers) {
                let _ = job.reply.send(answer);
            }
        });
    }
}
