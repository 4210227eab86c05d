//! Telemetry ingest over HTTP against a real region: JSON arrays and NDJSON
//! of readings, plausible or not, under either content type (or another).

use proptest::prelude::*;
use serde_json::Value;

use meridian_tests::RegionSandbox;

use crate::http::{assert_up, corrupt, post};
use crate::json;
use crate::runner;

#[derive(Clone)]
pub(crate) struct Case {
    pub content_type: String,
    pub body: Vec<u8>,
}

/// The body as escaped text, so a finding reads as what was sent.
impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Case {{ content_type: {:?}, body: b\"{}\" }}",
            self.content_type,
            self.body.escape_ascii()
        )
    }
}

fn item() -> BoxedStrategy<Value> {
    prop_oneof![5 => json::reading(), 1 => json::any_json()].boxed()
}

pub(crate) fn cases() -> BoxedStrategy<Case> {
    let content_type = prop_oneof![
        4 => Just("application/json".to_string()),
        4 => Just("application/x-ndjson".to_string()),
        1 => Just("application/x-ndjson; charset=utf-8".to_string()),
        1 => "[a-z/+-]{0,24}",
    ];
    let array = prop::collection::vec(item(), 0..12)
        .prop_map(|items| Value::Array(items).to_string().into_bytes());
    let ndjson = (
        prop::collection::vec(item(), 0..12),
        prop::sample::select(vec!["\n", "\r\n", "\n\n"]),
    )
        .prop_map(|(items, sep)| {
            items
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join(sep)
                .into_bytes()
        });
    let body = prop_oneof![
        3 => array.clone(),
        3 => ndjson.clone(),
        1 => (prop_oneof![array, ndjson], prop::collection::vec((any::<usize>(), any::<u8>()), 1..4))
            .prop_map(|(b, edits)| corrupt(b, &edits)),
        1 => json::any_json().prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..128),
    ];
    (content_type, body)
        .prop_map(|(content_type, body)| Case { content_type, body })
        .boxed()
}

pub(crate) async fn check(http: &reqwest::Client, base: &str, case: &Case) -> runner::Verdict {
    post(
        http,
        &format!("{base}/v1/telemetry"),
        &case.content_type,
        case.body.clone(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_bodies_over_http() {
    meridian_tests::init_logging();
    let region = RegionSandbox::start("us-east").await;
    let http = crate::tenant_client();
    let base = region.url();
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        runner::run("telemetry_http", 200, cases(), |case| {
            handle.block_on(check(&http, &base, &case))
        });
    });
    assert_up(&http, &base).await;
}
