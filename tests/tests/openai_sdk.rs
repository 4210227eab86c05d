//! The official OpenAI Python SDK works against the gateway unchanged: chat,
//! streaming with usage, model listing and retrieval, embeddings, and errors raised as the
//! SDK's own exception types. `infra/scripts/setup.sh` installs the SDK.

use meridian_tests::{ClusterSandbox, embedding_model_dir, init_logging, run_data_script};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_works_unchanged() {
    init_logging();
    let embeddings = format!("[embeddings]\nmodel_dir = {:?}\n", embedding_model_dir());
    let sandbox =
        ClusterSandbox::start_configured(&["eu-west"], |_| embeddings.clone(), |_, _| {}).await;
    let seen = run_data_script(
        "openai_sdk_check.py",
        vec![
            ("OPENAI_BASE_URL", format!("{}/v1", sandbox.gateway_url())),
            // The sandbox gateway runs without [auth]; the SDK insists on a key.
            ("OPENAI_API_KEY", "sk-unused".into()),
        ],
    )
    .await;
    eprintln!("openai sdk {}", seen["sdk_version"]);

    let chat = &seen["chat"];
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["model"], "sim-fast");
    assert!(!chat["content"].as_str().unwrap().is_empty());
    assert!(chat["total_tokens"].as_u64().unwrap() > 0);
    // Streaming with the same seed gives the same text, and the usage chunk.
    assert_eq!(seen["stream"]["text"], chat["content"]);
    assert_eq!(seen["stream"]["total_tokens"], chat["total_tokens"]);
    let models: Vec<&str> = seen["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert!(
        models.contains(&"sim-fast") && models.contains(&"all-minilm-l6-v2"),
        "{models:?}"
    );
    assert_eq!(seen["retrieved"], "sim-fast");
    assert_eq!(seen["retrieve_missing"], 404);
    assert_eq!(
        seen["required_keys"],
        serde_json::json!({"logprobs": true, "refusal": true}),
        "`choices[].logprobs` and `message.refusal` are present, null when empty"
    );
    assert_eq!(seen["embeddings"]["count"], 2);
    assert_eq!(seen["embeddings"]["dims"], 384);
    assert_eq!(seen["not_found"], 404);
    assert_eq!(seen["bad_request"], 400);
}
