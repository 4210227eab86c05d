//! `meridian.v1.Jobs` over gRPC.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use meridian_proto::v1 as pb;
use meridian_proto::v1::jobs_server::{Jobs, JobsServer};
use tonic::{Request, Response, Status};

use super::super::charge::Charge;
use super::super::grpc::{chat_request, finish_reason, pb_message};
use super::super::{AppState, Tenant};
use super::check_model;
use crate::queue::{Job, JobState, Priority, Submission};
use crate::replication::{DURABILITY_HEADER, Durability};

pub(in crate::api) fn service(state: Arc<AppState>) -> JobsServer<JobsApi> {
    JobsServer::new(JobsApi { state })
}

pub(in crate::api) struct JobsApi {
    state: Arc<AppState>,
}

#[tonic::async_trait]
impl Jobs for JobsApi {
    async fn submit(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let tenant = Tenant::from_metadata(request.metadata())?;
        let requested = Durability::requested(
            request
                .metadata()
                .get(DURABILITY_HEADER)
                .map(|v| v.as_bytes()),
        )?;
        // The gateway replays a submission in another region only when it
        // carries this metadata; the field and the metadata name one key.
        let metadata_key = match request
            .metadata()
            .get(crate::conversation::IDEMPOTENCY_HEADER)
        {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| {
                        crate::error::Error::invalid("`idempotency-key` must be ASCII", None)
                    })?
                    .to_string(),
            ),
        };
        let req = request.into_inner();
        let field_key = (!req.idempotency_key.is_empty()).then_some(req.idempotency_key);
        let idempotency_key = match (field_key, metadata_key) {
            (Some(a), Some(b)) if a != b => {
                return Err(crate::error::Error::invalid(
                    "`idempotency_key` and the `idempotency-key` metadata differ",
                    Some("idempotency_key"),
                )
                .into());
            }
            (a, b) => a.or(b),
        };
        let generate = req.request.ok_or_else(|| {
            crate::error::Error::invalid("`request` is required", Some("request"))
        })?;
        let chat = chat_request(generate)?;
        check_model(&self.state, &chat.model)?;
        self.state.pipeline.check_size(&chat)?;
        let priority = match pb::JobPriority::try_from(req.priority) {
            Ok(pb::JobPriority::Interactive) => Priority::Interactive,
            _ => Priority::Batch,
        };
        let charge = Charge::of(&chat);
        let submission = Submission {
            request: chat.into(),
            priority,
            idempotency_key,
        };
        let durability = self
            .state
            .replication
            .durability(tenant.as_str(), requested)?;
        tenant.may_use(&submission.request.model)?;
        self.state.spend.check(tenant.as_str())?;
        let submitted = self.state.jobs.submit(&tenant, submission).await?;
        if durability == Durability::Sync {
            self.state
                .replication
                .wait_logged(submitted.logged_as)
                .await?;
        }
        let mut response = Response::new(job_pb(&submitted.job, &self.state.region));
        response.metadata_mut().insert(
            DURABILITY_HEADER,
            tonic::metadata::MetadataValue::from_static(durability.header()),
        );
        for (name, value) in charge.head(submitted.logged_as.is_none()) {
            response.metadata_mut().insert(name, value.into());
        }
        Ok(response)
    }

    async fn get(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let tenant = Tenant::from_metadata(request.metadata())?;
        let job = self
            .state
            .jobs
            .get(&tenant, &request.into_inner().job_id)
            .await?;
        Ok(Response::new(job_pb(&job, &self.state.region)))
    }

    type WatchStream = BoxStream<'static, Result<pb::JobEvent, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let tenant = Tenant::from_metadata(request.metadata())?;
        let id = request.into_inner().job_id;
        let changes = self.state.jobs.clone().watch(tenant, &id).await?;
        let region = self.state.region.clone();
        let events = changes.map(move |change| {
            let change = change?;
            Ok(pb::JobEvent {
                job: Some(job_pb(&change.job, &region)),
                previous_state: change
                    .previous
                    .map_or(pb::JobState::Unspecified, state_pb)
                    .into(),
                occurred_at: Some(std::time::SystemTime::from(change.at).into()),
            })
        });
        let timeout = self.state.stream_write_timeout;
        let events = crate::slow_reader::cut_after(
            events,
            timeout,
            "job watch",
            Some(Err(super::super::grpc::unread(timeout))),
        );
        Ok(Response::new(events.boxed()))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let tenant = Tenant::from_metadata(request.metadata())?;
        let job = self
            .state
            .jobs
            .cancel(&tenant, &request.into_inner().job_id)
            .await?;
        Ok(Response::new(job_pb(&job, &self.state.region)))
    }
}

fn state_pb(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::DeadLettered => pb::JobState::DeadLettered,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    std::time::SystemTime::from(t).into()
}

fn saturate(ms: u64) -> u32 {
    u32::try_from(ms).unwrap_or(u32::MAX)
}

fn job_pb(job: &Job, region: &str) -> pb::Job {
    let request = pb::GenerateRequest {
        model: job.request.model.clone(),
        messages: job
            .request
            .messages
            .iter()
            .map(|m| pb_message(&m.role, &m.content, m.raw.as_ref(), &[]))
            .collect(),
        max_tokens: job.request.max_tokens,
        seed: job.request.seed,
        stop: job.request.stop.clone(),
        ..Default::default()
    };
    let result = job.result.as_ref().map(|r| pb::GenerateResponse {
        id: r.completion_id.clone(),
        model: job.request.model.clone(),
        message: Some(pb_message("assistant", &r.text, None, &r.extras.tool_calls)),
        finish_reason: finish_reason(crate::inference::Finish::parse(&r.finish)).into(),
        usage: Some(pb::Usage {
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            total_tokens: r.prompt_tokens + r.completion_tokens,
        }),
        region: region.to_string(),
        created_at: Some(prost_types::Timestamp {
            seconds: r.created,
            nanos: 0,
        }),
        time_to_first_token_ms: r.time_to_first_token_ms,
        latency_ms: r.latency_ms,
        cache: pb::CacheResult::Bypass.into(),
    });
    pb::Job {
        id: job.id.to_string(),
        state: state_pb(job.state).into(),
        priority: match job.priority {
            Priority::Interactive => pb::JobPriority::Interactive,
            Priority::Batch => pb::JobPriority::Batch,
        }
        .into(),
        idempotency_key: job.idempotency_key.clone().unwrap_or_default(),
        request: Some(request),
        result,
        attempts: job.attempts,
        last_error: job.last_error.as_ref().map(|e| pb::ErrorDetail {
            reason: e.reason.clone(),
            message: e.message.clone(),
            retryable: e.retryable,
            retry_after_ms: 0,
            region: region.to_string(),
        }),
        created_at: Some(timestamp(job.created_at)),
        started_at: job.started_at.map(timestamp),
        finished_at: job.finished_at.map(timestamp),
        queued_ms: saturate(job.queued_ms),
        running_ms: saturate(job.running_ms),
        region: region.to_string(),
    }
}
