//! Reads and audited writes of tenants and keys for the management API
//! (`/admin/v1/...`): each write and its audit record are one transaction,
//! so the log never misses a change nor records one that did not happen.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::{Error, TenantLimits};

/// Who made a write and from where, as the audit log records it.
#[derive(Debug, Clone)]
pub(crate) struct Actor {
    /// The caller's mesh identity, or `unauthenticated` on a plaintext mesh.
    pub who: String,
    /// The caller's address as this region saw it.
    pub source: String,
    /// The region that took the write.
    pub region: String,
}

/// A tenant as the API shows it.
#[derive(Debug, Serialize)]
pub(crate) struct TenantView {
    pub id: String,
    pub display_name: String,
    pub requests_per_second: Option<i32>,
    pub tokens_per_minute: Option<i64>,
    /// The regions its requests may be served in; `None`: any.
    pub allowed_regions: Option<Vec<String>>,
    /// What it may spend per period; `None`: no budget.
    pub budget: Option<BudgetView>,
    /// The models (or routes) its keys may use; `None`: any.
    pub allowed_models: Option<Vec<String>>,
    pub live_keys: i64,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
    /// When it was deleted; `None` while it lives.
    pub deleted_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When its stored data is erased in every region.
    pub purge_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A tenant's budget as the API shows it: tokens, dollars, or both, per
/// UTC day or month.
#[derive(Debug, Serialize)]
pub(crate) struct BudgetView {
    pub tokens: Option<i64>,
    pub usd: Option<f64>,
    pub period: String,
}

/// A budget as [`put_tenant`] sets it.
#[derive(Debug, Clone)]
pub(crate) struct BudgetSpec {
    pub tokens: Option<u64>,
    pub usd: Option<f64>,
    /// `day` or `month`; `None`: `month`.
    pub period: Option<String>,
}

/// The most a budget may be in dollars: its nano-dollar spend still fits.
const MAX_BUDGET_USD: f64 = 1e9;

impl BudgetSpec {
    /// (tokens, micro-dollars, period) as stored, or what is wrong.
    fn checked(&self) -> Result<(Option<i64>, Option<i64>, &'static str), Error> {
        let bad = |m: String| Err(Error::InvalidBudget(m));
        if self.tokens.is_none() && self.usd.is_none() {
            return bad("a `budget` needs `tokens`, `usd` or both; leave it out for none".into());
        }
        let tokens = match self.tokens {
            Some(0) => return bad("`budget.tokens` must be at least 1".into()),
            Some(t) => Some(i64::try_from(t).unwrap_or(i64::MAX)),
            None => None,
        };
        let micros = match self.usd {
            Some(usd) if !(usd.is_finite() && usd > 0.0 && usd <= MAX_BUDGET_USD) => {
                return bad(format!(
                    "`budget.usd` must be more than 0 and at most {MAX_BUDGET_USD}, not {usd}"
                ));
            }
            Some(usd) => Some(((usd * 1e6).round() as i64).max(1)),
            None => None,
        };
        let period = match self.period.as_deref().unwrap_or("month") {
            "day" => "day",
            "month" => "month",
            other => {
                return bad(format!(
                    "`budget.period` must be \"day\" or \"month\", not {other:?}"
                ));
            }
        };
        Ok((tokens, micros, period))
    }
}

/// A key as the API shows it: never the key itself.
#[derive(Debug, Serialize)]
pub(crate) struct KeyView {
    pub id: uuid::Uuid,
    pub tenant: String,
    pub prefix: String,
    pub name: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The models (or routes) it may use; `None`: any its tenant may.
    pub allowed_models: Option<Vec<String>>,
}

/// What a new key is: every field may be left out.
#[derive(Debug, Default, Clone)]
pub(crate) struct KeySpec {
    pub name: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    pub allowed_models: Option<Vec<String>>,
}

impl KeySpec {
    fn check(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::InvalidKey(m));
        let clean = |t: &str, most: usize| !t.is_empty() && t.len() <= most && !t.contains('\0');
        if let Some(name) = &self.name
            && !clean(name, 128)
        {
            return bad("a key's `name` is 1 to 128 bytes with no NUL".into());
        }
        if self.labels.len() > 32 {
            return bad("a key has at most 32 `labels`".into());
        }
        if let Some((k, _)) = self
            .labels
            .iter()
            .find(|(k, v)| !clean(k, 64) || v.len() > 256 || v.contains('\0'))
        {
            return bad(format!(
                "label {k:?}: keys are 1 to 64 bytes, values at most 256, with no NUL"
            ));
        }
        if let Some(at) = self.expires_at
            && at <= chrono::Utc::now()
        {
            return bad(format!("`expires_at` {at} is not in the future"));
        }
        check_models(self.allowed_models.as_deref()).map_err(Error::InvalidKey)
    }
}

/// What is wrong with a list of allowed models, if anything.
fn check_models(models: Option<&[String]>) -> Result<(), String> {
    let Some(models) = models else {
        return Ok(());
    };
    if models.is_empty() || models.len() > 256 {
        return Err("`allowed_models` names 1 to 256 models; leave it out for any".into());
    }
    match models
        .iter()
        .find(|m| m.is_empty() || m.len() > 256 || m.contains(',') || m.contains('\0'))
    {
        Some(m) => Err(format!(
            "`allowed_models`: {m:?} is not a model name (1 to 256 bytes, no ',' or NUL)"
        )),
        None => Ok(()),
    }
}

/// One audit record.
#[derive(Debug, Serialize)]
pub(crate) struct AuditView {
    pub id: uuid::Uuid,
    pub at: chrono::DateTime<chrono::Utc>,
    pub actor: String,
    pub action: String,
    pub resource: String,
    pub source: String,
    pub region: String,
    pub detail: Value,
}

/// What a tenant's view reads, from `tenants t` (a macro so the queries
/// stay static strings).
macro_rules! tenant_columns {
    () => {
        "t.id, t.display_name, t.requests_per_second, t.tokens_per_minute, t.allowed_regions, \
         t.budget_tokens, t.budget_usd_micros, t.budget_period, t.allowed_models, \
         t.created_at, t.updated_at, t.deleted_at, t.purge_at, (SELECT count(*) FROM api_keys k \
         WHERE k.tenant_id = t.id AND k.revoked_at IS NULL) AS live_keys"
    };
}

fn tenant(row: &sqlx::postgres::PgRow) -> TenantView {
    TenantView {
        id: row.get("id"),
        display_name: row.get("display_name"),
        requests_per_second: row.get("requests_per_second"),
        tokens_per_minute: row.get("tokens_per_minute"),
        allowed_regions: row.get("allowed_regions"),
        budget: budget(row),
        allowed_models: row.get("allowed_models"),
        live_keys: row.get("live_keys"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
        deleted_at: row.get("deleted_at"),
        purge_at: row.get("purge_at"),
    }
}

fn budget(row: &sqlx::postgres::PgRow) -> Option<BudgetView> {
    let tokens: Option<i64> = row.get("budget_tokens");
    let micros: Option<i64> = row.get("budget_usd_micros");
    if tokens.is_none() && micros.is_none() {
        return None;
    }
    Some(BudgetView {
        tokens,
        usd: micros.map(|m| m as f64 / 1e6),
        period: row
            .get::<Option<String>, _>("budget_period")
            .unwrap_or_else(|| "month".into()),
    })
}

/// Up to `limit` tenants with ids after `after`, in id order.
pub(crate) async fn list_tenants(
    pool: &PgPool,
    after: Option<&str>,
    limit: i64,
    include_deleted: bool,
) -> Result<Vec<TenantView>, Error> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        tenant_columns!(),
        " FROM tenants t WHERE ($1::text IS NULL OR t.id > $1)
            AND ($3 OR t.deleted_at IS NULL) ORDER BY t.id LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .bind(include_deleted)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(tenant).collect())
}

pub(crate) async fn get_tenant(pool: &PgPool, id: &str) -> Result<Option<TenantView>, Error> {
    let row = sqlx::query(concat!(
        "SELECT ",
        tenant_columns!(),
        " FROM tenants t WHERE t.id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.as_ref().map(tenant))
}

/// What a tenant is set to by [`put_tenant`].
#[derive(Debug, Default)]
pub(crate) struct TenantSpec<'a> {
    /// `None` keeps the current name (the id for a new tenant).
    pub display_name: Option<&'a str>,
    /// A limit left `None` is the gateway's default.
    pub limits: TenantLimits,
    /// `None`: any region.
    pub allowed_regions: Option<Vec<String>>,
    /// `None`: no budget.
    pub budget: Option<BudgetSpec>,
    /// `None`: any model.
    pub allowed_models: Option<Vec<String>>,
}

/// Creates tenant `id` or replaces its name, limits and regions; whether it
/// was created.
pub(crate) async fn put_tenant(
    pool: &PgPool,
    actor: &Actor,
    id: &str,
    spec: TenantSpec<'_>,
) -> Result<bool, Error> {
    let TenantSpec {
        display_name,
        limits,
        allowed_regions,
        budget,
        allowed_models,
    } = spec;
    check_models(allowed_models.as_deref()).map_err(Error::InvalidModels)?;
    let (budget_tokens, budget_micros, budget_period) = match &budget {
        Some(b) => {
            let (tokens, micros, period) = b.checked()?;
            (tokens, micros, Some(period))
        }
        None => (None, None, None),
    };
    if let Some(regions) = &allowed_regions {
        if regions.is_empty() {
            return Err(Error::InvalidRegions(
                "`allowed_regions` must name at least one region; leave it out for any".into(),
            ));
        }
        if let Some(bad) = regions
            .iter()
            .find(|r| !crate::config::valid_region_name(r))
        {
            return Err(Error::InvalidRegions(format!(
                "`allowed_regions`: {bad:?} is not a region name (lowercase letters, digits, '-')"
            )));
        }
    }
    let (rps, tpm) = super::tenants::checked(id, limits)?;
    let mut tx = pool.begin().await?;
    let deleted: Option<Option<chrono::DateTime<chrono::Utc>>> =
        sqlx::query_scalar("SELECT deleted_at FROM tenants WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let restored = matches!(deleted, Some(Some(_)));
    let created: bool = sqlx::query_scalar(
        "INSERT INTO tenants (id, display_name, requests_per_second, tokens_per_minute,
                              allowed_regions, budget_tokens, budget_usd_micros, budget_period,
                              allowed_models)
         VALUES ($1, COALESCE($2, $1), $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (id) DO UPDATE SET
             display_name = COALESCE($2, tenants.display_name),
             requests_per_second = EXCLUDED.requests_per_second,
             tokens_per_minute = EXCLUDED.tokens_per_minute,
             allowed_regions = EXCLUDED.allowed_regions,
             budget_tokens = EXCLUDED.budget_tokens,
             budget_usd_micros = EXCLUDED.budget_usd_micros,
             budget_period = EXCLUDED.budget_period,
             allowed_models = EXCLUDED.allowed_models,
             deleted_at = NULL,
             purge_at = NULL,
             updated_at = now()
         RETURNING (xmax = 0)",
    )
    .bind(id)
    .bind(display_name)
    .bind(rps)
    .bind(tpm)
    .bind(&allowed_regions)
    .bind(budget_tokens)
    .bind(budget_micros)
    .bind(budget_period)
    .bind(&allowed_models)
    .fetch_one(&mut *tx)
    .await?;
    let action = if created {
        "tenant.create"
    } else if restored {
        "tenant.restore"
    } else {
        "tenant.update"
    };
    let detail = serde_json::json!({
        "display_name": display_name,
        "requests_per_second": rps,
        "tokens_per_minute": tpm,
        "allowed_regions": allowed_regions,
        "allowed_models": allowed_models,
        "budget": budget.as_ref().map(|_| serde_json::json!({
            "tokens": budget_tokens,
            "usd_micros": budget_micros,
            "period": budget_period,
        })),
    });
    audit(&mut tx, actor, action, &format!("tenants/{id}"), detail).await?;
    tx.commit().await?;
    Ok(created)
}

/// Deletes tenant `id` softly: it stops at once (its keys are revoked in
/// the same transaction, so every gateway refuses them at its next reload),
/// and its stored data is erased in every region once `retention` has
/// passed ([`purge_deleted`]); until then a `PUT` restores it. Its view;
/// `None` when there is no such tenant. Deleting a deleted tenant changes
/// nothing and records nothing.
pub(crate) async fn delete_tenant(
    pool: &PgPool,
    actor: &Actor,
    id: &str,
    retention: std::time::Duration,
) -> Result<Option<TenantView>, Error> {
    let retention_s = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
    let mut tx = pool.begin().await?;
    let deleted = sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
        "UPDATE tenants SET deleted_at = now(),
                purge_at = now() + make_interval(secs => $2), updated_at = now()
          WHERE id = $1 AND deleted_at IS NULL
         RETURNING purge_at",
    )
    .bind(id)
    .bind(retention_s as f64)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(purge_at) = deleted {
        let revoked = sqlx::query(
            "UPDATE api_keys SET revoked_at = now() WHERE tenant_id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let detail = serde_json::json!({ "purge_at": purge_at, "keys_revoked": revoked,
            "retention_seconds": retention_s });
        audit(
            &mut tx,
            actor,
            "tenant.delete",
            &format!("tenants/{id}"),
            detail,
        )
        .await?;
    }
    let view = sqlx::query(concat!(
        "SELECT ",
        tenant_columns!(),
        " FROM tenants t WHERE t.id = $1"
    ))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(view.as_ref().map(tenant))
}

/// Erases the stored data of every tenant whose retention has passed:
/// keys, conversations and their messages, stored responses, jobs and
/// telemetry readings.
/// Each region erases its own copy (`meridian.applying` keeps the deletes
/// out of the replication log: every region holds the same `purge_at`),
/// so nothing crosses regions and a bound tenant's regions erase what only
/// they hold. Spend and usage counts stay, for billing. The rows erased.
pub(crate) async fn purge_deleted(pool: &PgPool) -> Result<u64, Error> {
    let due: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM tenants WHERE purge_at IS NOT NULL AND purge_at <= now()",
    )
    .fetch_all(pool)
    .await?;
    if due.is_empty() {
        return Ok(0);
    }
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL meridian.applying = on")
        .execute(&mut *tx)
        .await?;
    let mut erased = 0;
    for sql in [
        "DELETE FROM api_keys WHERE tenant_id = ANY($1)",
        "DELETE FROM conversation_messages WHERE tenant_id = ANY($1)",
        "DELETE FROM conversations WHERE tenant_id = ANY($1)",
        "DELETE FROM responses WHERE tenant_id = ANY($1)",
        "DELETE FROM jobs WHERE tenant = ANY($1)",
    ] {
        erased += sqlx::query(sql)
            .bind(&due)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    }
    let readings: bool = sqlx::query_scalar("SELECT to_regclass('telemetry_readings') IS NOT NULL")
        .fetch_one(&mut *tx)
        .await?;
    if readings {
        erased += sqlx::query("DELETE FROM telemetry_readings WHERE tenant = ANY($1)")
            .bind(&due)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    }
    tx.commit().await?;
    if erased > 0 {
        tracing::info!(tenants = ?due, rows = erased, "erased deleted tenants' data");
    }
    Ok(erased)
}

/// The columns of a key's view, from `api_keys`.
const KEY_COLUMNS: &str =
    "id, tenant_id, prefix, name, labels, created_at, expires_at, revoked_at, allowed_models";

/// A new key for `tenant`: its view and the key in clear, the only time it
/// exists so.
pub(crate) async fn create_key(
    pool: &PgPool,
    actor: &Actor,
    tenant: &str,
    spec: &KeySpec,
) -> Result<(KeyView, String), Error> {
    spec.check()?;
    let mut tx = pool.begin().await?;
    let made = insert_key(&mut tx, tenant, spec).await?;
    let Some((view, key)) = made else {
        return Err(Error::UnknownTenant(tenant.to_string()));
    };
    let detail = serde_json::json!({ "tenant": tenant, "prefix": view.prefix,
        "name": view.name, "labels": view.labels, "expires_at": view.expires_at,
        "allowed_models": view.allowed_models });
    audit(
        &mut tx,
        actor,
        "key.create",
        &format!("keys/{}", view.id),
        detail,
    )
    .await?;
    tx.commit().await?;
    Ok((view, key))
}

/// Inserts a new key of `tenant`; `None` when there is no such tenant.
async fn insert_key(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &str,
    spec: &KeySpec,
) -> Result<Option<(KeyView, String)>, Error> {
    let (id, key, prefix) = super::keys::new_key();
    let labels = (!spec.labels.is_empty()).then(|| serde_json::json!(spec.labels));
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO api_keys (id, tenant_id, prefix, key_hash, name, labels, expires_at,
                               allowed_models)
         SELECT $1, id, $3, $4, $5, $6, $7, $8 FROM tenants
          WHERE id = $2 AND deleted_at IS NULL
         RETURNING {KEY_COLUMNS}"
    )))
    .bind(id)
    .bind(tenant)
    .bind(&prefix)
    .bind(&meridian_proto::api_key::hash_key(key.as_bytes())[..])
    .bind(&spec.name)
    .bind(labels)
    .bind(spec.expires_at)
    .bind(&spec.allowed_models)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(|row| (self::key(&row), key)))
}

/// Rotates key `id`: a new key with its tenant, name, labels, expiry and
/// models, while the old one keeps working for `grace` (or until its own
/// expiry, if sooner). The new key's view and secret, and the old key's
/// view; `None` when there is no such key. A revoked key is not rotated.
pub(crate) async fn rotate_key(
    pool: &PgPool,
    actor: &Actor,
    id: uuid::Uuid,
    grace: std::time::Duration,
) -> Result<Option<(KeyView, String, KeyView)>, Error> {
    let grace_s = i64::try_from(grace.as_secs()).unwrap_or(i64::MAX);
    let mut tx = pool.begin().await?;
    let old = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE api_keys
            SET expires_at = LEAST(COALESCE(expires_at, 'infinity'),
                                   now() + make_interval(secs => $2))
          WHERE id = $1 AND revoked_at IS NULL
            AND (expires_at IS NULL OR expires_at > now())
         RETURNING {KEY_COLUMNS}"
    )))
    .bind(id)
    .bind(grace_s as f64)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(old) = old.as_ref().map(key) else {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys WHERE id = $1)")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
        return if exists {
            Err(Error::InvalidKey(format!(
                "key {id} is revoked or expired: make a new one instead"
            )))
        } else {
            Ok(None)
        };
    };
    let spec = KeySpec {
        name: old.name.clone(),
        labels: old.labels.clone(),
        expires_at: None,
        allowed_models: old.allowed_models.clone(),
    };
    let Some((new, secret)) = insert_key(&mut tx, &old.tenant, &spec).await? else {
        return Err(Error::UnknownTenant(old.tenant.clone()));
    };
    let detail = serde_json::json!({ "tenant": old.tenant, "prefix": old.prefix,
        "new_key": new.id, "new_prefix": new.prefix, "old_expires_at": old.expires_at });
    audit(&mut tx, actor, "key.rotate", &format!("keys/{id}"), detail).await?;
    tx.commit().await?;
    Ok(Some((new, secret, old)))
}

/// The keys of `tenant`, newest first, revoked ones included; `None` when
/// there is no such tenant.
pub(crate) async fn list_keys(pool: &PgPool, tenant: &str) -> Result<Option<Vec<KeyView>>, Error> {
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)")
        .bind(tenant)
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(None);
    }
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {KEY_COLUMNS} FROM api_keys
         WHERE tenant_id = $1 ORDER BY created_at DESC, id DESC"
    )))
    .bind(tenant)
    .fetch_all(pool)
    .await?;
    Ok(Some(rows.iter().map(key).collect()))
}

fn key(row: &sqlx::postgres::PgRow) -> KeyView {
    let labels: Option<Value> = row.get("labels");
    KeyView {
        id: row.get("id"),
        tenant: row.get("tenant_id"),
        prefix: row.get("prefix"),
        name: row.get("name"),
        labels: labels
            .and_then(|l| serde_json::from_value(l).ok())
            .unwrap_or_default(),
        created_at: row.get("created_at"),
        expires_at: row.get("expires_at"),
        revoked_at: row.get("revoked_at"),
        allowed_models: row.get("allowed_models"),
    }
}

/// Revokes key `id`: its view once revoked, `None` when there is no such
/// key. Revoking a revoked key changes nothing and records nothing.
pub(crate) async fn revoke_key(
    pool: &PgPool,
    actor: &Actor,
    id: uuid::Uuid,
) -> Result<Option<KeyView>, Error> {
    let mut tx = pool.begin().await?;
    let revoked = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL
         RETURNING {KEY_COLUMNS}"
    )))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let view = match revoked {
        Some(row) => {
            let view = key(&row);
            let detail = serde_json::json!({ "tenant": view.tenant, "prefix": view.prefix });
            audit(&mut tx, actor, "key.revoke", &format!("keys/{id}"), detail).await?;
            Some(view)
        }
        None => sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(key),
    };
    tx.commit().await?;
    Ok(view)
}

/// Up to `limit` audit records, newest first, older than record `before`
/// when given.
pub(crate) async fn list_audit(
    pool: &PgPool,
    before: Option<uuid::Uuid>,
    limit: i64,
) -> Result<Vec<AuditView>, Error> {
    let rows = sqlx::query(
        "SELECT id, at, actor, action, resource, source, region, detail FROM audit_log a
         WHERE $1::uuid IS NULL
            OR (a.at, a.id) < (SELECT at, id FROM audit_log WHERE id = $1)
         ORDER BY at DESC, id DESC LIMIT $2",
    )
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|row| AuditView {
            id: row.get("id"),
            at: row.get("at"),
            actor: row.get("actor"),
            action: row.get("action"),
            resource: row.get("resource"),
            source: row.get("source"),
            region: row.get("region"),
            detail: row.get("detail"),
        })
        .collect())
}

pub(crate) async fn audit(
    tx: &mut Transaction<'_, Postgres>,
    actor: &Actor,
    action: &str,
    resource: &str,
    detail: Value,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO audit_log (id, actor, action, resource, source, region, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(&actor.who)
    .bind(action)
    .bind(resource)
    .bind(&actor.source)
    .bind(&actor.region)
    .bind(detail)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
