//! Conversations, three regions each with its own Redis and PostgreSQL: a
//! client sends only its new message and the region prepends the stored
//! history (the simulator's prompt token count shows what the model got);
//! HTTP (header or `extra_body` field), SSE and gRPC share one history; a
//! cached answer is stored too; an id is its tenant's own (another
//! tenant's use of it is a separate conversation);
//! the turns replicate to equal digests; and when the home region dies (node
//! and PostgreSQL) the conversation continues through the gateway in another
//! region with every acknowledged turn.

use std::time::Duration;

use meridian_proto::v1::inference_client::InferenceClient;
use meridian_proto::v1::{ChatMessage, GenerateRequest};
use meridian_tests::replicated::{digest, rows, until};
use meridian_tests::{ClusterSandbox, RegionSandbox, TEST_MODEL, init_logging};
use serde_json::{Value, json};

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const CONVERGE: Duration = Duration::from_secs(20);
const CONVERSATION: &str = "x-meridian-conversation";
const TENANT: &str = "x-meridian-tenant";

/// Prompt tokens as Meridian counts them: words plus 4 per message.
fn tokens<'a>(contents: impl IntoIterator<Item = &'a str>) -> u64 {
    contents
        .into_iter()
        .map(|c| c.split_whitespace().count() as u64 + 4)
        .sum()
}

/// A chat body carrying only the new message.
fn turn(content: &str) -> Value {
    json!({ "model": TEST_MODEL, "max_tokens": 6,
            "messages": [{ "role": "user", "content": content }] })
}

/// The answer of a chat request: status, headers and body.
async fn chat(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = client.post(format!("{url}/v1/chat/completions")).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.expect("the request is answered");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.json().await.expect("a JSON body");
    (status, headers, body)
}

async fn transcript(url: &str, tenant: &str, id: &str) -> (u16, Value) {
    let res = reqwest::Client::new()
        .get(format!("{url}/v1/conversations/{id}"))
        .header(TENANT, tenant)
        .send()
        .await
        .expect("the region answers");
    (res.status().as_u16(), res.json().await.expect("JSON"))
}

fn contents(transcript: &Value) -> Vec<String> {
    transcript["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect()
}

/// Streams a chat turn over SSE; returns the text and the prompt tokens of
/// the usage chunk.
async fn stream_turn(url: &str, tenant: &str, id: &str, content: &str) -> (String, u64) {
    let mut body = turn(content);
    body["stream"] = json!(true);
    body["stream_options"] = json!({ "include_usage": true });
    let text = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .header(TENANT, tenant)
        .header(CONVERSATION, id)
        .json(&body)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut answer = String::new();
    let mut prompt_tokens = None;
    for event in text.split("\n\n") {
        let data = event.trim().strip_prefix("data: ").unwrap_or("");
        if data.is_empty() || data == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        assert!(chunk.get("error").is_none(), "stream failed: {chunk}");
        if let Some(d) = chunk["choices"][0]["delta"]["content"].as_str() {
            answer.push_str(d);
        }
        if let Some(p) = chunk["usage"]["prompt_tokens"].as_u64() {
            prompt_tokens = Some(p);
        }
    }
    (answer, prompt_tokens.expect("a usage chunk"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_turn_carries_the_history_and_the_turns_replicate() {
    init_logging();
    let cluster = ClusterSandbox::start_replicated(&REGIONS, "", |_, _| {}).await;
    let home = &cluster.regions[0];
    let url = home.url();
    let client = reqwest::Client::new();
    let id = "conv-history";
    let mut history: Vec<String> = Vec::new();

    // HTTP turns, alternately naming the conversation by header and by the
    // body field OpenAI's SDKs send through `extra_body`.
    for n in 1..=3 {
        let content = format!("question number {n} about the weather");
        let mut body = turn(&content);
        let headers: Vec<(&str, &str)> = if n % 2 == 1 {
            vec![(TENANT, "acme"), (CONVERSATION, id)]
        } else {
            body["conversation_id"] = json!(id);
            vec![(TENANT, "acme")]
        };
        let (status, _, answer) = chat(&client, &url, &headers, &body).await;
        assert_eq!(status, 200, "{answer}");
        history.push(content);
        let prompt = answer["usage"]["prompt_tokens"].as_u64().unwrap();
        assert_eq!(
            prompt,
            tokens(history.iter().map(String::as_str)),
            "turn {n}: the model saw the whole history"
        );
        history.push(
            answer["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }

    // A streamed turn is stored before the stream ends: the transcript read
    // right after it has the turn.
    let content = "and a streamed question";
    let (answer, prompt) = stream_turn(&url, "acme", id, content).await;
    history.push(content.to_string());
    assert_eq!(prompt, tokens(history.iter().map(String::as_str)));
    history.push(answer);
    let (status, stored) = transcript(&url, "acme", id).await;
    assert_eq!(status, 200, "{stored}");
    assert_eq!(contents(&stored), history);
    assert_eq!(stored["home_region"], home.name.as_str());

    // gRPC: the request's `conversation_id` continues the same history.
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = InferenceClient::new(channel);
    let content = "a question over grpc";
    let mut request = tonic::Request::new(GenerateRequest {
        model: TEST_MODEL.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: content.into(),
            ..Default::default()
        }],
        max_tokens: Some(6),
        conversation_id: id.into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert(TENANT, "acme".parse().unwrap());
    let response = grpc.generate(request).await.unwrap().into_inner();
    history.push(content.to_string());
    assert_eq!(
        u64::from(response.usage.unwrap().prompt_tokens),
        tokens(history.iter().map(String::as_str))
    );
    history.push(response.message.unwrap().content);

    // Every region ends with the same rows, and each peer shows the same
    // transcript with turns numbered 1.. in order.
    let expected = history.len() as i64;
    until(CONVERGE, "equal digests with every turn", || async {
        let first = digest(&cluster.regions[0]).await;
        if rows(&first, "conversation_messages") != expected {
            return false;
        }
        for r in &cluster.regions[1..] {
            if digest(r).await != first {
                return false;
            }
        }
        true
    })
    .await;
    assert_eq!(rows(&digest(home).await, "conversations"), 1);
    for r in &cluster.regions {
        let (status, stored) = transcript(&r.url(), "acme", id).await;
        assert_eq!(status, 200, "{}: {stored}", r.name);
        assert_eq!(contents(&stored), history, "{}", r.name);
        assert_eq!(stored["home_region"], home.name.as_str(), "{}", r.name);
        let turns: Vec<i64> = stored["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["turn"].as_i64().unwrap())
            .collect();
        assert_eq!(turns, (1..=expected).collect::<Vec<_>>(), "{}", r.name);
    }

    // Another tenant starting a conversation of the same id in another
    // region: both replicate side by side, neither replaces the other.
    let elsewhere = &cluster.regions[1];
    let (status, _, theirs) = chat(
        &client,
        &elsewhere.url(),
        &[(TENANT, "rival"), (CONVERSATION, id)],
        &turn("a rival question"),
    )
    .await;
    assert_eq!(status, 200, "{theirs}");
    until(
        CONVERGE,
        "both tenants' conversations everywhere",
        || async {
            let first = digest(&cluster.regions[0]).await;
            if rows(&first, "conversations") != 2 {
                return false;
            }
            for r in &cluster.regions[1..] {
                if digest(r).await != first {
                    return false;
                }
            }
            true
        },
    )
    .await;
    for r in &cluster.regions {
        let (_, stored) = transcript(&r.url(), "acme", id).await;
        assert_eq!(contents(&stored), history, "{}", r.name);
        assert_eq!(stored["home_region"], home.name.as_str(), "{}", r.name);
        let (_, rival) = transcript(&r.url(), "rival", id).await;
        assert_eq!(contents(&rival)[0], "a rival question", "{}", r.name);
        assert_eq!(rival["home_region"], elsewhere.name.as_str(), "{}", r.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_id_is_its_tenants_own_and_cached_answers_are_stored() {
    init_logging();
    let region = RegionSandbox::start("eu-west").await;
    let url = region.url();
    let client = reqwest::Client::new();
    // Deterministic, so the second conversation's identical first turn is
    // answered from the cache.
    let mut body = turn("hello there");
    body["temperature"] = json!(0);
    let (status, first, answer) = chat(
        &client,
        &url,
        &[(TENANT, "acme"), (CONVERSATION, "private-1")],
        &body,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(first["x-meridian-cache"], "miss");

    // Another tenant's use of the same id is a conversation of its own: it
    // neither joins nor reads acme's (no squatting, and nothing tells it
    // that acme uses the id), and acme's is untouched.
    let (status, _, theirs) = chat(
        &client,
        &url,
        &[(TENANT, "other"), (CONVERSATION, "private-1")],
        &turn("who else is here"),
    )
    .await;
    assert_eq!(status, 200, "{theirs}");
    let (status, read) = transcript(&url, "other", "private-1").await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(
        contents(&read),
        [
            "who else is here",
            theirs["choices"][0]["message"]["content"].as_str().unwrap()
        ]
    );
    let (status, _) = transcript(&url, "other", "never-used").await;
    assert_eq!(status, 404);
    let (status, mine) = transcript(&url, "acme", "private-1").await;
    assert_eq!(status, 200);
    assert_eq!(contents(&mine)[0], "hello there", "{mine}");
    assert_eq!(mine["messages"].as_array().unwrap().len(), 2, "{mine}");

    // A cache hit still stores the turn.
    let (status, second, hit) = chat(
        &client,
        &url,
        &[(TENANT, "acme"), (CONVERSATION, "private-2")],
        &body,
    )
    .await;
    assert_eq!(status, 200, "{hit}");
    assert!(
        second["x-meridian-cache"]
            .to_str()
            .unwrap()
            .starts_with("hit"),
        "{second:?}"
    );
    let (status, stored) = transcript(&url, "acme", "private-2").await;
    assert_eq!(status, 200);
    assert_eq!(
        contents(&stored),
        [
            "hello there",
            answer["choices"][0]["message"]["content"].as_str().unwrap()
        ]
    );

    // Header and body naming different conversations is refused.
    let mut both = turn("hi");
    both["conversation_id"] = json!("private-3");
    let (status, _, _) = chat(
        &client,
        &url,
        &[(TENANT, "acme"), (CONVERSATION, "private-1")],
        &both,
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_continues_in_another_region_after_its_home_dies() {
    init_logging();
    let mut cluster = ClusterSandbox::start_replicated(&REGIONS, "", |_, _| {}).await;
    let gateway = cluster.gateway_url();
    let client = reqwest::Client::new();
    let id = "conv-failover";
    let headers = [(CONVERSATION, id)];
    let mut history: Vec<String> = Vec::new();
    let mut home = None;
    const TURNS: usize = 4;
    for n in 1..=TURNS {
        let content = format!("turn {n} before the failure");
        let (status, h, answer) = chat(&client, &gateway, &headers, &turn(&content)).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(h["x-meridian-route"], "affinity");
        let region = h["x-meridian-region"].to_str().unwrap().to_string();
        assert_eq!(home.get_or_insert_with(|| region.clone()), &region);
        history.push(content);
        history.push(
            answer["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let home = home.unwrap();

    // Acknowledged turns reach the peers asynchronously: wait until both
    // have all of them, then kill the home region, node and database.
    for r in cluster.regions.iter().filter(|r| r.name != home) {
        let url = r.url();
        until(CONVERGE, &format!("{} has every turn", r.name), || async {
            let (status, stored) = transcript(&url, "default", id).await;
            status == 200 && contents(&stored) == history
        })
        .await;
    }
    let dead = cluster.region(&home);
    dead.kill_node();
    dead.postgres.kill();

    let content = "a turn after the failure";
    let (status, h, answer) = chat(&client, &gateway, &headers, &turn(content)).await;
    assert_eq!(status, 200, "{answer}");
    let served_by = h["x-meridian-region"].to_str().unwrap().to_string();
    assert_ne!(served_by, home);
    history.push(content.to_string());
    assert_eq!(
        answer["usage"]["prompt_tokens"].as_u64().unwrap(),
        tokens(history.iter().map(String::as_str)),
        "the new region sent the model the whole history"
    );
    history.push(
        answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    let url = cluster.region(&served_by).url();
    let (status, stored) = transcript(&url, "default", id).await;
    assert_eq!(status, 200, "{stored}");
    assert_eq!(contents(&stored), history);
    assert_eq!(stored["home_region"], home.as_str());
    let regions: Vec<&str> = stored["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["region"].as_str().unwrap())
        .collect();
    assert!(
        regions[..2 * TURNS].iter().all(|r| *r == home),
        "{regions:?}"
    );
    assert!(
        regions[2 * TURNS..].iter().all(|r| *r == served_by),
        "{regions:?}"
    );
}
