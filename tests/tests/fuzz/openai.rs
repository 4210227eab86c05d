//! OpenAI request bodies: through the gateway (which reads `max_tokens` out
//! of small bodies before routing) to a real region, and the gateway's own
//! scan in process.

use proptest::prelude::*;
use serde_json::Value;

use meridian_tests::{ClusterSandbox, TEST_MODEL};

use crate::http::{assert_up, corrupt, post};
use crate::json;
use crate::runner;

/// Which endpoint a case goes to, with its body.
#[derive(Clone)]
pub(crate) enum Case {
    Chat(Value),
    Completion(Value),
    Embeddings(Value),
    /// A chat body with bytes replaced: not JSON, or JSON of another shape.
    Raw(Vec<u8>),
}

/// JSON as text and raw bodies as escaped bytes, so a finding reads as
/// what was sent.
impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (path, body) = self.request();
        write!(f, "POST {path} b\"{}\"", body.escape_ascii())
    }
}

impl Case {
    fn request(&self) -> (&'static str, Vec<u8>) {
        match self {
            Case::Chat(v) => ("/v1/chat/completions", v.to_string().into_bytes()),
            Case::Completion(v) => ("/v1/completions", v.to_string().into_bytes()),
            Case::Embeddings(v) => ("/v1/embeddings", v.to_string().into_bytes()),
            Case::Raw(b) => ("/v1/chat/completions", b.clone()),
        }
    }
}

pub(crate) fn cases() -> BoxedStrategy<Case> {
    let raw = (
        json::chat_body(TEST_MODEL),
        prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    )
        .prop_map(|(v, edits)| Case::Raw(corrupt(v.to_string().into_bytes(), &edits)));
    prop_oneof![
        4 => json::chat_body(TEST_MODEL).prop_map(Case::Chat),
        2 => json::completion_body(TEST_MODEL).prop_map(Case::Completion),
        1 => json::embeddings_body("all-minilm-l6-v2").prop_map(Case::Embeddings),
        1 => raw,
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Case::Raw),
    ]
    .boxed()
}

/// Sends one case through the gateway; the answer must be well-formed.
pub(crate) async fn check(http: &reqwest::Client, base: &str, case: &Case) -> runner::Verdict {
    let (path, body) = case.request();
    post(http, &format!("{base}{path}"), "application/json", body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_bodies_through_gateway_and_region() {
    meridian_tests::init_logging();
    let embeddings = format!(
        "[embeddings]\nmodel_dir = {:?}\nmax_wait_ms = 5\n",
        meridian_tests::embedding_model_dir()
    );
    let sandbox =
        ClusterSandbox::start_configured(&["us-east"], |_| embeddings.clone(), |_, _| {}).await;
    let http = reqwest::Client::new();
    let base = sandbox.gateway_url();
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        runner::run("openai_http", 150, cases(), |case| {
            handle.block_on(check(&http, &base, &case))
        });
    });
    assert_up(&http, &sandbox.regions[0].url()).await;
    assert_up(&http, &sandbox.admin_url()).await;
}

/// The gateway's estimate reads `max_tokens` from raw bytes: any bytes give
/// an answer, the largest number after either key.
#[test]
fn gateway_max_tokens_scan() {
    let bodies = prop_oneof![
        json::chat_body(TEST_MODEL).prop_map(|v| v.to_string().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..256),
        (
            prop::collection::vec(any::<u8>(), 0..32),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..32)
        )
            .prop_map(|(a, n, b)| [a, format!("\"max_tokens\" :{n}").into_bytes(), b].concat()),
    ];
    runner::run("gateway_max_tokens_scan", 2000, bodies, |body| {
        let found = meridian_gateway::scan_max_tokens(&body);
        if let Ok(v) = serde_json::from_slice::<Value>(&body)
            && let Some(n) = v.get("max_tokens").and_then(Value::as_u64)
            && found.is_none_or(|f| f < n)
        {
            return Err(format!("max_tokens {n} of a JSON body, scanned {found:?}"));
        }
        Ok(())
    });
}

/// The region's chat body parser in process: any bytes give a body or an
/// invalid-argument error with a message, never a panic.
#[test]
fn region_chat_body_parser() {
    let bodies = prop_oneof![
        3 => json::chat_body(TEST_MODEL).prop_map(|v| v.to_string().into_bytes()),
        1 => (json::chat_body(TEST_MODEL), prop::collection::vec((any::<usize>(), any::<u8>()), 1..4))
            .prop_map(|(v, edits)| corrupt(v.to_string().into_bytes(), &edits)),
        1 => json::any_json().prop_map(|v| v.to_string().into_bytes()),
    ];
    runner::run("region_chat_body_parser", 1000, bodies, |body| {
        match meridian_regional::check_chat_body(&body) {
            Ok(()) => Ok(()),
            Err(e) => {
                let message = e.to_string();
                let code = tonic::Status::from(e).code();
                if code != tonic::Code::InvalidArgument || message.is_empty() {
                    return Err(format!("refused as {code:?}: {message:?}"));
                }
                Ok(())
            }
        }
    });
}
