use super::*;
use crate::inference::Message;
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
        model: "sim".into(),
        messages: vec![Message {
            role: "user".into(),
            content: content.into(),
        }],
        max_tokens,
        seed,
        stop: vec![],
        temperature: None,
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
            Chunk::Delta(d) => Some(d.as_str()),
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
