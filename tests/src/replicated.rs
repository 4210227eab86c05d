//! What the replication and failover tests share: waiting for a condition,
//! reading a region's digest, asking whether regions converged, a
//! replayable seed, reading a stored conversation, and submitting and
//! reading jobs.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;
use uuid::Uuid;

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

/// A pool of two connections to `region`'s PostgreSQL, for checks.
pub async fn pool(region: &RegionSandbox) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&region.postgres.url())
        .await
        .expect("the region's PostgreSQL answers")
}

/// (state, completions, attempts, owner_region, owner_epoch, result) of a job.
pub type JobRow = (String, i32, i32, String, i64, Option<Value>);

/// Every job in the database behind `pool`, by id.
pub async fn job_rows(pool: &sqlx::PgPool) -> HashMap<Uuid, JobRow> {
    type Wide = (Uuid, String, i32, i32, String, i64, Option<Value>);
    let rows: Vec<Wide> = sqlx::query_as(
        "SELECT id, state, completions, attempts, owner_region, owner_epoch, result FROM jobs",
    )
    .fetch_all(pool)
    .await
    .expect("jobs are readable");
    rows.into_iter()
        .map(|(id, s, c, a, o, e, r)| (id, (s, c, a, o, e, r)))
        .collect()
}

/// Submits a job of `tenant` asking `model` for `max_tokens` tokens about
/// `content` to `region`, expecting 202; its id.
pub async fn submit_job(
    http: &reqwest::Client,
    region: &RegionSandbox,
    tenant: &str,
    model: &str,
    max_tokens: u32,
    content: &str,
) -> Uuid {
    let res = http
        .post(format!("{}/v1/jobs", region.url()))
        .header("x-meridian-tenant", tenant)
        .json(&serde_json::json!({
            "model": model,
            "messages": [{ "role": "user", "content": content }],
            "max_tokens": max_tokens,
        }))
        .send()
        .await
        .expect("the region answers");
    assert_eq!(res.status(), 202);
    let job: Value = res.json().await.expect("a JSON job");
    job["id"]
        .as_str()
        .expect("a job id")
        .parse()
        .expect("a UUID")
}
