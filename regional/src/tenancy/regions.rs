//! Operators' controls of where gateways send traffic
//! (`0019_region_controls.sql`): drain, undrain and weight, stored and
//! replicated, read by every gateway with its keys.

use serde::Serialize;
use sqlx::PgPool;

use super::Error;
use super::manage::{Actor, audit};

/// A region's control as the API shows it.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub(crate) struct ControlView {
    pub region: String,
    pub drained: bool,
    pub weight: i32,
    pub reason: String,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// What a write changes; a field left `None` keeps its value (or the
/// default for a region with no control yet: not drained, weight 100).
#[derive(Debug, Default)]
pub(crate) struct ControlSpec {
    pub drained: Option<bool>,
    pub weight: Option<u32>,
    pub reason: Option<String>,
}

/// Every control, by region.
pub(crate) async fn list(pool: &PgPool) -> Result<Vec<ControlView>, Error> {
    Ok(sqlx::query_as(
        "SELECT region, drained, weight, reason, updated_at FROM region_controls ORDER BY region",
    )
    .fetch_all(pool)
    .await?)
}

/// Changes the control of `region`, audited; the control as stored.
pub(crate) async fn put(
    pool: &PgPool,
    actor: &Actor,
    region: &str,
    spec: ControlSpec,
) -> Result<ControlView, Error> {
    if !crate::config::valid_region_name(region) {
        return Err(Error::InvalidControl(format!(
            "{region:?} is not a region name (lowercase letters, digits, '-')"
        )));
    }
    if spec.weight.is_some_and(|w| w > 100) {
        return Err(Error::InvalidControl(
            "`weight` is a share of traffic from 0 to 100".into(),
        ));
    }
    if spec
        .reason
        .as_ref()
        .is_some_and(|r| r.len() > 1024 || r.contains('\0'))
    {
        return Err(Error::InvalidControl(
            "`reason` is at most 1024 bytes with no NUL".into(),
        ));
    }
    let weight = spec.weight.map(|w| i32::try_from(w).unwrap_or(100));
    let mut tx = pool.begin().await?;
    let view: ControlView = sqlx::query_as(
        "INSERT INTO region_controls (region, drained, weight, reason)
         VALUES ($1, COALESCE($2, false), COALESCE($3, 100), COALESCE($4, ''))
         ON CONFLICT (region) DO UPDATE SET
             drained = COALESCE($2, region_controls.drained),
             weight = COALESCE($3, region_controls.weight),
             reason = COALESCE($4, region_controls.reason),
             updated_at = now()
         RETURNING region, drained, weight, reason, updated_at",
    )
    .bind(region)
    .bind(spec.drained)
    .bind(weight)
    .bind(&spec.reason)
    .fetch_one(&mut *tx)
    .await?;
    let action = match spec.drained {
        Some(true) => "region.drain",
        Some(false) => "region.undrain",
        None => "region.update",
    };
    let detail = serde_json::json!({
        "drained": view.drained,
        "weight": view.weight,
        "reason": view.reason,
    });
    audit(&mut tx, actor, action, &format!("regions/{region}"), detail).await?;
    tx.commit().await?;
    Ok(view)
}
