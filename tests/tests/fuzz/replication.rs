//! The replication apply path against a real, migrated PostgreSQL: batches
//! of arbitrary changes to every replicated table (rows shaped from the
//! table's own columns, with values right or wrong for each column's type).
//! Applying never panics; a refused batch leaves every replicated table and
//! the peer's watermark as they were (the batch is one transaction); an
//! applied one accounts for every change and never moves the watermark back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meridian_proto::v1::Change;
use meridian_regional::replication::{apply_batch_through, digest};
use proptest::prelude::*;
use serde_json::{Value, json};
use sqlx::PgPool;

use meridian_tests::RegionSandbox;

use crate::json;
use crate::runner::{self, Verdict};

const LOCAL: &str = "us-east";
const DRIFT: Duration = Duration::from_secs(60);

/// A replicated table as its database describes it.
#[derive(Debug, Clone)]
struct Table {
    name: String,
    key: String,
    columns: Vec<(String, String)>,
}

async fn describe(pool: &PgPool) -> Vec<Table> {
    let names: Vec<String> = digest(pool)
        .await
        .expect("a digest of the replicated tables")
        .into_iter()
        .map(|d| d.table)
        .filter(|t| t != "replication_tombstones")
        .collect();
    let mut tables = Vec::new();
    for name in names {
        let columns: Vec<(String, String)> = sqlx::query_as(
            "SELECT column_name::text, data_type::text FROM information_schema.columns
              WHERE table_name = $1 ORDER BY ordinal_position",
        )
        .bind(&name)
        .fetch_all(pool)
        .await
        .expect("the table's columns");
        let key: Option<String> = sqlx::query_scalar(
            "SELECT a.attname::text FROM pg_index i
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
              WHERE i.indrelid = $1::regclass AND i.indisprimary LIMIT 1",
        )
        .bind(&name)
        .fetch_optional(pool)
        .await
        .expect("the table's key");
        tables.push(Table {
            key: key.unwrap_or_else(|| "id".into()),
            name,
            columns,
        });
    }
    tables
}

fn column_value(data_type: &str) -> BoxedStrategy<Value> {
    let right = match data_type {
        "uuid" => any::<u128>()
            .prop_map(|n| json!(uuid::Uuid::from_u128(n).to_string()))
            .boxed(),
        "bigint" | "integer" | "smallint" => json::number(),
        "double precision" | "real" | "numeric" => (-1e9f64..1e9).prop_map(Value::from).boxed(),
        "boolean" => any::<bool>().prop_map(Value::Bool).boxed(),
        "jsonb" | "json" => json::any_json(),
        t if t.starts_with("timestamp") => prop_oneof![
            Just(json!("2026-01-01T00:00:00Z")),
            Just(json!(chrono::Utc::now().to_rfc3339())),
            Just(json!("0001-01-01T00:00:00Z")),
        ]
        .boxed(),
        _ => json::text().prop_map(Value::String).boxed(),
    };
    prop_oneof![5 => right, 1 => json::any_json(), 1 => Just(Value::Null)].boxed()
}

fn key_text() -> BoxedStrategy<String> {
    prop_oneof![
        2 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string()),
        2 => "[a-z0-9-]{1,12}".boxed(),
        1 => json::text(),
    ]
    .boxed()
}

fn change(tables: &[Table]) -> BoxedStrategy<Change> {
    let table = prop::sample::select(tables.to_vec());
    let now = chrono::Utc::now().timestamp_millis() as u64;
    let hlc = prop_oneof![
        4 => (0u64..600_000, 0u64..1000).prop_map(move |(ago, n)| ((now - ago) << 16) | n),
        1 => any::<u64>(),
        1 => Just(0u64),
    ];
    let op = prop_oneof![4 => Just(1i32), 2 => Just(2i32), 1 => Just(3i32), 1 => any::<i32>()];
    let origin = prop_oneof![4 => Just("eu-west".to_string()), 1 => Just(LOCAL.to_string()), 1 => json::text()];
    (table, key_text(), hlc, op, origin, any::<bool>())
        .prop_flat_map(|(table, key, hlc, op, origin, key_agrees)| {
            let row = table
                .columns
                .iter()
                .map(|(c, t)| {
                    (
                        Just(c.clone()),
                        prop::option::weighted(0.9, column_value(t)),
                    )
                })
                .collect::<Vec<_>>();
            let payload = prop_oneof![
                6 => row.prop_map({
                    let (table, key) = (table.clone(), key.clone());
                    move |cols| {
                        let mut m: serde_json::Map<String, Value> =
                            cols.into_iter().filter_map(|(c, v)| v.map(|v| (c, v))).collect();
                        if key_agrees {
                            m.insert(table.key.clone(), Value::String(key.clone()));
                        }
                        let row = Value::Object(m);
                        // An append carries an array of rows.
                        if op == 3 { json!([row]) } else { row }.to_string().into_bytes()
                    }
                }),
                1 => json::any_json().prop_map(|v| v.to_string().into_bytes()),
                1 => prop::collection::vec(any::<u8>(), 0..32),
            ];
            let table_name = prop_oneof![8 => Just(table.name.clone()), 1 => json::text()];
            let key_bytes = prop_oneof![
                6 => Just(key.clone().into_bytes()),
                1 => prop::collection::vec(any::<u8>(), 0..12),
            ];
            (table_name, key_bytes, payload).prop_map(move |(table, key, payload)| Change {
                sequence: 0,
                table,
                key,
                payload,
                hlc,
                origin_region: origin.clone(),
                committed_at: None,
                op,
            })
        })
        .boxed()
}

/// A batch in sequence order (with repeats and gaps), and its
/// `through_sequence`.
fn batch(tables: &[Table]) -> BoxedStrategy<(Vec<Change>, u64)> {
    (
        prop::collection::vec((change(tables), 0u64..3), 0..5),
        prop_oneof![3 => Just(0u64), 1 => 0u64..20, 1 => any::<u64>()],
    )
        .prop_map(|(changes, through)| {
            let mut sequence = 0;
            let changes = changes
                .into_iter()
                .map(|(mut c, step)| {
                    sequence += step;
                    c.sequence = sequence;
                    c
                })
                .collect();
            (changes, through)
        })
        .boxed()
}

async fn watermark(pool: &PgPool, peer: &str) -> i64 {
    sqlx::query_scalar("SELECT applied_sequence FROM replication_peers WHERE peer = $1")
        .bind(peer)
        .fetch_optional(pool)
        .await
        .expect("the watermark reads")
        .unwrap_or(0)
}

async fn check(pool: &PgPool, peer: &str, changes: &[Change], through: u64) -> Verdict {
    let before = digest(pool)
        .await
        .map_err(|e| format!("digest before: {e}"))?;
    let mark = watermark(pool, peer).await;
    match apply_batch_through(pool, LOCAL, peer, changes, through, DRIFT).await {
        Ok(applied) => {
            let counted = applied.applied + applied.superseded + applied.skipped;
            if counted != changes.len() as u64 {
                return Err(format!(
                    "{applied:?} accounts for {counted} of {} changes",
                    changes.len()
                ));
            }
            let after = watermark(pool, peer).await;
            if after < mark
                || u64::try_from(after).ok() != Some(applied.watermark.min(i64::MAX as u64))
            {
                return Err(format!(
                    "watermark {mark} -> {after}, reported {}",
                    applied.watermark
                ));
            }
            Ok(())
        }
        Err(e) => {
            if e.to_string().is_empty() {
                return Err("an error without a message".into());
            }
            let after = digest(pool)
                .await
                .map_err(|e| format!("digest after: {e}"))?;
            if after != before {
                return Err(format!("refused ({e}) but the tables changed"));
            }
            if watermark(pool, peer).await != mark {
                return Err(format!("refused ({e}) but the watermark moved"));
            }
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_apply_of_arbitrary_changes() {
    meridian_tests::init_logging();
    let region = RegionSandbox::start(LOCAL).await;
    let pool = PgPool::connect(&region.postgres.url())
        .await
        .expect("the region's database");
    let tables = describe(&pool).await;
    assert!(tables.len() >= 4, "replicated tables: {tables:?}");
    // A new peer every few cases, so some batches land on a fresh watermark
    // and others on one that has moved.
    let cases = AtomicU64::new(0);
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        runner::run(
            "replication_apply",
            150,
            batch(&tables),
            |(changes, through)| {
                let peer = format!("fuzz-peer-{}", cases.fetch_add(1, Ordering::Relaxed) / 4);
                handle.block_on(check(&pool, &peer, &changes, through))
            },
        );
    });
    digest(&pool)
        .await
        .expect("the database reads after the run");
}
