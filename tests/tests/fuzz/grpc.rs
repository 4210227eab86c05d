//! Every `meridian.v1` method of a real region, sent arbitrary bytes,
//! arbitrary protobuf (right field numbers, any wire types and values) and
//! typed messages with any field values. Each answer must be a status the
//! service chose: not INTERNAL or UNKNOWN (what a panic or a broken
//! connection turns into), and the node must stay up.

use std::time::Duration;

use bytes::{Buf, BufMut};
use futures::StreamExt;
use meridian_proto::v1;
use proptest::prelude::*;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

use meridian_tests::{RegionSandbox, TEST_MODEL};

use crate::json;
use crate::runner::{self, Verdict};

/// Every method of every service in `proto/meridian/v1`, but
/// `Admin/Drain`: a drained node refuses all work by design, so one valid
/// drain would end the run's usefulness, not find a bug.
pub(crate) const METHODS: &[&str] = &[
    "/meridian.v1.Inference/Generate",
    "/meridian.v1.Inference/GenerateStream",
    "/meridian.v1.Inference/Embed",
    "/meridian.v1.Inference/ListModels",
    "/meridian.v1.Telemetry/Ingest",
    "/meridian.v1.Telemetry/Query",
    "/meridian.v1.Replication/Pull",
    "/meridian.v1.Replication/Ack",
    "/meridian.v1.Replication/Snapshot",
    "/meridian.v1.Jobs/Submit",
    "/meridian.v1.Jobs/Get",
    "/meridian.v1.Jobs/Watch",
    "/meridian.v1.Jobs/Cancel",
    "/meridian.v1.Admin/RegionStatus",
    "/meridian.v1.Admin/PurgeCache",
];

/// How long a streaming answer is read before the case lets it go (Pull and
/// Watch stay open by design).
const STREAM_READ: Duration = Duration::from_millis(300);
const CASE_TIMEOUT: Duration = Duration::from_secs(20);

/// One call: the method and its request messages (several for Ingest, the
/// client-streaming method; one for the others, or several to see extra
/// messages refused).
#[derive(Clone)]
pub(crate) struct Case {
    pub method: &'static str,
    pub messages: Vec<Vec<u8>>,
}

/// Messages as escaped bytes, so a finding reads compactly.
impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.method)?;
        for m in &self.messages {
            write!(f, " b\"{}\"", m.escape_ascii())?;
        }
        Ok(())
    }
}

/// A protobuf field with any wire type; nested messages recurse.
#[derive(Debug, Clone)]
enum Field {
    Varint(u32, u64),
    Fixed64(u32, u64),
    Fixed32(u32, u32),
    Bytes(u32, Vec<u8>),
    Message(u32, Vec<Field>),
}

fn encode_fields(fields: &[Field], buf: &mut Vec<u8>) {
    for f in fields {
        match f {
            Field::Varint(n, v) => {
                encode_key(*n, WireType::Varint, buf);
                encode_varint(*v, buf);
            }
            Field::Fixed64(n, v) => {
                encode_key(*n, WireType::SixtyFourBit, buf);
                buf.put_u64_le(*v);
            }
            Field::Fixed32(n, v) => {
                encode_key(*n, WireType::ThirtyTwoBit, buf);
                buf.put_u32_le(*v);
            }
            Field::Bytes(n, b) => {
                encode_key(*n, WireType::LengthDelimited, buf);
                encode_varint(b.len() as u64, buf);
                buf.extend_from_slice(b);
            }
            Field::Message(n, inner) => {
                let mut nested = Vec::new();
                encode_fields(inner, &mut nested);
                encode_key(*n, WireType::LengthDelimited, buf);
                encode_varint(nested.len() as u64, buf);
                buf.extend_from_slice(&nested);
            }
        }
    }
}

fn field_number() -> BoxedStrategy<u32> {
    prop_oneof![8 => 1u32..12, 1 => 1u32..(1 << 29)].boxed()
}

fn wire_message() -> BoxedStrategy<Vec<Field>> {
    let leaf = prop_oneof![
        (field_number(), prop_oneof![0u64..100, any::<u64>()])
            .prop_map(|(n, v)| Field::Varint(n, v)),
        (field_number(), any::<u64>()).prop_map(|(n, v)| Field::Fixed64(n, v)),
        (field_number(), any::<u32>()).prop_map(|(n, v)| Field::Fixed32(n, v)),
        (
            field_number(),
            prop_oneof![
                3 => json::text().prop_map(String::into_bytes),
                1 => Just(TEST_MODEL.as_bytes().to_vec()),
                1 => prop::collection::vec(any::<u8>(), 0..32),
            ]
        )
            .prop_map(|(n, b)| Field::Bytes(n, b)),
    ];
    let field = leaf.prop_recursive(3, 24, 4, |inner| {
        (field_number(), prop::collection::vec(inner, 0..4)).prop_map(|(n, f)| Field::Message(n, f))
    });
    prop::collection::vec(field, 0..6).boxed()
}

fn timestamp() -> BoxedStrategy<Option<prost_types::Timestamp>> {
    let now = chrono::Utc::now().timestamp();
    prop_oneof![
        2 => (now - 86_400..now + 60).prop_map(|seconds| Some(prost_types::Timestamp { seconds, nanos: 0 })),
        1 => (any::<i64>(), any::<i32>()).prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos })),
        1 => Just(None),
    ]
    .boxed()
}

fn generate_request() -> BoxedStrategy<v1::GenerateRequest> {
    let message = (
        prop_oneof![3 => prop::sample::select(vec!["system", "user", "assistant"]).prop_map(str::to_string), 1 => json::text()],
        json::text(),
    )
        .prop_map(|(role, content)| v1::ChatMessage { role, content, ..Default::default() });
    (
        prop_oneof![4 => Just(TEST_MODEL.to_string()), 1 => json::text()],
        prop::collection::vec(message, 0..3),
        prop_oneof![3 => prop::option::of(1u32..24), 1 => prop::option::of(any::<u32>())],
        prop::option::of(prop_oneof![0.0f32..2.0, any::<f32>()]),
        prop::option::of(any::<u64>()),
        prop::collection::vec(json::text(), 0..3),
    )
        .prop_map(
            |(model, messages, max_tokens, temperature, seed, stop)| v1::GenerateRequest {
                model,
                messages,
                max_tokens,
                temperature,
                seed,
                stop,
                ..Default::default()
            },
        )
        .boxed()
}

fn reading() -> BoxedStrategy<v1::Reading> {
    (
        prop_oneof![3 => "[a-z0-9]{1,8}".boxed(), 1 => json::text()],
        timestamp(),
        prop_oneof![3 => "[a-z_]{1,8}".boxed(), 1 => json::text()],
        any::<f64>(),
        prop::collection::hash_map("[a-z]{0,4}", json::text(), 0..3),
    )
        .prop_map(|(device_id, ts, metric, value, labels)| v1::Reading {
            device_id,
            ts,
            metric,
            value,
            labels,
        })
        .boxed()
}

fn query_request() -> BoxedStrategy<v1::QueryRequest> {
    (
        "[a-z0-9]{0,8}",
        "[a-z_]{0,8}",
        timestamp(),
        timestamp(),
        prop::option::of(
            (any::<i64>(), any::<i32>())
                .prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
        ),
        prop::collection::vec(prop_oneof![0i32..6, any::<i32>()], 0..4),
    )
        .prop_map(
            |(device_id, metric, start, end, bucket, aggregates)| v1::QueryRequest {
                device_id,
                metric,
                start,
                end,
                bucket,
                aggregates,
                ..Default::default()
            },
        )
        .boxed()
}

fn typed() -> BoxedStrategy<Case> {
    let one = |method: &'static str, m: Vec<u8>| Case {
        method,
        messages: vec![m],
    };
    prop_oneof![
        generate_request().prop_map(move |r| one(METHODS[0], r.encode_to_vec())),
        generate_request().prop_map(move |r| one(METHODS[1], r.encode_to_vec())),
        (
            generate_request(),
            prop_oneof![0i32..4, any::<i32>()],
            json::text()
        )
            .prop_map(move |(r, priority, key)| {
                one(
                    "/meridian.v1.Jobs/Submit",
                    v1::SubmitJobRequest {
                        request: Some(r),
                        priority,
                        idempotency_key: key,
                    }
                    .encode_to_vec(),
                )
            }),
        prop::collection::vec(prop::collection::vec(reading(), 0..6), 0..4).prop_map(|batches| {
            Case {
                method: "/meridian.v1.Telemetry/Ingest",
                messages: batches
                    .into_iter()
                    .map(|readings| v1::IngestRequest { readings }.encode_to_vec())
                    .collect(),
            }
        }),
        query_request().prop_map(move |q| one("/meridian.v1.Telemetry/Query", q.encode_to_vec())),
    ]
    .boxed()
}

pub(crate) fn cases() -> BoxedStrategy<Case> {
    let method = prop::sample::select(METHODS.to_vec());
    let wire =
        (method.clone(), prop::collection::vec(wire_message(), 1..3)).prop_map(|(method, ms)| {
            Case {
                method,
                messages: ms
                    .iter()
                    .map(|fields| {
                        let mut buf = Vec::new();
                        encode_fields(fields, &mut buf);
                        buf
                    })
                    .collect(),
            }
        });
    let raw = (
        method,
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..48), 1..3),
    )
        .prop_map(|(method, messages)| Case { method, messages });
    prop_oneof![3 => wire, 2 => typed(), 1 => raw].boxed()
}

/// Sends the case's messages as they are and reads what comes back.
pub(crate) async fn check(channel: &Channel, case: &Case) -> Verdict {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| format!("{}: channel not ready: {e}", case.method))?;
    let mut request = tonic::Request::new(futures::stream::iter(case.messages.clone()));
    request
        .metadata_mut()
        .insert("x-meridian-tenant", "fuzz".parse().expect("ascii"));
    request.set_timeout(CASE_TIMEOUT);
    let path = case.method.parse().expect("a method path");
    let answer = tokio::time::timeout(CASE_TIMEOUT, async {
        let mut stream = grpc.streaming(request, path, RawCodec).await?.into_inner();
        let deadline = tokio::time::Instant::now() + STREAM_READ;
        while let Ok(next) = tokio::time::timeout_at(deadline, stream.next()).await {
            match next {
                Some(Ok(_)) => {}
                Some(Err(status)) => return Err(status),
                None => break,
            }
        }
        Ok(())
    })
    .await
    .map_err(|_| format!("{}: no answer in {CASE_TIMEOUT:?}", case.method))?;
    match answer {
        Ok(()) => Ok(()),
        Err(s) if !chosen(&s) => Err(format!("{}: {:?}: {}", case.method, s.code(), s.message())),
        Err(_) => Ok(()),
    }
}

/// Whether a status is one the service (or tonic's codec) chose, rather
/// than what a panic, a reset stream or a dropped connection turns into.
/// tonic answers a message that does not decode with INTERNAL, as grpc-go
/// does; that one is the codec's choice, any other INTERNAL is not.
fn chosen(s: &tonic::Status) -> bool {
    let message = s.message();
    let broken = [
        "transport error",
        "h2 protocol error",
        "connection reset",
        "broken pipe",
        "panicked",
    ]
    .iter()
    .any(|m| message.to_ascii_lowercase().contains(m));
    let ok_code = match s.code() {
        tonic::Code::Unknown => false,
        tonic::Code::Internal => message.starts_with("failed to decode Protobuf message"),
        _ => true,
    };
    ok_code && !broken && !message.is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_messages_of_every_service() {
    meridian_tests::init_logging();
    let region = RegionSandbox::start("us-east").await;
    let channel = tonic::transport::Endpoint::from_shared(region.url())
        .expect("the region's URL")
        .connect()
        .await
        .expect("the region answers");
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        runner::run("grpc", 200, cases(), |case| {
            handle.block_on(check(&channel, &case))
        });
    });
    crate::http::assert_up(&reqwest::Client::new(), &region.url()).await;
}

/// Messages as bytes, unchanged both ways.
#[derive(Debug, Clone, Copy)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}
