//! The answer pipeline: what every way of asking the models shares. HTTP
//! chat and text completions, gRPC Generate and GenerateStream, and every
//! job attempt come here with a parsed request; the handlers only unpack
//! their wire format before and pack the answer after.
//!
//! In order: the durability asked for, the conversation's history, model
//! routing, the usage record, the response cache, an admission slot and the
//! backend on a miss, then the conversation's new turn stored (and, when
//! synchronous, applied by a peer region) before the client sees the end of
//! the answer.

mod stream;
mod trace;

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::cache::{Answer, Directives, Outcome, ResponseCache};
use crate::conversation::{self, Begun, ConversationId, Turn};
use crate::error::Error;
use crate::inference::{
    ChatRequest, ChunkStream, Completion, Fallback, Finish, Hints, Inference, Permit, Routed,
};
use crate::replication::{Durability, Replication};
use crate::store::{Store, StoreHealth};
use crate::telemetry::UsageRecorder;
use crate::telemetry::usage::UsageDraft;
use crate::tenancy::Tenant;

/// What the pipeline works with; each part is shared with the rest of the
/// node, which the pipeline never reaches beyond these.
pub(crate) struct Parts {
    pub region: String,
    /// The region's PostgreSQL, where conversation turns are stored.
    pub pool: PgPool,
    /// Whether PostgreSQL answers now: a turn is refused at once when not.
    pub stores: Arc<StoreHealth>,
    pub inference: Arc<Inference>,
    pub cache: Arc<ResponseCache>,
    pub usage: UsageRecorder,
    /// Budgets: a tenant whose budget is spent is refused before routing.
    pub spend: Arc<crate::tenancy::spend::Spend>,
    /// Durability defaults and the wait for a peer's apply.
    pub replication: Arc<Replication>,
    /// Where a streamed miss stores its answer once the stream has ended.
    pub tasks: TaskTracker,
    pub tracer: meridian_mesh::Tracer,
    pub limits: Limits,
}

/// How large a request the pipeline takes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// `inference.max_messages`: messages of one model call, a
    /// conversation's stored history included.
    pub messages: usize,
    /// `inference.max_conversation_bytes`: message bytes a conversation
    /// may hold before a turn.
    pub conversation_bytes: u64,
}

/// The one path from a parsed request to an answer.
pub(crate) struct Pipeline {
    parts: Parts,
}

/// What a request asks of its conversation turn.
#[derive(Debug, Default)]
pub(crate) struct TurnOptions {
    /// The conversation the request continues, if any.
    pub conversation: Option<ConversationId>,
    /// `x-meridian-durability` as asked; the tenant's default when `None`.
    pub durability: Option<Durability>,
    /// `Idempotency-Key`: a repeat of the turn stored under it gets the
    /// stored answer.
    pub idempotency_key: Option<String>,
}

/// What the caller of the pipeline asks of it, beside the request itself.
pub(crate) struct Ask<'a> {
    pub tenant: &'a Tenant,
    /// Routing hints from the request's headers, metadata or body.
    pub hints: Hints,
    /// What the request allows the cache to do.
    pub cache: Directives,
    /// When the answer is due; the model's work is cut there.
    pub deadline: Instant,
    pub turn: TurnOptions,
}

/// A whole answer and how it was found.
pub(crate) struct Answered {
    pub answer: Arc<Answer>,
    pub outcome: Outcome,
    /// Time to the first token of this request's generation; zero when
    /// another request (or the cache) answered.
    pub time_to_first_token: Duration,
    /// How the stored turn was acknowledged; `None` without a conversation.
    pub durability: Option<Durability>,
}

/// A streamed answer: chunks, how they were found, and what the stream must
/// hold until it ends (the usage record, the admission slot of a miss).
pub(crate) struct Streamed {
    pub chunks: ChunkStream,
    pub outcome: Outcome,
    pub record: UsageDraft,
    pub permit: Option<Permit>,
    /// How the turn is acknowledged (its last chunk waits for it); `None`
    /// without a conversation.
    pub durability: Option<Durability>,
    /// Set when a fallback model serves.
    pub fallback: Option<Fallback>,
}

impl Pipeline {
    pub(crate) fn new(parts: Parts) -> Self {
        Self { parts }
    }

    /// A whole completion, from the cache or the model; with a
    /// conversation, its history goes to the model and the exchange is
    /// stored before this returns (and, when synchronous, applied by a peer
    /// region).
    /// `req.model` is the model that served when this returns.
    pub(crate) async fn answer(
        &self,
        req: &mut ChatRequest,
        ask: Ask<'_>,
    ) -> Result<Answered, Error> {
        let Ask {
            tenant,
            hints,
            cache: directives,
            deadline,
            turn,
        } = ask;
        tenant.may_use(&req.model)?;
        let durability = self
            .parts
            .replication
            .durability(tenant.as_str(), turn.durability)?;
        let turn = match self.begin_turn(tenant, req, turn).await? {
            Some(Begun::Repeated(text)) => return Ok(repeated(text)),
            Some(Begun::Turn(turn)) => Some(turn),
            None => None,
        };
        let (routed, mut record) = self.route(tenant.as_str(), tenant.key(), req, &hints)?;
        let asked = &*req;
        let policy = self.parts.cache.policy(asked, directives);
        let mut ttft = Duration::ZERO;
        let compute = async {
            let _permit = self.parts.inference.admit(tenant.as_str())?;
            let done = routed.complete(asked, Some(deadline)).await?;
            ttft = done.time_to_first_token;
            Ok(Answer::of(done))
        };
        let (answer, outcome) = self
            .parts
            .cache
            .get_or_compute(tenant.as_str(), asked, policy, compute)
            .await
            .inspect_err(|e| record.failed(e))?;
        if let Some(fallback) = &answer.fallback {
            req.model.clone_from(&fallback.to);
            record.served_by(&fallback.to);
        }
        record.completed(answer.usage(), ttft, outcome.label());
        self.note_cache(outcome);
        let durability = match turn {
            Some(turn) => {
                // A hit is stored too: the history is what the client was told.
                self.store_turn(turn, &answer.text, durability).await?;
                Some(durability)
            }
            None => None,
        };
        Ok(Answered {
            answer,
            outcome,
            time_to_first_token: ttft,
            durability,
        })
    }

    /// One attempt of a job of `tenant`: routed and admitted like an
    /// interactive request, and recorded in the usage rows like one. The
    /// cache is not asked (a job is work its submitter wants done), and a
    /// refusal by admission control is waited out rather than failed: the
    /// job was accepted, and a slot frees as interactive requests end.
    /// Dropping the future (a cancel, a lost lease, the job fence) gives
    /// the slot back at once.
    pub(crate) async fn attempt(
        &self,
        tenant: &str,
        key: Option<&str>,
        req: &ChatRequest,
    ) -> Result<Completion, Error> {
        let mut req = req.clone();
        let (routed, mut record) = self.route(tenant, key, &mut req, &Hints::default())?;
        let _permit = self.parts.inference.admit_waiting(tenant).await;
        let done = routed
            .complete(&req, None)
            .await
            .inspect_err(|e| record.failed(e))?;
        if let Some(fallback) = &done.fallback {
            record.served_by(&fallback.to);
        }
        record.completed(
            done.usage,
            done.time_to_first_token,
            Outcome::Bypass.label(),
        );
        Ok(done)
    }

    /// Resolves the model of `req` and begins its usage record. A refusal by
    /// routing (unknown model, prompt too long) is recorded under the name
    /// the client asked for.
    fn route(
        &self,
        tenant: &str,
        key: Option<&str>,
        req: &mut ChatRequest,
        hints: &Hints,
    ) -> Result<(Routed, UsageDraft), Error> {
        self.check_size(req)?;
        self.parts
            .spend
            .check(tenant)
            .inspect_err(|e| self.parts.usage.begin(tenant, key, &req.model).failed(e))?;
        let requested = self.parts.tracer.is_enabled().then(|| req.model.clone());
        let routed = self
            .parts
            .inference
            .route(req, hints)
            .inspect_err(|e| self.parts.usage.begin(tenant, key, &req.model).failed(e))?;
        if let Some(requested) = requested {
            trace::note_model(&requested, &req.model);
        }
        Ok((routed, self.parts.usage.begin(tenant, key, &req.model)))
    }

    /// The request sizes the pipeline takes.
    pub(crate) fn limits(&self) -> Limits {
        self.parts.limits
    }

    /// Refuses a request with more messages than a model call may carry;
    /// job submissions ask before they are queued.
    pub(crate) fn check_size(&self, req: &ChatRequest) -> Result<(), Error> {
        let max = self.parts.limits.messages;
        if req.messages.len() > max {
            return Err(Error::too_large(
                format!(
                    "the request carries {} messages (with its conversation's history), over \
                     the limit of {max} set by `inference.max_messages`",
                    req.messages.len()
                ),
                Some("messages"),
            ));
        }
        Ok(())
    }

    /// The conversation's stored turns prepended to `req`, and the turn to
    /// store once answered; or the stored answer of a repeated turn.
    async fn begin_turn(
        &self,
        tenant: &Tenant,
        req: &mut ChatRequest,
        options: TurnOptions,
    ) -> Result<Option<Begun>, Error> {
        let id: Option<ConversationId> = options.conversation;
        match id {
            None => Ok(None),
            Some(id) => {
                self.parts.stores.require(Store::Postgres)?;
                conversation::begin(
                    &self.parts.pool,
                    tenant.as_str(),
                    id,
                    options.idempotency_key,
                    req,
                    &self.parts.limits,
                )
                .await
                .map(Some)
            }
        }
    }

    /// Stores the exchange of `turn` with `text` as its answer and, when
    /// synchronous, waits until a peer region has applied it.
    async fn store_turn(
        &self,
        turn: Turn,
        text: &str,
        durability: Durability,
    ) -> Result<(), Error> {
        store_turn(
            &self.parts.pool,
            &self.parts.region,
            &self.parts.replication,
            turn,
            text,
            durability,
        )
        .await
    }

    fn note_cache(&self, outcome: Outcome) {
        if self.parts.tracer.is_enabled() {
            trace::note_cache(outcome.label());
        }
    }
}

/// The answer to a repeated turn: the stored text, computed by nothing now.
/// It reports `async`: committed here, which is what is known of a turn
/// stored earlier.
fn repeated(text: String) -> Answered {
    Answered {
        answer: Arc::new(repeated_answer(text)),
        outcome: Outcome::Bypass,
        time_to_first_token: Duration::ZERO,
        durability: Some(Durability::Async),
    }
}

fn repeated_answer(text: String) -> Answer {
    Answer {
        text,
        finish: Finish::Stop,
        prompt_tokens: 0,
        completion_tokens: 0,
        extras: Default::default(),
        fallback: None,
    }
}

/// [`Pipeline::store_turn`] without the pipeline, for the end of a stream,
/// which outlives the borrow of the request.
async fn store_turn(
    pool: &PgPool,
    region: &str,
    replication: &Replication,
    turn: Turn,
    text: &str,
    durability: Durability,
) -> Result<(), Error> {
    let sequence = turn.store(pool, region, text).await?;
    if let Some(sequence) = sequence
        && durability == Durability::Sync
    {
        replication.wait_applied(sequence).await?;
    }
    Ok(())
}
