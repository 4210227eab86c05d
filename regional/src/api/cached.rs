//! The path every chat entry point shares (HTTP chat and text completions,
//! gRPC Generate and GenerateStream): prepend a conversation's history,
//! route, consult the response cache, and only on a miss take an admission
//! slot and call the model; then store the conversation's new turns before
//! the client sees the end of the answer.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use super::{AppState, Tenant};
use crate::cache::{Answer, Directives, Outcome, Policy};
use crate::conversation::{self, ConversationId, Turn};
use crate::error::Error;
use crate::inference::{ChatRequest, Chunk, ChunkStream, Hints, Permit, Routed};
use crate::replication::Durability;
use crate::telemetry::usage::UsageDraft;

/// What a request asks of its conversation turn.
#[derive(Debug, Default)]
pub(crate) struct TurnOptions {
    /// The conversation the request continues, if any.
    pub conversation: Option<ConversationId>,
    /// `x-meridian-durability` as asked; the tenant's default when `None`.
    pub durability: Option<Durability>,
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
}

impl AppState {
    fn note_cache(&self, outcome: Outcome) {
        if self.tracer.is_enabled() {
            super::note_cache(outcome.label());
        }
    }

    /// Resolves the model of `req` and begins its usage record. A refusal by
    /// routing (unknown model, prompt too long) is recorded under the name
    /// the client asked for.
    fn route(
        &self,
        tenant: &Tenant,
        req: &mut ChatRequest,
        hints: &Hints,
    ) -> Result<(Routed, UsageDraft), Error> {
        let usage = &self.telemetry.usage;
        let requested = self.tracer.is_enabled().then(|| req.model.clone());
        let routed = self
            .inference
            .route(req, hints)
            .inspect_err(|e| usage.begin(tenant.as_str(), &req.model).failed(e))?;
        if let Some(requested) = requested {
            super::note_model(&requested, &req.model);
        }
        Ok((routed, usage.begin(tenant.as_str(), &req.model)))
    }

    /// The conversation's stored turns prepended to `req`, and the turn to
    /// store once answered.
    async fn begin_turn(
        &self,
        tenant: &Tenant,
        req: &mut ChatRequest,
        conversation: Option<ConversationId>,
    ) -> Result<Option<Turn>, Error> {
        match conversation {
            None => Ok(None),
            Some(id) => conversation::begin(&self.pool, tenant.as_str(), id, req)
                .await
                .map(Some),
        }
    }

    /// A whole completion, from the cache or the model; with a
    /// conversation, its history goes to the model and the exchange is
    /// stored before this returns (and, when synchronous, applied by a peer
    /// region).
    pub(crate) async fn answer(
        &self,
        tenant: &Tenant,
        req: &mut ChatRequest,
        hints: &Hints,
        directives: Directives,
        deadline: Instant,
        turn: TurnOptions,
    ) -> Result<Answered, Error> {
        let durability = self
            .replication
            .durability(tenant.as_str(), turn.durability)?;
        let turn = self.begin_turn(tenant, req, turn.conversation).await?;
        let (routed, record) = self.route(tenant, req, hints)?;
        let req = &*req;
        let policy = self.cache.policy(req, directives);
        let mut ttft = Duration::ZERO;
        let compute = async {
            let _permit = self.inference.admit(tenant.as_str())?;
            let done = routed.complete(req, Some(deadline)).await?;
            ttft = done.time_to_first_token;
            Ok(Answer {
                text: done.text,
                finish: done.finish,
                prompt_tokens: done.usage.prompt_tokens,
                completion_tokens: done.usage.completion_tokens,
            })
        };
        let (answer, outcome) = self
            .cache
            .get_or_compute(tenant.as_str(), req, policy, compute)
            .await
            .inspect_err(|e| record.failed(e))?;
        record.completed(answer.usage(), ttft, outcome.label());
        self.note_cache(outcome);
        let durability = match turn {
            Some(turn) => {
                // A hit is stored too: the history is what the client was told.
                let sequence = turn.store(&self.pool, &self.region, &answer.text).await?;
                if durability == Durability::Sync {
                    self.replication.wait_applied(sequence).await?;
                }
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

    /// A streamed completion: a hit replayed as a stream, or the model's
    /// stream, stored in the cache once it ends well. With a conversation,
    /// the exchange is stored (and, when synchronous, applied by a peer
    /// region) before the last chunk goes out.
    pub(crate) async fn answer_stream(
        self: &Arc<Self>,
        tenant: &Tenant,
        req: &mut ChatRequest,
        hints: &Hints,
        directives: Directives,
        deadline: Instant,
        turn: TurnOptions,
    ) -> Result<Streamed, Error> {
        let durability = self
            .replication
            .durability(tenant.as_str(), turn.durability)?;
        let turn = self.begin_turn(tenant, req, turn.conversation).await?;
        let mut streamed = self
            .stream_answer(tenant, req, hints, directives, deadline)
            .await?;
        if let Some(turn) = turn {
            streamed.chunks = self.store_at_end(streamed.chunks, turn, durability);
            streamed.durability = Some(durability);
        }
        Ok(streamed)
    }

    /// Passes `chunks` on, storing the turn (with the streamed text as the
    /// answer) before the final chunk: a client that saw the stream end
    /// has its turn stored. When storing fails, the stream ends in that
    /// error instead.
    fn store_at_end(&self, chunks: ChunkStream, turn: Turn, durability: Durability) -> ChunkStream {
        let pool = self.pool.clone();
        let region = self.region.clone();
        let replication = self.replication.clone();
        async_stream::stream! {
            let mut chunks = chunks;
            let mut text = String::new();
            while let Some(chunk) = chunks.next().await {
                match chunk {
                    Ok(Chunk::Delta(d)) => {
                        text.push_str(&d);
                        yield Ok(Chunk::Delta(d));
                    }
                    Ok(done @ Chunk::Done { .. }) => {
                        let stored = async {
                            let sequence = turn.store(&pool, &region, &text).await?;
                            if durability == Durability::Sync {
                                replication.wait_applied(sequence).await?;
                            }
                            Ok::<_, Error>(())
                        };
                        match stored.await {
                            Ok(()) => yield Ok(done),
                            Err(e) => yield Err(e),
                        }
                        return;
                    }
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                }
            }
        }
        .boxed()
    }

    async fn stream_answer(
        self: &Arc<Self>,
        tenant: &Tenant,
        req: &mut ChatRequest,
        hints: &Hints,
        directives: Directives,
        deadline: Instant,
    ) -> Result<Streamed, Error> {
        let (routed, record) = self.route(tenant, req, hints)?;
        let policy = self.cache.policy(req, directives);
        let looked = self.cache.lookup(tenant.as_str(), req, policy).await;
        if let Some((answer, outcome)) = looked.hit {
            self.note_cache(outcome);
            return Ok(Streamed {
                chunks: answer.stream(),
                outcome,
                record,
                permit: None,
                durability: None,
            });
        }
        let permit = self
            .inference
            .admit(tenant.as_str())
            .inspect_err(|e| record.failed(e))?;
        let chunks = routed
            .stream(req.clone(), Some(deadline))
            .await
            .inspect_err(|e| record.failed(e))?;
        let outcome = if policy == Policy::Bypass {
            Outcome::Bypass
        } else {
            Outcome::Miss
        };
        self.note_cache(outcome);
        let chunks = if policy == Policy::Bypass {
            chunks
        } else {
            // Single-flight does not cover streams: a stream's worth is its
            // first token, which waiting on another request's whole answer
            // would delay.
            let state = self.clone();
            let mut pending = Some(looked.pending);
            let mut text = String::new();
            chunks
                .inspect(move |chunk| match chunk {
                    Ok(Chunk::Delta(d)) => text.push_str(d),
                    Ok(Chunk::Done { finish, usage }) => {
                        let Some(pending) = pending.take() else {
                            return;
                        };
                        let answer = Answer {
                            text: std::mem::take(&mut text),
                            finish: *finish,
                            prompt_tokens: usage.prompt_tokens,
                            completion_tokens: usage.completion_tokens,
                        };
                        let state = state.clone();
                        state.tasks.clone().spawn(async move {
                            state.cache.store_answer(pending, answer).await;
                        });
                    }
                    Err(_) => {}
                })
                .boxed()
        };
        Ok(Streamed {
            chunks,
            outcome,
            record,
            permit: Some(permit),
            durability: None,
        })
    }
}
