//! Inputs the fuzz targets found to fail, kept as fixed cases against one
//! region: each ran into a bug that is fixed now, and must keep passing.

use meridian_tests::{RegionSandbox, TEST_MODEL};

use serde_json::json;

use crate::{grpc, http, openai, telemetry};

/// Telemetry: a NUL in a reading's metric failed the batch's insert (503);
/// now that reading is rejected by itself.
const TELEMETRY: &[(&str, &[u8])] = &[(
    "application/json",
    br#"[{"device_id":"0","labels":{},"metric":"\u0000","ts":"2026-12-06T21:47:45.616933928+00:00","value":0.0}]"#,
)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_findings_stay_fixed() {
    meridian_tests::init_logging();
    let region = RegionSandbox::start("us-east").await;
    let http_client = crate::tenant_client();
    for (content_type, body) in TELEMETRY {
        let case = telemetry::Case {
            content_type: content_type.to_string(),
            body: body.to_vec(),
        };
        telemetry::check(&http_client, &region.url(), &case)
            .await
            .unwrap_or_else(|e| panic!("{case:?}: {e}"));
    }
    // Chat: `max_tokens` of u32::MAX overflowed the context-window sum, a
    // panic that dropped the connection; now a context-length error.
    let overflow = openai::Case::Chat(json!({
        "model": TEST_MODEL,
        "max_tokens": u32::MAX,
        "messages": [{"role": "user", "content": "hi"}],
    }));
    openai::check(&http_client, &region.url(), &overflow)
        .await
        .unwrap_or_else(|e| panic!("{overflow:?}: {e}"));
    let channel = tonic::transport::Endpoint::from_shared(region.url())
        .expect("the region's URL")
        .connect()
        .await
        .expect("the region answers");
    let long_model = [
        b"\n\x88\x7d".as_slice(),
        &[b'x'; 16008],
        b"\x12\x08\n\x06system",
    ]
    .concat();
    let cases = [
        // Jobs: a NUL in the idempotency key failed the insert (INTERNAL).
        grpc::Case {
            method: "/meridian.v1.Jobs/Submit",
            messages: vec![
                [
                    b"\n\x14\n\x08".as_slice(),
                    TEST_MODEL.as_bytes(),
                    b"\x12\x08\n\x06system\x1a\x01\x00",
                ]
                .concat(),
            ],
        },
        // Replication: an Ack naming a `peer_region` with a NUL reached the
        // database and failed there (INTERNAL); now INVALID_ARGUMENT.
        grpc::Case {
            method: "/meridian.v1.Replication/Ack",
            messages: vec![b"\n\x03a\x00b\x10\x01".to_vec()],
        },
        // A 16 KB model name came back in the status message, over the
        // client's header-list limit: an h2 protocol error, not NOT_FOUND.
        grpc::Case {
            method: "/meridian.v1.Inference/Generate",
            messages: vec![long_model],
        },
    ];
    for case in &cases {
        grpc::check(&channel, case)
            .await
            .unwrap_or_else(|e| panic!("{case:?}: {e}"));
    }
    // Usage: the record of a request for a model named with a NUL failed
    // its batch's insert, losing the records beside it; now it is stored
    // with the NUL replaced, and so is a normal request's after it.
    let nul_model = openai::Case::Chat(json!({
        "model": "no\u{0}such",
        "messages": [{"role": "user", "content": "hi"}],
    }));
    openai::check(&http_client, &region.url(), &nul_model)
        .await
        .unwrap_or_else(|e| panic!("{nul_model:?}: {e}"));
    let pool = sqlx::PgPool::connect(&region.postgres.url())
        .await
        .expect("the region's database");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let stored: i64 =
            sqlx::query_scalar("SELECT count(*) FROM inference_usage WHERE model = $1")
                .bind("no\u{fffd}such")
                .fetch_one(&pool)
                .await
                .expect("usage reads");
        if stored > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the usage record of a model named with a NUL was not stored"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    http::assert_up(&http_client, &region.url()).await;
}
