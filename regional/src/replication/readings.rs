//! Telemetry readings in the replication log: append-only rows, logged by
//! the ingest itself (not by triggers) in chunks, sent only to the peers in
//! `replication.telemetry_peers`, and applied by inserting what is missing.
//!
//! See `0011_replication_append.sql` and `docs/ARCHITECTURE.md`
//! (Replication) for why.

use meridian_proto::v1::Change;
use sqlx::{Postgres, Transaction};

use crate::error::Error;

/// The one table whose changes are appends.
pub(crate) const TABLE: &str = "telemetry_readings";

/// Readings per 'append' change at most: a change is applied in one
/// statement and travels in one Pull batch, so its size is bounded; at
/// 100k readings/s this is still only ~100 log rows a second.
pub(crate) const READINGS_PER_CHANGE: i64 = 1_000;

/// A local write's clock, as `replication_tick()` hands it out.
#[derive(Debug, Clone)]
pub(crate) struct Stamp {
    pub hlc: i64,
    pub region: String,
}

/// Ticks the region's clock for a write in `tx`, taking the clock row's
/// lock until `tx` ends: call it before touching any replicated row.
pub(crate) async fn tick(tx: &mut Transaction<'_, Postgres>) -> Result<Stamp, Error> {
    let (hlc, region): (Option<i64>, Option<String>) =
        sqlx::query_as("SELECT hlc, region FROM replication_tick()")
            .fetch_one(&mut **tx)
            .await?;
    match (hlc, region) {
        (Some(hlc), Some(region)) => Ok(Stamp { hlc, region }),
        _ => Err(Error::Replication(
            "replicated write before the region identity is set".into(),
        )),
    }
}

/// Wakes this region's Pull streams once `tx` commits, as the outbox
/// trigger does for the changes it logs.
pub(crate) async fn notify_commit(tx: &mut Transaction<'_, Postgres>) -> Result<(), Error> {
    sqlx::query("SELECT pg_notify('meridian_replication', '')")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Inserts the readings of an 'append' change that are not here yet, in the
/// key order local ingest inserts in (byte order, `COLLATE "C"`), so that
/// an apply and an ingest sharing keys wait for each other rather than
/// deadlock. Readings have no clock: an existing key keeps its row.
pub(super) async fn apply(tx: &mut Transaction<'_, Postgres>, c: &Change) -> Result<(), Error> {
    let invalid = |m: &str| Error::Replication(format!("change {} ({}): {m}", c.sequence, c.table));
    if c.table != TABLE {
        return Err(invalid("only telemetry_readings takes appends"));
    }
    let payload: serde_json::Value = serde_json::from_slice(&c.payload)
        .map_err(|e| invalid(&format!("payload is not JSON: {e}")))?;
    if !payload.is_array() {
        return Err(invalid("an append's payload must be a JSON array of rows"));
    }
    sqlx::query(
        "INSERT INTO telemetry_readings (tenant, device_id, metric, ts, value, labels)
         SELECT tenant, device_id, metric, ts, value, coalesce(labels, '{}')
           FROM jsonb_to_recordset($1) AS r(tenant text, device_id text, metric text,
                                            ts timestamptz, value float8, labels jsonb)
          ORDER BY tenant COLLATE \"C\", device_id COLLATE \"C\", metric COLLATE \"C\", ts
         ON CONFLICT (tenant, device_id, metric, ts) DO NOTHING",
    )
    .bind(&payload)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
