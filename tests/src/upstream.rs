//! Real OpenAI-compatible upstreams for tests: the built-in simulator served
//! over HTTP on a free port, and a reader of Prometheus metrics, so tests
//! can count what reached an upstream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use axum::routing::{get, post};
use meridian_mesh::Tracer;
use meridian_regional::{SimConfig, SimProtocol, serve_sim_as};
use tokio::sync::oneshot;

/// A simulator that answers at once: no prefill, time to first token or
/// time per token, so only the path to it takes time.
pub fn instant_sim() -> SimConfig {
    SimConfig {
        prefill_us_per_token: 0,
        ttft_ms: 0,
        per_token_ms: 0,
        ..SimConfig::default()
    }
}

/// A simulator behind real HTTP on a free port.
pub struct SimServer {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SimServer {
    pub async fn start(config: SimConfig) -> Self {
        Self::start_requiring(config, Vec::new()).await
    }

    /// A simulator whose `/v1` routes answer 401 to a request missing one
    /// of `required` headers (name, exact value), as a hosted provider
    /// does to a wrong key.
    pub async fn start_requiring(config: SimConfig, required: Vec<(String, String)>) -> Self {
        Self::start_speaking(SimProtocol::OpenAi, config, required).await
    }

    /// A simulator speaking `protocol`, behind `required` headers.
    pub async fn start_speaking(
        protocol: SimProtocol,
        config: SimConfig,
        required: Vec<(String, String)>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve_sim_as(
                protocol,
                config,
                listener,
                async {
                    let _ = stopped.await;
                },
                Tracer::disabled(),
                required,
            )
            .await
            .unwrap();
        });
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Three simulators for one pool, the last ten times slower to its first
    /// token (200 ms) than the others (20 ms), and nothing else slow: the
    /// pool a slow-upstream outlier has to leave.
    pub async fn one_slow_of_three() -> [SimServer; 3] {
        let sim = |ttft_ms| SimConfig {
            prefill_us_per_token: 0,
            ttft_ms,
            per_token_ms: 0,
            ..SimConfig::default()
        };
        let (a, b, slow) = tokio::join!(
            SimServer::start(sim(20)),
            SimServer::start(sim(20)),
            SimServer::start(sim(200))
        );
        [a, b, slow]
    }

    /// Where it listens, for a proxy in front of it.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// The `base_url` a region's config names.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Stops accepting and closes every connection once in-flight requests end.
    pub async fn kill(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }

    pub async fn metric(&self, name: &str) -> f64 {
        metric(&format!("http://{}/metrics", self.addr), name, &[]).await
    }
}

/// The sum of the samples of `name` whose labels contain every one of `labels`.
pub async fn metric(url: &str, name: &str, labels: &[&str]) -> f64 {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |sum, v| sum + v)
}

/// An upstream that passes its health checks but fails every chat: it
/// holds the request without answering, as a wedged inference server does,
/// or answers one error status, as an overloaded (429) or broken (5xx) one.
pub struct FaultyUpstream {
    addr: std::net::SocketAddr,
    chats: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultyUpstream {
    /// Holds every chat request without answering.
    pub async fn silent() -> Self {
        Self::start(None).await
    }

    /// Answers every chat request with `status` and an OpenAI error body.
    pub async fn answering(status: u16) -> Self {
        Self::start(Some(status)).await
    }

    async fn start(status: Option<u16>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let chats = Arc::new(AtomicU32::new(0));
        let counted = chats.clone();
        let app = axum::Router::new()
            .route(
                "/v1/models",
                get(|| async { axum::Json(serde_json::json!({ "object": "list", "data": [] })) }),
            )
            .route(
                "/v1/chat/completions",
                post(move || async move {
                    counted.fetch_add(1, Ordering::Relaxed);
                    let Some(status) = status else {
                        return std::future::pending().await;
                    };
                    let status = axum::http::StatusCode::from_u16(status).unwrap();
                    let body = serde_json::json!({ "error": { "message": format!("failing with {status}"),
                        "type": "server_error", "param": null, "code": null } });
                    (status, axum::Json(body))
                }),
            );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, chats, task }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Chat requests that reached it.
    pub fn chats(&self) -> u32 {
        self.chats.load(Ordering::Relaxed)
    }
}

impl Drop for FaultyUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
