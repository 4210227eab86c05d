//! Traces across Meridian's hops, received by an OTLP/gRPC collector the
//! test runs: one trace per request, from the gateway through the region
//! (and, for a job, the worker that runs it later) to the upstream model
//! server, each span the child of the one before; spans name their region,
//! tenant and model; a request that arrives sampled out leaves no span.

use std::time::Duration;

use meridian_gateway::AuthConfig;
use meridian_mesh::{TraceConfig, Tracer};
use meridian_regional::serve_sim_traced;
use meridian_regional::tenancy::{self, TenantLimits};
use meridian_tests::{ClusterSandbox, OtlpCollector, ReceivedSpan, init_logging, instant_sim};
use serde_json::{Value, json};
use tokio::sync::oneshot;

const REGION: &str = "eu-west";
/// A model served by a pool whose one upstream is the simulator over HTTP,
/// so inference leaves the region as a real HTTP call.
const MODEL: &str = "upstream-chat";
/// How long spans may take to reach the collector; a failing test says
/// what arrived.
const ARRIVAL: Duration = Duration::from_secs(15);

/// The simulator as an OpenAI-compatible upstream that exports its spans.
struct Upstream {
    tracer: Tracer,
    base_url: String,
    _stop: oneshot::Sender<()>,
}

impl Upstream {
    async fn start(collector: &OtlpCollector) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        let tracer = Tracer::start(
            &TraceConfig::otlp(collector.endpoint()),
            "meridian-sim",
            vec![],
        )
        .unwrap();
        let config = instant_sim();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve_sim_traced(
            config,
            listener,
            async {
                let _ = stopped.await;
            },
            tracer.clone(),
        ));
        Self {
            tracer,
            base_url,
            _stop: stop,
        }
    }

    async fn flush(&self) {
        let tracer = self.tracer.clone();
        tokio::task::spawn_blocking(move || tracer.force_flush())
            .await
            .unwrap()
            .unwrap();
    }
}

/// One region serving [`MODEL`] from `upstream`, and a gateway; both trace
/// every new request to `collector`.
async fn cluster(
    collector: &OtlpCollector,
    upstream: &Upstream,
    with_auth: bool,
) -> ClusterSandbox {
    let endpoint = collector.endpoint();
    let region = format!(
        "[[models]]\nid = \"{MODEL}\"\n\
         backend = {{ kind = \"openai\", upstreams = [{{ base_url = \"{}\" }}] }}\n\
         [tracing]\notlp_endpoint = \"{endpoint}\"\nsample_ratio = 1.0\n",
        upstream.base_url
    );
    ClusterSandbox::start_configured(
        &[REGION],
        |_| region.clone(),
        |regions, config| {
            config.tracing = TraceConfig {
                sample_ratio: 1.0,
                ..TraceConfig::otlp(endpoint.clone())
            };
            if with_auth {
                config.auth = Some(AuthConfig {
                    reload_interval_ms: 50,
                    ..AuthConfig::new(regions[0].postgres.url())
                });
            }
        },
    )
    .await
}

fn traceparent(trace_id: &str, span_id: &str, sampled: bool) -> String {
    format!(
        "00-{trace_id}-{span_id}-{}",
        if sampled { "01" } else { "00" }
    )
}

/// The one span called `name` (panics, listing all, unless exactly one).
fn one<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one `{name}` span expected in {spans:#?}");
    found[0]
}

fn has(spans: &[ReceivedSpan], names: &[&str]) -> bool {
    names.iter().all(|n| spans.iter().any(|s| s.name == *n))
}

fn assert_child(child: &ReceivedSpan, parent: &ReceivedSpan) {
    assert_eq!(
        child.parent_span_id.as_deref(),
        Some(parent.span_id.as_str()),
        "`{}` should be a child of `{}`",
        child.name,
        parent.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_one_trace_from_the_gateway_through_its_worker_to_the_upstream() {
    init_logging();
    let collector = OtlpCollector::start().await;
    let upstream = Upstream::start(&collector).await;
    let sandbox = cluster(&collector, &upstream, true).await;
    let pool = tenancy::connect(&sandbox.regions[0].postgres.url())
        .await
        .unwrap();
    tenancy::create_tenant(&pool, "acme", TenantLimits::default())
        .await
        .unwrap();
    let key = tenancy::create_api_key(&pool, "acme").await.unwrap();
    let http = reqwest::Client::new();
    let gateway = sandbox.gateway_url();
    // Everything but the request under test says "not sampled": the
    // gateway and the region must follow the caller's decision, so these
    // leave no span (checked at the end).
    let quiet_trace = "5b8efff798038103d269b633813fc60c";
    let quiet = traceparent(quiet_trace, "eee19b7ec3c1b174", false);
    let get = |path: String| {
        http.get(format!("{gateway}{path}"))
            .bearer_auth(&key)
            .header("traceparent", &quiet)
    };
    // The gateway learns the new key at its next reload.
    let deadline = tokio::time::Instant::now() + ARRIVAL;
    while get("/v1/models".into()).send().await.unwrap().status() != 200 {
        assert!(tokio::time::Instant::now() < deadline, "key never accepted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The client starts the trace; Meridian continues it.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let res = http
        .post(format!("{gateway}/v1/jobs"))
        .bearer_auth(&key)
        .header("traceparent", traceparent(trace_id, client_span, true))
        .json(&json!({ "model": MODEL, "max_tokens": 4,
            "messages": [{ "role": "user", "content": "trace me" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202, "{:?}", res.text().await);
    let job: Value = res.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    loop {
        let job: Value = get(format!("/v1/jobs/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        match job["state"].as_str().unwrap() {
            "succeeded" => break,
            "queued" | "running" => tokio::time::sleep(Duration::from_millis(20)).await,
            other => panic!("job ended {other}: {job}"),
        }
    }

    let names = [
        "gateway.request",
        "region.request",
        "job.submit",
        "job.run",
        "upstream.chat",
        "sim.request",
    ];
    let spans = collector
        .wait_for(
            ARRIVAL,
            || async {
                sandbox.flush_traces().await;
                upstream.flush().await;
            },
            |spans| has(spans, &names),
        )
        .await;

    assert!(
        spans.iter().all(|s| s.trace_id == trace_id),
        "every span belongs to the client's trace: {spans:#?}"
    );
    assert!(!spans.iter().any(|s| s.trace_id == quiet_trace));
    let gateway = one(&spans, "gateway.request");
    let region = one(&spans, "region.request");
    let submit = one(&spans, "job.submit");
    let run = one(&spans, "job.run");
    let call = one(&spans, "upstream.chat");
    let sim = one(&spans, "sim.request");
    assert_eq!(gateway.parent_span_id.as_deref(), Some(client_span));
    assert_child(region, gateway);
    assert_child(submit, region);
    assert_child(run, submit);
    assert_child(call, run);
    assert_child(sim, call);

    assert_eq!(gateway.service, "meridian-gateway");
    assert_eq!(gateway.attr("meridian.tenant"), Some("acme"));
    assert_eq!(gateway.attr("meridian.region"), Some(REGION));
    assert_eq!(gateway.attr("http.response.status_code"), Some("202"));
    for span in [region, run, call] {
        assert_eq!(span.service, "meridian-regional", "{span:#?}");
        assert_eq!(
            span.resource.get("meridian.region").map(String::as_str),
            Some(REGION)
        );
        assert_eq!(span.attr("meridian.model"), Some(MODEL), "{span:#?}");
    }
    for span in [region, run] {
        assert_eq!(span.attr("meridian.region"), Some(REGION), "{span:#?}");
        assert_eq!(span.attr("meridian.tenant"), Some("acme"), "{span:#?}");
    }
    assert_eq!(run.attr("meridian.job.id"), Some(id.as_str()));
    assert_eq!(run.attr("meridian.job.outcome"), Some("succeeded"));
    assert_eq!(sim.service, "meridian-sim");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_completion_is_one_trace_from_the_gateway_to_the_upstream() {
    init_logging();
    let collector = OtlpCollector::start().await;
    let upstream = Upstream::start(&collector).await;
    let sandbox = cluster(&collector, &upstream, false).await;

    // No traceparent: the gateway starts the trace.
    let res = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", sandbox.gateway_url()))
        .json(&json!({ "model": MODEL, "max_tokens": 4,
            "messages": [{ "role": "user", "content": "trace me too" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{:?}", res.text().await);

    let names = [
        "gateway.request",
        "region.request",
        "upstream.chat",
        "sim.request",
    ];
    let spans = collector
        .wait_for(
            ARRIVAL,
            || async {
                sandbox.flush_traces().await;
                upstream.flush().await;
            },
            |spans| has(spans, &names),
        )
        .await;

    let gateway = one(&spans, "gateway.request");
    let region = one(&spans, "region.request");
    let call = one(&spans, "upstream.chat");
    let sim = one(&spans, "sim.request");
    assert!(gateway.parent_span_id.is_none(), "{gateway:#?}");
    assert!(
        spans.iter().all(|s| s.trace_id == gateway.trace_id),
        "one trace: {spans:#?}"
    );
    assert_child(region, gateway);
    assert_child(call, region);
    assert_child(sim, call);
    assert_eq!(gateway.attr("meridian.region"), Some(REGION));
    assert_eq!(gateway.attr("meridian.tenant"), Some("default"));
    assert_eq!(region.attr("meridian.region"), Some(REGION));
    assert_eq!(region.attr("meridian.tenant"), Some("default"));
    assert_eq!(region.attr("meridian.model"), Some(MODEL));
    assert_eq!(region.attr("meridian.cache"), Some("bypass"));
    assert_eq!(region.attr("http.response.status_code"), Some("200"));
    assert_eq!(call.attr("http.response.status_code"), Some("200"));
}
