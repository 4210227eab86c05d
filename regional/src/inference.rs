//! Inference: the request shape both APIs convert into, and the backends that
//! serve it. Today the only backend is the built-in simulator.

mod sim;

use std::collections::HashMap;
use std::sync::Arc;

use futures::stream::BoxStream;

use crate::config::{BackendConfig, ModelConfig};
use crate::error::Error;

pub(crate) use self::sim::SimBackend;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    pub role: String,
    pub content: String,
}

/// A chat request after the API layer has checked it.
#[derive(Debug, Clone)]
pub(crate) struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub max_tokens: Option<u32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    Stop,
    Length,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// One piece of a streamed completion: text, or the end with its reason and usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Chunk {
    Delta(String),
    Done { finish: Finish, usage: Usage },
}

/// A whole completion.
#[derive(Debug, Clone)]
pub(crate) struct Completion {
    pub text: String,
    pub finish: Finish,
    pub usage: Usage,
    pub time_to_first_token: std::time::Duration,
}

/// The models of a region and their backends.
pub(crate) struct Inference {
    models: HashMap<String, Model>,
    order: Vec<String>,
}

pub(crate) struct Model {
    pub config: ModelConfig,
    backend: Arc<SimBackend>,
}

impl Inference {
    pub(crate) fn new(models: &[ModelConfig]) -> Self {
        let order = models.iter().map(|m| m.id.clone()).collect();
        let models = models
            .iter()
            .map(|m| {
                let backend = match &m.backend {
                    BackendConfig::Sim(sim) => Arc::new(SimBackend::new(sim.clone())),
                };
                (
                    m.id.clone(),
                    Model {
                        config: m.clone(),
                        backend,
                    },
                )
            })
            .collect();
        Self { models, order }
    }

    /// The configured models, in config order.
    pub(crate) fn models(&self) -> impl Iterator<Item = &ModelConfig> {
        self.order.iter().map(|id| &self.models[id].config)
    }

    fn model(&self, id: &str) -> Result<&Model, Error> {
        self.models
            .get(id)
            .ok_or_else(|| Error::ModelNotFound(id.to_string()))
    }

    /// Generates a whole completion.
    pub(crate) async fn complete(&self, req: &ChatRequest) -> Result<Completion, Error> {
        self.model(&req.model)?.backend.complete(req).await
    }

    /// Generates a completion as a stream of chunks ending with [`Chunk::Done`].
    pub(crate) fn stream(&self, req: ChatRequest) -> Result<BoxStream<'static, Chunk>, Error> {
        let backend = self.model(&req.model)?.backend.clone();
        Ok(backend.stream(req))
    }
}
