//! The path every chat entry point shares (HTTP chat and text completions,
//! gRPC Generate and GenerateStream): route, consult the response cache,
//! and only on a miss take an admission slot and call the model.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use super::{AppState, Tenant};
use crate::cache::{Answer, Directives, Outcome, Policy};
use crate::error::Error;
use crate::inference::{ChatRequest, Chunk, ChunkStream, Hints, Permit, Routed};
use crate::telemetry::usage::UsageDraft;

/// A whole answer and how it was found.
pub(crate) struct Answered {
    pub answer: Arc<Answer>,
    pub outcome: Outcome,
    /// Time to the first token of this request's generation; zero when
    /// another request (or the cache) answered.
    pub time_to_first_token: Duration,
}

/// A streamed answer: chunks, how they were found, and what the stream must
/// hold until it ends (the usage record, the admission slot of a miss).
pub(crate) struct Streamed {
    pub chunks: ChunkStream,
    pub outcome: Outcome,
    pub record: UsageDraft,
    pub permit: Option<Permit>,
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

    /// A whole completion, from the cache or the model.
    pub(crate) async fn answer(
        &self,
        tenant: &Tenant,
        req: &mut ChatRequest,
        hints: &Hints,
        directives: Directives,
        deadline: Instant,
    ) -> Result<Answered, Error> {
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
        Ok(Answered {
            answer,
            outcome,
            time_to_first_token: ttft,
        })
    }

    /// A streamed completion: a hit replayed as a stream, or the model's
    /// stream, stored in the cache once it ends well.
    pub(crate) async fn answer_stream(
        self: &Arc<Self>,
        tenant: &Tenant,
        req: &mut ChatRequest,
        hints: &Hints,
        directives: Directives,
        deadline: Instant,
    ) -> Result<Streamed, Error> {
        let (routed, record) = self.route(tenant, req, hints)?;
        let policy = self.cache.policy(req, directives);
        let probe = self.cache.lookup(tenant.as_str(), req, policy).await;
        if let Some((answer, outcome)) = probe.hit {
            self.note_cache(outcome);
            return Ok(Streamed {
                chunks: answer.stream(),
                outcome,
                record,
                permit: None,
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
            let tenant = tenant.as_str().to_string();
            let req = req.clone();
            let mut vector = probe.vector;
            let mut text = String::new();
            chunks
                .inspect(move |chunk| match chunk {
                    Ok(Chunk::Delta(d)) => text.push_str(d),
                    Ok(Chunk::Done { finish, usage }) => {
                        let answer = Answer {
                            text: std::mem::take(&mut text),
                            finish: *finish,
                            prompt_tokens: usage.prompt_tokens,
                            completion_tokens: usage.completion_tokens,
                        };
                        let (state, tenant, req, vector) =
                            (state.clone(), tenant.clone(), req.clone(), vector.take());
                        state.tasks.clone().spawn(async move {
                            state
                                .cache
                                .store_answer(&tenant, &req, vector, answer)
                                .await;
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
        })
    }
}
