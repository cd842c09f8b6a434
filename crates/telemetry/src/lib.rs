//! Telemetry (DESIGN.md section 2): `tracing` spans exported over OTLP/gRPC when an
//! endpoint is configured (the standard `OTEL_*` variables work), W3C trace context carried
//! in gRPC metadata so that one request is one trace across the services, logs as text or
//! JSON, and metrics on a Prometheus endpoint (and over OTLP when configured).

pub mod metrics;
mod propagation;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use metrics::Metrics;
pub use propagation::{extract, inject, set_finish_reasons, trace_id};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("metrics endpoint {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// What to set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// `service.name` unless `OTEL_SERVICE_NAME` says otherwise.
    pub service_name: String,
    /// OTLP/gRPC endpoint; None: no export (also `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub otlp_endpoint: Option<String>,
    pub log_format: LogFormat,
    /// Default log filter when `RUST_LOG` is unset.
    pub default_filter: String,
}

/// Keeps the exporters alive; [`Telemetry::shutdown`] flushes them.
pub struct Telemetry {
    tracer: SdkTracerProvider,
    meter: Option<SdkMeterProvider>,
    exporting: bool,
}

/// How long an export may take before it is dropped: a missing collector costs no more.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

fn resource(service_name: &str) -> Resource {
    let builder = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
        builder.build()
    } else {
        builder.with_service_name(service_name.to_string()).build()
    }
}

/// Sets up logging, tracing and (when an endpoint is configured) OTLP export. Call once,
/// inside a Tokio runtime.
pub fn init(cfg: &Config) -> Result<Telemetry> {
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let endpoint = cfg.otlp_endpoint.clone().or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok()).filter(|e| !e.is_empty());
    // Spans always get trace ids (they go on log lines and to the next service); they are
    // exported only when an endpoint is set.
    let mut tracer = SdkTracerProvider::builder().with_resource(resource(&cfg.service_name));
    let meter = match &endpoint {
        None => None,
        Some(ep) => {
            let spans = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(ep.clone())
                .with_timeout(EXPORT_TIMEOUT)
                .build()
                .map_err(|e| Error::Exporter(e.to_string()))?;
            tracer = tracer.with_batch_exporter(spans);
            let metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(ep.clone())
                .with_timeout(EXPORT_TIMEOUT)
                .build()
                .map_err(|e| Error::Exporter(e.to_string()))?;
            let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(metrics).with_interval(Duration::from_secs(10)).build();
            let meter = SdkMeterProvider::builder().with_reader(reader).with_resource(resource(&cfg.service_name)).build();
            opentelemetry::global::set_meter_provider(meter.clone());
            Some(meter)
        }
    };
    let tracer = tracer.build();
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| cfg.default_filter.as_str().into());
    let fmt = match cfg.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_ansi(ansi_colours()).with_writer(std::io::stderr).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // The exporter's own diagnostics stay out of the spans it exports.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer.tracer("lazyserve"))
        .with_filter(EnvFilter::new("info,opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off,h2=off,tonic=off,hyper=off,tower=off"));
    tracing_subscriber::registry().with(fmt.with_filter(filter())).with(otel).init();
    if let Some(ep) = &endpoint {
        tracing::info!(endpoint = %ep, "exporting traces and metrics over OTLP");
    }
    Ok(Telemetry { tracer, meter, exporting: endpoint.is_some() })
}

impl Telemetry {
    /// Whether OTLP export is on.
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// Flushes what is buffered (bounded by the export timeout).
    pub fn shutdown(self) {
        let _ = self.tracer.shutdown();
        if let Some(m) = self.meter {
            let _ = m.shutdown();
        }
    }
}

/// Whether text logs get colours: only on a terminal, and not when `NO_COLOR` is set to
/// anything (no-color.org), so that a file or a pipe gets plain lines.
pub fn ansi_colours() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
