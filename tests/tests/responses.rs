//! The Responses API (`/v1/responses`) through the gateway: the official
//! OpenAI Python SDK unchanged (plain, streamed with its event parser, a
//! function-tool round trip, structured output, a chain by
//! `previous_response_id`, input items, retrieval, deletion), the errors
//! around stored responses, tenant isolation, and a chain that continues in
//! another region after the first is killed.

use meridian_tests::{ClusterSandbox, TEST_SLOW_MODEL, init_logging, run_data_script};
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
            ("SLOW_MODEL", TEST_SLOW_MODEL.into()),
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

    let conversations = &seen["conversations"];
    assert_eq!(conversations["id_prefix_ok"], yes, "{conversations}");
    assert_eq!(conversations["object"], "conversation");
    assert_eq!(conversations["metadata"], json!({"topic": "trip"}));
    assert_eq!(conversations["response_conversation"], json!([true, true]));
    // The second response was given the first one's exchange.
    assert_eq!(conversations["second_input_tokens_larger"], yes);
    assert_eq!(
        conversations["items"],
        json!([
            ["message", "user"],
            ["message", "assistant"],
            ["message", "user"],
            ["message", "assistant"]
        ]),
        "both responses' input and output, in order: {conversations}"
    );
    assert_eq!(conversations["first_text"], "I want to see fjords.");
    assert_eq!(conversations["has_more"], Value::Bool(false));
    assert_eq!(conversations["retrieved_item_matches"], yes);
    assert_eq!(conversations["added"], 1);
    assert_eq!(conversations["count_after_delete"], 4);
    assert_eq!(
        conversations["updated_metadata"],
        json!({"topic": "norway"})
    );
    assert_eq!(
        conversations["retrieved_metadata"],
        json!({"topic": "norway"})
    );
    assert_eq!(conversations["deleted"], yes);
    assert_eq!(conversations["retrieve_after_delete"]["status_code"], 404);
    assert_eq!(conversations["respond_after_delete"]["status_code"], 404);

    let background = &seen["background"];
    assert_eq!(background["first"]["background"], yes, "{background}");
    assert!(
        ["queued", "in_progress"].contains(&background["first"]["status"].as_str().unwrap_or("")),
        "{background}"
    );
    assert_eq!(background["status"], "completed", "{background}");
    for key in [
        "output_text_nonempty",
        "usage_ok",
        "same_when_retrieved_again",
        "follow_input_tokens_larger",
    ] {
        assert_eq!(background[key], yes, "background {key}: {background}");
    }
    assert_eq!(background["cancelled"], "cancelled", "{background}");
    assert_eq!(background["cancelled_later"], "cancelled");
    assert_eq!(background["cancel_foreground"]["status_code"], 400);

    let unknown = &seen["unknown_previous"];
    assert_eq!(unknown["exception"], "NotFoundError", "{unknown}");
    assert_eq!(unknown["param"], "previous_response_id");
}

const TENANT: &str = "x-meridian-tenant";

/// `POST /v1/responses` to `url` for `tenant`: status and body.
async fn create(url: &str, tenant: &str, body: &Value) -> (u16, Value) {
    let res = reqwest::Client::new()
        .post(format!("{url}/v1/responses"))
        .header(TENANT, tenant)
        .json(body)
        .send()
        .await
        .expect("the request is answered");
    let status = res.status().as_u16();
    (status, res.json().await.expect("a JSON body"))
}

/// A streamed `POST /v1/responses`: its events' types, and the last
/// event's response.
async fn create_streamed(url: &str, body: &Value) -> (Vec<String>, Value) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let res = reqwest::Client::new()
        .post(format!("{url}/v1/responses"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let types = events
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    let last = events.last().cloned().unwrap_or_default();
    (types, last["response"].clone())
}

async fn get(url: &str, tenant: &str, path: &str) -> (u16, Value) {
    let res = reqwest::Client::new()
        .get(format!("{url}{path}"))
        .header(TENANT, tenant)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap())
}

/// What a response's output looks like, without its values: per item its
/// type, keys and content part types.
fn shape(response: &Value) -> Value {
    let items = response["output"].as_array().cloned().unwrap_or_default();
    items
        .iter()
        .map(|item| {
            let mut keys: Vec<&str> = item
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            keys.sort_unstable();
            let parts: Vec<Value> = item["content"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| p["type"].clone())
                .collect();
            json!({"type": item["type"], "keys": keys, "parts": parts})
        })
        .collect()
}

fn weather_tool() -> Value {
    json!([{
        "type": "function", "name": "get_weather", "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"], "additionalProperties": false},
    }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_anthropic_upstreams_answer_responses_in_the_same_shape() {
    use meridian_regional::SimProtocol;
    use meridian_tests::{RegionSandbox, SimServer, instant_sim};
    init_logging();
    let chat = SimServer::start(instant_sim()).await;
    let anthropic = SimServer::start_speaking(SimProtocol::Anthropic, instant_sim(), vec![]).await;
    let region = RegionSandbox::start_with_config(
        "eu-west",
        &format!(
            "[[models]]\nid = \"chat-up\"\n\
             backend = {{ kind = \"openai\", upstreams = [{{ base_url = \"{}\" }}] }}\n\
             [[models]]\nid = \"claude-up\"\n\
             backend = {{ kind = \"anthropic\", upstream_model = \"claude-sim\", \
             default_max_tokens = 64, upstreams = [{{ base_url = \"{}\" }}] }}\n",
            chat.base_url(),
            anthropic.base_url()
        ),
    )
    .await;
    let url = region.url();
    let mut shapes = Vec::new();
    for model in ["chat-up", "claude-up"] {
        let (status, plain) =
            create(&url, "default", &json!({"model": model, "input": "Hello"})).await;
        assert_eq!(status, 200, "{model}: {plain}");
        assert_eq!(plain["model"], model);
        assert!(
            plain["usage"]["input_tokens"].as_u64().unwrap() > 0,
            "{plain}"
        );
        let ask = json!({"model": model, "input": "Weather in Oslo?", "tools": weather_tool()});
        let (status, called) = create(&url, "default", &ask).await;
        assert_eq!(status, 200, "{model}: {called}");
        let call = &called["output"][0];
        assert_eq!(call["type"], "function_call", "{model}: {called}");
        let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
        assert!(args["city"].is_string(), "{model}: {call}");
        let answer = json!({
            "model": model, "previous_response_id": called["id"], "tools": weather_tool(),
            "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "7 C"}],
        });
        let (status, answered) = create(&url, "default", &answer).await;
        assert_eq!(status, 200, "{model}: {answered}");
        let (events, streamed) = create_streamed(&url, &ask).await;
        assert_eq!(streamed["status"], "completed", "{model}: {events:?}");
        shapes.push(json!({
            "plain": shape(&plain), "called": shape(&called), "answered": shape(&answered),
            "events": events, "streamed": shape(&streamed),
        }));
    }
    assert_eq!(
        shapes[0]["plain"][0]["parts"],
        json!(["output_text"]),
        "{}",
        shapes[0]
    );
    assert_eq!(shapes[0]["answered"][0]["type"], "message", "{}", shapes[0]);
    assert_eq!(shapes[0]["called"], shapes[0]["streamed"], "{}", shapes[0]);
    assert_eq!(
        shapes[0], shapes[1],
        "the chat protocol's shapes, then Anthropic's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_gets_the_chain_as_chat_messages_and_fields() {
    use meridian_tests::{RECORDED_ARGUMENTS, RecordingUpstream, RegionSandbox};
    init_logging();
    let upstream = RecordingUpstream::start().await;
    let region = RegionSandbox::start_with_config(
        "eu-west",
        &format!(
            "[[models]]\nid = \"recorded\"\n\
             backend = {{ kind = \"openai\", upstreams = [{{ base_url = \"{}\" }}] }}\n",
            upstream.base_url()
        ),
    )
    .await;
    let url = region.url();
    let (status, called) = create(
        &url,
        "default",
        &json!({
            "model": "recorded", "instructions": "Be brief.", "input": "Weather in Paris?",
            "tools": weather_tool(), "tool_choice": {"type": "function", "name": "get_weather"},
            "max_output_tokens": 50, "temperature": 0.7, "top_p": 0.9, "user": "u-1",
        }),
    )
    .await;
    assert_eq!(status, 200, "{called}");
    assert_eq!(called["output"][0]["call_id"], "call_0", "{called}");
    assert_eq!(called["output"][0]["arguments"], RECORDED_ARGUMENTS);
    assert_eq!(
        called["usage"]["output_tokens_details"]["reasoning_tokens"],
        2
    );
    assert_eq!(called["max_output_tokens"], 50);
    let first = &upstream.bodies()[0];
    assert_eq!(
        first["messages"],
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"}
        ]),
        "{first}"
    );
    assert_eq!(
        first["tools"][0]["function"]["name"], "get_weather",
        "{first}"
    );
    assert_eq!(
        first["tools"][0]["function"]["parameters"]["required"],
        json!(["city"])
    );
    assert_eq!(
        first["tool_choice"],
        json!({"type": "function", "function": {"name": "get_weather"}})
    );
    assert_eq!(first["max_completion_tokens"], 50);
    // Sent and echoed as the client wrote them, not as their f32 widening.
    assert_eq!(first["top_p"], 0.9);
    assert_eq!(first["temperature"], 0.7);
    assert_eq!(
        (&called["temperature"], &called["top_p"]),
        (&json!(0.7), &json!(0.9))
    );
    assert_eq!(first["user"], "u-1");

    // The results of the call, by previous_response_id alone: the call is
    // found in storage and goes to the model before its result.
    let (status, answered) = create(
        &url,
        "default",
        &json!({
            "model": "recorded", "previous_response_id": called["id"],
            "input": [{"type": "function_call_output", "call_id": "call_0", "output": "21 C"}],
            "text": {"format": {"type": "json_schema", "name": "w",
                                "schema": {"type": "object"}, "strict": true}},
            "include": ["message.output_text.logprobs"],
        }),
    )
    .await;
    assert_eq!(status, 200, "{answered}");
    let second = &upstream.bodies()[1];
    assert_eq!(
        second["messages"],
        json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_0", "type": "function",
                "function": {"name": "get_weather", "arguments": RECORDED_ARGUMENTS}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": "21 C"}
        ]),
        "instructions are not carried over, the call precedes its result: {second}"
    );
    assert_eq!(
        second["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": true}})
    );
    assert_eq!(second["logprobs"], true);
    let text = &answered["output"][0]["content"][0];
    assert_eq!(text["text"], "recorded answer", "{answered}");
    assert_eq!(text["logprobs"].as_array().map(Vec::len), Some(2), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_responses_are_their_tenants_own_and_bad_input_is_named() {
    use meridian_tests::RegionSandbox;
    init_logging();
    let region = RegionSandbox::start("eu-west").await;
    let url = region.url();
    let (status, r) = create(&url, "acme", &json!({"model": MODEL, "input": "hello"})).await;
    assert_eq!(status, 200, "{r}");
    let id = r["id"].as_str().unwrap();
    let (status, mine) = get(&url, "acme", &format!("/v1/responses/{id}")).await;
    assert_eq!((status, &mine["id"]), (200, &r["id"]));
    // Another tenant: as absent as an id never used, for every operation.
    for path in [
        format!("/v1/responses/{id}"),
        format!("/v1/responses/{id}/input_items"),
    ] {
        let (status, body) = get(&url, "globex", &path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"]["type"], "not_found_error");
    }
    let (status, body) = create(
        &url,
        "globex",
        &json!({"model": MODEL, "input": "hi", "previous_response_id": id}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["param"], "previous_response_id");
    let res = reqwest::Client::new()
        .delete(format!("{url}/v1/responses/{id}"))
        .header(TENANT, "globex")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let (status, _) = get(&url, "acme", &format!("/v1/responses/{id}")).await;
    assert_eq!(status, 200, "another tenant's delete erased nothing");

    // Bad input: refused by name, nothing dropped silently.
    let refused = [
        (
            json!({"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]}),
            "tools",
            "web_search",
        ),
        (
            json!({"model": MODEL, "input": [{"type": "computer_call", "id": "c"}]}),
            "input",
            "computer_call",
        ),
        (
            json!({"model": MODEL, "input": "x", "frobnicate": 1}),
            "",
            "frobnicate",
        ),
        (
            json!({"model": MODEL, "input": "x", "prompt": {"id": "pmpt_1"}}),
            "",
            "prompt",
        ),
        (
            json!({"model": MODEL, "input": "x", "tool_choice": {"type": "file_search"}}),
            "tool_choice",
            "file_search",
        ),
        (
            json!({"model": MODEL, "input": "x", "truncation": "sometimes"}),
            "truncation",
            "sometimes",
        ),
        (
            json!({"model": MODEL, "input": []}),
            "input",
            "at least one",
        ),
        (json!({"input": "x"}), "model", "model"),
    ];
    for (body, param, named) in refused {
        let (status, error) = create(&url, "acme", &body).await;
        assert_eq!(status, 400, "{body}: {error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(named), "{body}: {message}");
        if !param.is_empty() {
            assert_eq!(error["error"]["param"], param, "{body}: {error}");
        }
    }
    let res = reqwest::Client::new()
        .post(format!("{url}/v1/responses/{id}/cancel"))
        .header(TENANT, "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400, "only background responses are cancelled");
    let (status, _) = get(
        &url,
        "acme",
        &format!("/v1/responses/{id}/input_items?limit=0"),
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_previous_response_id_resolves_in_another_region_after_its_home_dies() {
    use meridian_tests::replicated::until;
    use std::time::Duration;
    init_logging();
    let mut cluster =
        ClusterSandbox::start_replicated(&["us-east", "eu-west", "ap-south"], "", |_, _| {}).await;
    let gateway = cluster.gateway_url();
    let client = reqwest::Client::new();
    let res = client
        .post(format!("{gateway}/v1/responses"))
        .json(&json!({"model": MODEL, "input": "My name is Ada.", "max_output_tokens": 8}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let home = res.headers()["x-meridian-region"]
        .to_str()
        .unwrap()
        .to_string();
    let first: Value = res.json().await.unwrap();
    let id = first["id"].as_str().unwrap().to_string();
    let answer = first["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();

    // Acknowledged responses reach the peers asynchronously: wait until both
    // hold it, then kill its region, node and database.
    for r in cluster.regions.iter().filter(|r| r.name != home) {
        let url = r.url();
        until(
            Duration::from_secs(20),
            &format!("{} has {id}", r.name),
            || async { get(&url, "default", &format!("/v1/responses/{id}")).await.0 == 200 },
        )
        .await;
    }
    let dead = cluster.region(&home);
    dead.kill_node();
    dead.postgres.kill();

    let question = "What is my name?";
    let res = client
        .post(format!("{gateway}/v1/responses"))
        .json(&json!({"model": MODEL, "input": question, "previous_response_id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let served_by = res.headers()["x-meridian-region"]
        .to_str()
        .unwrap()
        .to_string();
    assert_ne!(served_by, home);
    let second: Value = res.json().await.unwrap();
    assert_eq!(second["previous_response_id"], id.as_str());
    // The simulator counts words plus 4 per message: the model got the
    // stored turn (question and answer) before the new question.
    let words = |s: &str| s.split_whitespace().count() as u64 + 4;
    assert_eq!(
        second["usage"]["input_tokens"].as_u64().unwrap(),
        words("My name is Ada.") + words(&answer) + words(question),
        "{second}"
    );
    let url = cluster.region(&served_by).url();
    let (status, items) = get(
        &url,
        "default",
        &format!(
            "/v1/responses/{}/input_items?order=asc",
            second["id"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(status, 200, "{items}");
    let texts: Vec<&str> = items["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["content"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["My name is Ada.", answer.as_str(), question]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_of_items_continues_through_chat_completions() {
    use meridian_tests::{RECORDED_ARGUMENTS, RecordingUpstream, RegionSandbox};
    init_logging();
    let upstream = RecordingUpstream::start().await;
    let region = RegionSandbox::start_with_config(
        "eu-west",
        &format!(
            "[[models]]\nid = \"recorded\"\n\
             backend = {{ kind = \"openai\", upstreams = [{{ base_url = \"{}\" }}] }}\n",
            upstream.base_url()
        ),
    )
    .await;
    let url = region.url();
    let client = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        client
            .post(format!("{url}{path}"))
            .header(TENANT, "acme")
            .json(&body)
            .send()
    };
    let conv: Value = post(
        "/v1/conversations",
        json!({"items": [{"role": "user", "content": "Weather in Paris?"}]}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let id = conv["id"].as_str().unwrap().to_string();
    let res = post(
        "/v1/responses",
        json!({"model": "recorded", "conversation": id, "tools": weather_tool()}),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let called: Value = res.json().await.unwrap();
    assert_eq!(called["output"][0]["type"], "function_call", "{called}");
    assert_eq!(called["conversation"]["id"], id.as_str());
    let res = post(
        &format!("/v1/conversations/{id}/items"),
        json!({"items": [{"type": "function_call_output", "call_id": "call_0", "output": "21 C"}]}),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    // Chat's conversation header names the same conversation: its turn gets
    // the items as chat messages, the call before its result.
    let res = client
        .post(format!("{url}/v1/chat/completions"))
        .header(TENANT, "acme")
        .header("x-meridian-conversation", &id)
        .json(&json!({"model": "recorded", "messages": [{"role": "user", "content": "Thanks"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let last = upstream.bodies().pop().unwrap();
    assert_eq!(
        last["messages"],
        json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_0", "type": "function",
                "function": {"name": "get_weather", "arguments": RECORDED_ARGUMENTS}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": "21 C"},
            {"role": "user", "content": "Thanks"}
        ]),
        "{last}"
    );
    let (status, items) = get(
        &url,
        "acme",
        &format!("/v1/conversations/{id}/items?order=asc"),
    )
    .await;
    assert_eq!(status, 200, "{items}");
    let kinds: Vec<(&str, &str)> = items["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["type"].as_str().unwrap(),
                i["role"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("message", "user"),
            ("function_call", ""),
            ("function_call_output", ""),
            ("message", "user"),
            ("message", "assistant")
        ]
    );
    // A chat turn's row is an item with an id of its own.
    let answer = &items["data"][4];
    assert_eq!(answer["content"][0]["text"], "recorded answer", "{answer}");
    let (status, got) = get(
        &url,
        "acme",
        &format!(
            "/v1/conversations/{id}/items/{}",
            answer["id"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!((status, &got), (200, answer));
    // Another tenant does not see it.
    let (status, _) = get(&url, "globex", &format!("/v1/conversations/{id}")).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_responses_expire_after_the_retention() {
    use meridian_tests::RegionSandbox;
    use meridian_tests::replicated::until;
    use std::time::Duration;
    init_logging();
    let region =
        RegionSandbox::start_with_config("eu-west", "[inference]\nresponse_retention_days = 30\n")
            .await;
    let url = region.url();
    let (_, old) = create(&url, "acme", &json!({"model": MODEL, "input": "old"})).await;
    let (_, young) = create(&url, "acme", &json!({"model": MODEL, "input": "young"})).await;
    let (old, young) = (old["id"].as_str().unwrap(), young["id"].as_str().unwrap());
    let pool = sqlx::PgPool::connect(&region.postgres.url()).await.unwrap();
    sqlx::query("UPDATE responses SET created_at = now() - interval '31 days' WHERE id = $1")
        .bind(old)
        .execute(&pool)
        .await
        .unwrap();
    until(
        Duration::from_secs(30),
        "the old response expires",
        || async { get(&url, "acme", &format!("/v1/responses/{old}")).await.0 == 404 },
    )
    .await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM responses WHERE id = $1")
        .bind(old)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "the row is erased, not blanked");
    let (status, _) = get(&url, "acme", &format!("/v1/responses/{young}")).await;
    assert_eq!(status, 200, "a response within the retention stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_grown_through_items_keeps_its_limits() {
    use meridian_tests::RegionSandbox;
    init_logging();
    let region = RegionSandbox::start_with_config(
        "eu-west",
        "[inference]\nmax_conversation_bytes = 4000\nmax_messages = 6\n",
    )
    .await;
    let url = region.url();
    let client = reqwest::Client::new();
    let post = |path: String, body: Value| {
        client
            .post(format!("{url}{path}"))
            .header(TENANT, "acme")
            .json(&body)
            .send()
    };
    let conv: Value = post("/v1/conversations".into(), json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = conv["id"].as_str().unwrap();
    let items = format!("/v1/conversations/{id}/items");
    let message = |text: &str| json!({"items": [{"role": "user", "content": text}]});
    // Bytes count the whole item: an image's data URL as much as text.
    let image = json!({"items": [{"role": "user", "content": [
        {"type": "input_image", "image_url": format!("data:image/png;base64,{}", "A".repeat(5000))}]}]});
    let res = post(items.clone(), image).await.unwrap();
    assert_eq!(res.status(), 413);
    let error: Value = res.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_conversation_bytes"),
        "{error}"
    );
    for n in 0..4 {
        let res = post(items.clone(), message(&format!("item {n}")))
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "item {n}");
    }
    // Four held: a response's input and its answer make six, a seventh
    // would not fit, and the refusal comes before the model runs.
    let (status, body) = create(
        &url,
        "acme",
        &json!({"model": MODEL, "conversation": id, "input": [
            {"role": "user", "content": "one"}, {"role": "user", "content": "two"}]}),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_messages"),
        "{body}"
    );
    let (status, body) = create(
        &url,
        "acme",
        &json!({"model": MODEL, "conversation": id, "input": "one"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let res = post(items, message("one too many")).await.unwrap();
    assert_eq!(res.status(), 413);
    let (status, listed) = get(&url, "acme", &format!("/v1/conversations/{id}/items")).await;
    assert_eq!(status, 200);
    assert_eq!(
        listed["data"].as_array().unwrap().len(),
        6,
        "nothing refused was stored"
    );
}
