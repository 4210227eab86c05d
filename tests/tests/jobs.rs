//! Asynchronous jobs against a region's real Redis and PostgreSQL: every job
//! completes exactly once through worker deaths and Redis data loss, and the
//! API keeps its promises (idempotency, cancel, dead letters, tenancy,
//! backpressure, priority lanes).

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use meridian_proto::v1::jobs_client::JobsClient;
use meridian_proto::v1::{
    CancelJobRequest, ChatMessage, GenerateRequest, GetJobRequest, JobPriority, JobState,
    SubmitJobRequest, WatchJobRequest,
};
use meridian_tests::{RegionSandbox, init_logging};
use serde_json::{Value, json};
use tonic::transport::Channel;

const FAST: &str = "sim-fast";

fn setup() {
    init_logging();
    // reqwest is built without a default TLS provider in this crate; plain
    // HTTP never uses it, but the client wants one installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A model whose every completion takes `ms`.
fn slow_model(id: &str, ms: u64) -> String {
    format!(
        "[[models]]\nid = \"{id}\"\n\
         backend = {{ kind = \"sim\", prefill_us_per_token = 0, ttft_ms = {ms}, per_token_ms = 0 }}\n"
    )
}

fn body(model: &str, content: &str) -> Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": content }], "max_tokens": 4 })
}

async fn pg(region: &RegionSandbox) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&region.postgres.url())
        .await
        .unwrap()
}

async fn count(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Polls `check` until it holds; panics with `what` after `secs` seconds.
async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Api {
    http: reqwest::Client,
    url: String,
}

impl Api {
    fn new(region: &RegionSandbox) -> Self {
        Self {
            http: reqwest::Client::new(),
            url: region.url(),
        }
    }

    async fn submit_raw(&self, tenant: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/jobs", self.url))
            .header("x-meridian-tenant", tenant)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Submits and returns the job id, checking the 202 contract.
    async fn submit(&self, tenant: &str, body: &Value) -> String {
        let res = self.submit_raw(tenant, body).await;
        assert_eq!(res.status(), 202, "{:?}", res.text().await);
        let location = res.headers()["location"].to_str().unwrap().to_string();
        let job: Value = res.json().await.unwrap();
        let id = job["id"].as_str().unwrap().to_string();
        assert_eq!(location, format!("/v1/jobs/{id}"));
        id
    }

    async fn get(&self, tenant: &str, id: &str) -> (u16, Value) {
        let res = self
            .http
            .get(format!("{}/v1/jobs/{id}", self.url))
            .header("x-meridian-tenant", tenant)
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), res.json().await.unwrap())
    }

    async fn cancel(&self, tenant: &str, id: &str) -> (u16, Value) {
        let res = self
            .http
            .delete(format!("{}/v1/jobs/{id}", self.url))
            .header("x-meridian-tenant", tenant)
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), res.json().await.unwrap())
    }

    async fn state(&self, tenant: &str, id: &str) -> String {
        let (status, job) = self.get(tenant, id).await;
        assert_eq!(status, 200, "{job}");
        job["state"].as_str().unwrap().to_string()
    }
}

async fn grpc(region: &RegionSandbox) -> JobsClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(region.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    JobsClient::new(channel)
}

fn with_tenant<T>(tenant: &str, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("x-meridian-tenant", tenant.parse().unwrap());
    req
}

fn generate(model: &str, content: &str) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: content.into(),
            ..Default::default()
        }],
        max_tokens: Some(4),
        ..Default::default()
    }
}

fn reason(status: &tonic::Status) -> String {
    meridian_proto::error_detail(status)
        .map(|d| d.reason)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_jobs_complete_exactly_once() {
    setup();
    let region = RegionSandbox::start_with_config("eu-west", "[jobs]\nworkers = 4\n").await;
    let api = Api::new(&region);
    let ids: Vec<String> = futures::stream::iter(0..1000)
        .map(|i| {
            let api = &api;
            async move { api.submit("acme", &body(FAST, &format!("job {i}"))).await }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 1000);

    let db = pg(&region).await;
    eventually(45, "1000 jobs succeeded", || async {
        count(&db, "SELECT count(*) FROM jobs WHERE state = 'succeeded'").await == 1000
    })
    .await;
    assert_eq!(count(&db, "SELECT count(*) FROM jobs").await, 1000);
    // One recorded completion and one attempt each: no job ran twice.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM jobs WHERE completions = 1 AND attempts = 1 AND result IS NOT NULL"
        )
        .await,
        1000
    );
    let (status, job) = api.get("acme", &ids[0]).await;
    assert_eq!(status, 200);
    assert_eq!(job["result"]["object"], "chat.completion");
    assert!(
        !job["result"]["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_stopped_node_are_reclaimed_and_finished() {
    setup();
    let extra = format!(
        "[jobs]\nworkers = 8\nlease_ms = 1000\nsweep_interval_ms = 200\n{}",
        slow_model("job-slow", 2000)
    );
    let mut region = RegionSandbox::start_with_config("eu-west", &extra).await;
    let api = Api::new(&region);
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            api.submit("acme", &body("job-slow", &format!("slow {i}")))
                .await,
        );
    }
    let db = pg(&region).await;
    eventually(10, "all six running", || async {
        count(&db, "SELECT count(*) FROM jobs WHERE state = 'running'").await == 6
    })
    .await;
    // A crash mid-inference: the jobs stay running under a lease nobody
    // renews, their messages pending for a consumer that is gone.
    region.kill_node();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM jobs WHERE state = 'running' AND completions = 0"
        )
        .await,
        6
    );
    region.start_node().await;
    eventually(20, "all six succeeded after the restart", || async {
        count(&db, "SELECT count(*) FROM jobs WHERE state = 'succeeded'").await == 6
    })
    .await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM jobs WHERE completions = 1 AND attempts = 2"
        )
        .await,
        6,
        "each job ran once more, and completed once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_data_loses_no_accepted_job() {
    setup();
    let extra = format!(
        "[jobs]\nworkers = 2\nsweep_interval_ms = 200\n{}",
        slow_model("job-slow", 20)
    );
    let mut region = RegionSandbox::start_with_config("eu-west", &extra).await;
    let api = Api::new(&region);
    let db = pg(&region).await;
    for i in 0..100 {
        api.submit("acme", &body("job-slow", &format!("a {i}")))
            .await;
    }
    eventually(10, "some jobs done", || async {
        count(&db, "SELECT count(*) FROM jobs WHERE state = 'succeeded'").await >= 10
    })
    .await;

    let client = redis::Client::open(region.redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    // Jobs were still waiting when their stream vanished: only PostgreSQL
    // knows them now.
    assert!(count(&db, "SELECT count(*) FROM jobs WHERE state = 'queued'").await > 0);
    for i in 0..20 {
        api.submit("acme", &body("job-slow", &format!("b {i}")))
            .await;
    }

    // An empty restart: the streams, the groups and the id set are gone.
    region.redis.kill();
    region.redis.restart().await.unwrap();
    for i in 0..20 {
        api.submit("acme", &body("job-slow", &format!("c {i}")))
            .await;
    }
    eventually(30, "all 140 jobs succeeded", || async {
        count(&db, "SELECT count(*) FROM jobs WHERE state = 'succeeded'").await == 140
    })
    .await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM jobs WHERE completions = 1 AND result IS NOT NULL"
        )
        .await,
        140
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_idempotency_key_yields_one_job() {
    setup();
    let region = RegionSandbox::start_with_config("eu-west", "[jobs]\nworkers = 1\n").await;
    let api = Api::new(&region);
    let mut keyed = body(FAST, "once");
    keyed["idempotency_key"] = json!("k1");
    let ids: Vec<String> =
        futures::future::join_all((0..8).map(|_| api.submit("acme", &keyed))).await;
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");

    // The same key in the header names the same job.
    let res = api
        .http
        .post(format!("{}/v1/jobs", api.url))
        .header("idempotency-key", "k1")
        .header("x-meridian-tenant", "acme")
        .json(&body(FAST, "once"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(res.json::<Value>().await.unwrap()["id"], ids[0].as_str());

    // A different request under the same key is a conflict.
    let mut other = body(FAST, "twice");
    other["idempotency_key"] = json!("k1");
    let res = api.submit_raw("acme", &other).await;
    assert_eq!(res.status(), 409);
    assert_eq!(
        res.json::<Value>().await.unwrap()["error"]["type"],
        "conflict_error"
    );

    // Keys are per tenant.
    let theirs = api.submit("globex", &keyed).await;
    assert_ne!(theirs, ids[0]);

    let mut client = grpc(&region).await;
    let submit = |key: &str, content: &str| SubmitJobRequest {
        request: Some(generate(FAST, content)),
        priority: JobPriority::Unspecified.into(),
        idempotency_key: key.into(),
    };
    let a = client
        .submit(with_tenant("acme", submit("g1", "x")))
        .await
        .unwrap()
        .into_inner();
    let b = client
        .submit(with_tenant("acme", submit("g1", "x")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.id, b.id);
    let reused = client
        .submit(with_tenant("acme", submit("g1", "y")))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), tonic::Code::AlreadyExists);
    assert_eq!(reason(&reused), "IDEMPOTENCY_KEY_REUSED");

    let db = pg(&region).await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM jobs WHERE idempotency_key = 'k1'"
        )
        .await,
        2
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM jobs WHERE idempotency_key = 'g1'"
        )
        .await,
        1
    );
    assert_eq!(count(&db, "SELECT count(*) FROM jobs").await, 3);
}

/// Reads `job` events of an SSE stream until it ends; returns their states.
async fn sse_states(res: reqwest::Response) -> Vec<String> {
    let mut states = Vec::new();
    let mut buf = String::new();
    let mut bytes = res.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: "))
                && event.lines().any(|l| l == "event: job")
            {
                let job: Value = serde_json::from_str(data).unwrap();
                states.push(job["state"].as_str().unwrap().to_string());
            }
        }
    }
    states
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_queued_and_running_jobs() {
    setup();
    let extra = format!("[jobs]\nworkers = 1\n{}", slow_model("job-stuck", 60_000));
    let region = RegionSandbox::start_with_config("eu-west", &extra).await;
    let api = Api::new(&region);
    let running = api.submit("acme", &body("job-stuck", "a")).await;
    eventually(10, "the first job running", || async {
        api.state("acme", &running).await == "running"
    })
    .await;
    let events = api
        .http
        .get(format!("{}/v1/jobs/{running}/events", api.url))
        .header("x-meridian-tenant", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let watcher = tokio::spawn(sse_states(events));

    // The only worker is busy: this one waits.
    let queued = api.submit("acme", &body("job-stuck", "b")).await;
    let (status, job) = api.cancel("acme", &queued).await;
    assert_eq!(status, 200);
    assert_eq!(job["state"], "cancelled");

    let mut client = grpc(&region).await;
    let cancelled = client
        .cancel(with_tenant(
            "acme",
            CancelJobRequest {
                job_id: running.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, JobState::Cancelled as i32);
    let states = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("the event stream ends after the terminal state")
        .unwrap();
    assert_eq!(states, ["running", "cancelled"]);

    // The 60 s inference was stopped: the single worker is free again.
    let after = api.submit("acme", &body(FAST, "c")).await;
    eventually(10, "a later job succeeded", || async {
        api.state("acme", &after).await == "succeeded"
    })
    .await;
    let (_, job) = api.get("acme", &queued).await;
    assert_eq!(
        (job["state"].as_str(), job["attempts"].as_u64()),
        (Some("cancelled"), Some(0))
    );
    let (_, job) = api.get("acme", &running).await;
    assert_eq!(
        (job["state"].as_str(), job["attempts"].as_u64()),
        (Some("cancelled"), Some(1))
    );
    assert!(job["result"].is_null());

    // Cancelling again is a no-op; a finished job cannot be cancelled.
    assert_eq!(api.cancel("acme", &running).await.0, 200);
    let (status, err) = api.cancel("acme", &after).await;
    assert_eq!(status, 400, "{err}");
    let finished = client
        .cancel(with_tenant("acme", CancelJobRequest { job_id: after }))
        .await
        .unwrap_err();
    assert_eq!(finished.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&finished), "JOB_ALREADY_FINISHED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_dead_letter_the_job_with_its_error() {
    setup();
    // Backoffs of at least 150 ms and 300 ms (equal jitter): the watch, opened right after submit,
    // sees the job change state rather than only its final snapshot.
    let extra = "[jobs]\nworkers = 2\nmax_attempts = 3\nretry_base_ms = 300\nretry_max_ms = 600\n\
                 [[models]]\nid = \"job-broken\"\n\
                 backend = { kind = \"sim\", ttft_ms = 0, per_token_ms = 0, fail_rate = 1.0 }\n";
    let region = RegionSandbox::start_with_config("eu-west", extra).await;
    let mut client = grpc(&region).await;
    let job = client
        .submit(with_tenant(
            "acme",
            SubmitJobRequest {
                request: Some(generate("job-broken", "doomed")),
                priority: JobPriority::Interactive.into(),
                idempotency_key: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, JobState::Queued as i32);
    let mut events = client
        .watch(with_tenant(
            "acme",
            WatchJobRequest {
                job_id: job.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    let collect = async {
        while let Some(event) = events.next().await {
            last = Some(event.unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(15), collect)
        .await
        .expect("the watch ends at a terminal state");
    let last = last.expect("at least one event");
    assert_eq!(
        last.job.as_ref().unwrap().state,
        JobState::DeadLettered as i32
    );
    assert_ne!(last.previous_state, JobState::Unspecified as i32);

    let got = client
        .get(with_tenant(
            "acme",
            GetJobRequest {
                job_id: job.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.attempts, 3);
    assert!(got.result.is_none());
    let error = got.last_error.expect("the last error is kept");
    assert_eq!(error.reason, "BACKEND_ERROR");
    assert!(
        error.message.contains("simulated backend failure"),
        "{}",
        error.message
    );
    assert!(got.finished_at.is_some());

    let metrics = reqwest::get(format!("{}/metrics", region.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("meridian_jobs_dead_lettered_total{region=\"eu-west\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meridian_jobs_retries_total{region=\"eu-west\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_foreign_jobs_are_not_found() {
    setup();
    let region = RegionSandbox::start_with_config("eu-west", "[jobs]\nworkers = 1\n").await;
    let api = Api::new(&region);
    let id = api.submit("acme", &body(FAST, "mine")).await;
    assert_eq!(api.get("acme", &id).await.0, 200);

    let unknown = "0190aaaa-0000-7000-8000-000000000000";
    for (tenant, job) in [
        ("acme", unknown),
        ("acme", "not-a-job-id"),
        ("globex", id.as_str()),
    ] {
        let (status, err) = api.get(tenant, job).await;
        assert_eq!(status, 404, "{tenant} {job}: {err}");
        assert_eq!(err["error"]["type"], "not_found_error");
        assert_eq!(api.cancel(tenant, job).await.0, 404);
        let events = api
            .http
            .get(format!("{}/v1/jobs/{job}/events", api.url))
            .header("x-meridian-tenant", tenant)
            .send()
            .await
            .unwrap();
        assert_eq!(events.status(), 404);
    }
    // The foreign tenant's cancel changed nothing.
    eventually(10, "the job succeeded", || async {
        api.state("acme", &id).await == "succeeded"
    })
    .await;

    let mut client = grpc(&region).await;
    for (tenant, job) in [("acme", unknown), ("globex", id.as_str())] {
        let get = client
            .get(with_tenant(tenant, GetJobRequest { job_id: job.into() }))
            .await
            .unwrap_err();
        assert_eq!(get.code(), tonic::Code::NotFound);
        assert_eq!(reason(&get), "JOB_NOT_FOUND");
        let watch = client
            .watch(with_tenant(tenant, WatchJobRequest { job_id: job.into() }))
            .await
            .unwrap_err();
        assert_eq!(watch.code(), tonic::Code::NotFound);
        let cancel = client
            .cancel(with_tenant(tenant, CancelJobRequest { job_id: job.into() }))
            .await
            .unwrap_err();
        assert_eq!(cancel.code(), tonic::Code::NotFound);
    }

    let channel = tonic::transport::Endpoint::from_shared(region.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "meridian.v1.Jobs".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queues_refuse_with_retry_after() {
    setup();
    // No workers: submitted jobs stay queued and count against the limits.
    let extra = "[jobs]\nworkers = 0\nmax_queued_per_tenant = 5\nmax_queued_per_region = 8\n";
    let region = RegionSandbox::start_with_config("eu-west", extra).await;
    let api = Api::new(&region);

    // Concurrent submitters cannot overshoot the tenant's limit.
    let statuses: Vec<u16> = futures::future::join_all((0..30).map(|i| {
        let api = &api;
        async move {
            let res = api.submit_raw("burst", &body(FAST, &format!("{i}"))).await;
            let status = res.status().as_u16();
            if status == 429 {
                assert_eq!(res.headers()["retry-after"], "1");
                let err: Value = res.json().await.unwrap();
                assert_eq!(err["error"]["type"], "rate_limit_error");
            }
            status
        }
    }))
    .await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        25,
        "{statuses:?}"
    );

    // The region's limit binds across tenants: 5 + 3 = 8.
    let mut other = Vec::new();
    for i in 0..3 {
        other.push(api.submit("other", &body(FAST, &format!("{i}"))).await);
    }
    let res = api.submit_raw("other", &body(FAST, "one too many")).await;
    assert_eq!(res.status(), 429);
    let mut client = grpc(&region).await;
    let full = client
        .submit(with_tenant(
            "third",
            SubmitJobRequest {
                request: Some(generate(FAST, "x")),
                priority: JobPriority::Batch.into(),
                idempotency_key: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(full.code(), tonic::Code::ResourceExhausted);
    let detail = meridian_proto::error_detail(&full).expect("an error detail");
    assert_eq!(
        (detail.reason.as_str(), detail.retry_after_ms),
        ("QUEUE_FULL", 1000)
    );

    // A cancelled job frees its place.
    assert_eq!(api.cancel("other", &other[0]).await.0, 200);
    api.submit("third", &body(FAST, "now it fits")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_jobs_overtake_batch_jobs() {
    setup();
    let extra = format!("[jobs]\nworkers = 1\n{}", slow_model("job-slow", 250));
    let region = RegionSandbox::start_with_config("eu-west", &extra).await;
    let api = Api::new(&region);
    let mut batch = Vec::new();
    for i in 0..8 {
        batch.push(
            api.submit("acme", &body("job-slow", &format!("batch {i}")))
                .await,
        );
    }
    let mut urgent = body("job-slow", "urgent");
    urgent["priority"] = json!("interactive");
    let interactive = api.submit("acme", &urgent).await;

    let db = pg(&region).await;
    eventually(20, "all nine succeeded", || async {
        count(&db, "SELECT count(*) FROM jobs WHERE state = 'succeeded'").await == 9
    })
    .await;
    // Judged against the batch jobs still waiting when the interactive job
    // arrived, however many a slow machine had started by then: each of
    // them starts after it, but one the worker had already read.
    let id: uuid::Uuid = interactive.parse().unwrap();
    let (waiting, overtook): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE b.started_at < i.started_at)
           FROM jobs b, jobs i
          WHERE i.id = $1 AND b.priority = 'batch' AND b.started_at > i.created_at",
    )
    .bind(id)
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(
        waiting >= 3,
        "only {waiting} batch jobs were still waiting when the interactive one arrived: \
         submitting took longer than running five jobs"
    );
    assert!(
        overtook <= 1,
        "{overtook} of the {waiting} waiting batch jobs started before the interactive one"
    );
}

/// A job attempt goes through the region's answer pipeline like an
/// interactive request: it holds its tenant's in-flight slot while it runs
/// (so the tenant's chat requests meanwhile are refused), waits for a slot
/// rather than failing when none is free, and writes its usage row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_attempts_are_admitted_and_recorded_like_requests() {
    setup();
    let extra = format!(
        "[jobs]\nworkers = 3\n[inference]\nmax_in_flight_per_tenant = 1\n{}",
        slow_model("sim-job", 700)
    );
    let region = RegionSandbox::start_with_config("eu-west", &extra).await;
    let api = Api::new(&region);
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            api.submit("ledger", &body("sim-job", &format!("job {i}")))
                .await,
        );
    }
    let chat = |tenant: &'static str| {
        api.http
            .post(format!("{}/v1/chat/completions", api.url))
            .header("x-meridian-tenant", tenant)
            .json(&body(FAST, "meanwhile"))
            .send()
    };
    eventually(
        10,
        "a chat of the tenant refused while its job runs",
        || async {
            let res = chat("ledger").await.unwrap();
            if res.status() != 429 {
                return false;
            }
            let err: Value = res.json().await.unwrap();
            assert_eq!(err["error"]["type"], "rate_limit_error", "{err}");
            true
        },
    )
    .await;
    // The limit is the tenant's: another tenant is served meanwhile.
    assert_eq!(chat("other").await.unwrap().status(), 200);

    let db = pg(&region).await;
    eventually(30, "3 jobs succeeded", || async {
        count(&db, "SELECT count(*) FROM jobs WHERE state = 'succeeded'").await == 3
    })
    .await;
    // Three jobs for one slot: two waited for it, none failed an attempt.
    assert_eq!(
        count(&db, "SELECT count(*) FROM jobs WHERE attempts = 1").await,
        3
    );
    let mut tokens = 0;
    for id in &ids {
        let (_, job) = api.get("ledger", id).await;
        tokens += job["result"]["usage"]["completion_tokens"]
            .as_i64()
            .unwrap();
    }
    assert!(tokens > 0);
    eventually(10, "3 usage rows of the jobs", || async {
        count(
            &db,
            "SELECT count(*) FROM inference_usage WHERE tenant = 'ledger' AND model = 'sim-job'",
        )
        .await
            == 3
    })
    .await;
    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT status, cache, region, sum(completion_tokens)::bigint FROM inference_usage
          WHERE tenant = 'ledger' AND model = 'sim-job' GROUP BY 1, 2, 3",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![("ok".into(), "bypass".into(), "eu-west".into(), tokens)]
    );
}

/// Watches are capped per tenant, cost no query while their job is quiet,
/// and hear of a change whoever made it (here a write straight to the
/// database, as another node of the region or a replicated change makes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_are_capped_and_woken_by_the_database_not_by_polling() {
    setup();
    // No workers: the jobs stay queued until the test moves them.
    let region = RegionSandbox::start_with_config(
        "eu-west",
        "[jobs]\nworkers = 0\nmax_watches_per_tenant = 40\nsweep_interval_ms = 60000\n",
    )
    .await;
    let mut client = grpc(&region).await;
    let db = pg(&region).await;
    let submit = |n: usize| SubmitJobRequest {
        request: Some(generate(FAST, &format!("watched {n}"))),
        priority: JobPriority::Unspecified.into(),
        idempotency_key: String::new(),
    };
    let mut ids = Vec::new();
    for n in 0..40 {
        let job = client
            .submit(with_tenant("acme", submit(n)))
            .await
            .unwrap()
            .into_inner();
        ids.push(job.id);
    }
    let commits = || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        n
    };
    let quiet = {
        let before = commits().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        commits().await - before
    };
    let mut watches = Vec::new();
    for id in &ids {
        let mut events = client
            .watch(with_tenant("acme", WatchJobRequest { job_id: id.clone() }))
            .await
            .unwrap()
            .into_inner();
        let first = events.message().await.unwrap().unwrap();
        assert_eq!(first.job.unwrap().state(), JobState::Queued);
        watches.push(events);
    }
    // The cap: a 41st watch of the tenant is refused, another tenant's not.
    let status = client
        .watch(with_tenant(
            "acme",
            WatchJobRequest {
                job_id: ids[0].clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("jobs.max_watches_per_tenant"),
        "{status:?}"
    );
    let other = client
        .watch(with_tenant(
            "other",
            WatchJobRequest {
                job_id: ids[0].clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::NotFound, "another tenant's job");

    // Forty quiet watches add (next to) no queries: polling would add
    // forty reads every 250 ms, 320 in these two seconds.
    let watched = {
        let before = commits().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        commits().await - before
    };
    assert!(
        watched < quiet + 40,
        "{watched} commits in 2 s with 40 watches, {quiet} without"
    );

    // A change made behind the node's back reaches the watcher.
    sqlx::query("UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE id = $1::uuid")
        .bind(&ids[3])
        .execute(&db)
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), watches[3].message())
        .await
        .expect("the watcher hears of the change")
        .unwrap()
        .unwrap();
    assert_eq!(event.job.unwrap().state(), JobState::Cancelled);

    // A closed watch gives its slot back.
    drop(watches.remove(3));
    eventually(10, "a slot is free again", || {
        let mut client = client.clone();
        let id = ids[1].clone();
        async move {
            client
                .watch(with_tenant("acme", WatchJobRequest { job_id: id }))
                .await
                .is_ok()
        }
    })
    .await;
}
