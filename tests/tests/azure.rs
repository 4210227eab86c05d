//! A model served by Azure OpenAI: the OpenAI protocol at Azure's
//! deployment paths, with its `api-key` header and `api-version`.

use meridian_tests::{AZURE_API_VERSION, AzureUpstream, ClusterSandbox, init_logging};
use serde_json::{Value, json};

const KEY: &str = "azure-key-0123456789abcdef";

async fn chat(url: &str) -> (u16, Value) {
    let res = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

fn config(base_url: &str, key: &str) -> String {
    format!(
        "[[models]]\nid = \"gpt\"\n\
         backend = {{ kind = \"azure\", api_version = \"{AZURE_API_VERSION}\", \
         upstream_model = \"gpt-4o-prod\", retries = 0, \
         upstreams = [{{ base_url = \"{base_url}\", api_key = \"{key}\" }}] }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azure_deployment_answers_with_its_key_and_refuses_another() {
    init_logging();
    let azure = AzureUpstream::start(KEY, "gpt-4o-prod").await;
    let good = config(&azure.base_url(), KEY);
    let sandbox = ClusterSandbox::start_configured(&["eu-west"], |_| good.clone(), |_, _| {}).await;
    let (status, answer) = chat(&sandbox.gateway_url()).await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );
    drop(sandbox);

    let wrong = config(&azure.base_url(), "not-the-key");
    let sandbox =
        ClusterSandbox::start_configured(&["eu-west"], |_| wrong.clone(), |_, _| {}).await;
    let (status, error) = chat(&sandbox.gateway_url()).await;
    assert_eq!(status, 502, "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains(&azure.base_url()), "{message}");
    assert!(message.contains("Access denied"), "{message}");
}
