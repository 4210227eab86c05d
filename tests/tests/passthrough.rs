//! A faithful OpenAI endpoint: every request field Meridian does not act on
//! reaches the upstream unchanged (tools, response formats, content parts,
//! tool messages, fields not invented yet), every answer field comes back
//! (tool calls whole and in stream fragments, log probabilities, the
//! upstream's own fields), the cache tells such requests apart, and the
//! official OpenAI SDK runs a tool loop and structured output through the
//! gateway against the simulator as a hosted upstream: over HTTPS with a
//! certificate from a test CA, demanding an API key.

use meridian_tests::{
    ClusterSandbox, RECORDED_ARGUMENTS, RecordingUpstream, SimServer, TEST_MODEL, TestPki,
    TlsUpstream, UPSTREAM_FINGERPRINT, UPSTREAM_ONLY_FIELD, init_logging, instant_sim,
    run_data_script,
};
use serde_json::{Value, json};

const MODEL: &str = "hosted";
const UPSTREAM_MODEL: &str = "provider-model-v2";

/// A gateway before one region whose model `hosted` is served by the
/// upstream at `base_url` under the name `provider-model-v2`.
async fn cluster(base_url: &str) -> ClusterSandbox {
    cluster_with(base_url, "", "").await
}

/// [`cluster`] with `pool` settings and `upstream` settings added.
async fn cluster_with(base_url: &str, pool: &str, upstream: &str) -> ClusterSandbox {
    let model = format!(
        "[[models]]\nid = \"{MODEL}\"\n\
         backend = {{ kind = \"openai\", upstream_model = \"{UPSTREAM_MODEL}\"{pool}, \
         upstreams = [{{ base_url = \"{base_url}\"{upstream} }}] }}\n"
    );
    ClusterSandbox::start_configured(&["eu-west"], |_| model.clone(), |_, _| {}).await
}

/// The JSON chunks of a server-sent event stream, `[DONE]` left out.
fn chunks(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

async fn post(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "strict": true,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"], "additionalProperties": false}}})
}

/// What an agent sends on its second turn: an image, its earlier call, the
/// tool's result, and fields of every kind.
fn agent_request() -> Value {
    json!({
        "model": MODEL,
        "messages": [
            {"role": "developer", "content": "Use tools."},
            {"role": "user", "name": "ana", "content": [
                {"type": "text", "text": "Weather where this photo was taken?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_prev", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Lyon\"}"}}]},
            {"role": "tool", "tool_call_id": "call_prev", "content": "{\"temp\": 21}"},
        ],
        "tools": [weather_tool()],
        "tool_choice": "auto",
        "parallel_tool_calls": true,
        "response_format": {"type": "text"},
        "top_p": 0.9,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "logit_bias": {"50256": -100},
        "logprobs": true,
        "top_logprobs": 2,
        "user": "user-1234",
        "metadata": {"team": "travel"},
        "reasoning_effort": "low",
        "max_completion_tokens": 64,
        "temperature": 0.7,
        "x_future_field": {"nested": [1, 2, 3]},
        "seed": -5,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_meridian_does_not_own_reaches_the_upstream_and_comes_back() {
    init_logging();
    let upstream = RecordingUpstream::start().await;
    let sandbox = cluster(&upstream.base_url()).await;
    let url = sandbox.gateway_url();
    let sent = agent_request();

    let res = post(&url, &sent).await;
    assert_eq!(res.status(), 200);
    let answer: Value = res.json().await.unwrap();

    let bodies = upstream.bodies();
    assert_eq!(bodies.len(), 1);
    let got = &bodies[0];
    // Unchanged: every field Meridian does not act on, the messages whole.
    for field in [
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "top_p",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "user",
        "metadata",
        "reasoning_effort",
        "x_future_field",
        "messages",
    ] {
        assert_eq!(
            got[field], sent[field],
            "`{field}` reached the upstream unchanged"
        );
    }
    // Meridian's own, as the upstream needs them: its model name, the limit
    // under the client's name for it, the exact numbers sent, a stream.
    assert_eq!(got["model"], UPSTREAM_MODEL);
    assert_eq!(got["max_completion_tokens"], 64);
    assert!(got.get("max_tokens").is_none(), "{got}");
    assert_eq!(got["temperature"], json!(0.7));
    assert_eq!(got["seed"], -5);
    assert_eq!(got["stream"], true);

    // The answer: the calls joined, their finish reason, the upstream's own
    // fields, usage details, and Meridian's id and model.
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    assert_eq!(
        choice["message"]["tool_calls"],
        json!([{"id": "call_0", "type": "function",
                "function": {"name": "get_weather", "arguments": RECORDED_ARGUMENTS}}])
    );
    assert_eq!(answer["model"], MODEL);
    assert!(answer["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(answer["system_fingerprint"], UPSTREAM_FINGERPRINT);
    assert_eq!(answer[UPSTREAM_ONLY_FIELD], json!({"kept": true}));
    assert!(
        answer.get("obfuscation").is_none(),
        "per-chunk padding is dropped"
    );
    assert_eq!(answer["usage"]["total_tokens"], 18);
    assert_eq!(
        answer["usage"]["completion_tokens_details"]["reasoning_tokens"],
        2
    );

    // Streamed: the calls arrive as indexed fragments, and the end carries
    // the upstream's fields.
    let mut streamed = sent.clone();
    streamed["stream"] = json!(true);
    // Another seed: not the first answer from the cache, which would come
    // back whole rather than in the upstream's fragments.
    streamed["seed"] = json!(-6);
    streamed["stream_options"] = json!({"include_usage": true});
    let res = post(&url, &streamed).await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let chunks = chunks(&text);
    let fragments: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert!(fragments.len() >= 3, "{text}");
    assert_eq!(fragments[0]["id"], "call_0");
    assert_eq!(fragments[0]["function"]["name"], "get_weather");
    let arguments: String = fragments
        .iter()
        .filter_map(|f| f["function"]["arguments"].as_str())
        .collect();
    assert_eq!(arguments, RECORDED_ARGUMENTS);
    assert!(fragments.iter().all(|f| f["index"] == 0));
    let finish = chunks
        .iter()
        .find(|c| c["choices"][0]["finish_reason"].is_string())
        .unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(finish["system_fingerprint"], UPSTREAM_FINGERPRINT);
    let usage = chunks.iter().find(|c| c["usage"].is_object()).unwrap();
    assert_eq!(
        usage["usage"]["completion_tokens_details"]["reasoning_tokens"],
        2
    );

    // Without tools, log probabilities come back joined.
    let mut plain = json!({"model": MODEL, "logprobs": true,
        "messages": [{"role": "user", "content": "hi"}]});
    let res = post(&url, &plain).await;
    let answer: Value = res.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "recorded answer"
    );
    let tokens: Vec<&str> = answer["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert_eq!(tokens, ["recorded", " answer"]);
    plain["stream"] = json!(true);
    let text = post(&url, &plain).await.text().await.unwrap();
    assert!(text.contains(r#""logprobs":{"content":[{"#), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_differ_only_in_tools_or_response_format_are_two_cache_entries() {
    init_logging();
    let upstream = RecordingUpstream::start().await;
    let sandbox = cluster(&upstream.base_url()).await;
    let url = sandbox.gateway_url();
    let base = json!({"model": MODEL, "seed": 1,
        "messages": [{"role": "user", "content": "weather in Oslo?"}]});
    let mut forecast = weather_tool();
    forecast["function"]["name"] = json!("get_forecast");
    let variants = [
        base.clone(),
        json!({"tools": [weather_tool()]}),
        json!({"tools": [forecast]}),
        json!({"response_format": {"type": "json_object"}}),
        json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "w", "schema": {"type": "object"}}}}),
    ];
    let mut caches = Vec::new();
    for (i, fields) in variants.iter().enumerate() {
        let mut body = base.clone();
        if i > 0 {
            for (k, v) in fields.as_object().unwrap() {
                body[k] = v.clone();
            }
        }
        for _ in 0..2 {
            let res = post(&url, &body).await;
            assert_eq!(res.status(), 200);
            caches.push(
                res.headers()["x-meridian-cache"]
                    .to_str()
                    .unwrap()
                    .to_string(),
            );
        }
    }
    assert_eq!(
        upstream.bodies().len(),
        variants.len(),
        "each variant generated once: {caches:?}"
    );
    for pair in caches.chunks(2) {
        assert_eq!(pair[0], "miss", "{caches:?}");
        assert!(pair[1].starts_with("hit"), "{caches:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_refuses_tools_by_name_rather_than_store_them_in_part() {
    init_logging();
    let upstream = RecordingUpstream::start().await;
    let sandbox = cluster(&upstream.base_url()).await;
    let body = json!({"model": MODEL, "tools": [weather_tool()],
        "messages": [{"role": "user", "content": "weather?"}]});
    let res = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", sandbox.gateway_url()))
        .header("x-meridian-conversation", "trip-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let error: Value = res.json().await.unwrap();
    assert_eq!(error["error"]["param"], "tools", "{error}");
    assert!(upstream.bodies().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdk_runs_a_tool_loop_and_structured_output_against_a_hosted_simulator() {
    init_logging();
    const KEY: &str = "sk-hosted-0123456789abcdef";
    let sim = SimServer::start_requiring(
        instant_sim(),
        vec![("authorization".into(), format!("Bearer {KEY}"))],
    )
    .await;
    let pki = TestPki::new();
    let tls = TlsUpstream::start(&pki, sim.addr(), false).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("provider.key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let sandbox = cluster_with(
        &tls.base_url(),
        &format!(", ca_file = {:?}", tls.ca_file()),
        &format!(", api_key_file = {:?}", key_file.display().to_string()),
    )
    .await;
    let seen = run_data_script(
        "openai_sdk_tools.py",
        vec![
            ("OPENAI_BASE_URL", format!("{}/v1", sandbox.gateway_url())),
            ("OPENAI_API_KEY", "sk-unused".into()),
            ("MODEL", MODEL.into()),
        ],
    )
    .await;
    let both = json!(["get_weather", "get_time"]);
    assert_eq!(seen["call"]["finish_reason"], "tool_calls");
    assert_eq!(seen["call"]["names"], both, "parallel calls of both tools");
    assert_eq!(seen["call"]["ids_unique"], true);
    assert_eq!(seen["answer"]["finish_reason"], "stop");
    assert_eq!(seen["answer"]["has_text"], true);
    assert_eq!(seen["answer"]["tool_calls"], Value::Null);
    assert_eq!(seen["stream"]["finish_reason"], "tool_calls");
    assert_eq!(seen["stream"]["names"], both);
    assert_eq!(seen["stream"]["same_as_whole"], true);
    assert_eq!(seen["stream_helper"], both);
    assert!(seen["structured"]["steps"].is_array());
    assert!(seen["parsed"]["destination"].is_string());
    assert!(seen["parsed"]["nights"].is_i64());
    assert!(
        !tls.negotiated().is_empty() && tls.negotiated().iter().all(|p| p == "h2"),
        "the pool speaks HTTP/2 to the upstream: {:?}",
        tls.negotiated()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_generate_carries_tools_and_structured_output_as_typed_fields() {
    use meridian_proto::v1::inference_client::InferenceClient;
    use meridian_proto::v1::response_format::Type;
    use meridian_proto::v1::{ChatMessage, FinishReason, GenerateRequest, ResponseFormat, Tool};
    init_logging();
    let region = meridian_tests::RegionSandbox::start_with_config(
        "eu-west",
        "[[models]]\nid = \"agent\"\n\
         backend = { kind = \"sim\", ttft_ms = 0, per_token_ms = 0, prefill_us_per_token = 0 }\n",
    )
    .await;
    let mut client = InferenceClient::connect(region.url()).await.unwrap();
    let schema = r#"{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}"#;
    let ask = |extra_json: &str| GenerateRequest {
        model: "agent".into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "weather in Oslo?".into(),
            ..Default::default()
        }],
        tools: vec![Tool {
            name: "get_weather".into(),
            parameters_json: schema.into(),
            ..Default::default()
        }],
        tool_choice: "required".into(),
        extra_json: extra_json.into(),
        ..Default::default()
    };
    let done = client.generate(ask("")).await.unwrap().into_inner();
    assert_eq!(done.finish_reason(), FinishReason::ToolCalls);
    let calls = done.message.unwrap().tool_calls;
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].name, "get_weather");
    let args: Value = serde_json::from_str(&calls[0].arguments_json).unwrap();
    assert!(args["city"].is_string(), "{args}");

    // Streamed, the call arrives in fragments that join to a whole one.
    let mut stream = client.generate_stream(ask("")).await.unwrap().into_inner();
    let (mut id, mut arguments) = (String::new(), String::new());
    while let Some(chunk) = stream.message().await.unwrap() {
        for f in chunk.tool_calls {
            assert_eq!(f.index, 0);
            id.push_str(&f.id);
            arguments.push_str(&f.arguments_delta);
        }
    }
    assert_eq!(id, calls[0].id);
    assert_eq!(arguments, calls[0].arguments_json);

    // The escape hatch reaches the model: no parallel calls of two tools.
    let mut two = ask(r#"{"parallel_tool_calls": false}"#);
    two.tools.push(Tool {
        name: "get_time".into(),
        ..Default::default()
    });
    let done = client.generate(two).await.unwrap().into_inner();
    assert_eq!(done.message.unwrap().tool_calls.len(), 1);

    // Structured output: JSON valid against the schema.
    let structured = GenerateRequest {
        tools: vec![],
        tool_choice: String::new(),
        response_format: Some(ResponseFormat {
            r#type: Type::JsonSchema.into(),
            name: "place".into(),
            schema_json: schema.into(),
            strict: true,
        }),
        ..ask("")
    };
    let done = client.generate(structured).await.unwrap().into_inner();
    let document: Value = serde_json::from_str(&done.message.unwrap().content).unwrap();
    assert!(document["city"].is_string(), "{document}");

    // A typed field in the escape hatch is refused by name.
    let status = client.generate(ask(r#"{"tools": []}"#)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("`tools`"), "{}", status.message());
}

/// Text completions, served by chat models: the sampling fields, `user` and
/// fields not known yet reach the model as sent, `echo` puts the prompt
/// before the text (streamed too), and what a chat model cannot give is
/// refused by name without reaching it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_completions_pass_their_fields_on_and_refuse_what_chat_models_cannot_give() {
    init_logging();
    let upstream = RecordingUpstream::start().await;
    let sandbox = cluster(&upstream.base_url()).await;
    let url = format!("{}/v1/completions", sandbox.gateway_url());
    let http = reqwest::Client::new();
    let complete = |body: Value| {
        let request = http.post(&url).json(&body);
        async move {
            let res = request.send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    };

    let sent = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8,
        "echo": true, "top_p": 0.5, "frequency_penalty": 0.25, "presence_penalty": -0.5,
        "logit_bias": {"50256": -100}, "user": "u-42", "x_future_field": {"a": [1]},
        "logprobs": null, "suffix": null, "n": 1, "best_of": 1});
    let (status, text) = complete(sent.clone()).await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        answer["choices"][0]["text"], "Once upon a timerecorded answer",
        "the prompt, echoed, then the model's text"
    );
    let bodies = upstream.bodies();
    assert_eq!(bodies.len(), 1);
    let got = &bodies[0];
    for field in [
        "top_p",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "user",
        "x_future_field",
    ] {
        assert_eq!(got[field], sent[field], "`{field}` reached the model");
    }
    assert_eq!(got["messages"][0]["content"], "Once upon a time");
    for own in ["echo", "logprobs", "suffix", "n", "best_of", "prompt"] {
        assert!(got.get(own).is_none(), "`{own}` reached the model: {got}");
    }

    let mut streamed = sent.clone();
    streamed["stream"] = json!(true);
    let (status, text) = complete(streamed).await;
    assert_eq!(status, 200, "{text}");
    let pieces: Vec<String> = chunks(&text)
        .iter()
        .map(|chunk| chunk["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(pieces.first().map(String::as_str), Some("Once upon a time"));
    assert_eq!(pieces.concat(), "Once upon a timerecorded answer");

    // With `stream_options.include_usage`, the usage comes last, in a chunk
    // of its own with no choices, as OpenAI sends it.
    let mut with_usage = sent.clone();
    with_usage["stream"] = json!(true);
    with_usage["stream_options"] = json!({"include_usage": true});
    with_usage["user"] = json!("u-43"); // a new request, not the cached one
    let (status, text) = complete(with_usage).await;
    assert_eq!(status, 200, "{text}");
    let chunks = chunks(&text);
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(last["choices"], json!([]), "{last}");
    assert_eq!(last["usage"]["completion_tokens"], 7, "{last}");
    assert!(rest.iter().all(|c| c.get("usage").is_none()), "{text}");
    assert_eq!(rest.last().unwrap()["choices"][0]["finish_reason"], "stop");

    for (field, value, echo) in [
        ("logprobs", json!(6), false),
        ("logprobs", json!(1), true),
        ("suffix", json!("The end."), false),
        ("best_of", json!(3), false),
        ("n", json!(2), false),
    ] {
        let mut body = json!({"model": MODEL, "prompt": "hi", "max_tokens": 4, "echo": echo});
        body[field] = value;
        let (status, text) = complete(body).await;
        assert_eq!(status, 400, "{field}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error["error"]["param"], field, "{text}");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("`{field}`")),
            "{text}"
        );
    }
    assert_eq!(
        upstream.bodies().len(),
        3,
        "a refused request reached the model"
    );

    // Without `max_tokens`, OpenAI's default for text completions: 16.
    let (status, text) = complete(json!({"model": MODEL, "prompt": "no limit given"})).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(upstream.bodies()[3]["max_tokens"], 16);

    // `logprobs: k` asks the chat model for its log probabilities with k
    // alternatives, and its answer comes back in the legacy shape.
    let (status, text) =
        complete(json!({"model": MODEL, "prompt": "scored", "max_tokens": 4, "logprobs": 3})).await;
    assert_eq!(status, 200, "{text}");
    let asked = &upstream.bodies()[4];
    assert_eq!(
        (&asked["logprobs"], &asked["top_logprobs"]),
        (&json!(true), &json!(3))
    );
    let answer: Value = serde_json::from_str(&text).unwrap();
    let logprobs = &answer["choices"][0]["logprobs"];
    assert_eq!(
        logprobs["tokens"],
        json!(["recorded", " answer"]),
        "{answer}"
    );
    assert_eq!(logprobs["token_logprobs"], json!([-0.5, -0.5]));
    assert_eq!(logprobs["text_offset"], json!([0, 8]));
}

/// The simulator gives log probabilities when asked, in chat's shape and,
/// through text completions, in the legacy one: one entry per token of
/// the text, with the asked number of alternatives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_gives_log_probabilities_in_both_shapes() {
    init_logging();
    let sandbox = ClusterSandbox::start(&["eu-west"]).await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        let request = http
            .post(format!("{}/v1/{path}", sandbox.gateway_url()))
            .json(&body);
        async move {
            let res = request.send().await.unwrap();
            assert_eq!(res.status(), 200);
            res.json::<Value>().await.unwrap()
        }
    };
    let chat = post(
        "chat/completions",
        json!({"model": TEST_MODEL, "max_tokens": 6, "logprobs": true, "top_logprobs": 2,
            "messages": [{"role": "user", "content": "score me"}]}),
    )
    .await;
    let text = chat["choices"][0]["message"]["content"].as_str().unwrap();
    let entries = chat["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    let tokens: String = entries
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(tokens, text, "{chat}");
    for e in entries {
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 2, "{e}");
        assert!(e["logprob"].as_f64().unwrap() <= 0.0, "{e}");
    }

    let completion = post(
        "completions",
        json!({"model": TEST_MODEL, "prompt": "score me", "max_tokens": 6, "logprobs": 2}),
    )
    .await;
    let choice = &completion["choices"][0];
    let logprobs = &choice["logprobs"];
    let tokens: Vec<&str> = logprobs["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        tokens.concat(),
        choice["text"].as_str().unwrap(),
        "{completion}"
    );
    let offsets: Vec<u64> = logprobs["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    assert!(
        logprobs["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.as_object().unwrap().len() == 2),
        "{logprobs}"
    );
    // Without `logprobs`, none: the text is the same, the numbers absent.
    let plain = post(
        "completions",
        json!({"model": TEST_MODEL, "prompt": "score me", "max_tokens": 6}),
    )
    .await;
    assert_eq!(plain["choices"][0]["text"], choice["text"]);
    assert!(plain["choices"][0]["logprobs"].is_null(), "{plain}");
}
