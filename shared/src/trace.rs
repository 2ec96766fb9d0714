//! One trace per saga: W3C trace context (`traceparent`, `tracestate`) carried by every event.
//!
//! The context of the span that writes an event (the HTTP request that started the saga, or the
//! consumer span of the event being handled) goes into the event's CloudEvents `traceparent` /
//! `tracestate` extensions and its outbox row; the relay sends it as NATS headers; the consumer
//! makes its span a child of it. So a saga's spans form one tree across services.
//!
//! Spans are made with `tracing` and turned into OpenTelemetry spans by `tracing-opentelemetry`
//! (installed by `service::init_tracing`). Only spans that declare an `otel.kind` field are
//! exported; other spans stay log context. Without that layer (a library user, a unit test) the
//! context of the event being handled passes through unchanged, so the trace id still follows
//! the saga.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Header (NATS, HTTP) and CloudEvents extension carrying the parent span.
pub const TRACEPARENT: &str = "traceparent";
/// Header (NATS, HTTP) and CloudEvents extension carrying vendor trace state.
pub const TRACESTATE: &str = "tracestate";
/// Longest `tracestate` kept; W3C lets a receiver drop a longer one.
const MAX_TRACESTATE_LEN: usize = 512;

/// The trace context to write with an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// W3C `traceparent`.
    pub traceparent: String,
    /// W3C `tracestate`, when there is one.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The context of the innermost entered OpenTelemetry span of this task, if any.
    pub fn current() -> Option<Self> {
        opentelemetry::Context::map_current(|cx| {
            let sc = cx.span().span_context().clone();
            sc.is_valid().then(|| Self::of(&sc))
        })
    }

    /// The context naming `sc` as the parent.
    pub fn of(sc: &SpanContext) -> Self {
        let tracestate = (sc.trace_state() != &TraceState::NONE)
            .then(|| sc.trace_state().header())
            .filter(|s| !s.is_empty());
        Self {
            traceparent: format!(
                "00-{}-{}-{:02x}",
                sc.trace_id(),
                sc.span_id(),
                sc.trace_flags().to_u8()
            ),
            tracestate,
        }
    }
}

fn hex_id<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = nibble(b[2 * i])? << 4 | nibble(b[2 * i + 1])?;
    }
    Some(out)
}

/// Parse a W3C `traceparent`: version `00` exactly, a later version by its first four fields;
/// lowercase hex, ids not all zero. `None` means: ignore it, start a new trace.
pub fn parse_traceparent(value: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    let value = value.trim();
    let version = hex_id::<1>(value.get(0..2)?)?[0];
    if version == 0xff || (version == 0 && value.len() != 55) {
        return None;
    }
    if value.len() > 55 && value.as_bytes()[55] != b'-' {
        return None;
    }
    let b = value.as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace_id = TraceId::from_bytes(hex_id::<16>(value.get(3..35)?)?);
    let span_id = SpanId::from_bytes(hex_id::<8>(value.get(36..52)?)?);
    let flags = TraceFlags::new(hex_id::<1>(value.get(53..55)?)?[0]);
    (trace_id != TraceId::INVALID && span_id != SpanId::INVALID)
        .then_some((trace_id, span_id, flags))
}

/// Whether `value` is a `traceparent` to keep.
pub fn valid_traceparent(value: &str) -> bool {
    parse_traceparent(value).is_some()
}

/// Whether `value` is a `tracestate` to keep: at most 512 characters, a valid W3C list.
pub fn valid_tracestate(value: &str) -> bool {
    value.len() <= MAX_TRACESTATE_LEN
        && value.parse::<TraceState>().is_ok()
        && !value.chars().any(char::is_control)
}

/// The remote span context named by `traceparent` (and `tracestate`, dropped if invalid).
pub fn remote_context(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let (trace_id, span_id, flags) = parse_traceparent(traceparent)?;
    let state = tracestate
        .filter(|s| s.len() <= MAX_TRACESTATE_LEN)
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    Some(SpanContext::new(trace_id, span_id, flags, true, state))
}

/// Whether two `traceparent`s belong to the same trace.
pub fn same_trace(a: &str, b: &str) -> bool {
    matches!((parse_traceparent(a), parse_traceparent(b)), (Some(x), Some(y)) if x.0 == y.0)
}

/// Make a fresh span (not yet entered) the child of the remote context `traceparent`/`tracestate`
/// when it is valid; otherwise it stays where it is (a root, for a span made outside any other).
/// Returns the trace id the span belongs to, for its `trace_id` field.
pub fn adopt(
    span: &tracing::Span,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> Option<TraceId> {
    let parent = traceparent.and_then(|tp| remote_context(tp, tracestate));
    let parent_trace = parent.as_ref().map(SpanContext::trace_id);
    if let Some(p) = parent {
        // Fails only without the OpenTelemetry layer: then the parent's trace id still names it.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(p));
    }
    let own = span.context().span().span_context().trace_id();
    if own != TraceId::INVALID {
        Some(own)
    } else {
        parent_trace
    }
}

/// The server span of an HTTP request that starts a saga: the child of the request's
/// `traceparent`/`tracestate` when valid, else the root of a new trace. `name` is the OTel span
/// name, e.g. `POST /orders`. Its `correlation_id` field is to be recorded by the handler.
#[cfg(feature = "service")]
pub fn server_span(name: &'static str, headers: &axum::http::HeaderMap) -> tracing::Span {
    let span = tracing::info_span!(
        "server",
        otel.name = name,
        otel.kind = "server",
        trace_id = tracing::field::Empty,
        correlation_id = tracing::field::Empty,
    );
    // W3C: more than one traceparent is invalid; several tracestate headers are one list.
    let mut parents = headers.get_all(TRACEPARENT).iter();
    let traceparent = match (parents.next(), parents.next()) {
        (Some(v), None) => v.to_str().ok(),
        _ => None,
    };
    let mut states = headers
        .get_all(TRACESTATE)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let tracestate = match (states.next(), states.next()) {
        (Some(one), None) => Some(std::borrow::Cow::Borrowed(one)),
        (Some(first), Some(second)) => {
            let mut all = format!("{first},{second}");
            for s in states {
                all.push(',');
                all.push_str(s);
            }
            Some(std::borrow::Cow::Owned(all))
        }
        _ => None,
    };
    if let Some(id) = adopt(&span, traceparent, tracestate.as_deref()) {
        span.record("trace_id", tracing::field::display(id));
    }
    span
}

#[cfg(feature = "service")]
static PROVIDER: std::sync::OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> =
    std::sync::OnceLock::new();

/// What [`layer`] set up, to be logged once logging works.
#[cfg(feature = "service")]
#[derive(Debug)]
pub enum Export {
    /// Spans go to this OTLP/HTTP endpoint.
    Otlp(String),
    /// No endpoint configured: spans are made (ids propagate) but not exported.
    Off,
    /// An endpoint is configured but the exporter could not be built.
    Failed(String),
}

/// The OpenTelemetry layer for a service: spans that declare `otel.kind` (INFO and above) become
/// OTel spans, warnings and errors inside them become span events. Spans are exported over
/// OTLP http/protobuf when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set, with
/// the batch settings of `OTEL_BSP_*`; `OTEL_SERVICE_NAME` defaults to `default_service_name`.
#[cfg(feature = "service")]
pub fn layer<S>(default_service_name: &str) -> (impl tracing_subscriber::Layer<S>, Export)
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{span_processor_with_async_runtime, SdkTracerProvider};
    use tracing_subscriber::filter::{filter_fn, LevelFilter};
    use tracing_subscriber::Layer as _;

    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let service_name = var("OTEL_SERVICE_NAME").unwrap_or_else(|| default_service_name.to_owned());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .filter(|_| var("OTEL_SDK_DISABLED").as_deref() != Some("true"));
    let export = match endpoint {
        None => Export::Off,
        // The batch processor runs as a task of this runtime: the HTTP client is async.
        Some(_) if tokio::runtime::Handle::try_current().is_err() => {
            Export::Failed("not inside a tokio runtime".into())
        }
        Some(endpoint) => match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => {
                let processor = span_processor_with_async_runtime::BatchSpanProcessor::builder(
                    exporter,
                    opentelemetry_sdk::runtime::Tokio,
                )
                .build();
                builder = builder.with_span_processor(processor);
                Export::Otlp(endpoint)
            }
            Err(e) => Export::Failed(e.to_string()),
        },
    };
    let provider = builder.build();
    let tracer = provider.tracer("event-toolkit");
    let _ = PROVIDER.set(provider);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_filter(
            filter_fn(|meta| {
                if meta.is_span() {
                    *meta.level() <= tracing::Level::INFO
                        && meta.fields().field("otel.kind").is_some()
                } else {
                    *meta.level() <= tracing::Level::WARN
                }
            })
            .with_max_level_hint(LevelFilter::INFO),
        );
    (layer, export)
}

/// Export the spans still buffered and stop exporting (call once, at the end of `main`).
#[cfg(feature = "service")]
pub async fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        let provider = provider.clone();
        // Shutting down waits for the last export on a channel: off the async workers.
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    }
}

/// An OTLP/HTTP trace receiver for tests: accepts `POST /v1/traces` (protobuf) on 127.0.0.1 and
/// keeps the spans.
#[cfg(all(feature = "testing", feature = "service"))]
pub mod receiver {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::post;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::common::v1::AnyValue;
    use prost::Message as _;

    /// One received span, ids in lowercase hex.
    #[derive(Debug, Clone, PartialEq)]
    pub struct ReceivedSpan {
        /// `service.name` of the resource that sent it.
        pub service: String,
        /// Span name.
        pub name: String,
        /// Span kind (OTLP number: 2 server, 5 consumer, ...).
        pub kind: i32,
        /// Trace id.
        pub trace_id: String,
        /// Span id.
        pub span_id: String,
        /// Parent span id; `None` for a root.
        pub parent_span_id: Option<String>,
        /// Attributes, values rendered as strings.
        pub attributes: BTreeMap<String, String>,
    }

    impl ReceivedSpan {
        /// An attribute's value.
        pub fn attr(&self, key: &str) -> Option<&str> {
            self.attributes.get(key).map(String::as_str)
        }
    }

    /// The receiver; stops with the test's runtime.
    #[derive(Debug)]
    pub struct OtlpReceiver {
        endpoint: String,
        spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn render(v: Option<&AnyValue>) -> String {
        match v.and_then(|v| v.value.as_ref()) {
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::BoolValue(b)) => b.to_string(),
            Some(Value::IntValue(i)) => i.to_string(),
            Some(Value::DoubleValue(d)) => d.to_string(),
            Some(other) => format!("{other:?}"),
            None => String::new(),
        }
    }

    async fn accept(
        State(spans): State<Arc<Mutex<Vec<ReceivedSpan>>>>,
        body: Bytes,
    ) -> (StatusCode, [(&'static str, &'static str); 1], Vec<u8>) {
        let Ok(req) = ExportTraceServiceRequest::decode(body) else {
            return (
                StatusCode::BAD_REQUEST,
                [("content-type", "text/plain")],
                b"not an ExportTraceServiceRequest".to_vec(),
            );
        };
        let mut got = Vec::new();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| render(kv.value.as_ref()))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name,
                    kind: span.kind,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: (!span.parent_span_id.is_empty())
                        .then(|| hex(&span.parent_span_id)),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), render(kv.value.as_ref())))
                        .collect(),
                });
            }
        }
        spans.lock().unwrap_or_else(|e| e.into_inner()).extend(got);
        // An empty ExportTraceServiceResponse: everything accepted.
        (
            StatusCode::OK,
            [("content-type", "application/x-protobuf")],
            Vec::new(),
        )
    }

    impl OtlpReceiver {
        /// Listen on a free port of 127.0.0.1.
        pub async fn start() -> Self {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind the OTLP receiver");
            let addr = listener.local_addr().expect("receiver address");
            let spans = Arc::new(Mutex::new(Vec::new()));
            let app = axum::Router::new()
                .route("/v1/traces", post(accept))
                .with_state(spans.clone());
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            Self {
                endpoint: format!("http://{addr}"),
                spans,
            }
        }

        /// What to set `OTEL_EXPORTER_OTLP_ENDPOINT` to.
        pub fn endpoint(&self) -> &str {
            &self.endpoint
        }

        /// Every span received so far.
        pub fn spans(&self) -> Vec<ReceivedSpan> {
            self.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_parses_and_formats_back() {
        let (t, s, f) = parse_traceparent(TP).unwrap();
        assert_eq!(t.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s.to_string(), "00f067aa0ba902b7");
        assert!(f.is_sampled());
        let sc = remote_context(TP, Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")).unwrap();
        let back = TraceContext::of(&sc);
        assert_eq!(back.traceparent, TP);
        assert_eq!(
            back.tracestate.as_deref(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nX: y",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(!valid_traceparent(bad), "{bad:?}");
        }
        // A later version: its first four fields are read, the rest ignored.
        assert!(valid_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-whatever"
        ));
        assert!(!valid_tracestate("a=b\r\nX: y"));
        assert!(!valid_tracestate(&"k=v,".repeat(200)));
        assert!(valid_tracestate("congo=t61rcWkgMzE"));
        assert!(same_trace(
            TP,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-00"
        ));
    }

    #[test]
    fn without_the_layer_a_span_reports_its_parents_trace() {
        let span = tracing::info_span!("x", otel.kind = "consumer");
        let id = adopt(&span, Some(TP), None);
        assert_eq!(
            id.map(|t| t.to_string()).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(adopt(&span, None, None), None);
        assert_eq!(TraceContext::current(), None);
    }

    #[cfg(feature = "service")]
    #[test]
    fn with_the_layer_a_child_span_continues_the_trace() {
        use tracing_subscriber::layer::SubscriberExt;
        let (layer, _) = layer::<tracing_subscriber::Registry>("test");
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("event", otel.kind = "consumer");
            let id = adopt(&span, Some(TP), Some("congo=t61rcWkgMzE")).unwrap();
            assert_eq!(id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
            let inside = span.in_scope(TraceContext::current).unwrap();
            assert!(same_trace(&inside.traceparent, TP));
            assert_ne!(inside.traceparent, TP, "the child's own span id");
            assert_eq!(inside.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
            // A span without otel.kind is log context only: the OTel context stays the parent's.
            let nested = span
                .in_scope(|| tracing::info_span!("plain").in_scope(TraceContext::current))
                .unwrap();
            assert_eq!(nested, inside);
            // A root: a new trace.
            let root = tracing::info_span!("event", otel.kind = "consumer");
            let root_id = adopt(&root, None, None).unwrap();
            assert_ne!(root_id, id);
        });
    }
}
