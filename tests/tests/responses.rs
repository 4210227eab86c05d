//! The Responses API (`/v1/responses`) through the gateway: the official
//! OpenAI Python SDK unchanged (plain, streamed with its event parser, a
//! function-tool round trip, structured output, a chain by
//! `previous_response_id`, input items, retrieval, deletion), the errors
//! around stored responses, tenant isolation, and a chain that continues in
//! another region after the first is killed.

use meridian_tests::{ClusterSandbox, init_logging, run_data_script};
use serde_json::{Value, json};

const MODEL: &str = "sim-fast";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdk_creates_streams_chains_and_deletes_responses() {
    init_logging();
    let sandbox =
        ClusterSandbox::start_configured(&["eu-west"], |_| String::new(), |_, _| {}).await;
    let seen = run_data_script(
        "openai_sdk_responses.py",
        vec![
            ("OPENAI_BASE_URL", format!("{}/v1", sandbox.gateway_url())),
            ("OPENAI_API_KEY", "sk-unused".into()),
            ("MODEL", MODEL.into()),
        ],
    )
    .await;
    let yes = Value::Bool(true);

    let plain = &seen["plain"];
    assert_eq!(plain["status"], "completed", "{plain}");
    assert_eq!(plain["object"], "response");
    assert_eq!(plain["id_prefix_ok"], yes);
    assert_eq!(plain["output_text_nonempty"], yes);
    assert_eq!(plain["output_types"], json!(["message"]));
    assert_eq!(plain["usage_ok"], yes);
    assert_eq!(plain["instructions"], "Be brief.");
    assert_eq!(plain["store"], yes);

    let streamed = &seen["streamed"];
    assert_eq!(
        streamed["types"],
        json!([
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]),
        "{streamed}"
    );
    for key in [
        "sequence_ok",
        "text_nonempty",
        "text_matches",
        "id_prefix_ok",
        "one_id",
        "helper_text_matches",
    ] {
        assert_eq!(streamed[key], yes, "streamed {key}: {streamed}");
    }
    assert_eq!(streamed["status"], "completed");
    assert_eq!(streamed["helper_status"], "completed");

    let tools = &seen["tools"];
    assert_eq!(tools["output_types"], json!(["function_call"]), "{tools}");
    assert_eq!(tools["names"], json!(["get_weather"]));
    assert_eq!(tools["arguments_valid"], yes);
    assert_eq!(tools["call_ids_nonempty"], yes);
    // The results were paired with the calls found by previous_response_id:
    // the simulator answers a tool result in text.
    assert_eq!(
        tools["answer"]["output_types"],
        json!(["message"]),
        "{tools}"
    );
    assert_eq!(tools["answer"]["output_text_nonempty"], yes);
    assert_eq!(tools["answer"]["previous_response_id_ok"], yes);

    let streamed_tools = &seen["streamed_tools"];
    for kind in [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ] {
        assert!(
            streamed_tools["types"]
                .as_array()
                .is_some_and(|t| t.contains(&json!(kind))),
            "{kind} in {streamed_tools}"
        );
    }
    for key in [
        "sequence_ok",
        "deltas_match",
        "done_match",
        "arguments_valid",
    ] {
        assert_eq!(
            streamed_tools[key], yes,
            "streamed tools {key}: {streamed_tools}"
        );
    }

    let structured = &seen["structured"];
    assert_eq!(structured["valid"], yes, "{structured}");
    assert_eq!(structured["parsed_ok"], yes, "{structured}");

    let chain = &seen["chain"];
    for key in [
        "ids_distinct",
        "r2_previous_ok",
        "r3_previous_ok",
        "output_text_nonempty",
        "asc_is_reversed_desc",
    ] {
        assert_eq!(chain[key], yes, "chain {key}: {chain}");
    }
    // The whole context of the third turn: three questions and the two
    // answers before it, newest first.
    assert_eq!(
        chain["input_items"],
        json!([
            ["message", "user"],
            ["message", "assistant"],
            ["message", "user"],
            ["message", "assistant"],
            ["message", "user"]
        ]),
        "{chain}"
    );
    assert_eq!(chain["has_more"], Value::Bool(false));
    assert_eq!(chain["desc_first_text"], "And again?");
    assert_eq!(chain["asc_first_text"], "My name is Ada.");

    let retrieve = &seen["retrieve"];
    assert_eq!(retrieve["id_matches"], yes, "{retrieve}");
    assert_eq!(retrieve["status"], "completed");
    assert_eq!(retrieve["output_text_matches"], yes);

    let delete = &seen["delete"];
    assert_eq!(delete["status_code"], 200, "{delete}");
    assert_eq!(delete["body"]["deleted"], yes);
    for key in ["retrieve_after_delete", "delete_again"] {
        assert_eq!(delete[key]["exception"], "NotFoundError", "{key}: {delete}");
        assert_eq!(delete[key]["status_code"], 404);
    }
    assert_eq!(
        delete["continue_after_delete"]["status_code"], 404,
        "{delete}"
    );
    assert_eq!(
        delete["continue_after_delete"]["param"],
        "previous_response_id"
    );

    let not_stored = &seen["not_stored"];
    assert_eq!(not_stored["store"], Value::Bool(false), "{not_stored}");
    assert_eq!(not_stored["retrieve"]["status_code"], 404);
    assert_eq!(not_stored["continue"]["status_code"], 404);

    let unknown = &seen["unknown_previous"];
    assert_eq!(unknown["exception"], "NotFoundError", "{unknown}");
    assert_eq!(unknown["param"], "previous_response_id");
}
