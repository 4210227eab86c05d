//! What the replication tests share: waiting for a condition, reading a
//! region's digest, asking whether regions converged, a replayable seed,
//! and reading a stored conversation.

use std::future::Future;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;

use crate::RegionSandbox;

/// Polls `check` every 50 ms until it holds, failing after `limit`.
pub async fn until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The region's `GET /admin/replication/digest` tables: per replicated
/// table, its row count and hash.
pub async fn digest(region: &RegionSandbox) -> Value {
    let body: Value = reqwest::get(format!("{}/admin/replication/digest", region.url()))
        .await
        .expect("the region answers")
        .error_for_status()
        .expect("the digest is served")
        .json()
        .await
        .expect("the digest is JSON");
    assert_eq!(body["region"], region.name.as_str());
    body["tables"].clone()
}

/// Whether every one of `regions` reports the same digest.
pub async fn converged<'a>(regions: impl IntoIterator<Item = &'a RegionSandbox>) -> bool {
    let mut first = None;
    for r in regions {
        let d = digest(r).await;
        match &first {
            None => first = Some(d),
            Some(f) if *f != d => return false,
            Some(_) => {}
        }
    }
    true
}

/// The row count of `table` in a digest.
pub fn rows(digest: &Value, table: &str) -> i64 {
    digest
        .as_array()
        .expect("the digest lists tables")
        .iter()
        .find(|t| t["table"] == table)
        .unwrap_or_else(|| panic!("no {table} in {digest}"))["rows"]
        .as_i64()
        .expect("a row count")
}

/// The seed of a randomised test: `var` from the environment when set (to
/// replay a failing run), else a random one; printed either way.
pub fn seed(var: &str) -> u64 {
    let seed = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("seed {seed} (set {var} to replay)");
    seed
}

/// The stored message contents of conversation `id` of `tenant` in the
/// region at `url`, in order, or `None` when the region has none of it.
pub async fn conversation(url: &str, tenant: &str, id: &str) -> Option<Vec<String>> {
    let res = reqwest::Client::new()
        .get(format!("{url}/v1/conversations/{id}"))
        .header("x-meridian-tenant", tenant)
        .send()
        .await
        .expect("the region answers");
    if res.status().as_u16() == 404 {
        return None;
    }
    assert_eq!(res.status().as_u16(), 200);
    let body: Value = res.json().await.expect("JSON");
    Some(
        body["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["content"].as_str().expect("a content").to_string())
            .collect(),
    )
}
