//! An OTLP/gRPC trace collector on a free loopback port: the gateway and
//! regions export to it as they would to an OpenTelemetry Collector, and
//! tests read back what arrived.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use tokio::sync::{Notify, oneshot};

/// One span as the collector received it; ids in lowercase hex, as in a
/// `traceparent`.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// `service.name` of the exporting component.
    pub service: String,
    /// The exporting component's resource attributes.
    pub resource: HashMap<String, String>,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// `None` for a trace's root.
    pub parent_span_id: Option<String>,
    /// The span's attributes, every value as text.
    pub attributes: HashMap<String, String>,
}

impl ReceivedSpan {
    /// The attribute's value, if the span has it.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Default)]
struct Received {
    spans: Mutex<Vec<ReceivedSpan>>,
    arrived: Notify,
}

struct Sink(Arc<Received>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let resource = rs
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(ReceivedSpan {
                    service: service.clone(),
                    resource: resource.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: (!span.parent_span_id.is_empty())
                        .then(|| hex(&span.parent_span_id)),
                    attributes: attributes(&span.attributes),
                });
            }
        }
        self.0.spans.lock().expect("not poisoned").extend(got);
        self.0.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// A running collector; stops when dropped.
pub struct OtlpCollector {
    addr: SocketAddr,
    received: Arc<Received>,
    stop: Option<oneshot::Sender<()>>,
}

impl OtlpCollector {
    /// Serves `opentelemetry.proto.collector.trace.v1.TraceService` on
    /// 127.0.0.1, on a free port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port for the collector");
        let addr = listener.local_addr().expect("a bound address");
        let received = Arc::new(Received::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let service = TraceServiceServer::new(Sink(received.clone()));
        tokio::spawn(async move {
            let serve = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                );
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "the test collector stopped");
            }
        });
        Self {
            addr,
            received,
            stop: Some(stop),
        }
    }

    /// The `otlp_endpoint` to configure.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received.spans.lock().expect("not poisoned").clone()
    }

    /// Waits until the spans received satisfy `done`, calling `flush`
    /// (which should force the exporters to send what they hold) before
    /// each look; panics after `limit`, showing what did arrive.
    pub async fn wait_for<F, Fut>(
        &self,
        limit: Duration,
        mut flush: F,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Registered before the flush, so an export it causes wakes us.
            let arrived = self.received.arrived.notified();
            flush().await;
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            // A span ended after the flush (the gateway ends its span once
            // the response is written) arrives with a later flush.
            let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !wait.is_zero(),
                "the spans wanted did not arrive within {limit:?}; got:\n{spans:#?}"
            );
            let _ = tokio::time::timeout(wait.min(Duration::from_millis(100)), arrived).await;
        }
    }
}

impl Drop for OtlpCollector {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
