//! Operator tokens (`operator_tokens`, `0021_operator_tokens.sql`): bearer
//! tokens for the management API, for tools without a mesh certificate
//! and for operators who reach it through a gateway. Stored as the SHA-256
//! of the token with a short prefix in clear, like API keys; checked by the
//! region that serves the call ([`verify`]).

use meridian_proto::api_key::{OPERATOR_TOKEN_PREFIX, hash_key};
use serde::Serialize;
use sqlx::{PgPool, Row};

use super::Error;
use super::manage::{Actor, audit};

/// `mop-` and six more characters, to tell tokens apart in a listing.
const DISPLAY_PREFIX_CHARS: usize = 10;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) enum Role {
    /// Every management method.
    #[serde(rename = "admin")]
    Admin,
    /// Reads only: HTTP `GET`, and the Admin methods that change nothing.
    #[serde(rename = "read-only")]
    ReadOnly,
}

impl Role {
    pub(crate) fn parse(s: &str) -> Result<Self, Error> {
        match s {
            "admin" => Ok(Self::Admin),
            "read-only" => Ok(Self::ReadOnly),
            other => Err(Error::InvalidToken(format!(
                "role {other:?} is not one of \"admin\", \"read-only\""
            ))),
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::ReadOnly => "read-only",
        }
    }
}

/// The holder of a valid token, put in the request's extensions for the
/// mesh policy and the audit log.
#[derive(Debug, Clone)]
pub(crate) struct Operator {
    pub name: String,
    pub role: Role,
}

/// A token as the API shows it (never the token).
#[derive(Debug, Serialize)]
pub(crate) struct TokenView {
    pub id: uuid::Uuid,
    pub name: String,
    pub role: String,
    pub prefix: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

const COLUMNS: &str = "id, name, role, prefix, created_at, expires_at, revoked_at";

fn view(row: &sqlx::postgres::PgRow) -> TokenView {
    TokenView {
        id: row.get("id"),
        name: row.get("name"),
        role: row.get("role"),
        prefix: row.get("prefix"),
        created_at: row.get("created_at"),
        expires_at: row.get("expires_at"),
        revoked_at: row.get("revoked_at"),
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidToken(format!(
            "token name {name:?}: use 1 to 64 letters, digits, '.', '_', '@' or '-'"
        )))
    }
}

/// A new token: its view and the token in clear, the only time it exists
/// so.
pub(crate) async fn create(
    pool: &PgPool,
    actor: &Actor,
    name: &str,
    role: Role,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<(TokenView, String), Error> {
    check_name(name)?;
    if expires_at.is_some_and(|at| at <= chrono::Utc::now()) {
        return Err(Error::InvalidToken(
            "expires_at is in the past: leave it out for a token that does not expire".into(),
        ));
    }
    let (token, prefix) = super::keys::new_secret(OPERATOR_TOKEN_PREFIX, DISPLAY_PREFIX_CHARS);
    let id = uuid::Uuid::now_v7();
    let mut tx = pool.begin().await?;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO operator_tokens (id, name, role, prefix, token_hash, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(name)
    .bind(role.as_str())
    .bind(&prefix)
    .bind(&hash_key(token.as_bytes())[..])
    .bind(expires_at)
    .fetch_one(&mut *tx)
    .await?;
    let made = view(&row);
    let detail = serde_json::json!({ "name": made.name, "role": made.role,
        "prefix": made.prefix, "expires_at": made.expires_at });
    audit(
        &mut tx,
        actor,
        "operator_token.create",
        &format!("operator-tokens/{id}"),
        detail,
    )
    .await?;
    tx.commit().await?;
    Ok((made, token))
}

/// Every token, newest first, revoked ones included.
pub(crate) async fn list(pool: &PgPool) -> Result<Vec<TokenView>, Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM operator_tokens ORDER BY created_at DESC, id DESC"
    )))
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(view).collect())
}

/// Revokes token `id`: its view once revoked, `None` when there is no such
/// token. Revoking a revoked token changes nothing and records nothing.
pub(crate) async fn revoke(
    pool: &PgPool,
    actor: &Actor,
    id: uuid::Uuid,
) -> Result<Option<TokenView>, Error> {
    let mut tx = pool.begin().await?;
    let revoked = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE operator_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL
         RETURNING {COLUMNS}"
    )))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let found = match revoked {
        Some(row) => {
            let v = view(&row);
            let detail = serde_json::json!({ "name": v.name, "prefix": v.prefix });
            audit(
                &mut tx,
                actor,
                "operator_token.revoke",
                &format!("operator-tokens/{id}"),
                detail,
            )
            .await?;
            Some(v)
        }
        None => sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM operator_tokens WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(view),
    };
    tx.commit().await?;
    Ok(found)
}

/// The holder of `token` when it is live (known, not revoked, not
/// expired); `None` otherwise.
pub(crate) async fn verify(pool: &PgPool, token: &str) -> Result<Option<Operator>, Error> {
    let row = sqlx::query(
        "SELECT name, role FROM operator_tokens
         WHERE token_hash = $1 AND revoked_at IS NULL
           AND (expires_at IS NULL OR expires_at > now())",
    )
    .bind(&hash_key(token.as_bytes())[..])
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|row| Operator {
        name: row.get("name"),
        role: Role::parse(row.get::<&str, _>("role")).unwrap_or(Role::ReadOnly),
    }))
}
