//! The replicated tables and the SQL that applies a peer's change to each.
//! A new replicated table needs the two triggers of `0005_replication.sql`
//! on its side and an entry here.

use std::sync::LazyLock;

/// One replicated table.
pub(crate) struct Table {
    pub name: &'static str,
    /// The primary key column.
    pub key: &'static str,
    /// Its SQL type: the wire carries the key as text.
    pub key_type: &'static str,
    /// Every column but `hlc` and `origin_region`.
    pub columns: &'static [&'static str],
    /// Columns the payload carries in base64.
    pub bytea: &'static [&'static str],
    /// A column compared before the clock in last-writer-wins: a fencing
    /// epoch, so that a write under a newer epoch wins whatever the clocks.
    pub fence: Option<&'static str>,
    /// What of a row the digest covers besides key, clock and origin (SQL
    /// over `t`); `None`: the whole row. For tables where some local changes
    /// do not replicate, only the replicated part can agree.
    pub digest: Option<&'static str>,
    /// The column naming the tenant a row belongs to, for the tables whose
    /// rows go only to the tenant's allowed regions (`residency.rs`).
    pub tenant: Option<&'static str>,
}

/// In dependency order (keys refer to tenants; messages to conversations,
/// by id only), which the digest keeps too.
pub(crate) const TABLES: &[Table] = &[
    Table {
        name: "tenants",
        key: "id",
        key_type: "text",
        columns: &[
            "id",
            "display_name",
            "requests_per_second",
            "tokens_per_minute",
            "created_at",
            "updated_at",
            "allowed_regions",
            "budget_tokens",
            "budget_usd_micros",
            "budget_period",
            "allowed_models",
            "deleted_at",
            "purge_at",
        ],
        bytea: &[],
        fence: None,
        digest: None,
        tenant: None,
    },
    Table {
        name: "api_keys",
        key: "id",
        key_type: "uuid",
        columns: &[
            "id",
            "tenant_id",
            "prefix",
            "key_hash",
            "created_at",
            "revoked_at",
            "name",
            "labels",
            "expires_at",
            "allowed_models",
        ],
        bytea: &["key_hash"],
        fence: None,
        digest: None,
        tenant: None,
    },
    // Bearer tokens for the management API (`0021_operator_tokens.sql`),
    // everywhere like the keys, so any region checks any token.
    Table {
        name: "operator_tokens",
        key: "id",
        key_type: "uuid",
        columns: &[
            "id",
            "name",
            "role",
            "prefix",
            "token_hash",
            "created_at",
            "expires_at",
            "revoked_at",
        ],
        bytea: &["token_hash"],
        fence: None,
        digest: None,
        tenant: None,
    },
    // Keyed by tenant and id together (`0014_conversation_scope.sql`): a
    // computed column, so not among the columns a peer's row sets.
    Table {
        name: "conversations",
        key: "scoped_id",
        key_type: "text",
        columns: &[
            "id",
            "tenant_id",
            "home_region",
            "title",
            "metadata",
            "created_at",
            "updated_at",
            "deleted_at",
        ],
        bytea: &[],
        fence: None,
        digest: None,
        tenant: Some("tenant_id"),
    },
    // Append-only: a message's row never changes after its insert, so the
    // last-writer-wins upsert only ever meets its own copy.
    Table {
        name: "conversation_messages",
        key: "id",
        key_type: "uuid",
        columns: &[
            "id",
            "conversation_id",
            "tenant_id",
            "turn",
            "role",
            "content",
            "created_at",
            "idempotency_key",
            "item",
            "item_id",
        ],
        bytea: &[],
        fence: None,
        digest: None,
        tenant: Some("tenant_id"),
    },
    // Stored responses (`0024_responses.sql`): written once by the region
    // that answered, then only blanked by a delete, which wins by the clock.
    Table {
        name: "responses",
        key: "id",
        key_type: "text",
        columns: &[
            "id",
            "tenant_id",
            "model",
            "status",
            "previous_response_id",
            "body",
            "job_id",
            "input_items",
            "created_at",
            "updated_at",
            "deleted_at",
        ],
        bytea: &[],
        fence: None,
        digest: None,
        tenant: Some("tenant_id"),
    },
    // Only the submission, an adoption and the terminal state replicate
    // (`0009_job_failover.sql`); the epoch decides before the clock, so an
    // old owner's late result never replaces the adopter's.
    Table {
        name: "jobs",
        key: "id",
        key_type: "uuid",
        columns: &[
            "id",
            "tenant",
            "idempotency_key",
            "priority",
            "state",
            "request",
            "result",
            "last_error",
            "attempts",
            "completions",
            "lease_owner",
            "lease_expires_at",
            "run_after",
            "queued_since",
            "queued_ms",
            "running_ms",
            "created_at",
            "started_at",
            "finished_at",
            "traceparent",
            "home_region",
            "owner_region",
            "owner_epoch",
            "key_id",
        ],
        bytea: &[],
        fence: Some("owner_epoch"),
        // Claims, renewals and retries change the owner's row without
        // replicating: the replicated version is (hlc, origin), and these.
        digest: Some(
            "jsonb_build_object('owner_region', t.owner_region, 'owner_epoch', t.owner_epoch,
                 'completions', t.completions, 'result', t.result)::text",
        ),
        tenant: Some("tenant"),
    },
    // Set through the management API (`0017_budgets.sql`).
    Table {
        name: "model_prices",
        key: "model",
        key_type: "text",
        columns: &[
            "model",
            "input_micros_per_mtok",
            "output_micros_per_mtok",
            "updated_at",
        ],
        bytea: &[],
        fence: None,
        digest: None,
        tenant: None,
    },
    // Aliases set through the management API (`0018_routes.sql`).
    Table {
        name: "model_routes",
        key: "id",
        key_type: "text",
        columns: &["id", "route", "updated_at"],
        bytea: &[],
        fence: None,
        digest: None,
        tenant: None,
    },
    // Operators' drains and weights, read by gateways
    // (`0019_region_controls.sql`).
    Table {
        name: "region_controls",
        key: "region",
        key_type: "text",
        columns: &["region", "drained", "weight", "reason", "updated_at"],
        bytea: &[],
        fence: None,
        digest: None,
        tenant: None,
    },
    // A grow-only counter per region: only its region writes a row, so the
    // last write is always the largest. It goes to every region, a bound
    // tenant's included: it is what budgets and billing add up, and holds
    // counts, not content.
    Table {
        name: "spend",
        key: "id",
        key_type: "text",
        columns: &[
            "id",
            "region",
            "day",
            "tenant_id",
            "model",
            "requests",
            "input_tokens",
            "output_tokens",
            "cost_nanos",
            "updated_at",
            "key_id",
        ],
        bytea: &[],
        fence: None,
        digest: None,
        tenant: None,
    },
    // Append-only, like the messages (`0015_audit.sql`).
    Table {
        name: "audit_log",
        key: "id",
        key_type: "uuid",
        columns: &[
            "id", "at", "actor", "action", "resource", "source", "region", "detail",
        ],
        bytea: &[],
        fence: None,
        digest: None,
        tenant: None,
    },
];

/// Per table: the upsert and the delete, built once.
pub(crate) struct Statements {
    /// `$1` payload, `$2` hlc, `$3` origin; affects no row when the row here
    /// is as new or newer.
    pub upsert: String,
    /// `$1` key text, `$2` hlc, `$3` origin; same condition.
    pub delete: String,
}

pub(crate) static STATEMENTS: LazyLock<Vec<Statements>> =
    LazyLock::new(|| TABLES.iter().map(Table::statements).collect());

pub(crate) fn find(name: &str) -> Option<(&'static Table, &'static Statements)> {
    let i = TABLES.iter().position(|t| t.name == name)?;
    Some((&TABLES[i], &STATEMENTS[i]))
}

impl Table {
    fn statements(&self) -> Statements {
        let name = self.name;
        let key = self.key;
        let values: Vec<String> = self
            .columns
            .iter()
            .map(|c| {
                if self.bytea.contains(c) {
                    format!("decode($1 ->> '{c}', 'base64')")
                } else {
                    format!("r.{c}")
                }
            })
            .collect();
        let updates: Vec<String> = self
            .columns
            .iter()
            .filter(|c| **c != key)
            .map(|c| format!("{c} = EXCLUDED.{c}"))
            .collect();
        // Comparing (hlc, origin_region) as a row: origin_region is
        // COLLATE "C", so the tie-break is byte-wise in every region.
        let (mine, theirs) = match self.fence {
            Some(f) => (format!("{name}.{f}, "), format!("EXCLUDED.{f}, ")),
            None => (String::new(), String::new()),
        };
        let upsert = format!(
            "INSERT INTO {name} ({cols}, hlc, origin_region)
             SELECT {values}, $2, $3 FROM jsonb_populate_record(NULL::{name}, $1) r
             ON CONFLICT ({key}) DO UPDATE SET {updates},
                 hlc = EXCLUDED.hlc, origin_region = EXCLUDED.origin_region
             WHERE ({mine}{name}.hlc, {name}.origin_region)
                 < ({theirs}EXCLUDED.hlc, EXCLUDED.origin_region)",
            cols = self.columns.join(", "),
            values = values.join(", "),
            updates = updates.join(", "),
        );
        let delete = format!(
            "DELETE FROM {name} WHERE {key} = $1::{ty} AND (hlc, origin_region) < ($2, $3)",
            ty = self.key_type,
        );
        Statements { upsert, delete }
    }

    /// Hash of every row (key, clock, origin and content) in key order:
    /// equal in two regions exactly when they hold the same rows.
    pub(crate) fn digest_sql(&self) -> String {
        let content = self
            .digest
            .unwrap_or("(to_jsonb(t) - 'hlc' - 'origin_region')::text");
        // The rows of tenants bound to some regions are, by design, not in
        // every region: the digest compares what all regions share.
        let shared = match self.tenant {
            Some(tenant) => format!(
                " WHERE NOT EXISTS (SELECT 1 FROM tenants b
                                     WHERE b.id = t.{tenant} AND b.allowed_regions IS NOT NULL)"
            ),
            None => String::new(),
        };
        format!(
            "SELECT count(*), encode(sha256(convert_to(COALESCE(string_agg(
                 t.{key}::text || ' ' || t.hlc || ' ' || t.origin_region || ' '
                     || {content},
                 E'\\n' ORDER BY t.{key}::text COLLATE \"C\"), ''), 'UTF8')), 'hex')
             FROM {name} t{shared}",
            key = self.key,
            name = self.name,
        )
    }
}

impl Table {
    /// Every row as (key text, payload, hlc, origin): the payload shaped as
    /// the log trigger shapes it (bytea columns in base64), so a snapshot
    /// row applies like a logged change. `$1` (`text[]`): the tenants whose
    /// rows the taker may not hold.
    pub(crate) fn snapshot_sql(&self) -> String {
        let b64: Vec<String> = self
            .bytea
            .iter()
            .map(|c| format!("'{c}', translate(encode(t.{c}, 'base64'), E'\\n', '')"))
            .collect();
        format!(
            "SELECT t.{key}::text, (to_jsonb(t) - 'hlc' - 'origin_region')
                 || jsonb_build_object({b64}), t.hlc, t.origin_region::text
             FROM {name} t WHERE {resident}",
            key = self.key,
            name = self.name,
            b64 = b64.join(", "),
            resident = match self.tenant {
                Some(tenant) => format!("NOT (t.{tenant} = ANY($1::text[]))"),
                // Referenced all the same: every table's query takes `$1`.
                None => "$1::text[] IS NOT NULL".to_string(),
            },
        )
    }

    /// The rows of a relay: as `snapshot_sql`, only those last written by
    /// origin `$2` with a clock above `$3`.
    pub(crate) fn relay_sql(&self) -> String {
        format!(
            "{} AND t.origin_region = $2 AND t.hlc > $3",
            self.snapshot_sql()
        )
    }
}

/// The tombstones' digest, over the same shape.
pub(crate) const TOMBSTONES_DIGEST: &str =
    "SELECT count(*), encode(sha256(convert_to(COALESCE(string_agg(
         t.table_name || ' ' || encode(t.key, 'hex') || ' ' || t.hlc || ' ' || t.origin_region,
         E'\\n' ORDER BY t.table_name COLLATE \"C\", t.key), ''), 'UTF8')), 'hex')
     FROM replication_tombstones t";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_name_every_column_once() {
        let (t, s) = find("api_keys").unwrap();
        for c in t.columns {
            assert!(
                s.upsert.contains(&format!("{c}, ")) || s.upsert.contains(&format!("{c}, hlc"))
            );
        }
        assert!(s.upsert.contains("decode($1 ->> 'key_hash', 'base64')"));
        assert!(!s.upsert.contains("id = EXCLUDED.id"));
        assert!(s.delete.contains("$1::uuid"));
        assert!(find("job_depth").is_none());
    }

    #[test]
    fn a_newer_job_epoch_wins_before_the_clock() {
        let (_, s) = find("jobs").unwrap();
        assert!(s.upsert.contains(
            "(jobs.owner_epoch, jobs.hlc, jobs.origin_region)
                 < (EXCLUDED.owner_epoch, EXCLUDED.hlc, EXCLUDED.origin_region)"
        ));
        let (_, s) = find("tenants").unwrap();
        assert!(
            s.upsert
                .contains("WHERE (tenants.hlc, tenants.origin_region)")
        );
    }
}
