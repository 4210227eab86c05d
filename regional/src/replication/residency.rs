//! Data residency in replication: a tenant with `allowed_regions` has its
//! conversations, messages, jobs and telemetry readings sent only to those
//! regions. Tenants, keys and the audit log still go everywhere, so that
//! every gateway can authenticate and every region answers for its writes.
//!
//! The serving region decides, per peer, from its own `tenants` table: a
//! Pull batch, a snapshot and a relay leave out the rows of every tenant
//! the peer may not hold (`through_sequence` moves the peer past them, as
//! for readings it does not take). A tenant's regions are meant to be few
//! and rarely changed; a change applies to what is written from then on
//! (see `docs/ARCHITECTURE.md`, Data residency).

use sqlx::PgExecutor;

use super::tables::TABLES;
use crate::error::Error;

/// Tenants whose data `peer` may not hold: those with `allowed_regions`
/// that do not name it. Usually none, and then the filters cost nothing.
pub(super) async fn withheld<'e>(
    executor: impl PgExecutor<'e>,
    peer: &str,
) -> Result<Vec<String>, Error> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM tenants
          WHERE allowed_regions IS NOT NULL AND NOT ($1 = ANY(allowed_regions))",
    )
    .bind(peer)
    .fetch_all(executor)
    .await?)
}

/// The replicated tables whose rows belong to one tenant.
pub(super) fn tenant_tables() -> Vec<&'static str> {
    TABLES
        .iter()
        .filter(|t| t.tenant.is_some())
        .map(|t| t.name)
        .collect()
}
