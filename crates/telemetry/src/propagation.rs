//! W3C trace context in gRPC metadata.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Inject<'a>(&'a mut MetadataMap);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            self.0.insert(k, v);
        }
    }
}

struct Extract<'a>(&'a MetadataMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Puts `span`'s trace context into outgoing request metadata.
pub fn inject(span: &tracing::Span, metadata: &mut MetadataMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut Inject(metadata)));
}

/// Makes `span` a child of the trace context in incoming request metadata, if any.
pub fn extract(span: &tracing::Span, metadata: &MetadataMap) {
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Extract(metadata)));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The trace id of `span` (32 hex digits), or empty when tracing is off.
pub fn trace_id(span: &tracing::Span) -> String {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        sc.trace_id().to_string()
    } else {
        String::new()
    }
}

/// Sets `gen_ai.response.finish_reasons` (a string array, which `tracing` fields cannot hold).
pub fn set_finish_reasons(span: &tracing::Span, reasons: &[&str]) {
    let values: Vec<opentelemetry::StringValue> = reasons.iter().map(|r| r.to_string().into()).collect();
    span.set_attribute("gen_ai.response.finish_reasons", opentelemetry::Value::Array(values.into()));
}
