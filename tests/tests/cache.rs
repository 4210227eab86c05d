//! The response cache against real Redis and real upstreams: L1 and L2
//! hits, canonical keys, single-flight, tenant isolation, Redis outages,
//! purges, and the semantic cache measured on hand-labelled pairs.

use meridian_proto::v1::admin_client::AdminClient;
use meridian_proto::v1::inference_client::InferenceClient;
use meridian_proto::v1::{
    CacheResult, ChatMessage, GenerateRequest, PurgeCacheRequest, RegionStatusRequest,
};
use meridian_regional::{DEFAULT_SEMANTIC_THRESHOLD, SimConfig, semantic_questions_compatible};
use meridian_tests::{RegionSandbox, SimServer, embedding_model_dir, init_logging};
use serde_json::{Value, json};

/// The pooled model every test here asks for.
const MODEL: &str = "pooled";
/// What the simulator counts once per generation it runs.
const GENERATIONS: &str = "meridian_sim_time_to_first_token_seconds_count";

fn sim(ttft_ms: u64) -> SimConfig {
    SimConfig {
        prefill_us_per_token: 0,
        ttft_ms,
        per_token_ms: 0,
        ..SimConfig::default()
    }
}

/// A region whose model `pooled` is served by `upstream`, plus `extra` TOML.
async fn region(name: &str, upstream: &SimServer, extra: &str) -> RegionSandbox {
    let model = format!(
        "[[models]]\nid = \"{MODEL}\"\n\
         backend = {{ kind = \"openai\", upstreams = [{{ base_url = \"{}\" }}] }}\n",
        upstream.base_url()
    );
    RegionSandbox::start_with_config(name, &format!("{model}{extra}")).await
}

fn embeddings() -> String {
    format!(
        "[embeddings]\nmodel_dir = {:?}\nmax_wait_ms = 1\n",
        embedding_model_dir()
    )
}

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn question(content: &str) -> Value {
    json!({ "model": MODEL, "temperature": 0, "max_tokens": 12,
        "messages": [{ "role": "system", "content": "Answer briefly." },
                     { "role": "user", "content": content }] })
}

/// Sends a chat request; returns the answer text and `x-meridian-cache`.
async fn ask(
    client: &reqwest::Client,
    url: &str,
    tenant: &str,
    body: String,
    headers: &[(&str, &str)],
) -> (String, String) {
    let mut req = client
        .post(format!("{url}/v1/chat/completions"))
        .header("x-meridian-tenant", tenant)
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let cache = res.headers()["x-meridian-cache"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = res.json().await.unwrap();
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    (text, cache)
}

async fn ask_json(
    client: &reqwest::Client,
    url: &str,
    tenant: &str,
    body: &Value,
) -> (String, String) {
    ask(client, url, tenant, body.to_string(), &[]).await
}

async fn region_status(url: &str) -> meridian_proto::v1::RegionStatusResponse {
    AdminClient::connect(url.to_string())
        .await
        .unwrap()
        .region_status(RegionStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_cache_layers_keys_directives_and_purge() {
    init_logging();
    let client = http();
    let upstream = SimServer::start(sim(0)).await;
    let mut region = region("cache-exact", &upstream, "").await;
    let url = region.url();
    let q = question("What is an edge region?");

    let (first, c) = ask_json(&client, &url, "acme", &q).await;
    assert_eq!(c, "miss");
    let (again, c) = ask_json(&client, &url, "acme", &q).await;
    assert_eq!((again.as_str(), c.as_str()), (first.as_str(), "hit-l1"));
    // Key order and whitespace do not matter.
    let reordered = r#"{ "messages" : [ {"content":"Answer briefly.","role":"system"},
        {"content": "What is an edge region?", "role": "user"} ],
        "max_tokens": 12, "temperature": 0.0,   "model": "pooled" }"#;
    let (text, c) = ask(&client, &url, "acme", reordered.into(), &[]).await;
    assert_eq!((text.as_str(), c.as_str()), (first.as_str(), "hit-l1"));
    // What changes the answer changes the key.
    let mut longer = q.clone();
    longer["max_tokens"] = json!(13);
    assert_eq!(ask_json(&client, &url, "acme", &longer).await.1, "miss");
    // Another tenant never sees acme's entry.
    assert_eq!(ask_json(&client, &url, "globex", &q).await.1, "miss");
    assert_eq!(ask_json(&client, &url, "globex", &q).await.1, "hit-l1");
    assert_eq!(upstream.metric(GENERATIONS).await, 3.0);

    // Sampling without a seed is not cached unless the client opts in.
    let mut sampled = q.clone();
    sampled["temperature"] = json!(0.7);
    assert_eq!(ask_json(&client, &url, "acme", &sampled).await.1, "bypass");
    assert_eq!(ask_json(&client, &url, "acme", &sampled).await.1, "bypass");
    let opt_in = [("x-meridian-cache", "allow")];
    assert_eq!(
        ask(&client, &url, "acme", sampled.to_string(), &opt_in)
            .await
            .1,
        "miss"
    );
    assert_eq!(
        ask(&client, &url, "acme", sampled.to_string(), &opt_in)
            .await
            .1,
        "hit-l1"
    );
    // no-store skips the cache; no-cache refreshes the entry.
    let no_store = [("cache-control", "no-store")];
    assert_eq!(
        ask(&client, &url, "acme", q.to_string(), &no_store).await.1,
        "bypass"
    );
    let no_cache = [("cache-control", "no-cache")];
    assert_eq!(
        ask(&client, &url, "acme", q.to_string(), &no_cache).await.1,
        "miss"
    );
    // Three misses above, two bypasses, the opted-in miss, no-store, no-cache.
    assert_eq!(upstream.metric(GENERATIONS).await, 8.0);

    // A streamed request is served from the cache as a stream.
    let mut streamed = q.clone();
    streamed["stream"] = json!(true);
    let res = client
        .post(format!("{url}/v1/chat/completions"))
        .header("x-meridian-tenant", "acme")
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-meridian-cache"], "hit-l1");
    let sse = res.text().await.unwrap();
    let replayed: String = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(replayed, first);
    assert!(sse.trim_end().ends_with("data: [DONE]"));

    // gRPC shares the entry: same question, same key.
    let mut grpc = InferenceClient::connect(url.clone()).await.unwrap();
    let mut request = tonic::Request::new(GenerateRequest {
        model: MODEL.into(),
        messages: vec![
            ChatMessage {
                role: "system".into(),
                content: "Answer briefly.".into(),
                ..Default::default()
            },
            ChatMessage {
                role: "user".into(),
                content: "What is an edge region?".into(),
                ..Default::default()
            },
        ],
        max_tokens: Some(12),
        temperature: Some(0.0),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-meridian-tenant", "acme".parse().unwrap());
    let answer = grpc.generate(request).await.unwrap().into_inner();
    assert_eq!(answer.cache(), CacheResult::HitL1);
    assert_eq!(answer.message.unwrap().content, first);

    // A restarted node has an empty L1; Redis (L2) still has the answer.
    region.stop_node().await;
    region.start_node().await;
    let (text, c) = ask_json(&client, &url, "acme", &q).await;
    assert_eq!((text.as_str(), c.as_str()), (first.as_str(), "hit-l2"));
    assert_eq!(ask_json(&client, &url, "acme", &q).await.1, "hit-l1");

    // Purging acme empties both layers for acme only.
    let res = client
        .delete(format!("{url}/admin/cache/acme"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let purged: Value = res.json().await.unwrap();
    assert!(purged["removed_entries"].as_u64().unwrap() >= 3, "{purged}");
    assert_eq!(ask_json(&client, &url, "acme", &q).await.1, "miss");
    assert_eq!(ask_json(&client, &url, "globex", &q).await.1, "hit-l2");

    let status = region_status(&url).await;
    let acme = status
        .cache_tenants
        .iter()
        .find(|t| t.tenant == "acme")
        .expect("acme's cache stats");
    // Since the restart: hit-l2, hit-l1, then the miss after the purge.
    assert_eq!((acme.hits_l1, acme.hits_l2, acme.misses), (1, 1, 1));
    assert!((acme.hit_ratio - 2.0 / 3.0).abs() < 1e-9);
    let bad = AdminClient::connect(url.clone())
        .await
        .unwrap()
        .purge_cache(PurgeCacheRequest {
            tenant: "not a tenant".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_identical_concurrent_misses_make_one_upstream_call() {
    init_logging();
    let client = http();
    // Slow enough that all fifty arrive while the first is generating.
    let upstream = SimServer::start(sim(300)).await;
    let region = region("cache-flight", &upstream, "").await;
    let url = region.url();
    let q = question("Tell me about single flight.");
    let asks = (0..50).map(|_| {
        let (client, url, q) = (client.clone(), url.clone(), q.clone());
        tokio::spawn(async move { ask_json(&client, &url, "acme", &q).await })
    });
    let answers: Vec<_> = futures::future::join_all(asks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(upstream.metric(GENERATIONS).await, 1.0);
    assert!(answers.iter().all(|(text, _)| *text == answers[0].0));
    let misses = answers.iter().filter(|(_, c)| c == "miss").count();
    let hits = answers.iter().filter(|(_, c)| c == "hit-l1").count();
    assert_eq!(misses + hits, 50, "{answers:?}");
    let metrics = format!("{url}/metrics");
    let coalesced = meridian_tests::metric(&metrics, "meridian_cache_coalesced_total", &[]).await;
    assert_eq!(
        coalesced as usize + 1,
        misses,
        "every miss but one waited for another"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_turns_the_cache_into_misses_not_errors() {
    init_logging();
    let client = http();
    let upstream = SimServer::start(sim(0)).await;
    let mut region = region(
        "cache-outage",
        &upstream,
        "[cache]\nredis_timeout_ms = 100\n",
    )
    .await;
    let url = region.url();
    let (a, b) = (question("first question"), question("second question"));
    assert_eq!(ask_json(&client, &url, "acme", &a).await.1, "miss");

    region.redis.kill();
    // L1 still answers; a new question is a miss that still succeeds.
    assert_eq!(ask_json(&client, &url, "acme", &a).await.1, "hit-l1");
    assert_eq!(ask_json(&client, &url, "acme", &b).await.1, "miss");
    assert_eq!(ask_json(&client, &url, "acme", &b).await.1, "hit-l1");
    let metrics = format!("{url}/metrics");
    assert!(
        meridian_tests::metric(&metrics, "meridian_cache_redis_errors_total", &[]).await >= 2.0
    );

    // Once Redis is back, misses are stored there again (the connection
    // manager reconnects on its own; until then a miss is just not stored),
    // and a restarted node finds them in L2.
    region.redis.restart().await.unwrap();
    let mut conn = redis::Client::open(region.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut resumed = None;
    for i in 0..100 {
        let q = question(&format!("question {i} after the outage"));
        assert_eq!(ask_json(&client, &url, "acme", &q).await.1, "miss");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("meridian:cache:v1:acme:x:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            resumed = Some(q);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let q = resumed.expect("the cache never wrote to Redis again");
    region.stop_node().await;
    region.start_node().await;
    assert_eq!(ask_json(&client, &url, "acme", &q).await.1, "hit-l2");
}

/// Embeds every text through the region's `/v1/embeddings`.
async fn embed_all(client: &reqwest::Client, url: &str, texts: &[String]) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(64) {
        let res: Value = client
            .post(format!("{url}/v1/embeddings"))
            .json(&json!({ "model": "all-minilm-l6-v2", "input": chunk }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for item in res["data"].as_array().expect("embeddings") {
            out.push(
                item["embedding"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect(),
            );
        }
    }
    out
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

struct Pair {
    a: String,
    b: String,
    paraphrase: bool,
}

fn labelled_pairs() -> Vec<Pair> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/semantic_pairs.jsonl");
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            Pair {
                a: v["a"].as_str().unwrap().into(),
                b: v["b"].as_str().unwrap().into(),
                paraphrase: v["paraphrase"].as_bool().unwrap(),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_semantic_cache_keeps_precision_on_labelled_pairs() {
    init_logging();
    let client = http();
    let upstream = SimServer::start(sim(0)).await;
    let region = region("cache-pairs", &upstream, &embeddings()).await;
    let url = region.url();
    let pairs = labelled_pairs();
    assert!(pairs.len() >= 200);

    // The cache itself decides: each pair in a tenant of its own, the first
    // question asked (a miss that stores it), then the second.
    let mut decided = Vec::with_capacity(pairs.len());
    for (i, p) in pairs.iter().enumerate() {
        let tenant = format!("pair-{i}");
        assert_eq!(
            ask_json(&client, &url, &tenant, &question(&p.a)).await.1,
            "miss"
        );
        let (_, c) = ask_json(&client, &url, &tenant, &question(&p.b)).await;
        decided.push((c == "hit-semantic", p.paraphrase));
    }
    let tp = decided.iter().filter(|(hit, p)| *hit && *p).count() as f64;
    let fp = decided.iter().filter(|(hit, p)| *hit && !*p).count() as f64;
    let positives = decided.iter().filter(|(_, p)| *p).count() as f64;
    let (precision, recall) = (tp / (tp + fp), tp / positives);
    println!(
        "semantic cache at the default threshold {DEFAULT_SEMANTIC_THRESHOLD}: \
         precision {precision:.3}, recall {recall:.3} on {} pairs",
        pairs.len()
    );
    assert!(precision >= 0.95, "precision {precision:.3}");
    // A cache that never hits would be precise and useless.
    assert!(recall >= 0.2, "recall {recall:.3}");

    // The same decision at other thresholds, for tuning: similarity from
    // the region's model, then the cache's lexical checks.
    let texts: Vec<String> = pairs
        .iter()
        .flat_map(|p| [p.a.clone(), p.b.clone()])
        .collect();
    let vectors = embed_all(&client, &url, &texts).await;
    println!("threshold  precision  recall  (cosine only: precision)");
    for t in [0.80, 0.85, 0.88, 0.90, 0.91, 0.92, 0.93, 0.94, 0.95] {
        let sweep = |guarded: bool| {
            let scored: Vec<(bool, bool)> = pairs
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let s = cosine(&vectors[2 * i], &vectors[2 * i + 1]);
                    let ok = !guarded || semantic_questions_compatible(&p.a, &p.b);
                    (s >= t && ok, p.paraphrase)
                })
                .collect();
            let tp = scored.iter().filter(|(h, p)| *h && *p).count() as f64;
            let fp = scored.iter().filter(|(h, p)| *h && !*p).count() as f64;
            (tp / (tp + fp).max(1.0), tp / positives)
        };
        let ((p, r), (raw, _)) = (sweep(true), sweep(false));
        println!("{t:9.2}  {p:9.3}  {r:6.3}  {raw:.3}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semantic_hits_serve_paraphrases_within_a_tenant_across_nodes() {
    init_logging();
    let client = http();
    let upstream = SimServer::start(sim(0)).await;
    let mut region = region("cache-semantic", &upstream, &embeddings()).await;
    let url = region.url();
    let asked = question("How do I reverse a list in Python?");
    let paraphrase = question("How can I reverse a list in Python?");
    let near_miss = question("How do I reverse a list in JavaScript?");

    let (answer, c) = ask_json(&client, &url, "acme", &asked).await;
    assert_eq!(c, "miss");
    let (text, c) = ask_json(&client, &url, "acme", &paraphrase).await;
    assert_eq!(
        (text.as_str(), c.as_str()),
        (answer.as_str(), "hit-semantic")
    );
    assert_eq!(ask_json(&client, &url, "acme", &near_miss).await.1, "miss");
    // Another tenant's paraphrase never gets acme's answer.
    assert_eq!(
        ask_json(&client, &url, "globex", &paraphrase).await.1,
        "miss"
    );
    // Another system prompt is another conversation.
    let mut other_context = paraphrase.clone();
    other_context["messages"][0]["content"] = json!("Answer at length.");
    assert_eq!(
        ask_json(&client, &url, "acme", &other_context).await.1,
        "miss"
    );

    // A node that starts later loads the region's entries from Redis: the
    // four stored so far (the paraphrase was a hit and stored nothing).
    let mut second = region.start_extra_node().await;
    let second_url = second.url();
    wait_for_entries(&second_url, 4).await;
    let reworded = question("What is the way to reverse a list in Python?");
    let (text, c) = ask_json(&client, &second_url, "acme", &reworded).await;
    assert_eq!(
        (text.as_str(), c.as_str()),
        (answer.as_str(), "hit-semantic")
    );
    // An entry stored by one node reaches the other's index.
    let fresh = question("How do I sort a dictionary by value in Python?");
    let (sorted, c) = ask_json(&client, &second_url, "acme", &fresh).await;
    assert_eq!(c, "miss");
    wait_for_entries(&url, 5).await;
    let fresh_paraphrase = question("How can I sort a dictionary by value in Python?");
    let (text, c) = ask_json(&client, &url, "acme", &fresh_paraphrase).await;
    assert_eq!(
        (text.as_str(), c.as_str()),
        (sorted.as_str(), "hit-semantic")
    );

    // A purge reaches the other node's index too: globex's entry is left.
    let res = client
        .delete(format!("{url}/admin/cache/acme"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    wait_for_entries(&second_url, 1).await;
    let probe = question("How would I reverse a list in Python?");
    assert_eq!(
        ask_json(&client, &second_url, "acme", &probe).await.1,
        "miss"
    );
    second.stop().await;
    region.stop_node().await;
}

/// Waits until the node at `url` holds `n` semantic entries (its index
/// follows the region's Redis stream every 100 ms).
async fn wait_for_entries(url: &str, n: u64) {
    let metrics = format!("{url}/metrics");
    for _ in 0..200 {
        let have = meridian_tests::metric(&metrics, "meridian_cache_semantic_entries", &[]).await;
        if have as u64 == n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("{url} never held {n} semantic entries");
}
