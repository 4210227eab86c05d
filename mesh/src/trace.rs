//! Distributed traces: one OpenTelemetry tracer provider per component
//! (gateway, regional node, simulator), exporting with OTLP over gRPC, and
//! W3C `traceparent` propagation between them.
//!
//! Several components can share a process (`meridian up`, the tests), and
//! each must report under its own `service.name` and region to its own
//! collector with its own sampling. So there is no process-global tracer: a
//! component starts a [`Tracer`] from its `[tracing]` config and begins its
//! spans with it; the span's [`Context`] also carries that tracer, so code
//! deep in a request (the job queue, an upstream pool) starts child spans
//! with [`child_span`] without being handed the tracer. A disabled tracer
//! starts nothing and extracts nothing: off costs a branch per request.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, Tracer as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter};
use serde::Deserialize;

/// What users of this module need from OpenTelemetry, so they share its
/// version without naming it.
pub use opentelemetry::context::FutureExt;
pub use opentelemetry::trace::{SpanKind as Kind, TraceContextExt};
pub use opentelemetry::{Context, KeyValue};

/// The W3C header (and gRPC metadata key) that carries a trace context.
pub const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// The `[tracing]` section of the gateway's and the regional node's config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceConfig {
    /// OTLP/gRPC endpoint of the collector, e.g. `http://127.0.0.1:4317`;
    /// tracing is off when absent.
    pub otlp_endpoint: Option<String>,
    /// Fraction (0 to 1) of new traces recorded. A request that arrives with
    /// a `traceparent` follows its caller's decision instead, so a trace is
    /// recorded whole or not at all.
    pub sample_ratio: f64,
    /// `service.name` of the spans; the component's own name when absent
    /// (`meridian-gateway`, `meridian-regional`).
    pub service_name: Option<String>,
    /// Time one export to the collector may take, in milliseconds.
    pub export_timeout_ms: u64,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            service_name: None,
            export_timeout_ms: 5_000,
        }
    }
}

impl TraceConfig {
    /// Tracing on, exporting everything to `endpoint`.
    pub fn otlp(endpoint: impl Into<String>) -> Self {
        Self {
            otlp_endpoint: Some(endpoint.into()),
            ..Self::default()
        }
    }

    /// Checks the section; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err("`tracing.sample_ratio` must be between 0 and 1".into());
        }
        if self.export_timeout_ms == 0 {
            return Err("`tracing.export_timeout_ms` must be at least 1".into());
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            let uri: http::Uri = endpoint
                .parse()
                .map_err(|e| format!("`tracing.otlp_endpoint` {endpoint:?} is not a URL: {e}"))?;
            // The exporter is built without TLS: collectors are reached on
            // the node (an agent or sidecar), like the Prometheus scrape.
            if uri.scheme_str() != Some("http") || uri.host().is_none() {
                return Err(format!(
                    "`tracing.otlp_endpoint` must be http://host:port, got {endpoint:?}"
                ));
            }
        }
        if self.service_name.as_deref() == Some("") {
            return Err("`tracing.service_name` must not be empty".into());
        }
        Ok(())
    }
}

/// A component's tracer: disabled, or a tracer provider exporting to a
/// collector. Cheap to clone.
#[derive(Clone, Default)]
pub struct Tracer {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

impl Tracer {
    /// A tracer that records nothing.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Starts exporting per `config` (disabled when it names no endpoint).
    /// `service` is the default `service.name`; `attributes` describe the
    /// component (its region) on every span it exports.
    pub fn start(
        config: &TraceConfig,
        service: &str,
        attributes: Vec<KeyValue>,
    ) -> Result<Self, String> {
        config.validate()?;
        let Some(endpoint) = &config.otlp_endpoint else {
            return Ok(Self::disabled());
        };
        let runtime = export_runtime()?;
        // The tonic channel spawns its connection task on the runtime that
        // is current when it is built.
        let exporter = {
            let _entered = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(Duration::from_millis(config.export_timeout_ms))
                .build()
                .map_err(|e| format!("`tracing.otlp_endpoint`: {e}"))?
        };
        let exporter = OnRuntime {
            inner: Arc::new(exporter),
            runtime: runtime.handle().clone(),
        };
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(
                config
                    .service_name
                    .clone()
                    .unwrap_or_else(|| service.to_string()),
            )
            .with_attributes(attributes)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("meridian");
        tracing::info!(endpoint = %endpoint, sample_ratio = config.sample_ratio, service, "exporting traces");
        Ok(Self {
            inner: Some(Arc::new(Inner { provider, tracer })),
        })
    }

    /// Whether spans are recorded and exported.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The caller's trace context from request headers (or gRPC metadata,
    /// which travels as headers); empty when disabled or absent.
    pub fn extract(&self, headers: &http::HeaderMap) -> Context {
        if self.inner.is_none() || !headers.contains_key(TRACEPARENT) {
            return Context::new();
        }
        TraceContextPropagator::new().extract(&HeaderExtractor(headers))
    }

    /// Starts a span, child of `parent`'s span (local or remote), or the
    /// root of a new trace. The returned context holds the span and this
    /// tracer; when disabled it is `parent`, unchanged.
    pub fn start_span(
        &self,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        parent: &Context,
        attributes: Vec<KeyValue>,
    ) -> Context {
        let Some(inner) = &self.inner else {
            return parent.clone();
        };
        let span = inner
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&inner.tracer, parent);
        parent.with_span(span).with_value(self.clone())
    }

    /// Exports every ended span now; blocks until the collector answered or
    /// the export timed out. Not for a runtime thread: use `spawn_blocking`.
    pub fn force_flush(&self) -> Result<(), String> {
        match &self.inner {
            Some(inner) => inner.provider.force_flush().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// Exports what is left and stops; spans started afterwards are
    /// dropped. Blocks like [`Tracer::force_flush`].
    pub fn shutdown(&self) {
        if let Some(inner) = &self.inner
            && let Err(e) = inner.provider.shutdown()
        {
            tracing::warn!(error = %e, "trace exporter shutdown");
        }
    }
}

/// Starts a span under the current context's span, with the tracer that
/// context carries (see [`Tracer::start_span`]); without one (tracing off,
/// or no traced request around), returns the current context unchanged.
pub fn child_span(
    name: impl Into<Cow<'static, str>>,
    kind: SpanKind,
    attributes: Vec<KeyValue>,
) -> Context {
    let current = Context::current();
    match current.get::<Tracer>() {
        Some(tracer) => tracer.start_span(name, kind, &current, attributes),
        None => current,
    }
}

/// Writes `cx`'s trace context into request headers, replacing any the
/// caller sent; writes nothing for a context without a span.
pub fn inject(cx: &Context, headers: &mut http::HeaderMap) {
    if !cx.span().span_context().is_valid() {
        return;
    }
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
    // The propagator writes an empty `tracestate` when there is none; an
    // empty header is noise, and a caller's stale one must not survive.
    if headers.get(TRACESTATE).is_some_and(|v| v.is_empty()) {
        headers.remove(TRACESTATE);
    }
}

/// `cx`'s `traceparent` value, to store with work that runs later or to
/// set on a request built another way; `None` without a span.
pub fn traceparent(cx: &Context) -> Option<String> {
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut fields = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut fields);
    fields.remove(TRACEPARENT)
}

/// The remote context a stored `traceparent` names (empty when malformed).
pub fn from_traceparent(value: &str) -> Context {
    let fields = HashMap::from([(TRACEPARENT.to_string(), value.to_string())]);
    TraceContextPropagator::new().extract(&fields)
}

/// A `tracing` span carrying `cx`'s trace and span ids, so log lines
/// written inside it (JSON logs list their spans' fields) can be joined
/// with the trace; a disabled span when `cx` has no span.
pub fn log_span(cx: &Context) -> tracing::Span {
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "trace",
        trace_id = %sc.trace_id(),
        span_id = %sc.span_id()
    )
}

/// Sets attributes on `cx`'s span (nothing when it has none or is not
/// sampled).
pub fn set_attributes(cx: &Context, attributes: impl IntoIterator<Item = KeyValue>) {
    let span = cx.span();
    if span.is_recording() {
        span.set_attributes(attributes);
    }
}

/// Marks `cx`'s span as failed with `message`.
pub fn set_error(cx: &Context, message: impl Into<Cow<'static, str>>) {
    let span = cx.span();
    if span.is_recording() {
        span.set_status(opentelemetry::trace::Status::error(message));
    }
}

/// Ends `cx`'s span (a no-op for a remote or already ended one).
pub fn end(cx: &Context) {
    cx.span().end();
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl opentelemetry::propagation::Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The runtime OTLP exports run on, one for the process. The SDK's batch
/// processor exports from a plain thread with `block_on`, but the tonic
/// client needs a tokio reactor; and a component's own runtime (a region's,
/// Pingora's) may stop before the last export.
fn export_runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    static STARTING: Mutex<()> = Mutex::new(());
    // Held while building, so two components starting at once build one
    // runtime (a spare could not be dropped on a runtime thread).
    let _starting = STARTING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("meridian-otlp")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the trace export thread: {e}"))?;
    Ok(RUNTIME.get_or_init(|| runtime))
}

/// An exporter whose exports run on the export runtime.
#[derive(Debug)]
struct OnRuntime {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let inner = self.inner.clone();
        self.runtime
            .spawn(async move { inner.export(batch).await })
            .await
            .map_err(|e| OTelSdkError::InternalFailure(format!("trace export task: {e}")))?
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        // Called once, while the provider is built and this is the only owner.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked() {
        assert!(TraceConfig::default().validate().is_ok());
        assert!(
            TraceConfig::otlp("http://127.0.0.1:4317")
                .validate()
                .is_ok()
        );
        let bad = |c: TraceConfig| c.validate().unwrap_err();
        let e = bad(TraceConfig {
            sample_ratio: 1.5,
            ..TraceConfig::default()
        });
        assert!(e.contains("`tracing.sample_ratio`"), "{e}");
        let e = bad(TraceConfig::otlp("https://collector:4317"));
        assert!(e.contains("`tracing.otlp_endpoint`"), "{e}");
        let e = bad(TraceConfig::otlp("not a url"));
        assert!(e.contains("`tracing.otlp_endpoint`"), "{e}");
    }

    #[test]
    fn disabled_starts_nothing_and_extracts_nothing() {
        let tracer = Tracer::start(&TraceConfig::default(), "t", vec![]).unwrap();
        assert!(!tracer.is_enabled());
        let mut headers = http::HeaderMap::new();
        headers.insert(
            TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let cx = tracer.extract(&headers);
        assert!(!cx.span().span_context().is_valid());
        let cx = tracer.start_span("s", SpanKind::Server, &cx, vec![]);
        assert!(traceparent(&cx).is_none());
    }

    #[test]
    fn traceparent_round_trips() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = from_traceparent(value);
        assert!(cx.span().span_context().is_remote());
        assert_eq!(traceparent(&cx).as_deref(), Some(value));
        let mut headers = http::HeaderMap::new();
        headers.insert(TRACESTATE, "stale=1".parse().unwrap());
        inject(&cx, &mut headers);
        assert_eq!(headers[TRACEPARENT], value);
        assert!(!headers.contains_key(TRACESTATE));
        assert!(!from_traceparent("garbage").span().span_context().is_valid());
    }
}
