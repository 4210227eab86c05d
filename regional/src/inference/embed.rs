//! The built-in embedding model: all-MiniLM-L6-v2 on the CPU, in-process.
//!
//! Requests go through a bounded queue to one dedicated thread that owns the
//! model. The thread takes the first waiting request, gathers more for up to
//! `max_wait_ms` or until `max_batch` texts, and runs them in one forward
//! pass; requests arriving meanwhile wait in the queue for the next batch, so
//! under load batches fill without waiting. The model never runs on the async
//! runtime, and one thread (whose matrix products use candle's own worker
//! threads) keeps two large batches from competing for the same cores.

mod metrics;
mod model;

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use self::metrics::Metrics;
use self::model::MiniLm;
use crate::config::EmbeddingsConfig;
use crate::error::Error;

/// The id clients send as `model`.
pub(crate) const EMBEDDING_MODEL_ID: &str = "all-minilm-l6-v2";

/// The vectors of one request, in input order, and its token count.
#[derive(Debug)]
pub(crate) struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    /// Tokens of the texts, without the `[CLS]` and `[SEP]` the model adds
    /// (OpenAI counts the text alone).
    pub prompt_tokens: u32,
}

/// A handle on the model's thread; the thread ends when the last handle is
/// dropped.
pub(crate) struct Embedder {
    queue: SyncSender<Job>,
    dimensions: usize,
    max_inputs: usize,
    max_input_tokens: usize,
    metrics: std::sync::Arc<Metrics>,
}

struct Job {
    inputs: Vec<String>,
    reply: oneshot::Sender<Result<Embeddings, Error>>,
}

impl Embedder {
    /// Fails when a model file is missing: cheap, so the node can refuse to
    /// start before it touches a port or a store.
    pub(crate) fn check_files(config: &EmbeddingsConfig) -> Result<(), Error> {
        model::check_files(&config.model_dir).map(drop)
    }

    /// Loads the model and starts its thread. Blocks for the load (a
    /// fraction of a second to a few seconds): call it off the runtime.
    pub(crate) fn start(config: &EmbeddingsConfig, region: &str) -> Result<Self, Error> {
        let started = Instant::now();
        let model = MiniLm::load(&config.model_dir)?;
        let metrics = std::sync::Arc::new(Metrics::new(region));
        metrics.load.set(started.elapsed().as_secs_f64());
        let (queue, rx) = std::sync::mpsc::sync_channel(config.max_queued);
        let dimensions = model.dimensions();
        let batcher = Batcher {
            model,
            rx,
            max_batch: config.max_batch,
            max_wait: config.max_wait(),
            max_input_tokens: config.max_input_tokens,
            metrics: metrics.clone(),
        };
        std::thread::Builder::new()
            .name(format!("embed-{region}"))
            .spawn(move || batcher.run())?;
        tracing::info!(
            model = EMBEDDING_MODEL_ID,
            dir = %config.model_dir.display(),
            load_ms = started.elapsed().as_millis() as u64,
            "embedding model loaded"
        );
        Ok(Self {
            queue,
            dimensions,
            max_inputs: config.max_inputs,
            max_input_tokens: config.max_input_tokens,
            metrics,
        })
    }

    /// Longest text the node takes, in tokens with `[CLS]` and `[SEP]`.
    pub(crate) fn max_input_tokens(&self) -> u32 {
        u32::try_from(self.max_input_tokens).unwrap_or(u32::MAX)
    }

    /// Length of every vector.
    pub(crate) fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// Embeds `inputs` with `model`, which must be [`EMBEDDING_MODEL_ID`]. Bad inputs
    /// are refused as a whole, naming the first offending index.
    pub(crate) async fn embed(
        &self,
        model: &str,
        inputs: Vec<String>,
    ) -> Result<Embeddings, Error> {
        if model != EMBEDDING_MODEL_ID {
            return Err(Error::ModelNotFound(model.to_string()));
        }
        if inputs.is_empty() {
            return Err(Error::invalid(
                "`input` must contain at least one text",
                Some("input"),
            ));
        }
        if inputs.len() > self.max_inputs {
            return Err(Error::invalid(
                format!(
                    "`input` has {} texts; at most {} are allowed in one request",
                    inputs.len(),
                    self.max_inputs
                ),
                Some("input"),
            ));
        }
        if let Some(i) = inputs.iter().position(|s| s.is_empty()) {
            return Err(Error::invalid(
                format!("`input[{i}]` is empty"),
                Some("input"),
            ));
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Job { inputs, reply })
            .map_err(|e| match e {
                TrySendError::Full(_) => {
                    Error::Unavailable("the embedding model's queue is full: retry later".into())
                }
                TrySendError::Disconnected(_) => {
                    Error::Unavailable("the embedding model has stopped".into())
                }
            })?;
        self.metrics.requests.inc();
        answer
            .await
            .map_err(|_| Error::EmbeddingModel("the model's thread ended".into()))?
    }

    /// The embedding metrics, in Prometheus' text format.
    pub(crate) fn render_metrics(&self) -> String {
        self.metrics.render()
    }
}

/// The model's thread: gathers jobs into batches and runs them.
struct Batcher {
    model: MiniLm,
    rx: Receiver<Job>,
    max_batch: usize,
    max_wait: Duration,
    max_input_tokens: usize,
    metrics: std::sync::Arc<Metrics>,
}

/// A job whose texts are tokenized and within limits.
struct Admitted {
    reply: oneshot::Sender<Result<Embeddings, Error>>,
    seqs: Vec<Vec<u32>>,
}

impl Batcher {
    fn run(self) {
        while let Ok(first) = self.rx.recv() {
            let deadline = Instant::now() + self.max_wait;
            let mut batch = Vec::new();
            let mut texts = self.admit(first, &mut batch);
            while texts < self.max_batch {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.rx.recv_timeout(left) {
                    Ok(job) => texts += self.admit(job, &mut batch),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
            self.run_batch(batch);
        }
    }

    /// Tokenizes a job's texts; answers it at once when one is too long.
    /// Returns the number of texts it adds to the batch.
    fn admit(&self, job: Job, batch: &mut Vec<Admitted>) -> usize {
        if job.reply.is_closed() {
            return 0;
        }
        let mut seqs = Vec::with_capacity(job.inputs.len());
        for (i, text) in job.inputs.iter().enumerate() {
            let ids = match self.model.tokenize(text) {
                Ok(ids) => ids,
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                    return 0;
                }
            };
            if ids.len() > self.max_input_tokens {
                let _ = job.reply.send(Err(Error::invalid(
                    format!(
                        "`input[{i}]` is {} tokens long with [CLS] and [SEP]; {EMBEDDING_MODEL_ID} takes \
                         at most {}: shorten or split it",
                        ids.len(),
                        self.max_input_tokens
                    ),
                    Some("input"),
                )));
                return 0;
            }
            seqs.push(ids);
        }
        let n = seqs.len();
        batch.push(Admitted {
            reply: job.reply,
            seqs,
        });
        n
    }

    fn run_batch(&self, batch: Vec<Admitted>) {
        // A client that went away while queued costs no compute.
        let batch: Vec<_> = batch.into_iter().filter(|a| !a.reply.is_closed()).collect();
        // Texts of similar length side by side: each pass pads to its
        // longest text, so sorting wastes the least work on padding.
        let mut order: Vec<(usize, usize)> = batch
            .iter()
            .enumerate()
            .flat_map(|(j, a)| (0..a.seqs.len()).map(move |i| (j, i)))
            .collect();
        order.sort_by_key(|&(j, i)| batch[j].seqs[i].len());
        let mut vectors: Vec<Vec<Vec<f32>>> = batch
            .iter()
            .map(|a| vec![Vec::new(); a.seqs.len()])
            .collect();
        for chunk in order.chunks(self.max_batch) {
            let seqs: Vec<&[u32]> = chunk
                .iter()
                .map(|&(j, i)| batch[j].seqs[i].as_slice())
                .collect();
            let started = Instant::now();
            // A panic in the model must not take the thread, and with it
            // every later request, down.
            let out = std::panic::catch_unwind(AssertUnwindSafe(|| self.model.embed(&seqs)))
                .unwrap_or_else(|_| Err(Error::EmbeddingModel("forward pass panicked".into())));
            self.metrics
                .forward
                .observe(started.elapsed().as_secs_f64());
            self.metrics.batches.inc();
            self.metrics.batch_size.observe(seqs.len() as f64);
            match out {
                Ok(out) => {
                    for (&(j, i), v) in chunk.iter().zip(out) {
                        vectors[j][i] = v;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "embedding batch failed");
                    for a in batch {
                        let _ = a.reply.send(Err(Error::EmbeddingModel(e.to_string())));
                    }
                    return;
                }
            }
        }
        for (a, vectors) in batch.into_iter().zip(vectors) {
            self.metrics.inputs.inc_by(vectors.len() as u64);
            // [CLS] and [SEP] are the model's, not the client's.
            let tokens: usize = a.seqs.iter().map(|s| s.len().saturating_sub(2)).sum();
            let _ = a.reply.send(Ok(Embeddings {
                vectors,
                prompt_tokens: u32::try_from(tokens).unwrap_or(u32::MAX),
            }));
        }
    }
}
