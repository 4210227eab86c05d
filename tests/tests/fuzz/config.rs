//! The config loader in process: the regional node's and the gateway's
//! `Config::from_toml` on any text, on valid files with bytes changed, and
//! on valid files with values replaced, keys added and tables dropped. Never
//! a panic; a refusal names a key (in backticks) or the line at fault.

use std::net::SocketAddr;

use meridian_launcher::{MeshSection, RegionConfigFile, SimModel};
use proptest::prelude::*;
use toml::{Table, Value};

use crate::http::corrupt;
use crate::json;
use crate::runner::{self, Verdict};

const GATEWAY: &str = r#"
[server]
listen = "127.0.0.1:8080"
[mesh]
plaintext = true
[routing]
default_region = "us-east"
[tracing]
sample_ratio = 0.5
[[regions]]
name = "us-east"
address = "127.0.0.1:7101"
[[regions]]
name = "eu-west"
address = "127.0.0.1:7102"
"#;

fn regional() -> String {
    let listen = SocketAddr::from(([127, 0, 0, 1], 7101));
    RegionConfigFile::new(
        "us-east",
        listen,
        "redis://127.0.0.1:6379",
        "postgres://u@127.0.0.1/m",
    )
    .shutdown_grace_ms(2000)
    .postgres_max_connections(5)
    .mesh(MeshSection::Plaintext)
    .model(SimModel::new("sim-fast", 0, 0))
    .replication(
        vec![("eu-west".into(), SocketAddr::from(([127, 0, 0, 1], 7102)))],
        "heartbeat_interval_ms = 200\n",
    )
    .extra("[jobs]\nworkers = 2\n")
    .to_toml()
}

/// Keys of the two configs' sections, and others, for added keys.
const KEYS: &[&str] = &[
    "workers",
    "batch_size",
    "max_connections",
    "ttl_ms",
    "threshold",
    "enabled",
    "url",
    "listen",
    "model_dir",
    "sample_ratio",
    "interval_ms",
    "heartbeat_interval_ms",
    "id",
    "kind",
    "context_window_tokens",
    "ttft_ms",
    "per_token_ms",
    "default_max_tokens",
    "address",
    "name",
    "srv",
    "default_region",
    "plaintext",
    "retention_days",
    "max_drift_ms",
    "peers",
    "region",
];
const SECTIONS: &[&str] = &[
    "jobs",
    "cache",
    "telemetry",
    "embeddings",
    "replication",
    "inference",
    "tracing",
    "server",
    "health",
    "failover",
    "geo",
    "rate_limit",
    "discovery",
    "routing",
    "auth",
    "budget",
];

#[derive(Debug, Clone)]
pub(crate) enum Edit {
    /// The `n`th leaf (in document order) takes this value.
    Replace(usize, Value),
    /// A key added to the `n`th table.
    Add(usize, String, Value),
    /// The `n`th key of the top table removed.
    Drop(usize),
    /// A section added with one key.
    Section(String, String, Value),
}

fn value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(Value::Boolean),
        prop_oneof![-2i64..70_000, any::<i64>()].prop_map(Value::Integer),
        any::<f64>().prop_map(Value::Float),
        json::text().prop_map(Value::String),
        prop::sample::select(vec![
            "127.0.0.1:0",
            "redis://x",
            "postgres://",
            "",
            "sim",
            "/nonexistent"
        ])
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map(
                prop::sample::select(KEYS).prop_map(str::to_string),
                inner,
                0..3
            )
            .prop_map(|m| Value::Table(m.into_iter().collect())),
        ]
    })
    .boxed()
}

fn edit() -> BoxedStrategy<Edit> {
    let key = prop_oneof![3 => prop::sample::select(KEYS).prop_map(str::to_string), 1 => "[a-z_]{1,8}".boxed()];
    prop_oneof![
        4 => (any::<usize>(), value()).prop_map(|(n, v)| Edit::Replace(n, v)),
        2 => (any::<usize>(), key.clone(), value()).prop_map(|(n, k, v)| Edit::Add(n, k, v)),
        1 => any::<usize>().prop_map(Edit::Drop),
        2 => (prop::sample::select(SECTIONS).prop_map(str::to_string), key, value())
            .prop_map(|(s, k, v)| Edit::Section(s, k, v)),
    ]
    .boxed()
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut root = Value::Table(text.parse().expect("the base config is TOML"));
    for e in edits {
        match e {
            Edit::Replace(n, value) => {
                let count = leaves(&root);
                if let Some(leaf) = leaf_at(&mut root, &mut (n % count.max(1))) {
                    *leaf = value.clone();
                }
            }
            Edit::Add(n, key, value) => {
                let count = tables(&root);
                if let Some(table) = table_at(&mut root, &mut (n % count.max(1))) {
                    table.insert(key.clone(), value.clone());
                }
            }
            Edit::Drop(n) => {
                let Value::Table(doc) = &mut root else {
                    continue;
                };
                if !doc.is_empty() {
                    let key = doc.keys().nth(n % doc.len()).cloned().expect("a key");
                    doc.remove(&key);
                }
            }
            Edit::Section(section, key, value) => {
                let Value::Table(doc) = &mut root else {
                    continue;
                };
                if let Value::Table(t) = doc
                    .entry(section.clone())
                    .or_insert(Value::Table(Table::new()))
                {
                    t.insert(key.clone(), value.clone());
                }
            }
        }
    }
    toml::to_string(&root).unwrap_or_default()
}

fn leaves(v: &Value) -> usize {
    match v {
        Value::Table(t) => t.values().map(leaves).sum(),
        Value::Array(a) => a.iter().map(leaves).sum(),
        _ => 1,
    }
}

fn tables(v: &Value) -> usize {
    match v {
        Value::Table(t) => 1 + t.values().map(tables).sum::<usize>(),
        Value::Array(a) => a.iter().map(tables).sum(),
        _ => 0,
    }
}

/// The `i`th leaf in document order.
fn leaf_at<'a>(v: &'a mut Value, i: &mut usize) -> Option<&'a mut Value> {
    match v {
        Value::Table(t) => t.iter_mut().map(|(_, v)| v).find_map(|v| leaf_at(v, i)),
        Value::Array(a) => a.iter_mut().find_map(|v| leaf_at(v, i)),
        _ if *i == 0 => Some(v),
        _ => {
            *i -= 1;
            None
        }
    }
}

/// The `i`th table in document order.
fn table_at<'a>(v: &'a mut Value, i: &mut usize) -> Option<&'a mut Table> {
    match v {
        Value::Table(t) => {
            if *i == 0 {
                return Some(t);
            }
            *i -= 1;
            t.iter_mut().map(|(_, v)| v).find_map(|v| table_at(v, i))
        }
        Value::Array(a) => a.iter_mut().find_map(|v| table_at(v, i)),
        _ => None,
    }
}

/// What a refusal must look like.
fn names_its_problem(message: &str) -> Verdict {
    if message.contains('`') || message.contains(" line ") {
        Ok(())
    } else {
        Err(format!("the error names no key or line: {message}"))
    }
}

fn check(text: &str) -> Verdict {
    if let Err(e) = meridian_regional::Config::from_toml(text, "regional.toml") {
        names_its_problem(&e.to_string()).map_err(|e| format!("regional: {e}"))?;
    }
    if let Err(e) = meridian_gateway::Config::from_toml(text, "gateway.toml") {
        names_its_problem(&e.to_string()).map_err(|e| format!("gateway: {e}"))?;
    }
    Ok(())
}

#[test]
fn config_texts_and_edited_configs() {
    let regional = regional();
    // The edits start from files each loader takes, so they reach validation.
    if let Err(e) = meridian_regional::Config::from_toml(&regional, "regional.toml") {
        panic!("the regional base is refused: {e}");
    }
    if let Err(e) = meridian_gateway::Config::from_toml(GATEWAY, "gateway.toml") {
        panic!("the gateway base is refused: {e}");
    }
    let texts = prop_oneof![
        4 => (any::<bool>(), prop::collection::vec(edit(), 1..4)).prop_map({
            let regional = regional.clone();
            move |(gw, edits)| apply(if gw { GATEWAY } else { &regional }, &edits)
        }),
        2 => (any::<bool>(), prop::collection::vec((any::<usize>(), any::<u8>()), 1..4)).prop_map({
            let regional = regional.clone();
            move |(gw, edits)| {
                let base = if gw { GATEWAY.to_string() } else { regional.clone() };
                String::from_utf8_lossy(&corrupt(base.into_bytes(), &edits)).into_owned()
            }
        }),
        1 => any::<String>(),
    ];
    runner::run("config", 1000, texts, |text| check(&text));
}
