//! Fuzz targets of Meridian's trust boundaries, on stable Rust with
//! proptest: OpenAI bodies (through the gateway to a region, and the parsers
//! in process), telemetry ingest bodies, the protobuf messages of every
//! `meridian.v1` service, the config loader and the replication apply path.
//!
//! `make test` runs each target as a smoke test (a fixed seed, a few
//! hundred cases) and the regression inputs in `regressions.rs`;
//! `make fuzz` runs them for `FUZZ_SECONDS` in total under a random seed
//! (see `runner.rs`), one at a time:
//!
//! ```text
//! FUZZ_SECONDS=600 cargo test -p meridian-tests --test fuzz -- --test-threads=1 --nocapture
//! ```

mod config;
mod grpc;
mod http;
mod json;
mod openai;
mod regressions;
mod replication;
mod runner;
mod telemetry;

/// An HTTP client whose requests name a tenant, as the gateway's would.
fn tenant_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        "x-meridian-tenant",
        reqwest::header::HeaderValue::from_static("fuzz"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("an HTTP client")
}
