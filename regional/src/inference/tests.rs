use super::*;
use crate::inference::metrics::Metrics;

#[test]
fn timeouts_parse() {
    assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
    assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
    assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
    assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
    assert_eq!(parse_grpc_timeout("m"), None);
    assert_eq!(parse_grpc_timeout("123456789S"), None, "at most 8 digits");
    assert_eq!(parse_grpc_timeout("10x"), None);
    assert_eq!(
        parse_timeout_ms(" 300 ").unwrap(),
        Duration::from_millis(300)
    );
    assert!(parse_timeout_ms("0").is_err());
    assert!(parse_timeout_ms("-5").is_err());
}

fn slow_model() -> Routed {
    let config = crate::config::SimConfig {
        ttft_ms: 100,
        per_token_ms: 100,
        default_max_tokens: 50,
        ..Default::default()
    };
    let metrics = Metrics::with_labels(None);
    Routed {
        model: Arc::new(route::Model {
            config: ModelConfig {
                id: "slow".into(),
                context_window_tokens: 8192,
                backend: BackendConfig::Sim(config.clone()),
                fallbacks: vec![],
                context_fallbacks: vec![],
                task: crate::config::Task::Chat,
                embeddings: None,
            },
            backend: route::Backend::Sim(Arc::new(SimBackend::new(config, metrics.sim("slow")))),
        }),
        fallbacks: vec![],
        chosen: None,
    }
}

fn request() -> ChatRequest {
    ChatRequest {
        max_tokens: Some(50),
        seed: Some(1),
        ..ChatRequest::asking("slow", "tell me a long story")
    }
}

#[tokio::test(start_paused = true)]
async fn deadline_cuts_whole_and_streamed_completions() {
    let model = slow_model();
    let started = Instant::now();
    let err = model
        .complete(&request(), Some(started + Duration::from_millis(500)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded));
    assert_eq!(started.elapsed(), Duration::from_millis(500));

    // Before the first token: an error instead of a stream.
    let started = Instant::now();
    let err = model
        .stream(request(), Some(started + Duration::from_millis(50)))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::DeadlineExceeded));

    // After it: the stream ends with the error.
    let started = Instant::now();
    let items: Vec<_> = model
        .stream(request(), Some(started + Duration::from_millis(450)))
        .await
        .unwrap()
        .0
        .collect()
        .await;
    assert!(items.len() >= 2, "some tokens arrived");
    assert!(matches!(items.last(), Some(Err(Error::DeadlineExceeded))));
    assert_eq!(started.elapsed(), Duration::from_millis(450));
}
