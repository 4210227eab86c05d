use super::*;
use crate::inference::metrics::Metrics;

fn sim(config: SimConfig) -> SimBackend {
    SimBackend::new(config, Metrics::with_labels(None).sim("sim"))
}

fn fast() -> SimConfig {
    SimConfig {
        prefill_us_per_token: 0,
        ttft_ms: 0,
        per_token_ms: 0,
        max_concurrency: 4,
        default_max_tokens: 16,
        ..SimConfig::default()
    }
}

fn request(content: &str, seed: Option<u64>, max_tokens: Option<u32>) -> ChatRequest {
    ChatRequest {
        max_tokens,
        seed,
        ..ChatRequest::asking("sim", content)
    }
}

#[tokio::test]
async fn same_request_same_answer_and_seed_changes_it() {
    let sim = sim(fast());
    let a = sim
        .complete(&request("hello there", Some(1), None))
        .await
        .unwrap();
    let b = sim
        .complete(&request("hello there", Some(1), None))
        .await
        .unwrap();
    let c = sim
        .complete(&request("hello there", Some(2), None))
        .await
        .unwrap();
    assert_eq!(a.text, b.text);
    assert_ne!(a.text, c.text);
    assert_eq!(
        a.usage.completion_tokens as usize,
        a.text.split(' ').count()
    );
    assert_eq!(a.usage.prompt_tokens, 2 + 4);
}

#[tokio::test]
async fn max_tokens_bounds_output_and_reports_length() {
    let sim = sim(fast());
    let c = sim
        .complete(&request("count", None, Some(3)))
        .await
        .unwrap();
    assert!(c.usage.completion_tokens <= 3);
    if c.usage.completion_tokens == 3 {
        assert_eq!(c.finish, Finish::Length);
    }
}

#[tokio::test]
async fn stream_concatenates_to_the_completion() {
    let sim = sim(fast());
    let whole = sim
        .complete(&request("stream me", Some(9), None))
        .await
        .unwrap();
    let chunks: Vec<Chunk> = sim
        .stream(request("stream me", Some(9), None))
        .collect()
        .await;
    let text: String = chunks
        .iter()
        .filter_map(|c| match c {
            Chunk::Delta(d) => Some(d.content.as_str()),
            Chunk::Done { .. } => None,
        })
        .collect();
    assert_eq!(text, whole.text);
    assert!(matches!(chunks.last(), Some(Chunk::Done { usage, .. }) if *usage == whole.usage));
}

#[tokio::test(start_paused = true)]
async fn timing_follows_config() {
    let sim = sim(SimConfig {
        prefill_us_per_token: 1000,
        ttft_ms: 100,
        per_token_ms: 10,
        max_concurrency: 1,
        default_max_tokens: 8,
        ..SimConfig::default()
    });
    let req = request("one two three four five six", Some(3), Some(8));
    let started = tokio::time::Instant::now();
    let c = sim.complete(&req).await.unwrap();
    let prefill = Duration::from_millis(u64::from(c.usage.prompt_tokens));
    let expected = prefill
        + Duration::from_millis(100)
        + Duration::from_millis(10) * (c.usage.completion_tokens - 1);
    assert_eq!(started.elapsed(), expected);
    assert_eq!(c.time_to_first_token, prefill + Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn concurrency_limit_queues_requests() {
    let sim = Arc::new(sim(SimConfig {
        prefill_us_per_token: 0,
        ttft_ms: 50,
        per_token_ms: 0,
        max_concurrency: 1,
        default_max_tokens: 1,
        ..SimConfig::default()
    }));
    let started = tokio::time::Instant::now();
    let (ra, rb) = (request("a", None, Some(1)), request("b", None, Some(1)));
    let (a, b) = tokio::join!(sim.complete(&ra), sim.complete(&rb));
    a.unwrap();
    b.unwrap();
    // One slot: the second request waits for the first.
    assert_eq!(started.elapsed(), Duration::from_millis(100));
}

#[tokio::test]
async fn failure_injection_follows_rate_and_seed() {
    let draws = |seed| {
        let sim = sim(SimConfig {
            fail_rate: 0.5,
            fail_seed: seed,
            ..fast()
        });
        (0..64).map(|_| sim.inject_failure()).collect::<Vec<_>>()
    };
    let a = draws(7);
    assert_eq!(a, draws(7), "same seed, same sequence");
    assert_ne!(a, draws(8), "another seed, another sequence");
    let failed = a.iter().filter(|f| **f).count();
    assert!((16..=48).contains(&failed), "about half fail: {failed}");

    let always = sim(SimConfig {
        fail_rate: 1.0,
        ..fast()
    });
    let err = always
        .complete(&request("x", None, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    let never = sim(fast());
    assert!((0..64).all(|_| !never.inject_failure()));
}

#[tokio::test(start_paused = true)]
async fn prefix_cache_hits_skip_prefill() {
    let metrics = Metrics::with_labels(None);
    let sim = SimBackend::new(
        SimConfig {
            prefill_us_per_token: 1000,
            ttft_ms: 10,
            per_token_ms: 0,
            default_max_tokens: 1,
            prefix_block_tokens: 16,
            ..SimConfig::default()
        },
        metrics.sim("sim"),
    );
    let shared = "shared system prompt words ".repeat(16);
    let ask = |q: &str| request(&format!("{shared} {q}"), Some(1), Some(1));
    let cold = sim.complete(&ask("first question")).await.unwrap();
    let warm = sim.complete(&ask("second question")).await.unwrap();
    let prompt = u64::from(cold.usage.prompt_tokens);
    assert_eq!(cold.time_to_first_token, Duration::from_millis(prompt + 10));
    // 1 role + 64 shared words: 4 whole blocks of 16 were cached.
    assert_eq!(
        warm.time_to_first_token,
        Duration::from_millis(u64::from(warm.usage.prompt_tokens) - 64 + 10)
    );
    let text = metrics.render();
    assert!(
        text.contains("meridian_sim_prefix_cache_hits_total{model=\"sim\"} 64"),
        "{text}"
    );
}

fn with(extra: serde_json::Value, messages: &[(&str, &str)]) -> ChatRequest {
    let serde_json::Value::Object(extra) = extra else {
        unreachable!("extra is an object")
    };
    ChatRequest {
        seed: Some(7),
        max_tokens: Some(512),
        messages: messages
            .iter()
            .map(|(r, c)| crate::inference::Message::text(*r, *c))
            .collect(),
        extra: Arc::new(extra),
        ..ChatRequest::asking("sim", "")
    }
}

/// Schemas as agents and structured-output clients send them: nested
/// objects, enums, bounds, arrays, nullable fields, `$defs` references.
fn schemas() -> Vec<serde_json::Value> {
    use serde_json::json;
    vec![
        json!({"type": "object", "properties": {"city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
            "count": {"type": "integer", "minimum": 3, "maximum": 5},
            "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 2},
            "tags": {"type": "array", "items": {"type": "string", "minLength": 4}, "minItems": 2, "maxItems": 4},
            "when": {"type": "string", "format": "date-time"},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "flag": {"type": ["boolean", "null"]},
            "kind": {"const": "report"}},
            "required": ["count", "ratio", "tags", "when", "note", "flag", "kind"]}),
        json!({"type": "object", "$defs": {"step": {"type": "object",
            "properties": {"explanation": {"type": "string"}, "output": {"type": "string"}},
            "required": ["explanation", "output"], "additionalProperties": false}},
            "properties": {"steps": {"type": "array", "items": {"$ref": "#/$defs/step"}},
                "final_answer": {"type": "string"}},
            "required": ["steps", "final_answer"], "additionalProperties": false}),
    ]
}

#[tokio::test]
async fn offered_tools_are_called_with_arguments_valid_against_their_schemas() {
    use serde_json::json;
    let sim = sim(fast());
    let tools: Vec<_> = schemas()
        .into_iter()
        .enumerate()
        .map(|(i, s)| json!({"type": "function", "function": {"name": format!("tool_{i}"), "parameters": s}}))
        .collect();
    let asked = [("user", "plan my trip")];
    let done = sim
        .complete(&with(json!({"tools": tools}), &asked))
        .await
        .unwrap();
    assert_eq!(done.finish, Finish::ToolCalls);
    assert_eq!(done.extras.tool_calls.len(), 3, "parallel calls by default");
    for (call, schema) in done.extras.tool_calls.iter().zip(schemas()) {
        assert!(call.id.starts_with("call_"));
        let args: serde_json::Value = serde_json::from_str(&call.function.arguments).unwrap();
        assert!(
            jsonschema::is_valid(&schema, &args),
            "{} against {schema}",
            call.function.arguments
        );
    }
    // Deterministic: the same request, the same calls.
    let again = sim
        .complete(&with(json!({"tools": tools}), &asked))
        .await
        .unwrap();
    assert_eq!(again.extras.tool_calls, done.extras.tool_calls);
    // Streamed, the fragments assemble to the same calls.
    let mut assembly = crate::inference::Assembly::default();
    let mut chunks = sim.stream(with(json!({"tools": tools}), &asked));
    let mut fragments = 0;
    while let Some(c) = chunks.next().await {
        if let Chunk::Delta(d) = c {
            fragments += 1;
            assembly.push(&d);
        }
    }
    assert!(fragments > 6, "arguments arrive in pieces");
    let (_, extras) = assembly.finish(Default::default());
    assert_eq!(extras.tool_calls, done.extras.tool_calls);

    let one = sim
        .complete(&with(
            json!({"tools": tools, "parallel_tool_calls": false}),
            &asked,
        ))
        .await
        .unwrap();
    assert_eq!(one.extras.tool_calls.len(), 1);
    let named = sim
        .complete(&with(
            json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "tool_2"}}}),
            &asked,
        ))
        .await
        .unwrap();
    assert_eq!(named.extras.tool_calls.len(), 1);
    assert_eq!(named.extras.tool_calls[0].function.name, "tool_2");
    let none = sim
        .complete(&with(
            json!({"tools": tools, "tool_choice": "none"}),
            &asked,
        ))
        .await
        .unwrap();
    assert!(none.extras.tool_calls.is_empty() && !none.text.is_empty());
    // After a tool's result, `auto` answers in text; `required` calls again.
    let answered = [
        ("user", "plan my trip"),
        ("assistant", ""),
        ("tool", "sunny"),
    ];
    let after = sim
        .complete(&with(json!({"tools": tools}), &answered))
        .await
        .unwrap();
    assert!(after.extras.tool_calls.is_empty() && after.finish != Finish::ToolCalls);
    let required = sim
        .complete(&with(
            json!({"tools": tools, "tool_choice": "required"}),
            &answered,
        ))
        .await
        .unwrap();
    assert_eq!(required.finish, Finish::ToolCalls);
}

#[tokio::test]
async fn response_format_gets_json_valid_against_its_schema() {
    use serde_json::json;
    let sim = sim(fast());
    for schema in schemas() {
        let format = json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "answer", "strict": true, "schema": schema}}});
        let done = sim
            .complete(&with(format, &[("user", "answer")]))
            .await
            .unwrap();
        let document: serde_json::Value = serde_json::from_str(&done.text).unwrap();
        assert!(
            jsonschema::is_valid(&schema, &document),
            "{} against {schema}",
            done.text
        );
    }
    let object = sim
        .complete(&with(
            json!({"response_format": {"type": "json_object"}}),
            &[("user", "answer")],
        ))
        .await
        .unwrap();
    assert!(
        serde_json::from_str::<serde_json::Value>(&object.text)
            .unwrap()
            .is_object()
    );
}
