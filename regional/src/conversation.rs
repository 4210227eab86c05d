//! Conversations: the turns a region keeps so that a client sends only its
//! new message. Before the model call the stored turns are prepended to the
//! request; after it, the new messages and the answer are stored in one
//! transaction before the client hears the answer, which is what makes a
//! turn acknowledged. Both tables replicate (0007_conversations.sql), so the
//! history follows the conversation to another region when its home dies.
//! A conversation is named by its tenant and its id together: another
//! tenant's use of an id is invisible.
//!
//! See `docs/ARCHITECTURE.md` (Conversations).

pub(crate) mod items;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::answer::Limits;
use crate::error::Error;
use crate::inference::{ChatRequest, Message};

/// Request header (and gRPC metadata key) naming the conversation. The
/// gateway's affinity reads the same header.
pub(crate) const CONVERSATION_HEADER: &str = meridian_proto::header::CONVERSATION;

/// A validated conversation id: 1 to 128 ASCII letters, digits, `.`, `_`,
/// `:` or `-` (the table's CHECK says the same).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConversationId(String);

impl ConversationId {
    fn parse(value: &str) -> Result<Self, Error> {
        let valid = !value.is_empty()
            && value.len() <= 128
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if !valid {
            return Err(Error::invalid(
                "a conversation id must be 1 to 128 letters, digits, '.', '_', ':' or '-'",
                Some("conversation_id"),
            ));
        }
        Ok(Self(value.to_string()))
    }

    /// The id a request names in its header and/or its body; empty values
    /// name none. Both may be given, but then they must agree.
    pub(crate) fn from_request(
        header: Option<&str>,
        body: Option<&str>,
    ) -> Result<Option<Self>, Error> {
        let header = header.filter(|v| !v.is_empty());
        let body = body.filter(|v| !v.is_empty());
        match (header, body) {
            (Some(h), Some(b)) if h != b => Err(Error::invalid(
                format!(
                    "`{CONVERSATION_HEADER}` and `conversation_id` name different conversations"
                ),
                Some("conversation_id"),
            )),
            (Some(v), _) | (None, Some(v)) => Self::parse(v).map(Some),
            (None, None) => Ok(None),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// Request header (and gRPC metadata key) naming a turn so that a repeat
/// stores it once; jobs read the same header.
pub(crate) const IDEMPOTENCY_HEADER: &str = meridian_proto::header::IDEMPOTENCY_KEY;

/// A turn's idempotency key: 1 to 255 ASCII bytes (as for jobs).
pub(crate) fn idempotency_key(value: Option<&str>) -> Result<Option<String>, Error> {
    match value {
        None => Ok(None),
        Some(k) if k.is_empty() || k.len() > crate::queue::MAX_KEY_BYTES || !k.is_ascii() => {
            Err(Error::invalid(
                format!(
                    "`{IDEMPOTENCY_HEADER}` must be 1 to {} ASCII bytes",
                    crate::queue::MAX_KEY_BYTES
                ),
                None,
            ))
        }
        Some(k) => Ok(Some(k.to_string())),
    }
}

/// A turn in progress: the messages the client sent, to be stored with the
/// answer once it is complete.
pub(crate) struct Turn {
    id: ConversationId,
    tenant: String,
    new: Vec<Message>,
    key: Option<String>,
}

/// What [`begin`] found.
pub(crate) enum Begun {
    /// A new turn, its history prepended to the request.
    Turn(Turn),
    /// The turn was stored already under the request's idempotency key:
    /// its stored answer.
    Repeated(String),
}

fn not_found(id: &ConversationId) -> Error {
    Error::NotFound(format!("no conversation {:?}", id.as_str()))
}

/// Loads the stored turns of `id` for `tenant` and prepends them to `req`.
/// An id the tenant does not use yet is a new conversation (created when
/// its first turn is stored): ids are the tenant's own
/// (`0014_conversation_scope.sql`), whatever other tenants use. A conversation whose history
/// and new messages would pass `limits` is refused before its history is
/// read, so a turn never loads more than the limits allow. A turn stored
/// under `key` already is answered from the store when the request repeats
/// its messages, and refused when it does not.
pub(crate) async fn begin(
    pool: &PgPool,
    tenant: &str,
    id: ConversationId,
    key: Option<String>,
    req: &mut ChatRequest,
    limits: &Limits,
) -> Result<Begun, Error> {
    storable(req)?;
    // PostgreSQL text holds no NUL: said here, not failed by the store.
    if req
        .messages
        .iter()
        .any(|m| m.role.contains('\0') || m.content.contains('\0'))
    {
        return Err(Error::invalid(
            "a message of a conversation turn contains a NUL character, which cannot be stored",
            Some("messages"),
        ));
    }
    if let Some(key) = &key
        && let Some(answer) = stored_answer(pool, tenant, &id, key, &req.messages).await?
    {
        return Ok(Begun::Repeated(answer));
    }
    let (stored, bytes): (i64, i64) = sqlx::query_as(items::HELD)
        .bind(tenant)
        .bind(id.as_str())
        .fetch_one(pool)
        .await?;
    let stored = usize::try_from(stored).unwrap_or(usize::MAX);
    let messages = stored.saturating_add(req.messages.len());
    if messages > limits.messages {
        return Err(Error::too_large(
            format!(
                "conversation {:?} holds {stored} messages; with this request's {} it would \
                 pass the limit of {} set by `inference.max_messages`: start a new conversation",
                id.as_str(),
                req.messages.len(),
                limits.messages
            ),
            Some("messages"),
        ));
    }
    let new_bytes: u64 = req.messages.iter().map(|m| m.content.len() as u64).sum();
    let bytes = u64::try_from(bytes).unwrap_or(0).saturating_add(new_bytes);
    if bytes > limits.conversation_bytes {
        return Err(Error::too_large(
            format!(
                "conversation {:?} would hold {bytes} bytes of messages with this request, over \
                 the limit of {} set by `inference.max_conversation_bytes`: start a new \
                 conversation",
                id.as_str(),
                limits.conversation_bytes
            ),
            Some("messages"),
        ));
    }
    let history: Vec<(String, String, Option<serde_json::Value>)> = sqlx::query_as(
        "SELECT role, content, item FROM conversation_messages
          WHERE conversation_id = $1 AND tenant_id = $2 ORDER BY turn, id",
    )
    .bind(id.as_str())
    .bind(tenant)
    .fetch_all(pool)
    .await?;
    let new = std::mem::take(&mut req.messages);
    req.messages = Vec::with_capacity(history.len() + new.len());
    // Items the Responses and Conversations APIs stored (function calls,
    // their outputs, content parts) go to the model as chat carries them;
    // a chat turn's row is its role and text.
    let mut items = Vec::new();
    for (role, content, item) in history {
        match item {
            Some(item) => items.push(item),
            None => {
                crate::responses::items::append_messages(&mut req.messages, items.iter());
                items.clear();
                req.messages.push(Message::text(role, content));
            }
        }
    }
    crate::responses::items::append_messages(&mut req.messages, items.iter());
    req.messages.extend(new.iter().cloned());
    Ok(Begun::Turn(Turn {
        id,
        tenant: tenant.to_string(),
        new,
        key,
    }))
}

/// Refuses a turn that a conversation would store only in part. Stored
/// turns are text: a message with content parts or tool fields, or a
/// request offering tools (whose answer may be calls), would lose what it
/// carries, so it is refused whole rather than stored less.
fn storable(req: &ChatRequest) -> Result<(), Error> {
    if let Some(i) = req.messages.iter().position(|m| m.raw.is_some()) {
        return Err(Error::invalid(
            format!(
                "`messages[{i}]` carries content parts or tool fields, which a conversation \
                 does not store yet (stored turns are text): send the request without a \
                 conversation, with the history in `messages`"
            ),
            Some("messages"),
        ));
    }
    for field in ["tools", "functions"] {
        if req.extra.get(field).is_some_and(|v| !v.is_null()) {
            return Err(Error::invalid(
                format!(
                    "`{field}` cannot be used with a conversation yet: stored turns are text \
                     and its answer may be tool calls; send the request without a \
                     conversation, with the history in `messages`"
                ),
                Some(field),
            ));
        }
    }
    Ok(())
}

/// The answer of the turn stored under `key`, if there is one; an error if
/// that turn's messages were not `asked`.
async fn stored_answer(
    pool: &PgPool,
    tenant: &str,
    id: &ConversationId,
    key: &str,
    asked: &[Message],
) -> Result<Option<String>, Error> {
    // Two regions cut off from each other may each have stored the turn
    // once; the rows of the one that stored first (by turn, then id) answer.
    let rows: Vec<(String, String)> = sqlx::query_as(
        "WITH keyed AS (
             SELECT turn, id, role, content, origin_region FROM conversation_messages
              WHERE conversation_id = $1 AND tenant_id = $2 AND idempotency_key = $3)
         SELECT role, content FROM keyed
          WHERE origin_region = (SELECT origin_region FROM keyed ORDER BY turn, id LIMIT 1)
          ORDER BY turn, id",
    )
    .bind(id.as_str())
    .bind(tenant)
    .bind(key)
    .fetch_all(pool)
    .await?;
    let Some(((_, answer), stored)) = rows.split_last() else {
        return Ok(None);
    };
    let same = stored.len() == asked.len()
        && stored
            .iter()
            .zip(asked)
            .all(|((role, content), m)| *role == m.role && *content == m.content);
    if !same {
        return Err(Error::IdempotencyKeyReused(key.to_string()));
    }
    Ok(Some(answer.clone()))
}

impl Turn {
    /// Stores the client's messages and the answer as the next turns, in
    /// one transaction: either the whole exchange is in the history or none
    /// of it. `region` becomes the home of a conversation created here.
    /// Returns the last sequence of the replication log the turn wrote, for
    /// a writer that waits until a peer applied it; `None` when a request
    /// with the same idempotency key stored the turn meanwhile (two
    /// concurrent repeats store it once).
    pub(crate) async fn store(
        &self,
        pool: &PgPool,
        region: &str,
        answer: &str,
    ) -> Result<Option<u64>, Error> {
        let mut tx = pool.begin().await?;
        // Takes the conversation's row lock too, so two requests of one
        // conversation in this region number their turns one after the other.
        sqlx::query(
            "INSERT INTO conversations (id, tenant_id, home_region) VALUES ($1, $2, $3)
             ON CONFLICT (scoped_id) DO UPDATE SET updated_at = now(), deleted_at = NULL",
        )
        .bind(self.id.as_str())
        .bind(&self.tenant)
        .bind(region)
        .execute(&mut *tx)
        .await?;
        if let Some(key) = &self.key {
            // Under the conversation's row lock: a concurrent repeat that
            // stored first is seen here.
            let stored: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM conversation_messages
                  WHERE conversation_id = $1 AND tenant_id = $2 AND idempotency_key = $3)",
            )
            .bind(self.id.as_str())
            .bind(&self.tenant)
            .bind(key)
            .fetch_one(&mut *tx)
            .await?;
            if stored {
                return Ok(None);
            }
        }
        let last: i32 = sqlx::query_scalar(
            "SELECT COALESCE(max(turn), 0) FROM conversation_messages
              WHERE tenant_id = $1 AND conversation_id = $2",
        )
        .bind(&self.tenant)
        .bind(self.id.as_str())
        .fetch_one(&mut *tx)
        .await?;
        let answer = Message::text("assistant", answer);
        for (turn, m) in (last + 1..).zip(self.new.iter().chain([&answer])) {
            sqlx::query(
                "INSERT INTO conversation_messages
                     (id, conversation_id, tenant_id, turn, role, content, idempotency_key)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(uuid::Uuid::now_v7())
            .bind(self.id.as_str())
            .bind(&self.tenant)
            .bind(turn)
            .bind(&m.role)
            .bind(&m.content)
            .bind(&self.key)
            .execute(&mut *tx)
            .await?;
        }
        let sequence = crate::replication::logged_sequence(&mut tx).await?;
        tx.commit().await?;
        Ok(Some(sequence))
    }
}

/// A conversation as `GET /v1/conversations/{id}` shows it.
#[derive(Debug, Serialize)]
pub(crate) struct Transcript {
    pub id: String,
    pub object: &'static str,
    /// `None` while this region has messages but not yet the conversation's
    /// row (they replicate on separate streams when regions differ).
    pub home_region: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub messages: Vec<StoredMessage>,
}

/// One stored message.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub(crate) struct StoredMessage {
    pub turn: i32,
    pub role: String,
    pub content: String,
    pub created_at: DateTime<Utc>,
    /// The region that stored it.
    #[sqlx(rename = "origin_region")]
    pub region: String,
}

/// The conversation `id` of `tenant` as stored in this region.
pub(crate) async fn transcript(pool: &PgPool, tenant: &str, id: &str) -> Result<Transcript, Error> {
    let id = ConversationId::parse(id)?;
    let row: Option<(String, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT home_region, created_at, updated_at FROM conversations
          WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL",
    )
    .bind(tenant)
    .bind(id.as_str())
    .fetch_optional(pool)
    .await?;
    let messages: Vec<StoredMessage> = sqlx::query_as(
        "SELECT turn, role, content, created_at, origin_region FROM conversation_messages
          WHERE conversation_id = $1 AND tenant_id = $2 ORDER BY turn, id",
    )
    .bind(id.as_str())
    .bind(tenant)
    .fetch_all(pool)
    .await?;
    if row.is_none() && messages.is_empty() {
        return Err(not_found(&id));
    }
    Ok(Transcript {
        id: id.0,
        object: "conversation",
        home_region: row.as_ref().map(|r| r.0.clone()),
        created_at: row.as_ref().map(|r| r.1),
        updated_at: row.as_ref().map(|r| r.2),
        messages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_from_the_header_or_the_body_and_must_agree() {
        let id = |h, b| ConversationId::from_request(h, b);
        assert_eq!(id(None, None).unwrap(), None);
        assert_eq!(id(Some(""), None).unwrap(), None);
        assert_eq!(id(Some("c-1"), None).unwrap().unwrap().as_str(), "c-1");
        assert_eq!(id(None, Some("c:1")).unwrap().unwrap().as_str(), "c:1");
        assert_eq!(id(Some("c"), Some("c")).unwrap().unwrap().as_str(), "c");
        assert!(id(Some("a"), Some("b")).is_err());
        assert!(id(Some("a b"), None).is_err());
        assert!(id(Some(&"x".repeat(129)), None).is_err());
    }
}
