//! The router: the public API in front of prefill and decode workers. Two thin fronts, gRPC
//! Generate ([`grpc`]) and the OpenAI-compatible HTTP API ([`http`]), hand requests to one
//! pipeline: checks and tokenization ([`job`]), worker choice ([`policy`]), prefill with
//! retry ([`pipeline`]) and the relay of the decode stream ([`relay`]). TTFT is measured
//! here, where the client sees it (DESIGN.md section 2).

mod grpc;
pub mod http;
mod job;
mod load;
mod pipeline;
pub mod policy;
mod relay;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lazyserve_discovery::Discovery;
use lazyserve_request::{limits, ModelMeta, Schedule};
use lazyserve_telemetry::metrics::Gauges;
use lazyserve_telemetry::Metrics;
use tokio::sync::{mpsc, Semaphore};
use tonic::metadata::MetadataMap;
use tracing::Instrument;

use crate::channels::Channels;
use crate::config::RouterPolicy;
use crate::error::{Error, Result};
pub use job::{Ask, Input};
pub use pipeline::Event;
use policy::RoutedMap;

/// Events a request may queue before it waits for its client.
const EVENTS_BUFFER: usize = 32;

/// The Generation and Admin services and the HTTP front; clones share everything.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    meta: ModelMeta,
    policy: RouterPolicy,
    discovery: Arc<dyn Discovery>,
    /// What this router has in flight on each worker.
    routed: Arc<Mutex<RoutedMap>>,
    channels: Channels,
    inflight: Arc<Semaphore>,
    next_id: AtomicUsize,
    metrics: Metrics,
}

/// A request taken in.
pub struct Submitted {
    pub request_id: String,
    /// Chunks, then one `Complete` or `Failed`. Dropping it cancels the request.
    pub events: mpsc::Receiver<Event>,
}

impl Router {
    /// A router for the model described by `meta`, over the workers `discovery` finds,
    /// reached through `channels`.
    pub fn new(
        meta: ModelMeta,
        policy: RouterPolicy,
        discovery: Arc<dyn Discovery>,
        channels: Channels,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        Schedule::parse(&policy.default_prune, meta.config.num_hidden_layers).map_err(|e| anyhow::anyhow!("--default-prune: {e}"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                inflight: Arc::new(Semaphore::new(policy.max_inflight)),
                meta,
                policy,
                discovery,
                routed: Arc::default(),
                channels,
                next_id: AtomicUsize::new(0),
                metrics,
            }),
        })
    }

    /// Requests in flight and prompt tokens sent to prefill workers and not yet prefilled.
    pub fn gauges(&self) -> Gauges {
        let inner = &self.inner;
        let routed = inner.routed.lock().unwrap_or_else(PoisonError::into_inner);
        let queued: u64 = routed.iter().filter(|(k, _)| k.starts_with("prefill/")).map(|(_, r)| r.prompt_tokens).sum();
        Gauges {
            inflight_requests: (inner.policy.max_inflight - inner.inflight.available_permits()) as i64,
            queued_prompt_tokens: queued as i64,
            ..Gauges::default()
        }
    }

    /// The served model: its id, limits and tokenizer.
    pub fn meta(&self) -> &ModelMeta {
        &self.inner.meta
    }

    /// Takes a request in: an in-flight slot, then the checks and tokenization (on a
    /// blocking thread), then runs it in the background. `timeout` is the caller's
    /// deadline; `trace` may carry the caller's W3C trace context.
    pub async fn submit(&self, ask: Ask, timeout: Option<Duration>, trace: &MetadataMap) -> Result<Submitted> {
        let arrived = Instant::now();
        let inner = &self.inner;
        let permit = inner.inflight.clone().try_acquire_owned().map_err(|_| {
            Error::Overloaded(format!("router has {} requests in flight; retry later", inner.policy.max_inflight))
        })?;
        if let Some(id) = &ask.request_id {
            limits::request_id(id)?;
        }
        let request_id = ask.request_id.clone().filter(|id| !id.is_empty()).unwrap_or_else(|| {
            format!("r{}-{:x}", inner.next_id.fetch_add(1, Ordering::Relaxed), rand::random::<u32>())
        });
        let owner = self.inner.clone();
        let job = tokio::task::spawn_blocking(move || job::Job::new(ask, &owner.meta, &owner.policy, request_id, arrived, timeout))
            .await
            .map_err(|_| Error::Internal("tokenizing panicked"))??;
        let model = &inner.meta.name;
        let empty = tracing::field::Empty;
        // The request span, named and attributed after the OpenTelemetry GenAI conventions.
        let span = tracing::info_span!(
            "generate",
            otel.name = %format!("{} {model}", job.operation),
            otel.kind = "server",
            gen_ai.operation.name = job.operation,
            gen_ai.request.model = %model,
            gen_ai.request.max_tokens = job.max_tokens as i64,
            gen_ai.request.temperature = job.sampling.temperature as f64,
            gen_ai.request.top_p = job.sampling.top_p as f64,
            gen_ai.usage.input_tokens = job.prompt_ids.len() as i64,
            gen_ai.usage.output_tokens = empty,
            request_id = %job.request_id,
            trace_id = empty,
            lazyserve.prune = %job.prune,
            lazyserve.ttft_ms = empty,
            lazyserve.prompt_tokens_computed_percent = empty,
            lazyserve.revived_tokens = empty,
            lazyserve.prefill_path = empty,
        );
        lazyserve_telemetry::extract(&span, trace);
        span.record("trace_id", lazyserve_telemetry::trace_id(&span));
        let (tx, rx) = mpsc::channel(EVENTS_BUFFER);
        let submitted = Submitted { request_id: job.request_id.clone(), events: rx };
        tokio::spawn(pipeline::run(self.inner.clone(), job, tx, permit).instrument(span));
        Ok(submitted)
    }
}
