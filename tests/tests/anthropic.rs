//! Anthropic's Messages API on both sides of Meridian: the simulator speaks
//! it well enough for the official Anthropic SDK, and a model served by an
//! Anthropic-protocol pool answers the official OpenAI SDK through the
//! gateway (chat, streams, a parallel tool loop, images), refusing by name
//! what the protocol cannot carry.

use meridian_regional::SimProtocol;
use meridian_tests::{ClusterSandbox, SimServer, init_logging, instant_sim, run_data_script};

const MODEL: &str = "claude";
const KEY: &str = "sk-ant-test-0123456789";

/// A fast simulator speaking Anthropic; with `strict`, open only to
/// requests with the key and version headers Meridian sends. The SDK's
/// own (2.x sends a bearer token and a newer version) are not checked:
/// its test is of wire shapes.
async fn anthropic_sim(strict: bool) -> SimServer {
    let config = instant_sim();
    let required = if strict {
        vec![
            ("x-api-key".to_string(), KEY.to_string()),
            ("anthropic-version".to_string(), "2023-06-01".to_string()),
        ]
    } else {
        Vec::new()
    };
    SimServer::start_speaking(SimProtocol::Anthropic, config, required).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_anthropic_sdk_reads_the_simulators_messages_and_events() {
    init_logging();
    let sim = anthropic_sim(false).await;
    let seen = run_data_script(
        "anthropic_sdk.py",
        vec![
            ("ANTHROPIC_BASE_URL", format!("http://{}", sim.addr())),
            ("ANTHROPIC_API_KEY", KEY.to_string()),
        ],
    )
    .await;
    let plain = &seen["plain"];
    assert_eq!(plain["type"], "text");
    assert_eq!(plain["has_text"], true);
    assert!(plain["input_tokens"].as_u64().unwrap() > 0, "{plain}");
    assert!(plain["output_tokens"].as_u64().unwrap() > 0, "{plain}");
    assert_eq!(seen["stream"]["same_as_plain"], true);
    assert_eq!(seen["stream"]["stop_reason"], plain["stop_reason"]);
    assert_eq!(seen["stream"]["output_tokens"], plain["output_tokens"]);
    let tools = &seen["tools"];
    assert_eq!(tools["stop_reason"], "tool_use");
    assert_eq!(tools["names"], serde_json::json!(["get_weather"]));
    assert_eq!(tools["streamed_stop_reason"], "tool_use");
    assert_eq!(tools["streamed_same"], true);
    assert_eq!(tools["answer_stop_reason"], "end_turn");
    assert_eq!(tools["answer_types"], serde_json::json!(["text"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_reaches_an_anthropic_upstream_through_the_gateway() {
    init_logging();
    let sim = anthropic_sim(true).await;
    let model = format!(
        "[[models]]\nid = \"{MODEL}\"\n\
         backend = {{ kind = \"anthropic\", upstream_model = \"claude-sim\", \
         default_max_tokens = 64, upstreams = [{{ base_url = \"{}\", api_key = \"{KEY}\" }}] }}\n",
        sim.base_url()
    );
    let sandbox =
        ClusterSandbox::start_configured(&["eu-west"], |_| model.clone(), |_, _| {}).await;
    let seen = run_data_script(
        "openai_sdk_anthropic.py",
        vec![
            ("OPENAI_BASE_URL", format!("{}/v1", sandbox.gateway_url())),
            ("OPENAI_API_KEY", "sk-unused".to_string()),
            ("MODEL", MODEL.to_string()),
        ],
    )
    .await;
    let chat = &seen["chat"];
    assert_eq!(chat["has_text"], true);
    assert!(chat["prompt_tokens"].as_u64().unwrap() > 0, "{chat}");
    assert_eq!(chat["stream_same"], true);
    assert_eq!(chat["stream_finish"], chat["finish_reason"]);
    assert_eq!(chat["stream_usage"], chat["completion_tokens"]);
    let both = serde_json::json!(["get_weather", "get_time"]);
    let tools = &seen["tools"];
    assert_eq!(tools["finish_reason"], "tool_calls");
    assert_eq!(tools["names"], both, "parallel calls of both tools");
    assert_eq!(tools["stream_names"], both);
    assert_eq!(tools["stream_arguments_same"], true);
    assert_eq!(tools["answer_finish"], "stop");
    assert_eq!(tools["answer_has_text"], true);
    assert_eq!(seen["image"]["has_text"], true);
    // The upstream got both images as Anthropic image blocks.
    let images = format!("http://{}/metrics", sim.addr());
    let base64 = meridian_tests::metric(&images, "meridian_sim_image_blocks_total", &["base64"]);
    let url = meridian_tests::metric(&images, "meridian_sim_image_blocks_total", &["\"url\""]);
    assert_eq!((base64.await, url.await), (1.0, 1.0));
    let refused = &seen["refused"];
    assert_eq!(refused["status"], 400, "{seen}");
    let message = refused["message"].as_str().unwrap();
    assert!(message.contains("`logprobs`"), "{message}");
    assert!(message.contains("Anthropic Messages API"), "{message}");
}
