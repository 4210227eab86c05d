//! The `meridian.v1` gRPC services of a region.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use meridian_proto::v1::inference_server::{Inference, InferenceServer};
use meridian_proto::v1::{
    CacheResult, ChatMessage, EmbedRequest, EmbedResponse, FinishReason, GenerateChunk,
    GenerateRequest, GenerateResponse, ListModelsRequest, ListModelsResponse, Model, ModelKind,
};
use tonic::{Request, Response, Status};

use super::http::completion_id;
use super::{AppState, Tenant};
use crate::error::Error;
use crate::inference::{ChatRequest, Chunk, Finish, Message, Usage};

pub(super) fn inference(state: Arc<AppState>) -> InferenceServer<InferenceApi> {
    InferenceServer::new(InferenceApi { state })
}

pub(super) struct InferenceApi {
    state: Arc<AppState>,
}

pub(super) fn chat_request(req: GenerateRequest) -> Result<ChatRequest, Error> {
    if req.model.is_empty() {
        return Err(Error::invalid("`model` must not be empty", Some("model")));
    }
    if req.messages.is_empty() {
        return Err(Error::invalid(
            "`messages` must contain at least one message",
            Some("messages"),
        ));
    }
    if req.max_tokens == Some(0) {
        return Err(Error::invalid(
            "`max_tokens` must be at least 1",
            Some("max_tokens"),
        ));
    }
    Ok(ChatRequest {
        model: req.model,
        messages: req
            .messages
            .into_iter()
            .map(|m| Message {
                role: m.role,
                content: m.content,
            })
            .collect(),
        max_tokens: req.max_tokens,
        seed: req.seed,
        stop: req.stop,
    })
}

fn finish(f: Finish) -> FinishReason {
    match f {
        Finish::Stop => FinishReason::Stop,
        Finish::Length => FinishReason::Length,
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
        let req = chat_request(request.into_inner())?;
        let record = self
            .state
            .telemetry
            .usage
            .begin(tenant.as_str(), &req.model);
        let done = self
            .state
            .inference
            .complete(&req)
            .await
            .inspect_err(|e| record.failed(e))?;
        record.completed(done.usage, done.time_to_first_token, "bypass");
        let now = std::time::SystemTime::now();
        // Tokens used, for the gateway's tokens-per-minute accounting.
        let total = done.usage.prompt_tokens + done.usage.completion_tokens;
        let mut response = Response::new(GenerateResponse {
            id: completion_id(),
            model: req.model,
            message: Some(ChatMessage {
                role: "assistant".into(),
                content: done.text,
                name: String::new(),
            }),
            finish_reason: finish(done.finish).into(),
            usage: Some(usage(done.usage)),
            region: self.state.region.clone(),
            created_at: Some(now.into()),
            time_to_first_token_ms: millis(done.time_to_first_token),
            latency_ms: millis(started.elapsed()),
            cache: CacheResult::Bypass.into(),
        });
        response
            .metadata_mut()
            .insert("x-meridian-usage-tokens", total.into());
        Ok(response)
    }

    type GenerateStreamStream = BoxStream<'static, Result<GenerateChunk, Status>>;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let tenant = Tenant::from_metadata(request.metadata())?;
        let req = chat_request(request.into_inner())?;
        let model = req.model.clone();
        let record = self.state.telemetry.usage.begin(tenant.as_str(), &model);
        let chunks = self
            .state
            .inference
            .stream(req)
            .inspect_err(|e| record.failed(e))?;
        let mut ttft = None;
        let id = completion_id();
        let region = self.state.region.clone();
        let mut index = 0;
        let stream = chunks.map(move |chunk| {
            let mut out = GenerateChunk {
                id: id.clone(),
                model: model.clone(),
                index,
                region: region.clone(),
                ..Default::default()
            };
            index += 1;
            match chunk {
                Chunk::Delta(text) => {
                    ttft.get_or_insert_with(|| record.elapsed());
                    out.delta = text;
                }
                Chunk::Done {
                    finish: f,
                    usage: u,
                } => {
                    record.completed(u, ttft.unwrap_or_else(|| record.elapsed()), "bypass");
                    out.finish_reason = finish(f).into();
                    out.usage = Some(usage(u));
                }
            }
            Ok(out)
        });
        Ok(Response::new(stream.boxed()))
    }

    async fn embed(
        &self,
        request: Request<EmbedRequest>,
    ) -> Result<Response<EmbedResponse>, Status> {
        Err(Error::ModelNotFound(request.into_inner().model).into())
    }

    async fn list_models(
        &self,
        _request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let models = self
            .state
            .inference
            .models()
            .map(|m| Model {
                id: m.id.clone(),
                owned_by: "meridian".into(),
                kind: ModelKind::Chat.into(),
                context_window_tokens: m.context_window_tokens,
            })
            .collect();
        Ok(Response::new(ListModelsResponse {
            models,
            region: self.state.region.clone(),
        }))
    }
}
