//! Conversations as the Conversations and Responses APIs see them: an
//! object with metadata, and items (messages, function calls and their
//! outputs) in order, on the same replicated tables as chat's turns. A
//! chat turn's row (no `item`) is shown as a message item named after its
//! row id, so both APIs name one history.

use serde_json::{Map, Value, json};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::ConversationId;
use crate::answer::Limits;
use crate::error::Error;
use crate::replication::logged_sequence;
use crate::responses::items::texts;

/// The item prefix of a chat turn's row: `msg_` and the row's UUID.
const ROW_PREFIX: &str = "msg_";

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("no conversation {id:?}"))
}

/// A conversation as the API shows it, with Meridian's own fields.
pub(crate) async fn object(pool: &PgPool, tenant: &str, id: &str) -> Result<Value, Error> {
    let id = ConversationId::parse(id)?;
    let row: Option<(String, Value, i64, i64)> = sqlx::query_as(
        "SELECT home_region, metadata, extract(epoch FROM created_at)::bigint,
                extract(epoch FROM updated_at)::bigint
           FROM conversations
          WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL",
    )
    .bind(tenant)
    .bind(id.as_str())
    .fetch_optional(pool)
    .await?;
    let (home, metadata, created, updated) = row.ok_or_else(|| not_found(id.as_str()))?;
    Ok(json!({
        "id": id.as_str(),
        "object": "conversation",
        "created_at": created,
        "metadata": metadata,
        "home_region": home,
        "updated_at": updated,
    }))
}

/// Creates a conversation with `items` (checked by the caller) in `region`.
/// Returns its object and the replication sequence of the write.
pub(crate) async fn create(
    pool: &PgPool,
    region: &str,
    tenant: &str,
    metadata: &Map<String, Value>,
    items: &[Value],
    limits: &Limits,
) -> Result<(Value, u64), Error> {
    let id = format!("conv_{}", Uuid::now_v7().simple());
    fits(&id, 0, 0, items, limits)?;
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO conversations (id, tenant_id, home_region, metadata) VALUES ($1, $2, $3, $4)",
    )
    .bind(&id)
    .bind(tenant)
    .bind(region)
    .bind(Value::Object(metadata.clone()))
    .execute(&mut *tx)
    .await?;
    insert_items(&mut tx, tenant, &id, items).await?;
    let sequence = logged_sequence(&mut tx).await?;
    tx.commit().await?;
    Ok((object(pool, tenant, &id).await?, sequence))
}

/// Replaces the metadata of conversation `id`.
pub(crate) async fn update(
    pool: &PgPool,
    tenant: &str,
    id: &str,
    metadata: &Map<String, Value>,
) -> Result<(Value, u64), Error> {
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "UPDATE conversations SET metadata = $3, updated_at = now()
          WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL",
    )
    .bind(tenant)
    .bind(id)
    .bind(Value::Object(metadata.clone()))
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(not_found(id));
    }
    let sequence = logged_sequence(&mut tx).await?;
    tx.commit().await?;
    Ok((object(pool, tenant, id).await?, sequence))
}

/// Marks conversation `id` deleted and removes its items.
pub(crate) async fn delete(pool: &PgPool, tenant: &str, id: &str) -> Result<u64, Error> {
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "UPDATE conversations SET deleted_at = now(), updated_at = now(), metadata = '{}'
          WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL",
    )
    .bind(tenant)
    .bind(id)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(not_found(id));
    }
    sqlx::query("DELETE FROM conversation_messages WHERE tenant_id = $1 AND conversation_id = $2")
        .bind(tenant)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let sequence = logged_sequence(&mut tx).await?;
    tx.commit().await?;
    Ok(sequence)
}

/// Every item of conversation `id`, oldest first.
pub(crate) async fn items(pool: &PgPool, tenant: &str, id: &str) -> Result<Vec<Value>, Error> {
    exists(pool, tenant, id).await?;
    let rows: Vec<(Uuid, String, String, Option<Value>)> = sqlx::query_as(
        "SELECT id, role, content, item FROM conversation_messages
          WHERE tenant_id = $1 AND conversation_id = $2 ORDER BY turn, id",
    )
    .bind(tenant)
    .bind(id)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(render).collect())
}

/// Appends `items` (checked by the caller) to conversation `id`, after
/// its last turn. Returns the replication sequence of the write.
pub(crate) async fn append(
    pool: &PgPool,
    tenant: &str,
    id: &str,
    items: &[Value],
    limits: &Limits,
) -> Result<u64, Error> {
    let mut tx = pool.begin().await?;
    // The row lock orders two appends of one conversation in this region.
    let found = sqlx::query(
        "UPDATE conversations SET updated_at = now()
          WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL",
    )
    .bind(tenant)
    .bind(id)
    .execute(&mut *tx)
    .await?;
    if found.rows_affected() == 0 {
        return Err(not_found(id));
    }
    // Under the row lock: a concurrent append is counted.
    let (count, bytes) = held(&mut *tx, tenant, id).await?;
    fits(id, count, bytes, items, limits)?;
    insert_items(&mut tx, tenant, id, items).await?;
    let sequence = logged_sequence(&mut tx).await?;
    tx.commit().await?;
    Ok(sequence)
}

/// One item of conversation `id`.
pub(crate) async fn item(
    pool: &PgPool,
    tenant: &str,
    id: &str,
    item_id: &str,
) -> Result<Value, Error> {
    exists(pool, tenant, id).await?;
    let row: Option<(Uuid, String, String, Option<Value>)> = sqlx::query_as(
        "SELECT id, role, content, item FROM conversation_messages
          WHERE tenant_id = $1 AND conversation_id = $2 AND (item_id = $3 OR id = $4)
          ORDER BY turn, id LIMIT 1",
    )
    .bind(tenant)
    .bind(id)
    .bind(item_id)
    .bind(row_id(item_id))
    .fetch_optional(pool)
    .await?;
    row.map(render)
        .ok_or_else(|| Error::NotFound(format!("no item {item_id:?} in conversation {id:?}")))
}

/// Removes one item of conversation `id`.
pub(crate) async fn delete_item(
    pool: &PgPool,
    tenant: &str,
    id: &str,
    item_id: &str,
) -> Result<u64, Error> {
    exists(pool, tenant, id).await?;
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "DELETE FROM conversation_messages
          WHERE tenant_id = $1 AND conversation_id = $2 AND (item_id = $3 OR id = $4)",
    )
    .bind(tenant)
    .bind(id)
    .bind(item_id)
    .bind(row_id(item_id))
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(Error::NotFound(format!(
            "no item {item_id:?} in conversation {id:?}"
        )));
    }
    let sequence = logged_sequence(&mut tx).await?;
    tx.commit().await?;
    Ok(sequence)
}

async fn exists(pool: &PgPool, tenant: &str, id: &str) -> Result<(), Error> {
    let found: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM conversations
                         WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL)",
    )
    .bind(tenant)
    .bind(id)
    .fetch_one(pool)
    .await?;
    if found { Ok(()) } else { Err(not_found(id)) }
}

async fn insert_items(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &str,
    id: &str,
    items: &[Value],
) -> Result<(), Error> {
    let last: i32 = sqlx::query_scalar(
        "SELECT COALESCE(max(turn), 0) FROM conversation_messages
          WHERE tenant_id = $1 AND conversation_id = $2",
    )
    .bind(tenant)
    .bind(id)
    .fetch_one(&mut **tx)
    .await?;
    for (turn, item) in (last + 1..).zip(items) {
        let (role, content) = summary(item);
        sqlx::query(
            "INSERT INTO conversation_messages
                 (id, conversation_id, tenant_id, turn, role, content, item, item_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(Uuid::now_v7())
        .bind(id)
        .bind(tenant)
        .bind(turn)
        .bind(role)
        .bind(content)
        .bind(item)
        .bind(item["id"].as_str())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// The role (or, for other items, the type) and the text a row keeps
/// beside the item, for transcripts and size limits.
fn summary(item: &Value) -> (&str, String) {
    let kind = item["type"].as_str().unwrap_or("message");
    match kind {
        "message" => (
            item["role"].as_str().unwrap_or("user"),
            texts(item["content"].as_array().map_or(&[], Vec::as_slice)).join("\n"),
        ),
        "function_call" => (kind, item["arguments"].as_str().unwrap_or("").to_string()),
        "function_call_output" => (
            kind,
            match &item["output"] {
                Value::String(s) => s.clone(),
                Value::Array(parts) => texts(parts).join("\n"),
                _ => String::new(),
            },
        ),
        _ => (kind, String::new()),
    }
}

/// A row as an item: its stored item, or a chat turn as a message.
fn render((id, role, content, item): (Uuid, String, String, Option<Value>)) -> Value {
    if let Some(item) = item {
        return item;
    }
    let part = if role == "assistant" {
        json!({"type": "output_text", "text": content, "annotations": []})
    } else {
        json!({"type": "input_text", "text": content})
    };
    json!({
        "id": format!("{ROW_PREFIX}{}", id.simple()),
        "type": "message",
        "status": "completed",
        "role": role,
        "content": [part],
    })
}

/// The row a chat turn's item id names, if it is one.
fn row_id(item_id: &str) -> Option<Uuid> {
    item_id
        .strip_prefix(ROW_PREFIX)
        .and_then(|hex| Uuid::try_parse(hex).ok())
}

/// What a conversation's rows hold, as its limits count it: rows, and the
/// bytes of their text and whole items. Chat turns count the same way.
pub(crate) const HELD: &str =
    "SELECT count(*), COALESCE(sum(octet_length(content) + COALESCE(octet_length(item::text), 0)), 0)::bigint
       FROM conversation_messages WHERE tenant_id = $1 AND conversation_id = $2";

async fn held<'c, E>(executor: E, tenant: &str, id: &str) -> Result<(usize, u64), Error>
where
    E: sqlx::PgExecutor<'c>,
{
    let (count, bytes): (i64, i64) = sqlx::query_as(HELD)
        .bind(tenant)
        .bind(id)
        .fetch_one(executor)
        .await?;
    Ok((
        usize::try_from(count).unwrap_or(usize::MAX),
        u64::try_from(bytes).unwrap_or(0),
    ))
}

/// Refuses before anything runs a request whose `adding` items (and
/// `answers` more to come) would take conversation `id` past its limits.
pub(crate) async fn has_room(
    pool: &PgPool,
    tenant: &str,
    id: &str,
    adding: &[Value],
    answers: usize,
    limits: &Limits,
) -> Result<(), Error> {
    let (count, bytes) = held(pool, tenant, id).await?;
    fits(id, count.saturating_add(answers), bytes, adding, limits)
}

/// Whether `adding` fits beside `count` rows and `bytes` bytes: the limits
/// of chat turns, `inference.max_messages` and
/// `inference.max_conversation_bytes`, refused with 413 like theirs.
fn fits(
    id: &str,
    count: usize,
    bytes: u64,
    adding: &[Value],
    limits: &Limits,
) -> Result<(), Error> {
    let rows = count.saturating_add(adding.len());
    if rows > limits.messages {
        return Err(Error::too_large(
            format!(
                "conversation {id:?} holds {count} items; with {} more it would pass the limit \
                 of {} set by `inference.max_messages`: start a new conversation",
                adding.len(),
                limits.messages
            ),
            Some("items"),
        ));
    }
    let new: u64 = adding
        .iter()
        .map(|item| (summary(item).1.len() + item.to_string().len()) as u64)
        .sum();
    let total = bytes.saturating_add(new);
    if total > limits.conversation_bytes {
        return Err(Error::too_large(
            format!(
                "conversation {id:?} would hold {total} bytes with these items, over the limit of \
                 {} set by `inference.max_conversation_bytes`: start a new conversation",
                limits.conversation_bytes
            ),
            Some("items"),
        ));
    }
    Ok(())
}
