//! `/v1/moderations`: answered by an upstream that offers it (a model with
//! `task = "moderations"`, here the simulator's deterministic moderations),
//! through the gateway and with the official OpenAI SDK; a region without a
//! moderation model answers 404 naming the configuration it lacks, and
//! what is not a moderation request is refused by name.

use meridian_tests::{
    ClusterSandbox, RegionSandbox, SimServer, TEST_MODEL, init_logging, instant_sim,
    run_data_script,
};
use serde_json::{Value, json};

/// Two moderation models served by `upstream`: OpenAI's default name, and
/// a second one a client must name.
fn models(upstream: &SimServer) -> String {
    let base_url = upstream.base_url();
    ["omni-moderation-latest", "text-moderation-stable"]
        .map(|id| {
            format!(
                "[[models]]\nid = \"{id}\"\ntask = \"moderations\"\n\
                 backend = {{ kind = \"openai\", upstreams = [{{ base_url = \"{base_url}\" }}] }}\n"
            )
        })
        .concat()
}

async fn moderate(url: &str, body: &Value) -> (u16, Value) {
    let res = reqwest::Client::new()
        .post(format!("{url}/v1/moderations"))
        .json(body)
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdk_moderates_through_the_gateway() {
    init_logging();
    let upstream = SimServer::start(instant_sim()).await;
    let config = models(&upstream);
    let sandbox =
        ClusterSandbox::start_configured(&["eu-west"], |_| config.clone(), |_, _| {}).await;
    let seen = run_data_script(
        "openai_sdk_moderations.py",
        vec![
            ("OPENAI_BASE_URL", format!("{}/v1", sandbox.gateway_url())),
            ("OPENAI_API_KEY", "sk-unused".into()),
        ],
    )
    .await;
    assert_eq!(seen["model"], "omni-moderation-latest", "OpenAI's default");
    assert!(seen["id"].as_str().unwrap().starts_with("modr-"), "{seen}");
    assert_eq!(seen["flagged"], true);
    assert_eq!(seen["violence"], true);
    assert!(seen["violence_score"].as_f64().unwrap() > 0.5, "{seen}");
    assert_eq!(seen["many"], json!([false, true]));
    assert_eq!(seen["harassment"], true);
    assert_eq!(seen["applied_violence"], json!(["text", "image"]));
    assert_eq!(seen["applied_hate"], json!(["text"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_model_answers_under_its_name_and_bad_requests_are_named() {
    init_logging();
    let upstream = SimServer::start(instant_sim()).await;
    let region = RegionSandbox::start_with_config("mod-eu", &models(&upstream)).await;
    let url = region.url();

    let (status, body) = moderate(
        &url,
        &json!({"model": "text-moderation-stable", "input": "a calm sentence"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "text-moderation-stable");
    assert_eq!(body["results"][0]["flagged"], false);

    for (request, status, named) in [
        (json!({"model": "nope", "input": "x"}), 404, "nope"),
        (
            json!({"model": TEST_MODEL, "input": "x"}),
            400,
            "serves chat completions",
        ),
        (
            json!({"model": 5, "input": "x"}),
            400,
            "`model` must be a string",
        ),
        (json!({"model": ""}), 400, "`model` must not be empty"),
        (json!({}), 400, "`input` is required"),
        (json!({"input": []}), 400, "empty array"),
        (json!({"input": [{"type": "audio"}]}), 400, "`input[0]`"),
    ] {
        let (got, body) = moderate(&url, &request).await;
        assert_eq!(got, status, "{request}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(named), "{request}: {message}");
    }
    // A refused request is not a failed region: it goes on serving.
    let (status, _) = moderate(&url, &json!({"input": "still here"})).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_without_a_moderation_model_says_which_configuration_it_lacks() {
    init_logging();
    let sandbox = ClusterSandbox::start(&["eu-west"]).await;
    let (status, body) = moderate(&sandbox.gateway_url(), &json!({"input": "hello"})).await;
    assert_eq!(status, 404, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("no moderation model") && message.contains("task = \"moderations\""),
        "{message}"
    );
    assert_eq!(body["error"]["type"], "not_found_error", "{body}");
}
