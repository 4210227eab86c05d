//! The `meridian.v1` gRPC services of a region.

mod chat;

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use meridian_proto::v1::inference_server::{Inference, InferenceServer};
use meridian_proto::v1::{
    EmbedRequest, EmbedResponse, FinishReason, GenerateChunk, GenerateRequest, GenerateResponse,
    ListModelsRequest, ListModelsResponse, Model, ModelKind,
};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

pub(super) use self::chat::chat_request;
use self::chat::pb_deltas;
pub(super) use self::chat::pb_message;
use super::charge::{self, Charge};
use super::http::completion_id;
use super::{AppState, Tenant};
use crate::answer::{Ask, TurnOptions};
use crate::cache::{Directives, RESULT_HEADER};
use crate::conversation::{
    CONVERSATION_HEADER, ConversationId, IDEMPOTENCY_HEADER, idempotency_key,
};
use crate::error::Error;
use crate::inference::{
    Chunk, Fallback, Finish, Hints, SizeHint, Usage, parse_grpc_timeout, parse_timeout_ms,
};
use crate::replication::{DURABILITY_HEADER, Durability};
use crate::slow_reader::cut_after;

pub(super) fn inference(state: Arc<AppState>) -> InferenceServer<InferenceApi> {
    InferenceServer::new(InferenceApi { state })
}

pub(super) struct InferenceApi {
    state: Arc<AppState>,
}

/// What a call asks of the answer pipeline, read before the body is taken:
/// its deadline (`grpc-timeout` or `x-meridian-timeout-ms`, else the node's
/// default), routing hint, cache directives and conversation turn.
fn call_ask<'a>(
    state: &AppState,
    request: &Request<GenerateRequest>,
    tenant: &'a Tenant,
) -> Result<Ask<'a>, Error> {
    let header = |name| request.metadata().get(name).and_then(|v| v.to_str().ok());
    // The HTTP API's header counts too, the shorter of the two winning.
    let timeout = [
        header("grpc-timeout").and_then(parse_grpc_timeout),
        header(meridian_proto::header::TIMEOUT_MS).and_then(|v| parse_timeout_ms(v).ok()),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(state.inference.default_timeout);
    let hints = Hints {
        // The proto has no tools field.
        has_tools: false,
        size: SizeHint::parse(&request.get_ref().routing_hint),
    };
    let mut cache =
        Directives::parse(|name: &str| request.metadata().get(name).and_then(|v| v.to_str().ok()));
    cache.no_store |= request.get_ref().no_cache;
    Ok(Ask {
        tenant,
        hints,
        cache,
        deadline: tokio::time::Instant::now() + timeout,
        turn: call_turn(request)?,
    })
}

/// The conversation a call continues (`x-meridian-conversation` metadata,
/// which the gateway's affinity reads, or the request's `conversation_id`)
/// and the durability it asks for (`x-meridian-durability`), and the turn's
/// `idempotency-key`.
fn call_turn(request: &Request<GenerateRequest>) -> Result<TurnOptions, Error> {
    let metadata = |name: &'static str| {
        request
            .metadata()
            .get(name)
            .map(|v| {
                v.to_str()
                    .map_err(|_| Error::invalid(format!("`{name}` must be ASCII"), None))
            })
            .transpose()
    };
    Ok(TurnOptions {
        conversation: ConversationId::from_request(
            metadata(CONVERSATION_HEADER)?,
            Some(&request.get_ref().conversation_id),
        )?,
        durability: metadata(DURABILITY_HEADER)?
            .map(Durability::parse)
            .transpose()?
            .flatten(),
        idempotency_key: idempotency_key(metadata(IDEMPOTENCY_HEADER)?)?,
    })
}

fn durability_metadata<T>(response: &mut Response<T>, durability: Option<Durability>) {
    if let Some(d) = durability {
        response
            .metadata_mut()
            .insert(DURABILITY_HEADER, MetadataValue::from_static(d.header()));
    }
}

/// `x-meridian-model`, and `x-meridian-fallback` when a fallback served.
fn model_metadata<T>(response: &mut Response<T>, model: &str, fallback: Option<&Fallback>) {
    if let Ok(v) = model.parse() {
        response
            .metadata_mut()
            .insert(meridian_proto::header::MODEL, v);
    }
    if let Some(v) = fallback.and_then(|f| f.header().parse().ok()) {
        response
            .metadata_mut()
            .insert(meridian_proto::header::FALLBACK, v);
    }
}

pub(super) fn finish_reason(f: Finish) -> FinishReason {
    match f {
        Finish::Stop => FinishReason::Stop,
        Finish::Length => FinishReason::Length,
        Finish::ToolCalls | Finish::FunctionCall => FinishReason::ToolCalls,
        Finish::ContentFilter => FinishReason::ContentFilter,
    }
}

fn usage(u: Usage) -> meridian_proto::v1::Usage {
    meridian_proto::v1::Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.prompt_tokens + u.completion_tokens,
    }
}

fn millis(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

#[tonic::async_trait]
impl Inference for InferenceApi {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let started = tokio::time::Instant::now();
        let tenant = Tenant::from_metadata(request.metadata())?;
        let ask = call_ask(&self.state, &request, &tenant)?;
        let mut req = chat_request(request.into_inner())?;
        let done = self.state.pipeline.answer(&mut req, ask).await?;
        let now = std::time::SystemTime::now();
        let answer_usage = done.answer.usage();
        let total = charge::used(answer_usage, done.outcome);
        let mut response = Response::new(GenerateResponse {
            id: completion_id(),
            model: req.model,
            message: Some(pb_message(
                "assistant",
                &done.answer.text,
                None,
                &done.answer.extras.tool_calls,
            )),
            finish_reason: finish_reason(done.answer.finish).into(),
            usage: Some(usage(answer_usage)),
            region: self.state.region.clone(),
            created_at: Some(now.into()),
            time_to_first_token_ms: millis(done.time_to_first_token),
            latency_ms: millis(started.elapsed()),
            cache: done.outcome.proto().into(),
        });
        response.metadata_mut().insert(
            RESULT_HEADER,
            MetadataValue::from_static(done.outcome.header()),
        );
        response
            .metadata_mut()
            .insert(meridian_proto::header::USAGE_TOKENS, total.into());
        let model = response.get_ref().model.clone();
        model_metadata(&mut response, &model, done.answer.fallback.as_ref());
        durability_metadata(&mut response, done.durability);
        Ok(response)
    }

    type GenerateStreamStream = BoxStream<'static, Result<GenerateChunk, Status>>;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let tenant = Tenant::from_metadata(request.metadata())?;
        let ask = call_ask(&self.state, &request, &tenant)?;
        let mut req = chat_request(request.into_inner())?;
        let streamed = self.state.pipeline.answer_stream(&mut req, ask).await?;
        let charge = Charge::of(&req);
        let settle = charge.clone();
        let model = req.model.clone();
        let durability = streamed.durability;
        let fallback = streamed.fallback.clone();
        let (chunks, outcome, record, permit) = (
            streamed.chunks,
            streamed.outcome,
            streamed.record,
            streamed.permit,
        );
        let mut ttft = None;
        let id = completion_id();
        let region = self.state.region.clone();
        let mut index = 0;
        let response_model = model.clone();
        let stream = chunks.map(move |chunk| {
            // Admitted for as long as the stream runs.
            let _permit = &permit;
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    record.failed(&e);
                    return Err(Status::from(e));
                }
            };
            let mut out = GenerateChunk {
                id: id.clone(),
                model: model.clone(),
                index,
                region: region.clone(),
                ..Default::default()
            };
            index += 1;
            match chunk {
                Chunk::Delta(piece) => {
                    ttft.get_or_insert_with(|| record.elapsed());
                    out.tool_calls = pb_deltas(&piece.tool_calls);
                    out.delta = piece.content;
                }
                Chunk::Done {
                    finish: f,
                    usage: u,
                    ..
                } => {
                    record.completed(u, ttft.unwrap_or_else(|| record.elapsed()), outcome.label());
                    settle.settle(u, outcome);
                    out.finish_reason = finish_reason(f).into();
                    out.usage = Some(usage(u));
                }
            }
            Ok(out)
        });
        let timeout = self.state.stream_write_timeout;
        let stream = cut_after(
            stream,
            timeout,
            "GenerateStream",
            Some(Err(unread(timeout))),
        );
        let mut response = Response::new(stream.boxed());
        model_metadata(&mut response, &response_model, fallback.as_ref());
        durability_metadata(&mut response, durability);
        response
            .metadata_mut()
            .insert(RESULT_HEADER, MetadataValue::from_static(outcome.header()));
        for (name, value) in charge.head(outcome.is_hit()) {
            response.metadata_mut().insert(name, value.into());
        }
        charge.trail_grpc(&mut response);
        Ok(response)
    }

    async fn embed(
        &self,
        request: Request<EmbedRequest>,
    ) -> Result<Response<EmbedResponse>, Status> {
        super::embeddings::embed_grpc(&self.state, request).await
    }

    async fn list_models(
        &self,
        _request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let mut models: Vec<_> = self
            .state
            .inference
            .models()
            .map(|m| Model {
                id: m.id,
                owned_by: "meridian".into(),
                kind: match m.task {
                    crate::config::Task::Chat => ModelKind::Chat,
                    crate::config::Task::Embeddings => ModelKind::Embedding,
                    crate::config::Task::Moderations => ModelKind::Moderation,
                }
                .into(),
                context_window_tokens: m.context_window_tokens,
            })
            .collect();
        models.extend(self.state.embedder.as_ref().map(|e| Model {
            id: crate::inference::EMBEDDING_MODEL_ID.into(),
            owned_by: "meridian".into(),
            kind: ModelKind::Embedding.into(),
            context_window_tokens: e.max_input_tokens(),
        }));
        Ok(Response::new(ListModelsResponse {
            models,
            region: self.state.region.clone(),
        }))
    }
}

/// The status a gRPC stream ends with when its reader took nothing for
/// `timeout` (`server.stream_write_timeout_ms`).
pub(super) fn unread(timeout: std::time::Duration) -> Status {
    Status::deadline_exceeded(format!(
        "the stream was cut: its reader took nothing for {} ms \
         (`server.stream_write_timeout_ms`)",
        timeout.as_millis()
    ))
}
