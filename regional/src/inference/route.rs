//! The model table: real models with their backends, and aliases that pick
//! one of them per request, by size or by weight.

use std::collections::HashMap;
use std::sync::Arc;

use rand::Rng;

use super::embed_pool::EmbedPool;
use super::pool::Pool;
use super::sim::{Fnv, SimBackend};
use super::{ChatRequest, Hints, ModelInfo};
use crate::config::{AliasConfig, ModelConfig, Task};
use crate::error::Error;

/// `x-meridian-routing-hint` / `routing_hint`: the client's own view of
/// how hard its request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SizeHint {
    Small,
    Large,
}

impl SizeHint {
    /// `small` or `large`; anything else (empty, or a region name the proto
    /// also allows there) is no size hint.
    pub(crate) fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "small" => Some(Self::Small),
            "large" => Some(Self::Large),
            _ => None,
        }
    }
}

/// The refusal of a request for `wanted` to model `id`, which serves `task`.
pub(super) fn wrong_task(id: &str, task: Task, wanted: Task) -> Error {
    Error::invalid(
        format!(
            "model {id:?} serves {}, not {}",
            task.serves(),
            wanted.serves()
        ),
        Some("model"),
    )
}

#[derive(Clone)]
pub(super) enum Backend {
    Sim(Arc<SimBackend>),
    Pool(Arc<Pool>),
    /// A pool serving embeddings, behind its batcher.
    Embed(Arc<EmbedPool>),
}

pub(super) struct Model {
    pub config: ModelConfig,
    pub backend: Backend,
}

enum Rule {
    BySize {
        small: Arc<Model>,
        large: Arc<Model>,
        large_above_prompt_tokens: u32,
    },
    /// Cumulative weights, ascending, with their models.
    ByWeight { cumulative: Vec<(u64, Arc<Model>)> },
}

/// Where a request goes when its model fails or is too small for it, in
/// order.
#[derive(Default)]
pub(super) struct Fallbacks {
    pub errors: Vec<Arc<Model>>,
    pub context: Vec<Arc<Model>>,
}

#[derive(Default)]
pub(super) struct Table {
    models: HashMap<String, Arc<Model>>,
    aliases: HashMap<String, Rule>,
    /// By model or alias id, for those that name any.
    fallbacks: HashMap<String, Arc<Fallbacks>>,
    /// Models, then aliases, in config order.
    order: Vec<String>,
}

impl Table {
    /// A table from validated config: alias targets name models.
    pub(super) fn new(models: Vec<Model>, aliases: &[AliasConfig]) -> Self {
        let mut order: Vec<String> = models.iter().map(|m| m.config.id.clone()).collect();
        let models: HashMap<_, _> = models
            .into_iter()
            .map(|m| (m.config.id.clone(), Arc::new(m)))
            .collect();
        let get = |id: &str| models[id].clone();
        let lists = |errors: &[String], context: &[String]| {
            let all = |ids: &[String]| ids.iter().map(|id| get(id)).collect();
            Arc::new(Fallbacks {
                errors: all(errors),
                context: all(context),
            })
        };
        let fallbacks = models
            .values()
            .map(|m| {
                (
                    &m.config.id,
                    &m.config.fallbacks,
                    &m.config.context_fallbacks,
                )
            })
            .chain(
                aliases
                    .iter()
                    .map(|a| (&a.id, &a.fallbacks, &a.context_fallbacks)),
            )
            .filter(|(_, e, c)| !e.is_empty() || !c.is_empty())
            .map(|(id, e, c)| (id.clone(), lists(e, c)))
            .collect();
        let aliases = aliases
            .iter()
            .map(|a| {
                let rule = match (&a.small, &a.large) {
                    (Some(small), Some(large)) => Rule::BySize {
                        small: get(small),
                        large: get(large),
                        large_above_prompt_tokens: a.large_above_prompt_tokens,
                    },
                    _ => {
                        let mut total = 0;
                        let cumulative = a
                            .weights
                            .iter()
                            .filter(|(_, w)| **w > 0)
                            .map(|(id, w)| {
                                total += u64::from(*w);
                                (total, get(id))
                            })
                            .collect();
                        Rule::ByWeight { cumulative }
                    }
                };
                order.push(a.id.clone());
                (a.id.clone(), rule)
            })
            .collect();
        Self {
            models,
            aliases,
            fallbacks,
            order,
        }
    }

    /// The same models (their backends shared) with `aliases` instead.
    pub(super) fn with_aliases(&self, aliases: &[AliasConfig]) -> Self {
        let models = self
            .model_configs()
            .into_iter()
            .map(|config| {
                let backend = self.models[&config.id].backend.clone();
                Model { config, backend }
            })
            .collect();
        Self::new(models, aliases)
    }

    /// The models' configs, in config order.
    pub(super) fn model_configs(&self) -> Vec<ModelConfig> {
        self.order
            .iter()
            .filter_map(|id| self.models.get(id))
            .map(|m| m.config.clone())
            .collect()
    }

    /// The fallbacks of a request to `asked` served first by `model`: the
    /// alias's own lists, else the model's.
    pub(super) fn fallbacks(&self, asked: &str, model: &Model) -> Arc<Fallbacks> {
        self.fallbacks
            .get(asked)
            .or_else(|| self.fallbacks.get(&model.config.id))
            .cloned()
            .unwrap_or_default()
    }

    pub(super) fn is_alias(&self, id: &str) -> bool {
        self.aliases.contains_key(id)
    }

    pub(super) fn model(&self, id: &str) -> Option<&Arc<Model>> {
        self.models.get(id)
    }

    /// The models serving `task`, in config order.
    pub(super) fn of_task(&self, task: Task) -> impl Iterator<Item = &Arc<Model>> {
        self.order
            .iter()
            .filter_map(|id| self.models.get(id))
            .filter(move |m| m.config.task == task)
    }

    /// The model that serves `req`: itself, or the one its alias picks.
    pub(super) fn route(&self, req: &ChatRequest, hints: &Hints) -> Result<Arc<Model>, Error> {
        if let Some(m) = self.models.get(&req.model) {
            if m.config.task != Task::Chat {
                return Err(wrong_task(&m.config.id, m.config.task, Task::Chat));
            }
            return Ok(m.clone());
        }
        match self.aliases.get(&req.model) {
            None => Err(Error::ModelNotFound(req.model.clone())),
            Some(Rule::BySize {
                small,
                large,
                large_above_prompt_tokens,
            }) => {
                let large_wanted = match hints.size {
                    Some(hint) => hint == SizeHint::Large,
                    None => hints.has_tools || req.prompt_tokens() > *large_above_prompt_tokens,
                };
                Ok(if large_wanted { large } else { small }.clone())
            }
            Some(Rule::ByWeight { cumulative }) => {
                let total = cumulative.last().map_or(1, |(t, _)| *t);
                // A seeded request always lands on the same version (a retry
                // gets the same answer); others are spread at random.
                let draw = match req.seed {
                    Some(seed) => {
                        let mut h = Fnv::new();
                        h.write(req.model.as_bytes());
                        h.write(&seed.to_le_bytes());
                        h.finish() % total
                    }
                    None => rand::rng().random_range(0..total),
                };
                let (_, model) = cumulative
                    .iter()
                    .find(|(upto, _)| draw < *upto)
                    .expect("the draw is below the total");
                Ok(model.clone())
            }
        }
    }

    pub(super) fn list(&self) -> Vec<ModelInfo> {
        self.order
            .iter()
            .map(|id| match self.models.get(id) {
                Some(m) => {
                    let (healthy, total) = match &m.backend {
                        Backend::Sim(_) => (1, 1),
                        Backend::Pool(p) => p.health(),
                        Backend::Embed(e) => e.pool().health(),
                    };
                    ModelInfo {
                        id: id.clone(),
                        context_window_tokens: m.config.context_window_tokens,
                        alias: false,
                        task: m.config.task,
                        healthy_backends: healthy,
                        total_backends: total,
                    }
                }
                None => {
                    let targets: Vec<&Arc<Model>> = match &self.aliases[id] {
                        Rule::BySize { small, large, .. } => vec![small, large],
                        Rule::ByWeight { cumulative } => {
                            cumulative.iter().map(|(_, m)| m).collect()
                        }
                    };
                    ModelInfo {
                        id: id.clone(),
                        // What any target accepts.
                        context_window_tokens: targets
                            .iter()
                            .map(|m| m.config.context_window_tokens)
                            .min()
                            .unwrap_or(0),
                        alias: true,
                        task: Task::Chat,
                        healthy_backends: 0,
                        total_backends: 0,
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, SimConfig};
    use crate::inference::metrics::Metrics;

    fn table(aliases: &str) -> Table {
        let metrics = Metrics::with_labels(None);
        let models = ["small", "large", "v1", "v2"]
            .into_iter()
            .map(|id| Model {
                config: ModelConfig {
                    id: id.into(),
                    context_window_tokens: 8192,
                    backend: BackendConfig::Sim(SimConfig::default()),
                    fallbacks: vec![],
                    context_fallbacks: vec![],
                    task: crate::config::Task::Chat,
                    embeddings: None,
                },
                backend: Backend::Sim(Arc::new(SimBackend::new(
                    SimConfig::default(),
                    metrics.sim(id),
                ))),
            })
            .collect();
        #[derive(serde::Deserialize)]
        struct A {
            aliases: Vec<AliasConfig>,
        }
        let a: A = toml::from_str(aliases).unwrap();
        Table::new(models, &a.aliases)
    }

    fn req(model: &str, words: usize, seed: Option<u64>) -> ChatRequest {
        ChatRequest {
            seed,
            ..ChatRequest::asking(model, &"word ".repeat(words))
        }
    }

    #[test]
    fn size_alias_follows_length_tools_and_hint() {
        let t = table(
            "[[aliases]]\nid = \"auto\"\nsmall = \"small\"\nlarge = \"large\"\nlarge_above_prompt_tokens = 50\n",
        );
        let served = |r: &ChatRequest, h: Hints| t.route(r, &h).unwrap().config.id.clone();
        assert_eq!(served(&req("auto", 5, None), Hints::default()), "small");
        assert_eq!(served(&req("auto", 100, None), Hints::default()), "large");
        let tools = Hints {
            has_tools: true,
            size: None,
        };
        assert_eq!(served(&req("auto", 5, None), tools), "large");
        let hint = |size| Hints {
            has_tools: false,
            size: Some(size),
        };
        assert_eq!(
            served(&req("auto", 5, None), hint(SizeHint::Large)),
            "large"
        );
        assert_eq!(
            served(&req("auto", 100, None), hint(SizeHint::Small)),
            "small"
        );
        assert_eq!(served(&req("v1", 100, None), Hints::default()), "v1");
        assert!(matches!(
            t.route(&req("nope", 1, None), &Hints::default()),
            Err(Error::ModelNotFound(_))
        ));
    }

    #[test]
    fn weights_split_traffic_and_a_seed_sticks() {
        let t = table("[[aliases]]\nid = \"sim\"\nweights = { v1 = 90, v2 = 10 }\n");
        let v2 = (0..10_000)
            .filter(|s| {
                t.route(&req("sim", 3, Some(*s)), &Hints::default())
                    .unwrap()
                    .config
                    .id
                    == "v2"
            })
            .count();
        assert!((700..1300).contains(&v2), "v2 got {v2} of 10000");
        let a = t
            .route(&req("sim", 3, Some(42)), &Hints::default())
            .unwrap();
        let b = t
            .route(&req("sim", 3, Some(42)), &Hints::default())
            .unwrap();
        assert_eq!(a.config.id, b.config.id);
    }
}
