//! The streamed half of the pipeline: a hit replayed as a stream, or the
//! model's stream, stored in the cache once it ends well; with a
//! conversation, the turn is stored before the last chunk goes out.

use futures::StreamExt;

use super::{Ask, Pipeline, Streamed, repeated_answer, store_turn};
use crate::cache::{Answer, Outcome, Policy};
use crate::conversation::{Begun, Turn};
use crate::error::Error;
use crate::inference::{Assembly, ChatRequest, Chunk, ChunkStream};
use crate::replication::Durability;

impl Pipeline {
    /// A streamed completion. With a conversation, the exchange is stored
    /// (and, when synchronous, applied by a peer region) before the last
    /// chunk goes out.
    /// `req.model` is the model that serves when this returns.
    pub(crate) async fn answer_stream(
        &self,
        req: &mut ChatRequest,
        mut ask: Ask<'_>,
    ) -> Result<Streamed, Error> {
        ask.tenant.may_use(&req.model)?;
        let durability = self
            .parts
            .replication
            .durability(ask.tenant.as_str(), ask.turn.durability)?;
        let options = std::mem::take(&mut ask.turn);
        let turn = match self.begin_turn(ask.tenant, req, options).await? {
            Some(Begun::Repeated(text)) => {
                return Ok(Streamed {
                    fallback: None,
                    chunks: std::sync::Arc::new(repeated_answer(text)).stream(),
                    outcome: Outcome::Bypass,
                    record: self.parts.usage.begin(
                        ask.tenant.as_str(),
                        ask.tenant.key(),
                        &req.model,
                    ),
                    permit: None,
                    durability: Some(Durability::Async),
                });
            }
            Some(Begun::Turn(turn)) => Some(turn),
            None => None,
        };
        let mut streamed = self.stream_answer(req, &ask).await?;
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
        let pool = self.parts.pool.clone();
        let region = self.parts.region.clone();
        let replication = self.parts.replication.clone();
        async_stream::stream! {
            let mut chunks = chunks;
            let mut text = String::new();
            while let Some(chunk) = chunks.next().await {
                match chunk {
                    Ok(Chunk::Delta(d)) => {
                        text.push_str(&d.content);
                        yield Ok(Chunk::Delta(d));
                    }
                    Ok(done @ Chunk::Done { .. }) => {
                        match store_turn(&pool, &region, &replication, turn, &text, durability).await {
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

    async fn stream_answer(&self, req: &mut ChatRequest, ask: &Ask<'_>) -> Result<Streamed, Error> {
        let (tenant, deadline) = (ask.tenant, ask.deadline);
        let (routed, record) = self.route(tenant.as_str(), tenant.key(), req, &ask.hints)?;
        let policy = self.parts.cache.policy(req, ask.cache);
        let looked = self.parts.cache.lookup(tenant.as_str(), req, policy).await;
        let mut record = record;
        if let Some((answer, outcome)) = looked.hit {
            self.note_cache(outcome);
            if let Some(fallback) = &answer.fallback {
                req.model.clone_from(&fallback.to);
                record.served_by(&fallback.to);
            }
            return Ok(Streamed {
                fallback: answer.fallback.clone(),
                chunks: answer.stream(),
                outcome,
                record,
                permit: None,
                durability: None,
            });
        }
        let permit = self
            .parts
            .inference
            .admit(tenant.as_str())
            .inspect_err(|e| record.failed(e))?;
        let (chunks, fallback) = routed
            .stream(req.clone(), Some(deadline))
            .await
            .inspect_err(|e| record.failed(e))?;
        if let Some(fallback) = &fallback {
            req.model.clone_from(&fallback.to);
            record.served_by(&fallback.to);
        }
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
            let (cache, tasks) = (self.parts.cache.clone(), self.parts.tasks.clone());
            let mut pending = Some(looked.pending);
            let mut assembly = Assembly::default();
            let written_by = fallback.clone();
            chunks
                .inspect(move |chunk| match chunk {
                    Ok(Chunk::Delta(d)) => assembly.push(d),
                    Ok(Chunk::Done {
                        finish,
                        usage,
                        meta,
                    }) => {
                        let Some(pending) = pending.take() else {
                            return;
                        };
                        let answer = Answer {
                            fallback: written_by.clone(),
                            ..Answer::assembled(
                                std::mem::take(&mut assembly),
                                *finish,
                                *usage,
                                meta.clone(),
                            )
                        };
                        let cache = cache.clone();
                        tasks.spawn(async move {
                            cache.store_answer(pending, answer).await;
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
            fallback,
        })
    }
}
