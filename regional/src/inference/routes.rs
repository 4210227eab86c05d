//! Model routes set through the management API (`/admin/v1/routes`,
//! `0018_routes.sql`): aliases stored in PostgreSQL and replicated, which
//! every region serves over the `[[aliases]]` of its config. Each region
//! checks each route against its own models and leaves out one it cannot
//! serve, saying why, so one region's missing model never breaks another
//! region's routing.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::Inference;
use crate::config::{AliasConfig, ModelConfig};
use crate::error::Error;
use crate::tenancy::manage::{Actor, audit};

/// How often a region looks for routes changed elsewhere.
const POLL: Duration = Duration::from_millis(500);

/// One route as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RouteView {
    pub id: String,
    /// `config` (this region's `[[aliases]]`) or `api` (set through the
    /// management API, in every region).
    pub source: &'static str,
    /// Whether this region serves it now.
    pub applied: bool,
    /// Why not, when it does not.
    pub problem: Option<String>,
    pub route: AliasConfig,
}

/// The config's aliases, the API's routes, and what came of them.
#[derive(Default)]
pub(super) struct RouteState {
    pub config: Vec<AliasConfig>,
    pub api: Vec<AliasConfig>,
    pub views: Vec<RouteView>,
}

/// The aliases to serve: the config's, with each API route (in id order)
/// over the alias of its id or added, unless this region cannot serve it.
pub(super) fn compose(
    models: &[ModelConfig],
    config: &[AliasConfig],
    api: &[AliasConfig],
) -> (Vec<AliasConfig>, Vec<RouteView>) {
    let mut aliases = config.to_vec();
    let mut views: Vec<RouteView> = config
        .iter()
        .map(|a| RouteView {
            id: a.id.clone(),
            source: "config",
            applied: true,
            problem: None,
            route: a.clone(),
        })
        .collect();
    for route in api {
        let problem = if models.iter().any(|m| m.id == route.id) {
            Some(format!(
                "{:?} is a model of this region; a route is a name of its own",
                route.id
            ))
        } else {
            let mut candidate = aliases.clone();
            match candidate.iter_mut().find(|a| a.id == route.id) {
                Some(existing) => *existing = route.clone(),
                None => candidate.push(route.clone()),
            }
            let at = candidate.iter().position(|a| a.id == route.id);
            let problems = crate::config::routing_problems(models, &candidate);
            if problems.is_empty() {
                aliases = candidate;
                None
            } else {
                // Config validation names the alias by its index.
                let index = format!("`aliases[{}]", at.unwrap_or_default());
                Some(
                    problems
                        .iter()
                        .map(|p| p.replace(&index, "`route"))
                        .collect::<Vec<_>>()
                        .join("; "),
                )
            }
        };
        if problem.is_none() {
            for view in views.iter_mut().filter(|v| v.id == route.id) {
                view.applied = false;
                view.problem = Some("the API's route of this name replaces it".into());
            }
        }
        views.push(RouteView {
            id: route.id.clone(),
            source: "api",
            applied: problem.is_none(),
            problem,
            route: route.clone(),
        });
    }
    views.sort_by(|a, b| (&a.id, a.source).cmp(&(&b.id, b.source)));
    (aliases, views)
}

/// Every route stored through the API, in id order. A row this version
/// cannot read is left out, with a warning.
pub(crate) async fn load(pool: &PgPool) -> Result<Vec<AliasConfig>, Error> {
    let rows: Vec<(String, serde_json::Value)> =
        sqlx::query_as("SELECT id, route FROM model_routes ORDER BY id")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, route)| match parse(&id, route) {
            Ok(route) => Some(route),
            Err(e) => {
                tracing::warn!(route = %id, error = %e, "stored route not understood; left out");
                None
            }
        })
        .collect())
}

/// A stored or requested route, its id set.
pub(crate) fn parse(id: &str, mut route: serde_json::Value) -> Result<AliasConfig, String> {
    let Some(fields) = route.as_object_mut() else {
        return Err("a route is a JSON object".into());
    };
    if fields.contains_key("id") {
        return Err("a route's id is in its path, not its body".into());
    }
    fields.insert("id".into(), serde_json::Value::String(id.to_string()));
    serde_json::from_value(route).map_err(|e| e.to_string())
}

/// Stores `route` (replacing one of its id), audited; whether it was new.
pub(crate) async fn put(pool: &PgPool, actor: &Actor, route: &AliasConfig) -> Result<bool, Error> {
    let mut body = serde_json::to_value(route).map_err(|e| Error::Unavailable(e.to_string()))?;
    if let Some(fields) = body.as_object_mut() {
        fields.remove("id");
    }
    let mut tx = pool.begin().await?;
    let created: bool = sqlx::query_scalar(
        "INSERT INTO model_routes (id, route) VALUES ($1, $2)
         ON CONFLICT (id) DO UPDATE SET route = EXCLUDED.route, updated_at = now()
         RETURNING (xmax = 0)",
    )
    .bind(&route.id)
    .bind(&body)
    .fetch_one(&mut *tx)
    .await?;
    let action = if created {
        "route.create"
    } else {
        "route.update"
    };
    audit(
        &mut tx,
        actor,
        action,
        &format!("routes/{}", route.id),
        body,
    )
    .await
    .map_err(tenancy_error)?;
    tx.commit().await?;
    Ok(created)
}

/// Removes the API's route `id`, audited; whether there was one.
pub(crate) async fn delete(pool: &PgPool, actor: &Actor, id: &str) -> Result<bool, Error> {
    let mut tx = pool.begin().await?;
    let gone = sqlx::query("DELETE FROM model_routes WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if gone == 0 {
        return Ok(false);
    }
    audit(
        &mut tx,
        actor,
        "route.delete",
        &format!("routes/{id}"),
        serde_json::json!({}),
    )
    .await
    .map_err(tenancy_error)?;
    tx.commit().await?;
    Ok(true)
}

fn tenancy_error(e: crate::tenancy::Error) -> Error {
    match e {
        crate::tenancy::Error::Database(e) => Error::Postgres(e),
        other => Error::Unavailable(other.to_string()),
    }
}

/// Applies the stored routes now, then whenever they change, until
/// shutdown: routes written in other regions arrive by replication.
pub(crate) async fn follow(inference: Arc<Inference>, pool: PgPool, shutdown: CancellationToken) {
    loop {
        match load(&pool).await {
            Ok(routes) => inference.set_api_routes(routes),
            Err(e) => tracing::debug!(error = %e, "routes not read; the current ones stand"),
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
