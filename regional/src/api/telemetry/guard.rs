//! Counts the readings of each `IngestRequest` of a gRPC Ingest stream as
//! its bytes arrive, before tonic decodes the message. An empty reading is
//! two bytes on the wire and over a hundred once decoded, so a message of
//! tens of thousands of them would cost tens of MiB; a batch with more than
//! `max_batch` readings is never decoded: it reaches the handler as an
//! empty batch, with its count beside it ([`Oversized`]), and is rejected
//! whole as the Ingest proto says.
//!
//! The walk reads only the gRPC frame headers and the top-level field keys
//! and lengths of each message; a message passes on whole once complete
//! (tonic holds a whole message anyway), unchanged. A malformed message is
//! left for prost to refuse.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use axum::body::Bytes;
use axum::http::Request;
use bytes::BytesMut;
use http_body::{Body as HttpBody, Frame, SizeHint};
use meridian_proto::v1::telemetry_server::TelemetryServer;
use tonic::Status;
use tonic::server::NamedService;

use super::grpc::TelemetryApi;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where the walk is in the stream.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    /// Reading the 5-byte frame header: `have` bytes so far.
    Header { have: u8 },
    /// Inside a message, `left` bytes of it still to come.
    Message { left: u64 },
    /// A compressed message (which tonic refuses) or one this walk cannot
    /// follow: its `left` bytes pass unread.
    Opaque { left: u64 },
}

/// Where the walk is inside one message's top-level fields.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Field {
    /// Reading a field key varint (`value` so far, `shift` bits).
    Key { value: u64, shift: u32 },
    /// Reading a length or varint value.
    Varint {
        value: u64,
        shift: u32,
        length: bool,
    },
    /// Skipping a field's payload.
    Skip { left: u64 },
}

const KEY: Field = Field::Key { value: 0, shift: 0 };

/// The counting state of one request body.
#[derive(Debug)]
pub(super) struct Counter {
    max: u32,
    max_bytes: u32,
    step: Step,
    field: Field,
    header: [u8; 5],
    readings: u32,
    batch: u32,
}

/// What [`Counter::feed`] found: a message that ended after `used` bytes
/// of the input, with its readings counted when they are over the limit.
#[derive(Debug, PartialEq)]
pub(super) struct Ended {
    pub used: usize,
    pub oversized: Option<u32>,
}

impl Counter {
    pub(super) fn new(max: u32, max_bytes: usize) -> Self {
        Self {
            max,
            max_bytes: u32::try_from(max_bytes).unwrap_or(u32::MAX),
            step: Step::Header { have: 0 },
            field: KEY,
            header: [0; 5],
            readings: 0,
            batch: 0,
        }
    }

    /// Whether the message being read already holds too many readings.
    fn over(&self) -> bool {
        self.readings > self.max
    }

    /// Walks `bytes` up to the end of the next message, if it ends in them.
    /// A message longer than the size limit is an error at its header,
    /// before any of it is kept.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Result<Option<Ended>, Status> {
        let mut at = 0;
        while at < bytes.len() {
            match self.step {
                Step::Header { have } => {
                    self.header[usize::from(have)] = bytes[at];
                    at += 1;
                    let have = have + 1;
                    if have < 5 {
                        self.step = Step::Header { have };
                        continue;
                    }
                    let len = u32::from_be_bytes([
                        self.header[1],
                        self.header[2],
                        self.header[3],
                        self.header[4],
                    ]);
                    if len > self.max_bytes {
                        return Err(Status::resource_exhausted(format!(
                            "IngestRequest {} of the stream is {len} bytes, over the limit of {} \
                             set by `telemetry.max_body_bytes`",
                            self.batch, self.max_bytes
                        )));
                    }
                    self.readings = 0;
                    self.field = KEY;
                    self.step = match (self.header[0], len) {
                        (_, 0) => return Ok(Some(self.end_message(at))),
                        (0, left) => Step::Message {
                            left: u64::from(left),
                        },
                        (_, left) => Step::Opaque {
                            left: u64::from(left),
                        },
                    };
                }
                Step::Opaque { left } => {
                    let n = left.min((bytes.len() - at) as u64);
                    at += n as usize;
                    if n == left {
                        return Ok(Some(self.end_message(at)));
                    }
                    self.step = Step::Opaque { left: left - n };
                }
                Step::Message { left } => {
                    let room = left.min((bytes.len() - at) as u64) as usize;
                    self.walk(&bytes[at..at + room]);
                    at += room;
                    let left = left - room as u64;
                    if left == 0 {
                        return Ok(Some(self.end_message(at)));
                    }
                    self.step = match self.field {
                        // A field that claims to run past the message:
                        // prost refuses it; nothing more to count.
                        Field::Skip { left: skip } if skip > left => Step::Opaque { left },
                        _ => Step::Message { left },
                    };
                }
            }
        }
        Ok(None)
    }

    fn end_message(&mut self, used: usize) -> Ended {
        let oversized = self.over().then_some(self.readings);
        self.readings = 0;
        self.batch = self.batch.saturating_add(1);
        self.step = Step::Header { have: 0 };
        Ended { used, oversized }
    }

    /// Walks the fields in `bytes`, all inside the current message.
    fn walk(&mut self, bytes: &[u8]) {
        let mut at = 0;
        while at < bytes.len() {
            match self.field {
                Field::Skip { left } => {
                    let n = left.min((bytes.len() - at) as u64);
                    at += n as usize;
                    self.field = if n == left {
                        KEY
                    } else {
                        Field::Skip { left: left - n }
                    };
                }
                Field::Key { value, shift } | Field::Varint { value, shift, .. } => {
                    let b = bytes[at];
                    at += 1;
                    let value = value | u64::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
                    let length = matches!(self.field, Field::Varint { length: true, .. });
                    if b & 0x80 != 0 && shift < 63 {
                        self.field = match self.field {
                            Field::Key { .. } => Field::Key {
                                value,
                                shift: shift + 7,
                            },
                            _ => Field::Varint {
                                value,
                                shift: shift + 7,
                                length,
                            },
                        };
                        continue;
                    }
                    self.field = match self.field {
                        Field::Key { .. } => self.after_key(value),
                        _ if length => Field::Skip { left: value },
                        _ => KEY,
                    };
                }
            }
        }
    }

    /// What follows a field key: the readings field is counted.
    fn after_key(&mut self, key: u64) -> Field {
        let (number, wire_type) = (key >> 3, key & 7);
        if number == 1 && wire_type == 2 {
            self.readings = self.readings.saturating_add(1);
        }
        match wire_type {
            0 => Field::Varint {
                value: 0,
                shift: 0,
                length: false,
            },
            1 => Field::Skip { left: 8 },
            2 => Field::Varint {
                value: 0,
                shift: 0,
                length: true,
            },
            5 => Field::Skip { left: 4 },
            // Groups and invalid wire types: prost refuses the message, so
            // its bytes need no counting.
            _ => Field::Skip { left: u64::MAX },
        }
    }
}

/// The batches the guard took out of a stream, as (position in the stream,
/// readings counted), in stream order; the handler rejects each whole.
#[derive(Debug, Clone, Default)]
pub(in crate::api) struct Oversized(Arc<Mutex<VecDeque<(u32, u32)>>>);

impl Oversized {
    /// The readings of batch `index` if the guard took it out.
    pub(super) fn take(&self, index: u32) -> Option<u32> {
        let mut queue = self.0.lock().expect("not poisoned");
        match queue.front() {
            Some(&(i, count)) if i == index => {
                queue.pop_front();
                Some(count)
            }
            _ => None,
        }
    }
}

/// An empty `IngestRequest`: what an oversized batch becomes on its way to
/// the decoder.
const EMPTY_MESSAGE: [u8; 5] = [0; 5];

/// A request body whose messages pass on whole once [`Counter`] has seen
/// them, but for a batch of too many readings, which passes on as an empty
/// one (its count noted in [`Oversized`]) and is never kept whole.
pub(super) struct Counted<B> {
    inner: B,
    counter: Counter,
    /// The message being read, until it is complete.
    message: BytesMut,
    /// Complete messages, ready to pass on.
    out: BytesMut,
    oversized: Oversized,
    ended: bool,
}

impl<B> Counted<B> {
    pub(super) fn new(inner: B, max: u32, max_bytes: usize, oversized: Oversized) -> Self {
        Self {
            inner,
            counter: Counter::new(max, max_bytes),
            message: BytesMut::new(),
            out: BytesMut::new(),
            oversized,
            ended: false,
        }
    }

    fn take_in(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            match self.counter.feed(data)? {
                Some(Ended { used, oversized }) => {
                    match oversized {
                        Some(count) => {
                            let index = self.counter.batch - 1;
                            self.oversized
                                .0
                                .lock()
                                .expect("not poisoned")
                                .push_back((index, count));
                            self.out.extend_from_slice(&EMPTY_MESSAGE);
                        }
                        None => {
                            self.out.extend_from_slice(&self.message);
                            self.out.extend_from_slice(&data[..used]);
                        }
                    }
                    self.message.clear();
                    data = &data[used..];
                }
                None => {
                    if self.counter.over() {
                        // Never passed on: nothing of it is kept.
                        self.message = BytesMut::new();
                    } else {
                        self.message.extend_from_slice(data);
                    }
                    data = &[];
                }
            }
        }
        Ok(())
    }
}

impl<B> HttpBody for Counted<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if !this.out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(this.out.split().freeze()))));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None => {
                    this.ended = true;
                    // A message cut short: the decoder reports it.
                    let rest = std::mem::take(&mut this.message);
                    this.out.extend_from_slice(&rest);
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if let Err(status) = this.take_in(&data) {
                            this.ended = true;
                            this.out.clear();
                            return Poll::Ready(Some(Err(Box::new(status))));
                        }
                    }
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.out.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// The Telemetry service with its Ingest request bodies [`Counted`].
#[derive(Clone)]
pub(in crate::api) struct Guarded {
    inner: TelemetryServer<TelemetryApi>,
    max_batch: u32,
    max_bytes: usize,
}

impl Guarded {
    pub(super) fn new(
        inner: TelemetryServer<TelemetryApi>,
        max_batch: u32,
        max_bytes: usize,
    ) -> Self {
        Self {
            inner,
            max_batch,
            max_bytes,
        }
    }
}

impl NamedService for Guarded {
    const NAME: &'static str = <TelemetryServer<TelemetryApi> as NamedService>::NAME;
}

impl tower::Service<Request<tonic::body::Body>> for Guarded {
    type Response =
        <TelemetryServer<TelemetryApi> as tower::Service<Request<tonic::body::Body>>>::Response;
    type Error = Infallible;
    type Future =
        <TelemetryServer<TelemetryApi> as tower::Service<Request<tonic::body::Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower::Service::<Request<tonic::body::Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut req: Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path().ends_with("/Ingest") {
            let oversized = Oversized::default();
            req.extensions_mut().insert(oversized.clone());
            let (max, max_bytes) = (self.max_batch, self.max_bytes);
            req = req
                .map(|body| tonic::body::Body::new(Counted::new(body, max, max_bytes, oversized)));
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use meridian_proto::v1 as pb;
    use prost::Message;

    use super::*;

    fn frame(msg: &pb::IngestRequest) -> Vec<u8> {
        let body = msg.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn batch(n: usize) -> pb::IngestRequest {
        pb::IngestRequest {
            readings: (0..n)
                .map(|i| pb::Reading {
                    device_id: format!("d{i}"),
                    metric: "m".into(),
                    value: 1.5,
                    labels: [("site".to_string(), "x".repeat(200))].into(),
                    ts: Some(prost_types::Timestamp {
                        seconds: 1_700_000_000,
                        nanos: 5,
                    }),
                })
                .collect(),
        }
    }

    /// Feeds `bytes` through [`Counted::take_in`] in pieces of `piece`
    /// bytes; returns what passes on and the batches taken out.
    /// What passes on, and the (batch, count) of each batch taken out.
    type Passed = (Vec<u8>, Vec<(u32, u32)>);

    fn pass(max: u32, bytes: &[u8], piece: usize) -> Result<Passed, Status> {
        let oversized = Oversized::default();
        let mut c = Counted::new((), max, 1 << 20, oversized.clone());
        let mut out = Vec::new();
        for chunk in bytes.chunks(piece) {
            c.take_in(chunk)?;
            out.extend_from_slice(&c.out.split());
        }
        assert!(c.message.is_empty(), "ends between messages");
        let taken = oversized.0.lock().unwrap().drain(..).collect();
        Ok((out, taken))
    }

    #[test]
    fn batches_up_to_the_limit_pass_unchanged_in_any_split() {
        let mut stream = frame(&batch(3));
        stream.extend(frame(&batch(0)));
        stream.extend(frame(&batch(2)));
        for piece in [1, 2, 3, 7, 64, 100_000] {
            let (out, taken) = pass(3, &stream, piece).unwrap();
            assert_eq!(out, stream, "piece {piece}");
            assert!(taken.is_empty());
        }
    }

    #[test]
    fn a_batch_over_the_limit_passes_on_empty_with_its_count() {
        let mut stream = frame(&batch(2));
        stream.extend(frame(&batch(4)));
        stream.extend(frame(&batch(1)));
        let mut expected = frame(&batch(2));
        expected.extend(frame(&batch(0)));
        expected.extend(frame(&batch(1)));
        for piece in [1, 5, 1_000_000] {
            let (out, taken) = pass(3, &stream, piece).unwrap();
            assert_eq!(out, expected, "piece {piece}");
            assert_eq!(taken, vec![(1, 4)]);
        }
        // Empty readings: two bytes each.
        let empty = pb::IngestRequest {
            readings: vec![pb::Reading::default(); 10_000],
        };
        let (out, taken) = pass(9_999, &frame(&empty), 4096).unwrap();
        assert_eq!((out, taken), (frame(&batch(0)), vec![(0, 10_000)]));
        let (out, _) = pass(10_000, &frame(&empty), 4096).unwrap();
        assert_eq!(out, frame(&empty));
    }

    #[test]
    fn a_message_over_the_size_limit_is_refused_at_its_header() {
        let e = pass(10, &[0, 0x10, 0, 0, 0, 1, 2, 3], 3).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message().contains("telemetry.max_body_bytes"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn malformed_and_compressed_messages_are_left_to_the_decoder() {
        // A length that runs past the message, then a good batch.
        let mut stream = vec![0, 0, 0, 0, 3, 0x0a, 0xff, 0x01];
        stream.extend(frame(&batch(1)));
        assert_eq!(pass(1, &stream, 1).unwrap().0, stream);
        let mut compressed = frame(&batch(5));
        compressed[0] = 1;
        assert_eq!(pass(1, &compressed, 3).unwrap().0, compressed);
    }
}
