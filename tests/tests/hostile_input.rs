//! Hostile input against a real region: bodies, batches, histories and
//! numbers chosen to exhaust a node or break its arithmetic get a clear
//! error naming the limit or the field, and the node keeps serving.

use std::time::Duration;

use chrono::{DateTime, Utc};
use meridian_proto::v1::telemetry_client::TelemetryClient;
use meridian_proto::v1::{IngestRequest, QueryRequest, Reading};
use meridian_tests::{RegionProcess, RegionSandbox, TEST_MODEL, init_logging};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TENANT: &str = "x-meridian-tenant";

fn setup() {
    init_logging();
}

/// One telemetry POST written by hand, so the body can be far larger than
/// what the server will read and sent while the answer is awaited: the
/// server must answer without reading it all. Returns the status and body.
async fn raw_post(
    addr: std::net::SocketAddr,
    body: Vec<u8>,
    declare_length: bool,
) -> (u16, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut rx, mut tx) = stream.into_split();
    let framing = if declare_length {
        format!("content-length: {}\r\n", body.len())
    } else {
        "transfer-encoding: chunked\r\n".to_string()
    };
    let head = format!(
        "POST /v1/telemetry HTTP/1.1\r\nhost: region\r\n{TENANT}: hostile\r\n\
         content-type: application/json\r\n{framing}\r\n"
    );
    let writer = tokio::spawn(async move {
        tx.write_all(head.as_bytes()).await?;
        for piece in body.chunks(256 * 1024) {
            if declare_length {
                tx.write_all(piece).await?;
            } else {
                tx.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                    .await?;
                tx.write_all(piece).await?;
                tx.write_all(b"\r\n").await?;
            }
        }
        if !declare_length {
            tx.write_all(b"0\r\n\r\n").await?;
        }
        // Held open until the answer is read: a half-closed connection is
        // one the server may close unanswered.
        std::future::pending::<()>().await;
        std::io::Result::Ok(())
    });
    let mut answer = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    let text = loop {
        let n = match rx.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => panic!("reading the answer (length declared: {declare_length}): {e}"),
        };
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok());
            if length.is_some_and(|l| body.len() >= l) || n == 0 {
                break text;
            }
        }
        assert!(
            n > 0,
            "the connection closed before an answer (length declared: {declare_length}): {text:?}"
        );
    };
    writer.abort();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

/// A JSON array of `n` zeros: each item costs two bytes on the wire.
fn zeros(n: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(n * 2 + 2);
    body.push(b'[');
    for i in 0..n {
        if i > 0 {
            body.push(b',');
        }
        body.push(b'0');
    }
    body.push(b']');
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_telemetry_bodies_are_refused_before_they_are_expanded() {
    setup();
    let mut region = RegionSandbox::start("eu-west").await;
    let mut node = RegionProcess::start(env!("CARGO_BIN_EXE_region-process"), &mut region).await;
    let http = reqwest::Client::new();
    let reading =
        json!([{"device_id": "d", "ts": Utc::now().to_rfc3339(), "metric": "m", "value": 1}]);
    for _ in 0..3 {
        let res = http
            .post(format!("{}/v1/telemetry", node.url()))
            .header(TENANT, "warm")
            .json(&reading)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let idle = node.rss_kib();
    println!("idle resident memory: {idle} KiB");

    // Four at once: two 64 MiB bodies of tiny items that declare their
    // length, two that do not (chunked).
    let huge = zeros(32 << 20);
    assert!(huge.len() >= 64 << 20);
    let addr = node.addr();
    let posts: Vec<_> = [true, true, false, false]
        .into_iter()
        .map(|declared| tokio::spawn(raw_post(addr, huge.clone(), declared)))
        .collect();
    drop(huge);
    let mut peak = idle;
    while !posts.iter().all(|p| p.is_finished()) {
        peak = peak.max(node.rss_kib());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for post in posts {
        let (status, body) = post.await.unwrap();
        assert_eq!(status, 413, "{body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("telemetry.max_body_bytes"), "{message}");
    }
    println!("peak resident memory under four 64 MiB bodies: {peak} KiB");
    assert!(
        peak < 2 * idle,
        "resident memory rose from {idle} KiB to {peak} KiB"
    );

    // Under the body limit but over max_batch: the items are counted, not
    // parsed, and the answer lists only the first rejections.
    let count = 3_000_000;
    let (status, body) = raw_post(addr, zeros(count), true).await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["accepted"], 0, "{body}");
    assert_eq!(body["rejected"], count, "{body}");
    let listed = body["rejections"].as_array().unwrap();
    assert_eq!(listed.len(), 1_000);
    assert!(
        listed[0]["reason"]
            .as_str()
            .unwrap()
            .contains("over the limit of 10000")
    );
    // NDJSON is counted by its lines the same way.
    let ndjson = "0\n".repeat(count);
    let res = http
        .post(format!("{}/v1/telemetry", node.url()))
        .header(TENANT, "hostile")
        .header("content-type", "application/x-ndjson")
        .body(ndjson)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["rejected"], count, "{body}");
    let after = node.rss_kib();
    println!("resident memory after: {after} KiB");
    assert!(after < 2 * idle, "resident memory stayed at {after} KiB");

    // The node still serves.
    assert!(node.running());
    let res = http
        .post(format!("{}/v1/telemetry", node.url()))
        .header(TENANT, "warm")
        .json(&reading)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_batches_of_empty_readings_are_counted_not_decoded() {
    setup();
    let mut region =
        RegionSandbox::start_with_config("eu-west", "[telemetry]\nmax_batch = 1000\n").await;
    let node = RegionProcess::start(env!("CARGO_BIN_EXE_region-process"), &mut region).await;
    let url = node.url();
    let now = Utc::now();
    let good = Reading {
        device_id: "d1".into(),
        metric: "m".into(),
        value: 1.0,
        ts: Some(prost_types::Timestamp {
            seconds: now.timestamp(),
            nanos: 0,
        }),
        labels: Default::default(),
    };
    let ingest = |batches: Vec<IngestRequest>| {
        let url = url.clone();
        async move {
            let mut client = TelemetryClient::connect(url).await.unwrap();
            let mut request = tonic::Request::new(futures::stream::iter(batches));
            request
                .metadata_mut()
                .insert(TENANT, "hostile".parse().unwrap());
            client.ingest(request).await
        }
    };
    let warm = ingest(vec![IngestRequest {
        readings: vec![good.clone()],
    }])
    .await
    .unwrap();
    assert_eq!(warm.into_inner().accepted_count, 1);
    let idle = node.rss_kib();

    // Four streams at once, each a good batch then 250,000 empty readings:
    // 500 KB on the wire, tens of MB each once decoded.
    let empty = IngestRequest {
        readings: vec![Reading::default(); 250_000],
    };
    let streams: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(ingest(vec![
                IngestRequest {
                    readings: vec![good.clone()],
                },
                empty.clone(),
            ]))
        })
        .collect();
    let mut peak = idle;
    while !streams.iter().all(|s| s.is_finished()) {
        peak = peak.max(node.rss_kib());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for stream in streams {
        let done = stream.await.unwrap().unwrap().into_inner();
        // Rejected whole, as the proto says, and listed only in part.
        assert_eq!((done.accepted_count, done.rejected_count), (1, 250_000));
        assert_eq!(done.rejections.len(), 1_000);
        assert_eq!(done.rejections[0].batch_index, 1);
        assert!(
            done.rejections[0]
                .reason
                .contains("batch of 250000 readings is over the limit of 1000"),
            "{:?}",
            done.rejections[0]
        );
    }
    println!("resident memory: idle {idle} KiB, peak {peak} KiB");
    assert!(
        peak < idle + idle / 2,
        "resident memory rose from {idle} KiB to {peak} KiB"
    );

    // A message over the size limit is refused from its header.
    let status = ingest(vec![IngestRequest {
        readings: vec![
            Reading {
                device_id: "x".repeat(2 << 20),
                ..good.clone()
            };
            1
        ],
    }])
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("telemetry.max_body_bytes"),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_apart_query_timestamps_are_an_invalid_argument() {
    setup();
    let region = RegionSandbox::start("eu-west").await;
    let mut client = TelemetryClient::connect(region.url()).await.unwrap();
    let ts = |t: DateTime<Utc>| prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    };
    let mut request = tonic::Request::new(QueryRequest {
        device_id: "d".into(),
        metric: "m".into(),
        start: Some(ts(DateTime::<Utc>::MIN_UTC)),
        end: Some(ts(DateTime::<Utc>::MAX_UTC)),
        bucket: Some(prost_types::Duration {
            seconds: 0,
            nanos: 1_000,
        }),
        ..Default::default()
    });
    request.metadata_mut().insert(TENANT, "t".parse().unwrap());
    let status = client.query(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("buckets"), "{status:?}");
    // Timestamps out of any calendar's range are named too.
    let mut request = tonic::Request::new(QueryRequest {
        device_id: "d".into(),
        metric: "m".into(),
        start: Some(prost_types::Timestamp {
            seconds: i64::MIN,
            nanos: 0,
        }),
        end: Some(ts(Utc::now())),
        ..Default::default()
    });
    request.metadata_mut().insert(TENANT, "t".parse().unwrap());
    let status = client.query(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("start"), "{status:?}");
}

async fn chat(http: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let res = http
        .post(format!("{url}/v1/chat/completions"))
        .header(TENANT, "hostile")
        .json(body)
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_numbers_and_sizes_get_errors_that_name_them() {
    setup();
    let region =
        RegionSandbox::start_with_config("eu-west", "[inference]\nmax_messages = 8\n").await;
    let http = reqwest::Client::new();
    let url = region.url();
    let ask = |extra: Value| {
        let mut body =
            json!({"model": TEST_MODEL, "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };

    // The largest max_tokens u32 holds, plus the prompt: no wrap, no panic.
    let (status, body) = chat(&http, &url, &ask(json!({"max_tokens": 4_294_967_295u64}))).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
    let (status, body) = chat(&http, &url, &ask(json!({"max_tokens": 4_294_967_296u64}))).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "max_tokens", "{body}");
    for n in [json!(-1), json!(1.5), json!("NaN")] {
        let (status, body) = chat(&http, &url, &ask(json!({"max_tokens": n}))).await;
        assert_eq!(status, 400, "max_tokens {n}: {body}");
    }
    let (status, body) = chat(&http, &url, &ask(json!({"n": 4_294_967_295u64}))).await;
    assert_eq!(
        (status, body["error"]["param"].clone()),
        (400, json!("n")),
        "{body}"
    );

    // 2 MiB without a space is not one token.
    let blob = "x".repeat(2 << 20);
    let body = json!({"model": TEST_MODEL, "messages": [{"role": "user", "content": blob}]});
    let (status, body) = chat(&http, &url, &body).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");

    // Too many messages, and too large a body.
    let many: Vec<Value> = (0..9)
        .map(|_| json!({"role": "user", "content": "hi"}))
        .collect();
    let (status, body) = chat(&http, &url, &json!({"model": TEST_MODEL, "messages": many})).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["param"], "messages", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("inference.max_messages"),
        "{body}"
    );
    let big = "word ".repeat(2 << 20);
    let body = json!({"model": TEST_MODEL, "messages": [{"role": "user", "content": big}]});
    let (status, body) = chat(&http, &url, &body).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("server.max_body_bytes"),
        "{body}"
    );

    // The node still answers.
    let (status, body) = chat(&http, &url, &ask(json!({"max_tokens": 5}))).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_stops_growing_at_its_limit() {
    setup();
    let region = RegionSandbox::start_with_config(
        "eu-west",
        "[inference]\nmax_conversation_bytes = 2000\nmax_messages = 64\n",
    )
    .await;
    let http = reqwest::Client::new();
    let url = region.url();
    let turn = |n: usize| {
        json!({"model": TEST_MODEL, "conversation_id": "long-talk", "max_tokens": 8,
               "messages": [{"role": "user", "content": format!("{n} {}", "z".repeat(300))}]})
    };
    let mut refused = None;
    for n in 0..20 {
        let (status, body) = chat(&http, &url, &turn(n)).await;
        if status != 200 {
            refused = Some((n, status, body));
            break;
        }
    }
    let (n, status, body) = refused.expect("the conversation hits its limit");
    assert!(n >= 3, "refused at turn {n}");
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("inference.max_conversation_bytes"),
        "{body}"
    );
    // The refused turn stored nothing.
    let res: Value = http
        .get(format!("{url}/v1/conversations/long-talk"))
        .header(TENANT, "hostile")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(res["messages"].as_array().unwrap().len(), 2 * n, "{res}");

    // A NUL cannot be stored as text: a turn carrying one is refused by
    // name, not failed by the database.
    let nul = json!({"model": TEST_MODEL, "conversation_id": "nul-talk", "max_tokens": 4,
                     "messages": [{"role": "user", "content": "before\0after"}]});
    let (status, body) = chat(&http, &url, &nul).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "messages", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("NUL"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_at_the_edge_reach_no_operator_endpoint() {
    setup();
    let token = "0123456789abcdef-operators";
    let cluster = meridian_tests::ClusterSandbox::start_with(&["eu-west"], |config| {
        config.admin_token = Some(token.into());
    })
    .await;
    let http = reqwest::Client::new();
    let gateway = cluster.gateway_url();
    // Straight to the region, which takes the tenant header on a
    // plaintext mesh: its metrics then name the tenant.
    let res = http
        .post(format!("{}/v1/chat/completions", cluster.regions[0].url()))
        .header(TENANT, "acme-secret-project")
        .json(&json!({"model": TEST_MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // The region's own metrics name its tenants, so the edge must not
    // serve them.
    let region_metrics = http
        .get(format!("{}/metrics", cluster.regions[0].url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(region_metrics.contains("acme-secret-project"));
    for path in ["/metrics", "/metrics/", "/admin/cache/acme-secret-project"] {
        let res = http.get(format!("{gateway}{path}")).send().await.unwrap();
        assert_eq!(res.status(), 404, "{path}");
        let body: Value = res.json().await.unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("operators and peers on the mesh"),
            "{body}"
        );
    }
    let mut admin = meridian_proto::v1::admin_client::AdminClient::connect(gateway.clone())
        .await
        .unwrap();
    let status = admin
        .region_status(meridian_proto::v1::RegionStatusRequest {})
        .await
        .unwrap_err();
    // The management API at the edge takes an operator token, and nothing
    // else reaches a region.
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("operator token"), "{status:?}");

    // The gateway's own admin port asks for its token, but of the probes.
    let admin_url = cluster.admin_url();
    let res = http
        .get(format!("{admin_url}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = http
        .get(format!("{admin_url}/metrics"))
        .bearer_auth("0123456789abcdef-operatorz")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = http
        .get(format!("{admin_url}/metrics"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = http
        .get(format!("{admin_url}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_nobody_reads_gives_its_admission_slot_back() {
    setup();
    let region = RegionSandbox::start_with_config(
        "eu-west",
        "[server]\nstream_write_timeout_ms = 1500\n\
         [inference]\nmax_in_flight_per_tenant = 1\n\
         [[models]]\nid = \"sim-long\"\ncontext_window_tokens = 400000\n\
         backend = { kind = \"sim\", prefill_us_per_token = 0, ttft_ms = 0, per_token_ms = 0 }\n",
    )
    .await;
    // A reader with a tiny window that never reads: tens of MB of events
    // (this seed's answer is long) fill every buffer on the way.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(region.addr()).await.unwrap();
    let body = json!({"model": "sim-long", "stream": true, "max_tokens": 300_000, "seed": 7,
                      "messages": [{"role": "user", "content": "tell me everything"}]})
    .to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: region\r\n{TENANT}: hostile\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(body.as_bytes()).await.unwrap();

    let http = reqwest::Client::new();
    let small = json!({"model": TEST_MODEL, "max_tokens": 4,
                       "messages": [{"role": "user", "content": "hi"}]});
    let chat = || {
        http.post(format!("{}/v1/chat/completions", region.url()))
            .header(TENANT, "hostile")
            .json(&small)
            .send()
    };
    // Held while the stalled stream is still waited on...
    tokio::time::sleep(Duration::from_millis(300)).await;
    let res = chat().await.unwrap();
    assert_eq!(
        res.status(),
        429,
        "the stalled stream holds the tenant's one slot"
    );
    // ...and given back once the stream is cut.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let res = chat().await.unwrap();
        if res.status() == 200 {
            break;
        }
        assert_eq!(res.status(), 429);
        assert!(
            std::time::Instant::now() < deadline,
            "the slot was never given back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(stalled);
}
