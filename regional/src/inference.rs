//! Inference: the request shape both APIs convert into, the model table
//! (models, aliases, their backends) and the backends that serve it: the
//! built-in simulator and pools of OpenAI-compatible HTTP upstreams.
//!
//! A request is admitted ([`Inference::admit`]), routed to a real model
//! ([`Inference::route`]: aliases resolved, context window checked), then
//! completed or streamed by that model's backend under its deadline. The
//! table sits behind an `ArcSwap`, so `POST /admin/reload` swaps it whole
//! while in-flight requests finish on the table they started with.

mod admission;
mod anthropic;
mod embed;
mod embed_pool;
mod metrics;
mod openai;
mod pool;
mod reply;
mod route;
pub(crate) mod routes;
mod sim;
mod sse;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use serde_json::{Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{AliasConfig, BackendConfig, Config, ModelConfig, Task};
use crate::error::Error;

use self::admission::Admission;
pub(crate) use self::admission::Permit;
pub(crate) use self::embed::{EMBEDDING_MODEL_ID, Embedder};
pub(crate) use self::embed_pool::{EmbedCall, EmbedPool};
use self::metrics::Metrics;
pub(crate) use self::openai::json_f32;
use self::pool::Pool;
pub(crate) use self::reply::{
    Assembly, Delta, Extras, FunctionCall, FunctionDelta, Meta, ToolCall, ToolCallDelta,
};
pub(crate) use self::route::SizeHint;
use self::route::Table;
pub(crate) use self::sim::SimBackend;
pub use self::sim::{SimProtocol, serve_sim, serve_sim_as, serve_sim_requiring, serve_sim_traced};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    pub role: String,
    /// The text of the message (of its text parts, when it has parts):
    /// what token estimates, the simulator and the semantic cache read.
    pub content: String,
    /// The message as the client sent it, when it carries more than a role
    /// and a text: content parts (images, audio, files), an assistant's
    /// `tool_calls`, a tool result's `tool_call_id`, a `name`. Sent to an
    /// OpenAI-protocol upstream as is.
    pub raw: Option<Arc<Map<String, Value>>>,
}

impl Message {
    pub(crate) fn text(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            raw: None,
        }
    }
}

/// A chat request after the API layer has checked it.
#[derive(Debug, Clone)]
pub(crate) struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub max_tokens: Option<u32>,
    /// Whether the client named the limit `max_completion_tokens` (which
    /// reasoning models require) rather than `max_tokens`; the upstream
    /// gets the name the client used.
    pub max_completion_tokens: bool,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Sampling temperature, 0 to 2; the backend's default when unset.
    pub temperature: Option<f32>,
    /// Every top-level field of the client's request that Meridian does not
    /// act on itself (`tools`, `tool_choice`, `response_format`, `top_p`,
    /// `logprobs`, `user`, and fields not invented yet), passed to an
    /// OpenAI-protocol upstream unchanged. Part of the cache key.
    pub extra: Arc<Map<String, Value>>,
}

impl ChatRequest {
    /// One user message to `model`, nothing else set.
    #[cfg(test)]
    pub(crate) fn asking(model: &str, content: &str) -> Self {
        Self {
            model: model.into(),
            messages: vec![Message::text("user", content)],
            max_tokens: None,
            max_completion_tokens: false,
            seed: None,
            stop: vec![],
            temperature: None,
            extra: Arc::default(),
        }
    }

    /// Prompt tokens, estimated: each whitespace-separated word is one
    /// token, a long one (over 16 bytes) one more per 4 bytes beyond, as a
    /// BPE tokenizer splits what it has no word for; plus 4 per message.
    /// Close enough to a real tokenizer for routing, context checks and the
    /// simulator's accounting, and the same everywhere; a 2 MiB message
    /// without a space counts half a million tokens, not one.
    pub(crate) fn prompt_tokens(&self) -> u32 {
        let tokens: u64 = self
            .messages
            .iter()
            .map(|m| 4 + m.content.split_whitespace().map(word_tokens).sum::<u64>())
            .sum();
        u32::try_from(tokens).unwrap_or(u32::MAX)
    }
}

fn word_tokens(word: &str) -> u64 {
    1 + (word.len().saturating_sub(16) as u64).div_ceil(4)
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Finish {
    Stop,
    Length,
    ToolCalls,
    ContentFilter,
    /// The deprecated single-function form of `tool_calls`.
    FunctionCall,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ToolCalls => "tool_calls",
            Self::ContentFilter => "content_filter",
            Self::FunctionCall => "function_call",
        }
    }

    /// Reads an OpenAI `finish_reason`; one not known here is a stop.
    pub(crate) fn parse(reason: &str) -> Self {
        match reason {
            "length" => Self::Length,
            "tool_calls" => Self::ToolCalls,
            "content_filter" => Self::ContentFilter,
            "function_call" => Self::FunctionCall,
            _ => Self::Stop,
        }
    }
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// One piece of a streamed completion, or the end with its reason, usage
/// and the answer's fields Meridian passes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Chunk {
    Delta(Delta),
    Done {
        finish: Finish,
        usage: Usage,
        meta: Meta,
    },
}

/// A streamed completion: chunks ending with [`Chunk::Done`], or an error
/// once the client has seen part of the answer (a failed upstream, the
/// deadline).
pub(crate) type ChunkStream = BoxStream<'static, Result<Chunk, Error>>;

/// A whole completion.
#[derive(Debug, Clone)]
pub(crate) struct Completion {
    pub text: String,
    pub finish: Finish,
    pub usage: Usage,
    pub time_to_first_token: std::time::Duration,
    pub extras: Extras,
    /// Set when another model than the one routed to served.
    pub fallback: Option<Fallback>,
}

/// A request served by a fallback: by `to` rather than `from`, the model
/// it was routed to, because of `reason`. Kept with a cached answer, so a
/// hit says which model wrote it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Fallback {
    pub from: String,
    pub to: String,
    /// `context_window` (the request did not fit `from`), `unavailable`
    /// (429, 5xx, connect failure, first-byte timeout, no healthy
    /// upstream) or `refused` (the upstream refused the region's key).
    pub reason: String,
}

impl Fallback {
    /// The `x-meridian-fallback` value: where the request went first, and why
    /// it left (`x-meridian-model` names the model that served).
    pub(crate) fn header(&self) -> String {
        format!("from={}; reason={}", self.from, self.reason)
    }
}

/// Whether `e`, from a model's backend before its answer started, sends the
/// request on to the next fallback; the reason it gives.
fn fallback_reason(e: &Error) -> Option<&'static str> {
    match e {
        Error::Unavailable(_) | Error::NoHealthyBackend { .. } => Some("unavailable"),
        Error::UpstreamRefused { .. } => Some("refused"),
        _ => None,
    }
}

/// What routes a request besides its body: the parts of a request that
/// only an alias looks at.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Hints {
    /// The body carries tools (`tools` in the OpenAI body).
    pub has_tools: bool,
    /// `x-meridian-routing-hint` / `routing_hint`.
    pub size: Option<SizeHint>,
}

/// A model as the APIs list it.
#[derive(Debug, Clone)]
pub(crate) struct ModelInfo {
    pub id: String,
    pub context_window_tokens: u32,
    /// An alias rather than a model.
    pub alias: bool,
    /// What it serves (an alias serves chat).
    pub task: crate::config::Task,
    /// Upstreams able to take requests now, and all of them (1 and 1 for
    /// the simulator).
    pub healthy_backends: u32,
    pub total_backends: u32,
}

/// The moderation model a request that names none gets, if the region
/// has one by this name: OpenAI's default.
const DEFAULT_MODERATION_MODEL: &str = "omni-moderation-latest";

/// The models of a region, their backends, and admission control.
pub(crate) struct Inference {
    table: ArcSwap<Table>,
    admission: Admission,
    metrics: Arc<Metrics>,
    /// Stops the health checkers of every pool at shutdown.
    shutdown: CancellationToken,
    /// Where `reload` reads models and aliases from.
    source: Option<std::path::PathBuf>,
    /// The config's aliases and the API's routes the table was built from.
    routes: std::sync::Mutex<routes::RouteState>,
    /// Deadline of HTTP requests that name none.
    pub default_timeout: Duration,
}

/// A request's model, chosen: the backend that serves it and its config,
/// and the models tried after it when it fails before answering.
#[derive(Clone)]
pub(crate) struct Routed {
    model: Arc<route::Model>,
    /// In order; each fits the request.
    fallbacks: Vec<Arc<route::Model>>,
    /// Set when a context fallback is `model`.
    chosen: Option<Fallback>,
}

impl Inference {
    pub(crate) fn new(config: &Config, shutdown: CancellationToken) -> Result<Self, Error> {
        let metrics = Arc::new(Metrics::new(&config.region));
        let inference = Self {
            table: ArcSwap::from_pointee(Table::default()),
            admission: Admission::new(
                config.max_in_flight,
                config.inference.max_in_flight_per_tenant,
                Duration::from_millis(config.inference.retry_after_ms),
            ),
            metrics,
            shutdown,
            source: config.source.clone(),
            routes: std::sync::Mutex::new(routes::RouteState::default()),
            default_timeout: Duration::from_millis(config.inference.request_timeout_ms),
        };
        let table = inference.build(&config.models, &config.aliases, None)?;
        inference.table.store(Arc::new(table));
        let (_, views) = routes::compose(&config.models, &config.aliases, &[]);
        *inference.routes() = routes::RouteState {
            config: config.aliases.clone(),
            api: Vec::new(),
            views,
        };
        Ok(inference)
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, routes::RouteState> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves the API's `routes` over the config's aliases, when they
    /// changed; a route this region cannot serve is left out (see
    /// [`Inference::route_views`]).
    pub(crate) fn set_api_routes(&self, api: Vec<AliasConfig>) {
        let mut state = self.routes();
        if state.api == api {
            return;
        }
        let table = self.table.load_full();
        let (aliases, views) = routes::compose(&table.model_configs(), &state.config, &api);
        self.table.store(Arc::new(table.with_aliases(&aliases)));
        let applied = views
            .iter()
            .filter(|v| v.source == "api" && v.applied)
            .count();
        tracing::info!(
            routes = api.len(),
            applied,
            "model routes from the API applied"
        );
        state.api = api;
        state.views = views;
    }

    /// Every route, its source and whether this region serves it.
    pub(crate) fn route_views(&self) -> Vec<routes::RouteView> {
        self.routes().views.clone()
    }

    /// Why this region could not serve `route` with the routes it has, if
    /// it could not.
    pub(crate) fn route_problem(&self, route: &AliasConfig) -> Option<String> {
        let state = self.routes();
        let mut api: Vec<_> = state
            .api
            .iter()
            .filter(|r| r.id != route.id)
            .cloned()
            .collect();
        api.push(route.clone());
        api.sort_by(|a, b| a.id.cmp(&b.id));
        let models = self.table.load().model_configs();
        let (_, views) = routes::compose(&models, &state.config, &api);
        views
            .into_iter()
            .find(|v| v.id == route.id && v.source == "api")
            .and_then(|v| v.problem)
    }

    /// Makes a table; backends whose config did not change are taken over
    /// from `old`, so a reload keeps their caches, breakers and queues. A
    /// pool is kept only if the files and variables it read (keys,
    /// certificates) say the same too: a reload is how a rotated key
    /// reaches a running region. Those files are small, read on the
    /// runtime like the config file itself.
    fn build(
        &self,
        models: &[ModelConfig],
        aliases: &[AliasConfig],
        old: Option<&Table>,
    ) -> Result<Table, Error> {
        let invalid = |message: String| Error::Config {
            origin: self
                .source
                .as_ref()
                .map_or_else(|| "(no file)".into(), |p| p.display().to_string()),
            message,
        };
        let mut built = Vec::with_capacity(models.len());
        for (i, m) in models.iter().enumerate() {
            let material = match m.backend.pool() {
                Some(cfg) => Some(pool::Material::read(i, cfg).map_err(invalid)?),
                None => None,
            };
            let reused = old
                .and_then(|t| t.model(&m.id))
                .filter(|o| o.config.backend == m.backend)
                .filter(|o| o.config.task == m.task && o.config.embeddings == m.embeddings)
                .filter(|o| match (&o.backend, &material) {
                    (route::Backend::Pool(p), Some(material)) => p.material() == material,
                    (route::Backend::Embed(e), Some(material)) => e.pool().material() == material,
                    _ => true,
                })
                .map(|o| o.backend.clone());
            let backend = match (reused, &m.backend) {
                (Some(b), _) => b,
                (None, BackendConfig::Sim(sim)) => route::Backend::Sim(Arc::new(SimBackend::new(
                    sim.clone(),
                    self.metrics.sim(&m.id),
                ))),
                (
                    None,
                    BackendConfig::OpenAi(cfg)
                    | BackendConfig::Anthropic(cfg)
                    | BackendConfig::Azure(cfg),
                ) => {
                    let pool = pool::Pool::start(
                        (i, &m.id),
                        (
                            pool::Protocol::of(&m.backend).expect("a pool backend"),
                            cfg.clone(),
                        ),
                        material.expect("read for every pool above"),
                        self.metrics.clone(),
                        self.shutdown.clone(),
                    )
                    .map_err(invalid)?;
                    match m.task {
                        // Routing checks the task before it looks at the
                        // backend, so a moderation pool never gets chat.
                        Task::Chat | Task::Moderations => route::Backend::Pool(pool),
                        Task::Embeddings => route::Backend::Embed(Arc::new(EmbedPool::start(
                            &m.id,
                            pool,
                            m.embeddings.clone().unwrap_or_default(),
                            self.metrics.embed_batch(&m.id),
                        ))),
                    }
                }
            };
            built.push(route::Model {
                config: m.clone(),
                backend,
            });
        }
        Ok(Table::new(built, aliases))
    }

    /// Reads the config file again and swaps in its models and aliases;
    /// requests already running finish on the table they started with.
    /// Other settings need a restart.
    pub(crate) fn reload(&self) -> Result<Vec<ModelInfo>, Error> {
        let Some(path) = &self.source else {
            return Err(Error::invalid(
                "this node was not started from a config file: nothing to reload",
                None,
            ));
        };
        // A bad file is the operator's request gone wrong: say why, keep
        // serving the old table.
        let config = Config::from_file(path).map_err(|e| Error::invalid(e.to_string(), None))?;
        let mut state = self.routes();
        let (aliases, views) = routes::compose(&config.models, &config.aliases, &state.api);
        let old = self.table.load_full();
        let table = self
            .build(&config.models, &aliases, Some(&old))
            .map_err(|e| match e {
                Error::Config { .. } => Error::invalid(e.to_string(), None),
                e => e,
            })?;
        self.table.store(Arc::new(table));
        state.config = config.aliases;
        state.views = views;
        drop(state);
        tracing::info!(path = %path.display(), "models and aliases reloaded");
        Ok(self.models().collect())
    }

    /// The configured models, then the aliases, in config order.
    pub(crate) fn models(&self) -> std::vec::IntoIter<ModelInfo> {
        self.table.load().list().into_iter()
    }

    /// Takes an in-flight slot for `tenant`, or refuses at once.
    pub(crate) fn admit(&self, tenant: &str) -> Result<Permit, Error> {
        self.admission.admit(tenant)
    }

    /// Takes an in-flight slot for `tenant`, waiting until one is free.
    pub(crate) async fn admit_waiting(&self, tenant: &str) -> Permit {
        self.admission.admit_waiting(tenant).await
    }

    /// Resolves an alias to a real model (rewriting `req.model`) and checks
    /// the request fits that model.
    pub(crate) fn route(&self, req: &mut ChatRequest, hints: &Hints) -> Result<Routed, Error> {
        let table = self.table.load();
        let first = table.route(req, hints)?;
        let fallbacks = table.fallbacks(&req.model, &first);
        // In u64: `max_tokens` may be as large as u32 allows.
        let tokens = u64::from(req.prompt_tokens()) + u64::from(req.max_tokens.unwrap_or(0));
        let fits = |m: &route::Model| tokens <= u64::from(m.config.context_window_tokens);
        let (model, chosen) = if fits(&first) {
            (first, None)
        } else {
            let Some(bigger) = fallbacks.context.iter().find(|m| fits(m)) else {
                return Err(Error::ContextLengthExceeded {
                    tokens,
                    window: first.config.context_window_tokens,
                });
            };
            let chosen = Fallback {
                from: first.config.id.clone(),
                to: bigger.config.id.clone(),
                reason: "context_window".into(),
            };
            (bigger.clone(), Some(chosen))
        };
        req.model = model.config.id.clone();
        let fallbacks = fallbacks
            .errors
            .iter()
            .filter(|m| m.config.id != model.config.id && fits(m))
            .cloned()
            .collect();
        Ok(Routed {
            model,
            fallbacks,
            chosen,
        })
    }

    /// The upstream embedding model `id`; `None` when the table has no
    /// such name (the built-in model may have it); a chat model or an
    /// alias is refused by name.
    pub(crate) fn embedding_model(&self, id: &str) -> Result<Option<Arc<EmbedPool>>, Error> {
        let table = self.table.load();
        match table.model(id).map(|m| &m.backend) {
            Some(route::Backend::Embed(e)) => Ok(Some(e.clone())),
            Some(_) => Err(route::wrong_task(id, Task::Chat, Task::Embeddings)),
            None if table.is_alias(id) => Err(route::wrong_task(id, Task::Chat, Task::Embeddings)),
            None => Ok(None),
        }
    }

    /// The moderation model `id` names, or without one the region's default:
    /// the model named `omni-moderation-latest` (OpenAI's default, so a
    /// client that names none gets what it would there), else the first
    /// moderation model in config order. Its id and pool.
    pub(crate) fn moderation_model(&self, id: Option<&str>) -> Result<(String, Arc<Pool>), Error> {
        let table = self.table.load();
        let pool = |m: &route::Model| match &m.backend {
            route::Backend::Pool(p) if m.config.task == Task::Moderations => {
                Ok((m.config.id.clone(), p.clone()))
            }
            _ => Err(route::wrong_task(
                &m.config.id,
                m.config.task,
                Task::Moderations,
            )),
        };
        let not_configured = || {
            Error::NotFound(
                "this region serves no moderation model: /v1/moderations needs a [[models]] \
                 entry with task = \"moderations\" and an OpenAI-compatible backend that \
                 offers it"
                    .into(),
            )
        };
        match id {
            Some(id) => match table.model(id) {
                Some(m) => pool(m),
                None if table.is_alias(id) => {
                    Err(route::wrong_task(id, Task::Chat, Task::Moderations))
                }
                None if table.of_task(Task::Moderations).next().is_none() => Err(not_configured()),
                None => Err(Error::ModelNotFound(id.to_string())),
            },
            None => table
                .model(DEFAULT_MODERATION_MODEL)
                .filter(|m| m.config.task == Task::Moderations)
                .or_else(|| table.of_task(Task::Moderations).next())
                .map_or_else(|| Err(not_configured()), |m| pool(m)),
        }
    }

    /// The Prometheus text of the inference metrics.
    pub(crate) fn render_metrics(&self) -> String {
        self.metrics.render()
    }
}

impl Routed {
    /// Generates a whole completion, cut at `deadline`; a model that fails
    /// before answering hands the request to the next fallback, all within
    /// the one deadline.
    pub(crate) async fn complete(
        &self,
        req: &ChatRequest,
        deadline: Option<Instant>,
    ) -> Result<Completion, Error> {
        let work = async {
            let mut failed = None;
            for (i, model) in self.candidates().enumerate() {
                let asked = self.asked(req, i, model);
                let result = match &model.backend {
                    route::Backend::Sim(sim) => sim.complete(&asked).await,
                    route::Backend::Pool(pool) => match pool.stream(asked.into_owned()).await {
                        Ok(stream) => collect(stream).await,
                        Err(e) => Err(e),
                    },
                    route::Backend::Embed(_) => Err(embedding_for_chat(model)),
                };
                match self.next(i, model, result, &mut failed)? {
                    Some(mut done) => {
                        done.fallback = self.fallback(i, model, failed.as_ref());
                        return Ok(done);
                    }
                    None => continue,
                }
            }
            unreachable!("the last candidate's error is returned")
        };
        match deadline {
            Some(d) => tokio::time::timeout_at(d, work)
                .await
                .map_err(|_| Error::DeadlineExceeded)?,
            None => work.await,
        }
    }

    /// Generates a completion as a stream. Resolves once the first chunk is
    /// ready, so everything that fails before the client sees a byte (and
    /// every retry and fallback) happens here and gets a proper status; the
    /// stream ends with an error if `deadline` passes while it runs.
    pub(crate) async fn stream(
        &self,
        req: ChatRequest,
        deadline: Option<Instant>,
    ) -> Result<(ChunkStream, Option<Fallback>), Error> {
        let work = async {
            let mut failed = None;
            for (i, model) in self.candidates().enumerate() {
                let asked = self.asked(&req, i, model).into_owned();
                let result = async {
                    let stream = match &model.backend {
                        route::Backend::Sim(sim) => sim.stream(asked).map(Ok).boxed(),
                        route::Backend::Pool(pool) => pool.stream(asked).await?,
                        route::Backend::Embed(_) => return Err(embedding_for_chat(model)),
                    };
                    first_chunk(stream).await
                }
                .await;
                if let Some(stream) = self.next(i, model, result, &mut failed)? {
                    return Ok((stream, self.fallback(i, model, failed.as_ref())));
                }
            }
            unreachable!("the last candidate's error is returned")
        };
        let Some(deadline) = deadline else {
            return work.await;
        };
        let (stream, fallback) = tokio::time::timeout_at(deadline, work)
            .await
            .map_err(|_| Error::DeadlineExceeded)??;
        Ok((cut_at(stream, deadline), fallback))
    }

    fn candidates(&self) -> impl Iterator<Item = &Arc<route::Model>> {
        std::iter::once(&self.model).chain(&self.fallbacks)
    }

    /// The request as candidate `i` gets it: a fallback under its own name,
    /// which the simulator's output depends on.
    fn asked<'r>(
        &self,
        req: &'r ChatRequest,
        i: usize,
        model: &route::Model,
    ) -> std::borrow::Cow<'r, ChatRequest> {
        if i == 0 {
            return std::borrow::Cow::Borrowed(req);
        }
        let mut req = req.clone();
        req.model = model.config.id.clone();
        std::borrow::Cow::Owned(req)
    }

    /// What candidate `i`'s `result` means: its answer; `None` to go on to
    /// the next (the failure kept in `failed`); or the error to return,
    /// when it does not send a request on or no candidate is left.
    fn next<T>(
        &self,
        i: usize,
        model: &route::Model,
        result: Result<T, Error>,
        failed: &mut Option<(String, &'static str)>,
    ) -> Result<Option<T>, Error> {
        match result {
            Ok(done) => Ok(Some(done)),
            Err(e) => match fallback_reason(&e) {
                Some(reason) if i < self.fallbacks.len() => {
                    tracing::warn!(model = %model.config.id, error = %e, "model failed; trying its next fallback");
                    failed.get_or_insert((model.config.id.clone(), reason));
                    Ok(None)
                }
                _ => Err(e),
            },
        }
    }

    /// The fallback that candidate `i` answering makes: the context
    /// fallback chosen at routing, or the first failure's.
    fn fallback(
        &self,
        i: usize,
        model: &route::Model,
        failed: Option<&(String, &'static str)>,
    ) -> Option<Fallback> {
        match (i, failed) {
            (0, _) | (_, None) => self.chosen.clone(),
            (_, Some((first, reason))) => Some(Fallback {
                from: self
                    .chosen
                    .as_ref()
                    .map_or_else(|| first.clone(), |c| c.from.clone()),
                to: model.config.id.clone(),
                reason: (*reason).into(),
            }),
        }
    }
}

/// Routing refuses chat with an embedding model; this keeps a table that
/// says otherwise from sending one to an embedding server.
fn embedding_for_chat(model: &route::Model) -> Error {
    route::wrong_task(&model.config.id, Task::Embeddings, Task::Chat)
}

/// Waits for the first item, then hands back the whole stream.
async fn first_chunk(mut stream: ChunkStream) -> Result<ChunkStream, Error> {
    match stream.next().await {
        Some(Ok(first)) => Ok(futures::stream::once(async { Ok(first) })
            .chain(stream)
            .boxed()),
        Some(Err(e)) => Err(e),
        None => Err(Error::Unavailable(
            "the backend ended without answering".into(),
        )),
    }
}

/// Ends `stream` with [`Error::DeadlineExceeded`] at `deadline`; dropping
/// the inner stream cancels the backend's work (closes the upstream call).
fn cut_at(stream: ChunkStream, deadline: Instant) -> ChunkStream {
    async_stream::stream! {
        let mut stream = stream;
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    Some(item) => yield item,
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => {
                    yield Err(Error::DeadlineExceeded);
                    break;
                }
            }
        }
    }
    .boxed()
}

/// Collects a stream into a whole completion.
async fn collect(stream: ChunkStream) -> Result<Completion, Error> {
    let started = Instant::now();
    let mut stream = stream;
    let mut assembly = Assembly::default();
    let mut first = None;
    while let Some(chunk) = stream.try_next().await? {
        match chunk {
            Chunk::Delta(d) => {
                first.get_or_insert_with(|| started.elapsed());
                assembly.push(&d);
            }
            Chunk::Done {
                finish,
                usage,
                meta,
            } => {
                let (text, extras) = assembly.finish(meta);
                return Ok(Completion {
                    text,
                    finish,
                    usage,
                    time_to_first_token: first.unwrap_or_else(|| started.elapsed()),
                    extras,
                    fallback: None,
                });
            }
        }
    }
    Err(Error::Unavailable("the backend stopped early".into()))
}

/// Reads an `x-meridian-timeout-ms` value.
pub(crate) fn parse_timeout_ms(value: &str) -> Result<Duration, Error> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .ok_or_else(|| {
            Error::invalid(
                "`x-meridian-timeout-ms` must be a whole number of milliseconds above 0",
                None,
            )
        })
}

/// Reads a `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m,
/// u, n), per the gRPC HTTP/2 protocol.
pub(crate) fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
