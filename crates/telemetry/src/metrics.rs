//! Service metrics under the names operators alert on, with the OpenTelemetry GenAI
//! histogram boundaries. Served on a Prometheus endpoint; when OTLP export is on the
//! latency histograms also go out over OTLP (TTFT as `gen_ai.server.time_to_first_token`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use opentelemetry::metrics::Histogram as OtelHistogram;
use opentelemetry::KeyValue;
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::{Error, Result};

/// GenAI semantic conventions: `gen_ai.server.time_to_first_token`.
pub const TTFT_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];
/// GenAI semantic conventions: `gen_ai.server.time_per_output_token`.
pub const TOKEN_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5];
/// GenAI semantic conventions: `gen_ai.server.request.duration`.
pub const DURATION_BUCKETS: &[f64] =
    &[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92];
const RATIO_BUCKETS: &[f64] = &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0];
/// Sequences stepped together in one decode iteration.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Point-in-time values read at each scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub inflight_requests: i64,
    pub queued_prompt_tokens: i64,
    pub decode_sequences_held: i64,
    pub decode_state_bytes_held: i64,
    pub decode_sequences_waiting: i64,
}

type GaugeSource = Arc<dyn Fn() -> Gauges + Send + Sync>;

/// The OTLP side of the latency histograms.
struct Otlp {
    ttft: OtelHistogram<f64>,
    inter_token: OtelHistogram<f64>,
    duration: OtelHistogram<f64>,
    transfer: OtelHistogram<f64>,
    attrs: Vec<KeyValue>,
}

/// Every metric of one service process. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub request_duration: Histogram,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub computed_ratio: Histogram,
    pub transfer_bytes: IntCounter,
    pub transfer_seconds: Histogram,
    pub requests: IntCounterVec,
    pub migrations: IntCounter,
    pub batch_size: Histogram,
    pub iteration_seconds: Histogram,
    inflight: IntGauge,
    queued: IntGauge,
    sequences: IntGauge,
    state_bytes: IntGauge,
    waiting: IntGauge,
    gauges: Arc<Mutex<Vec<GaugeSource>>>,
    otlp: Arc<Option<Otlp>>,
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Result<Histogram> {
    Ok(Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?)
}

impl Metrics {
    /// Metrics labelled with `model` and `role`; `otlp`: also export the latency histograms
    /// through the global OpenTelemetry meter provider.
    pub fn new(model: &str, role: &str, otlp: bool) -> Result<Self> {
        let labels = [("model".to_string(), model.to_string()), ("role".to_string(), role.to_string())].into();
        let registry = Registry::new_custom(None, Some(labels))?;
        let m = Self {
            ttft: histogram("lazyserve_time_to_first_token_seconds", "Time to first token, as the router sends it", TTFT_BUCKETS)?,
            inter_token: histogram("lazyserve_inter_token_latency_seconds", "Time between tokens after the first", TOKEN_BUCKETS)?,
            request_duration: histogram("lazyserve_request_duration_seconds", "Whole request at the router", DURATION_BUCKETS)?,
            prompt_tokens: IntCounter::new("lazyserve_prompt_tokens_total", "Prompt tokens of finished requests")?,
            generation_tokens: IntCounter::new("lazyserve_generation_tokens_total", "Tokens generated")?,
            computed_ratio: histogram(
                "lazyserve_prompt_tokens_computed_ratio",
                "LazyLLM: prompt token-layers computed over prompt tokens x layers, per request",
                RATIO_BUCKETS,
            )?,
            transfer_bytes: IntCounter::new("lazyserve_state_transfer_bytes_total", "Sequence state bytes shipped to decode workers")?,
            transfer_seconds: histogram(
                "lazyserve_state_transfer_seconds",
                "State transfer time not hidden by prefill compute",
                TTFT_BUCKETS,
            )?,
            requests: IntCounterVec::new(Opts::new("lazyserve_requests_total", "Finished requests"), &["finish_reason"])?,
            migrations: IntCounter::new("lazyserve_migrations_total", "Streams moved to another decode worker after theirs failed")?,
            batch_size: histogram("lazyserve_decode_batch_size", "Sequences stepped together per decode iteration", BATCH_BUCKETS)?,
            iteration_seconds: histogram(
                "lazyserve_decode_iteration_seconds",
                "Time of one decode iteration (every live sequence one step)",
                TOKEN_BUCKETS,
            )?,
            inflight: IntGauge::new("lazyserve_inflight_requests", "Requests in flight")?,
            queued: IntGauge::new("lazyserve_queued_prompt_tokens", "Prompt tokens waiting or being prefilled")?,
            sequences: IntGauge::new("lazyserve_decode_sequences_held", "Sequence states a decode worker holds")?,
            state_bytes: IntGauge::new("lazyserve_decode_state_bytes_held", "Bytes of sequence state a decode worker holds")?,
            waiting: IntGauge::new(
                "lazyserve_decode_sequences_waiting",
                "Sequences on a decode worker waiting to join the batch or prefilling their prompt",
            )?,
            gauges: Arc::default(),
            otlp: Arc::new(otlp.then(|| {
                let meter = opentelemetry::global::meter("lazyserve");
                let h = |name: &'static str, buckets: &[f64]| {
                    meter.f64_histogram(name).with_unit("s").with_boundaries(buckets.to_vec()).build()
                };
                Otlp {
                    ttft: h("gen_ai.server.time_to_first_token", TTFT_BUCKETS),
                    inter_token: h("gen_ai.server.time_per_output_token", TOKEN_BUCKETS),
                    duration: h("gen_ai.server.request.duration", DURATION_BUCKETS),
                    transfer: h("lazyserve.state_transfer.duration", TTFT_BUCKETS),
                    attrs: vec![KeyValue::new("gen_ai.request.model", model.to_string()), KeyValue::new("lazyserve.role", role.to_string())],
                }
            })),
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.ttft.clone()))?;
        r.register(Box::new(m.inter_token.clone()))?;
        r.register(Box::new(m.request_duration.clone()))?;
        r.register(Box::new(m.prompt_tokens.clone()))?;
        r.register(Box::new(m.generation_tokens.clone()))?;
        r.register(Box::new(m.computed_ratio.clone()))?;
        r.register(Box::new(m.transfer_bytes.clone()))?;
        r.register(Box::new(m.transfer_seconds.clone()))?;
        r.register(Box::new(m.requests.clone()))?;
        r.register(Box::new(m.migrations.clone()))?;
        r.register(Box::new(m.batch_size.clone()))?;
        r.register(Box::new(m.iteration_seconds.clone()))?;
        r.register(Box::new(m.waiting.clone()))?;
        r.register(Box::new(m.inflight.clone()))?;
        r.register(Box::new(m.queued.clone()))?;
        r.register(Box::new(m.sequences.clone()))?;
        r.register(Box::new(m.state_bytes.clone()))?;
        Ok(m)
    }

    /// Adds a source of gauge values, read (and summed with the others) at each scrape.
    pub fn add_gauges(&self, source: impl Fn() -> Gauges + Send + Sync + 'static) {
        self.gauges.lock().unwrap_or_else(PoisonError::into_inner).push(Arc::new(source));
    }

    pub fn observe_ttft(&self, seconds: f64) {
        self.ttft.observe(seconds);
        if let Some(o) = self.otlp.as_ref() {
            o.ttft.record(seconds, &o.attrs);
        }
    }

    pub fn observe_inter_token(&self, seconds: f64) {
        self.inter_token.observe(seconds);
        if let Some(o) = self.otlp.as_ref() {
            o.inter_token.record(seconds, &o.attrs);
        }
    }

    pub fn observe_request(&self, seconds: f64) {
        self.request_duration.observe(seconds);
        if let Some(o) = self.otlp.as_ref() {
            o.duration.record(seconds, &o.attrs);
        }
    }

    /// One decode iteration: how many sequences it stepped and how long it took.
    pub fn observe_iteration(&self, sequences: usize, seconds: f64) {
        self.batch_size.observe(sequences as f64);
        self.iteration_seconds.observe(seconds);
    }

    pub fn observe_transfer(&self, seconds: f64, bytes: u64) {
        self.transfer_seconds.observe(seconds);
        self.transfer_bytes.inc_by(bytes);
        if let Some(o) = self.otlp.as_ref() {
            o.transfer.record(seconds, &o.attrs);
        }
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let g = self.gauges.lock().unwrap_or_else(PoisonError::into_inner).iter().fold(Gauges::default(), |a, f| {
            let b = f();
            Gauges {
                inflight_requests: a.inflight_requests + b.inflight_requests,
                queued_prompt_tokens: a.queued_prompt_tokens + b.queued_prompt_tokens,
                decode_sequences_held: a.decode_sequences_held + b.decode_sequences_held,
                decode_state_bytes_held: a.decode_state_bytes_held + b.decode_state_bytes_held,
                decode_sequences_waiting: a.decode_sequences_waiting + b.decode_sequences_waiting,
            }
        });
        self.inflight.set(g.inflight_requests);
        self.queued.set(g.queued_prompt_tokens);
        self.sequences.set(g.decode_sequences_held);
        self.state_bytes.set(g.decode_state_bytes_held);
        self.waiting.set(g.decode_sequences_waiting);
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    /// Serves `GET /metrics` on `addr` until the process ends.
    pub async fn serve(&self, addr: SocketAddr) -> Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Listen { addr, source })?;
        let bound = listener.local_addr().map_err(|source| Error::Listen { addr, source })?;
        let metrics = self.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let m = metrics.clone();
                async move { ([(axum::http::header::CONTENT_TYPE, TextEncoder::new().format_type().to_string())], m.render()) }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
        tracing::info!(addr = %bound, "metrics on /metrics");
        Ok(bound)
    }
}
