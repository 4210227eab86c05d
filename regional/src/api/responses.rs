//! The Responses API (`/v1/responses`): create (whole or streamed with the
//! Responses event protocol), retrieve, delete, cancel and list input
//! items. A request is translated to the chat request the answer pipeline
//! serves (`request.rs`), so routing, cache, admission, budgets and usage
//! are those of chat completions; its answer becomes the Response object
//! (`object.rs`, `events.rs`). Stored responses (`crate::responses`)
//! replicate to the tenant's regions, so a `previous_response_id` resolves
//! wherever the next request lands.

mod background;
mod events;
mod object;
mod request;

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde_json::{Value, json};

use self::events::Writer;
use self::object::{Shell, State as ResponseState, output_items};
use self::request::CreateBody;
pub(super) use self::request::{check_items, check_metadata};
use super::body::JsonBody;
use super::charge::{self, Charge};
use super::infer::{RequestFacts, durability_header, model_header};
use super::{AppState, Tenant};
use crate::answer::{Streamed, TurnOptions};
use crate::cache::RESULT_HEADER;
use crate::conversation::items as conversation;
use crate::error::Error;
use crate::inference::{ChatRequest, Chunk};
use crate::queue::{Priority, Submission};
use crate::replication::Durability;
use crate::responses::{self as stored, NewResponse};
use crate::slow_reader::cut_after;
use crate::store::Store;

pub(super) fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/responses", post(create))
        .route("/v1/responses/{id}", get(retrieve).delete(delete))
        .route("/v1/responses/{id}/cancel", post(cancel))
        .route("/v1/responses/{id}/input_items", get(input_items))
        .with_state(state)
}

async fn create(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    facts: RequestFacts,
    JsonBody(body): JsonBody,
) -> Response {
    match respond(state, &tenant, facts, &body).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    }
}

async fn respond(
    state: Arc<AppState>,
    tenant: &Tenant,
    facts: RequestFacts,
    body: &[u8],
) -> Result<Response, Error> {
    let checked = CreateBody::parse(body)?.check()?;
    let store = checked.body.store.unwrap_or(true);
    let durability = state
        .replication
        .durability(tenant.as_str(), facts.durability())?;
    let stored = store || checked.conversation.is_some();
    if stored || checked.body.previous_response_id.is_some() {
        state.stores.require(Store::Postgres)?;
    }
    let limit = state.pipeline.limits().messages;
    let (chain, cut) = match &checked.body.previous_response_id {
        None => match &checked.conversation {
            Some(conversation) => {
                let items = conversation::items(&state.pool, tenant.as_str(), conversation).await?;
                // Refused before the model runs, room left for an answer.
                conversation::has_room(
                    &state.pool,
                    tenant.as_str(),
                    conversation,
                    &checked.input_items,
                    1,
                    &state.pipeline.limits(),
                )
                .await?;
                (items, false)
            }
            None => (Vec::new(), false),
        },
        Some(previous) => {
            let last = background::current(&state, tenant, previous)
                .await
                .map_err(|e| match e {
                    Error::UnknownResponse { id, .. } => Error::UnknownResponse {
                        id,
                        param: Some("previous_response_id"),
                    },
                    e => e,
                })?;
            if background::pending(&last) {
                return Err(Error::invalid(
                    format!(
                        "`previous_response_id` {previous:?} is still {}: continue it once it \
                         has completed",
                        last["status"].as_str().unwrap_or("running")
                    ),
                    Some("previous_response_id"),
                ));
            }
            let chain = stored::chain(&state.pool, tenant.as_str(), previous, limit).await?;
            let items = chain
                .links
                .into_iter()
                .flat_map(|l| l.input_items.into_iter().chain(l.output))
                .collect::<Vec<_>>();
            (items, chain.cut)
        }
    };
    let mut req = checked.chat_request(&chain)?;
    if checked.body.truncation.as_deref() == Some("auto") {
        truncate(&state, &mut req, checked.body.instructions.is_some(), limit);
    } else if cut {
        return Err(Error::too_large(
            format!(
                "the chain of `previous_response_id` is longer than the {limit} messages a model \
                 call may carry (`inference.max_messages`): set `truncation` to `auto` to drop \
                 its oldest items"
            ),
            Some("previous_response_id"),
        ));
    }
    if checked.body.background == Some(true) {
        return run_in_background(&state, tenant, &checked, req, durability).await;
    }
    let has_tools = req.extra.contains_key("tools");
    let mut ask = facts.ask(&state, tenant, has_tools, None)?;
    // A response's state is its chain, not a conversation of chat's.
    ask.turn = TurnOptions::default();
    let save = Save {
        state: state.clone(),
        tenant: tenant.as_str().to_string(),
        store,
        conversation: checked.conversation.clone(),
        durability,
        previous: checked.body.previous_response_id.clone(),
        input_items: Value::Array(checked.input_items.clone()),
    };
    if checked.body.stream.unwrap_or(false) {
        let streamed = state.pipeline.answer_stream(&mut req, ask).await?;
        let charge = Charge::of(&req);
        let shell = Shell::new(&checked, &req.model);
        let headers = (
            model_header(&req.model, streamed.fallback.as_ref()),
            [(RESULT_HEADER, streamed.outcome.header())],
            durability_header(stored.then_some(durability)),
            charge.head_headers(streamed.outcome.is_hit()),
        );
        let events = stream(
            Writer::new(shell, checked.logprobs),
            streamed,
            charge.clone(),
            save,
        );
        let body = Sse::new(cut_after(
            events,
            state.stream_write_timeout,
            "response stream",
            None,
        ))
        .keep_alive(KeepAlive::default());
        let mut response = (headers, body).into_response();
        charge.trail(&mut response);
        return Ok(response);
    }
    let done = state.pipeline.answer(&mut req, ask).await?;
    let answer = &done.answer;
    let shell = Shell::new(&checked, &req.model);
    let output = output_items(answer, checked.logprobs, &mut request::item_id);
    let object = shell.object(ResponseState::finished(
        &output,
        answer.finish,
        answer.usage(),
        &answer.extras.meta,
    ));
    save.store(&shell, &object).await?;
    let total = charge::used(answer.usage(), done.outcome);
    Ok((
        model_header(&req.model, answer.fallback.as_ref()),
        [
            (meridian_proto::header::USAGE_TOKENS, total.to_string()),
            (RESULT_HEADER, done.outcome.header().to_string()),
        ],
        durability_header(stored.then_some(durability)),
        axum::Json(object),
    )
        .into_response())
}

/// Submits a background response's request as a job (checked as a job
/// submission is, so a refusal comes now, not from the queue) and stores
/// the response as queued, naming the job.
async fn run_in_background(
    state: &AppState,
    tenant: &Tenant,
    checked: &request::Checked,
    req: ChatRequest,
    durability: Durability,
) -> Result<Response, Error> {
    super::jobs::check_model(state, &req.model)?;
    state.pipeline.check_size(&req)?;
    tenant.may_use(&req.model)?;
    state.spend.check(tenant.as_str())?;
    let mut shell = Shell::new(checked, &req.model);
    shell.background();
    let submitted = state
        .jobs
        .submit(
            tenant,
            Submission {
                request: req.into(),
                priority: Priority::Interactive,
                idempotency_key: None,
            },
        )
        .await?;
    let object = shell.object(ResponseState::pending("queued"));
    let sequence = stored::insert(
        &state.pool,
        NewResponse {
            id: &shell.id,
            tenant: tenant.as_str(),
            model: &shell.model,
            status: "queued",
            previous: checked.body.previous_response_id.as_deref(),
            body: &object,
            input_items: &Value::Array(checked.input_items.clone()),
            job: Some(submitted.job.id),
        },
    )
    .await?;
    if durability == Durability::Sync {
        state.replication.wait_applied(sequence).await?;
    }
    Ok((durability_header(Some(durability)), axum::Json(object)).into_response())
}

/// Drops the oldest items of the context (after the instructions) until
/// it fits the model call's message limit and the model's context window,
/// as `truncation: auto` asks; a call's output never starts what is left
/// without its call.
fn truncate(state: &AppState, req: &mut ChatRequest, instructions: bool, max_messages: usize) {
    let window = state
        .inference
        .models()
        .find(|m| m.id == req.model)
        .map(|m| u64::from(m.context_window_tokens));
    let keep = usize::from(instructions);
    let fits = |req: &ChatRequest| {
        req.messages.len() <= max_messages
            && window.is_none_or(|w| {
                u64::from(req.prompt_tokens()) + u64::from(req.max_tokens.unwrap_or(0)) <= w
            })
    };
    while !fits(req) && req.messages.len() > keep + 1 {
        req.messages.remove(keep);
        while req.messages.len() > keep + 1 && req.messages[keep].role == "tool" {
            req.messages.remove(keep);
        }
    }
}

/// What storing a finished response needs, carried into its stream.
struct Save {
    state: Arc<AppState>,
    tenant: String,
    store: bool,
    /// The conversation the input and output are appended to.
    conversation: Option<String>,
    durability: Durability,
    previous: Option<String>,
    input_items: Value,
}

impl Save {
    /// Appends the input and output to the conversation, stores `object`
    /// (when the request asked to) and, when synchronous, waits until a peer
    /// region has applied both.
    async fn store(&self, shell: &Shell, object: &Value) -> Result<(), Error> {
        let mut sequence = None;
        if let Some(id) = &self.conversation {
            let mut items = self.input_items.as_array().cloned().unwrap_or_default();
            items.extend(object["output"].as_array().into_iter().flatten().cloned());
            let limits = self.state.pipeline.limits();
            sequence = Some(
                conversation::append(&self.state.pool, &self.tenant, id, &items, &limits).await?,
            );
        }
        if self.store {
            sequence = Some(self.insert(shell, object).await?);
        }
        if let Some(sequence) = sequence
            && self.durability == Durability::Sync
        {
            self.state.replication.wait_applied(sequence).await?;
        }
        Ok(())
    }

    async fn insert(&self, shell: &Shell, object: &Value) -> Result<u64, Error> {
        stored::insert(
            &self.state.pool,
            NewResponse {
                id: &shell.id,
                tenant: &self.tenant,
                model: &shell.model,
                status: object["status"].as_str().unwrap_or("completed"),
                previous: self.previous.as_deref(),
                body: object,
                input_items: &self.input_items,
                job: None,
            },
        )
        .await
    }
}

/// The stream's events; the response is stored before its last event, so
/// a client that saw `response.completed` can continue from it anywhere.
fn stream(
    mut writer: Writer,
    streamed: Streamed,
    charge: Charge,
    save: Save,
) -> impl futures::Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let Streamed {
        chunks,
        outcome,
        record,
        permit,
        ..
    } = streamed;
    async_stream::stream! {
        // Admitted for as long as the stream runs.
        let _permit = permit;
        for event in writer.start() {
            yield Ok(event);
        }
        let mut chunks = chunks;
        let mut ttft = None;
        while let Some(chunk) = chunks.next().await {
            match chunk {
                Err(e) => {
                    record.failed(&e);
                    let (event, object) = writer.fail(&e);
                    if let Err(store) = save.store(writer.shell(), &object).await {
                        tracing::warn!(error = %store, "a failed response could not be stored");
                    }
                    yield Ok(event);
                    return;
                }
                Ok(Chunk::Delta(piece)) => {
                    ttft.get_or_insert_with(|| record.elapsed());
                    for event in writer.delta(&piece) {
                        yield Ok(event);
                    }
                }
                Ok(Chunk::Done { finish, usage, meta }) => {
                    record.completed(usage, ttft.unwrap_or_else(|| record.elapsed()), outcome.label());
                    charge.settle(usage, outcome);
                    let (events, object) = writer.finish(finish, usage, &meta);
                    for event in events {
                        yield Ok(event);
                    }
                    match save.store(writer.shell(), &object).await {
                        Ok(()) => yield Ok(writer.last(object)),
                        Err(e) => {
                            let failed = writer.fail(&e).0;
                            yield Ok(failed);
                        }
                    }
                    return;
                }
            }
        }
    }
}

/// `GET /v1/responses/{id}`: the response as it was returned.
async fn retrieve(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    state.stores.require(Store::Postgres)?;
    let body = background::current(&state, &tenant, &id).await?;
    Ok(axum::Json(body).into_response())
}

/// `DELETE /v1/responses/{id}`: erased here and, by replication, in every
/// region of the tenant.
async fn delete(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    facts: RequestFacts,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    state.stores.require(Store::Postgres)?;
    let durability = state
        .replication
        .durability(tenant.as_str(), facts.durability())?;
    // A pending background response's job stops first: nobody could read
    // its answer.
    let found = stored::get(&state.pool, tenant.as_str(), &id).await?;
    if let Some(job) = found.job {
        background::stop(&state, &tenant, job, &found.body).await?;
    }
    let sequence = stored::delete(&state.pool, tenant.as_str(), &id).await?;
    if durability == Durability::Sync {
        state.replication.wait_applied(sequence).await?;
    }
    Ok((
        durability_header(Some(durability)),
        axum::Json(json!({"id": id, "object": "response", "deleted": true})),
    )
        .into_response())
}

/// `POST /v1/responses/{id}/cancel`: cancels a background response's
/// job; a foreground response cannot be cancelled.
async fn cancel(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    state.stores.require(Store::Postgres)?;
    let body = background::cancel(&state, &tenant, &id).await?;
    Ok(axum::Json(body).into_response())
}

/// The list parameters of `input_items`, read from the query's pairs
/// (a repeated one counts once, its last value), so that any query string
/// gets an OpenAI error rather than the extractor's plain-text one.
#[derive(Debug, Default)]
pub(super) struct ListQuery {
    after: Option<String>,
    limit: Option<String>,
    order: Option<String>,
}

impl ListQuery {
    pub(super) fn read(
        pairs: Result<Query<Vec<(String, String)>>, QueryRejection>,
    ) -> Result<Self, Error> {
        let Query(pairs) =
            pairs.map_err(|e| Error::invalid(format!("invalid query string: {e}"), None))?;
        let mut query = Self::default();
        for (key, value) in pairs {
            match key.as_str() {
                "after" => query.after = Some(value),
                "limit" => query.limit = Some(value),
                "order" => query.order = Some(value),
                _ => {}
            }
        }
        Ok(query)
    }
}

/// `GET /v1/responses/{id}/input_items`: what the model was given for the
/// response, its chain's items included, newest first unless `order=asc`.
async fn input_items(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    Path(id): Path<String>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, Error> {
    let query = ListQuery::read(query)?;
    state.stores.require(Store::Postgres)?;
    let limit_chain = state.pipeline.limits().messages;
    let chain = stored::chain(&state.pool, tenant.as_str(), &id, limit_chain)
        .await
        .map_err(|e| match e {
            Error::UnknownResponse { id, .. } => Error::UnknownResponse { id, param: None },
            e => e,
        })?;
    let last = chain.links.len().saturating_sub(1);
    let mut items: Vec<Value> = Vec::new();
    for (i, link) in chain.links.into_iter().enumerate() {
        items.extend(link.input_items);
        if i < last {
            items.extend(link.output);
        }
    }
    Ok(axum::Json(list(items, &query)?).into_response())
}

/// One page of `items` (oldest first) as an OpenAI list: newest first
/// unless `order=asc`, `limit` items (20 by default, at most 100) after
/// the item `after` names.
pub(super) fn list(mut items: Vec<Value>, query: &ListQuery) -> Result<Value, Error> {
    let limit = match query.limit.as_deref() {
        None => 20,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=100).contains(l))
            .ok_or_else(|| Error::invalid("`limit` must be between 1 and 100", None))?,
    };
    let ascending = match query.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(other) => {
            return Err(Error::invalid(
                format!("`order` must be asc or desc, got {other:?}"),
                None,
            ));
        }
    };
    if !ascending {
        items.reverse();
    }
    let start = match &query.after {
        None => 0,
        Some(after) => {
            items
                .iter()
                .position(|i| i["id"].as_str() == Some(after.as_str()))
                .ok_or_else(|| {
                    Error::invalid(
                        format!("`after` names no item of this list: {after:?}"),
                        None,
                    )
                })?
                + 1
        }
    };
    let page: Vec<Value> = items.iter().skip(start).take(limit).cloned().collect();
    let has_more = start + page.len() < items.len();
    Ok(json!({
        "object": "list",
        "data": page,
        "first_id": page.first().map(|i| i["id"].clone()),
        "last_id": page.last().map(|i| i["id"].clone()),
        "has_more": has_more,
    }))
}
