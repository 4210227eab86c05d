//! The job record: its states, lanes, request, result and error, and how a
//! `jobs` row reads back as the [`Job`] the APIs show.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use uuid::Uuid;

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::error::Error;
use crate::inference::{ChatRequest, Extras, Message};

/// Where a job is in its lifecycle; the strings are the `jobs.state` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    DeadLettered,
    Cancelled,
}

impl JobState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::DeadLettered => "dead_lettered",
            Self::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "dead_lettered" => Self::DeadLettered,
            "cancelled" => Self::Cancelled,
            other => return Err(Error::Unavailable(format!("unknown job state {other:?}"))),
        })
    }

    pub(crate) fn is_terminal(self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }
}

/// The lane a job waits in: interactive jobs are read before batch ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Priority {
    Interactive,
    Batch,
}

impl Priority {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Interactive => "interactive",
            Self::Batch => "batch",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "interactive" => Some(Self::Interactive),
            "batch" => Some(Self::Batch),
            _ => None,
        }
    }
}

/// The generation a job runs, as stored: the checked inference request, so
/// both APIs read back the same thing and idempotent resubmissions compare
/// equal whatever optional fields the client spelled out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct JobRequest {
    pub model: String,
    pub messages: Vec<JobMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub max_completion_tokens: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// The fields passed to the upstream as sent (`tools`, ...).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct JobMessage {
    pub role: String,
    pub content: String,
    /// The message as sent, when it carries more than a role and a text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<Map<String, Value>>,
}

impl From<ChatRequest> for JobRequest {
    fn from(r: ChatRequest) -> Self {
        Self {
            model: r.model,
            messages: r
                .messages
                .into_iter()
                .map(|m| JobMessage {
                    role: m.role,
                    content: m.content,
                    raw: m.raw.map(Arc::unwrap_or_clone),
                })
                .collect(),
            max_tokens: r.max_tokens,
            max_completion_tokens: r.max_completion_tokens,
            seed: r.seed,
            stop: r.stop,
            temperature: r.temperature,
            extra: Arc::unwrap_or_clone(r.extra),
        }
    }
}

impl JobRequest {
    pub(crate) fn to_chat(&self) -> ChatRequest {
        ChatRequest {
            model: self.model.clone(),
            messages: self
                .messages
                .iter()
                .map(|m| Message {
                    role: m.role.clone(),
                    content: m.content.clone(),
                    raw: m.raw.clone().map(Arc::new),
                })
                .collect(),
            max_tokens: self.max_tokens,
            max_completion_tokens: self.max_completion_tokens,
            seed: self.seed,
            stop: self.stop.clone(),
            temperature: self.temperature,
            extra: Arc::new(self.extra.clone()),
        }
    }
}

/// What a successful attempt produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct JobResult {
    pub completion_id: String,
    /// Unix seconds.
    pub created: i64,
    pub text: String,
    /// `stop` or `length`.
    pub finish: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub time_to_first_token_ms: u32,
    pub latency_ms: u32,
    /// Tool calls, refusal, log probabilities, the upstream's own fields.
    #[serde(flatten)]
    pub extras: Extras,
}

/// Why the latest attempt failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct JobError {
    pub reason: String,
    pub message: String,
    pub retryable: bool,
}

/// A job as the APIs show it.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub id: Uuid,
    pub state: JobState,
    pub priority: Priority,
    pub idempotency_key: Option<String>,
    pub request: JobRequest,
    pub result: Option<JobResult>,
    pub attempts: u32,
    pub last_error: Option<JobError>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Time spent queued and running so far, the current stretch included.
    pub queued_ms: u64,
    pub running_ms: u64,
}

#[derive(sqlx::FromRow)]
pub(super) struct JobRow {
    id: Uuid,
    idempotency_key: Option<String>,
    priority: String,
    state: String,
    request: Json<JobRequest>,
    result: Option<Json<JobResult>>,
    last_error: Option<Json<JobError>>,
    attempts: i32,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    queued_since: Option<DateTime<Utc>>,
    queued_ms: i64,
    running_ms: i64,
    /// The database's clock, so durations never mix two clocks.
    now: DateTime<Utc>,
}

impl TryFrom<JobRow> for Job {
    type Error = Error;

    fn try_from(r: JobRow) -> Result<Self, Error> {
        let state = JobState::parse(&r.state)?;
        let since =
            |t: Option<DateTime<Utc>>| t.map_or(0, |t| (r.now - t).num_milliseconds().max(0));
        let queued_extra = if state == JobState::Queued {
            since(r.queued_since)
        } else {
            0
        };
        let running_extra = if state == JobState::Running {
            since(r.started_at)
        } else {
            0
        };
        Ok(Self {
            id: r.id,
            state,
            priority: Priority::parse(&r.priority).unwrap_or(Priority::Batch),
            idempotency_key: r.idempotency_key,
            request: r.request.0,
            result: r.result.map(|j| j.0),
            attempts: u32::try_from(r.attempts).unwrap_or(0),
            last_error: r.last_error.map(|j| j.0),
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            queued_ms: u64::try_from(r.queued_ms + queued_extra).unwrap_or(0),
            running_ms: u64::try_from(r.running_ms + running_extra).unwrap_or(0),
        })
    }
}

pub(super) fn job(row: Option<JobRow>) -> Result<Option<Job>, Error> {
    row.map(Job::try_from).transpose()
}
