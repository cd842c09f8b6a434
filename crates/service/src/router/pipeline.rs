//! One request from routing to its last event, the same for both fronts: prefill up to the
//! first token on a prefill worker (or on a decode worker itself for a short prompt), with
//! one retry on another worker, then the relay of the rest ([`super::relay`]).

use std::sync::{Arc, PoisonError};

use lazyserve_discovery::{Role, WorkerInfo};
use lazyserve_proto::v1::decode_client::DecodeClient;
use lazyserve_proto::v1::prefill_client::PrefillClient;
use lazyserve_proto::v1::{
    decode_response, prefill_response, Completion, DecodeRequest, DecodeResponse, FirstToken, LocalPrefill, PrefillRequest,
    PrefillResponse, StateEncoding,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::timeout_at;
use tonic::{Request, Streaming};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::job::Job;
use super::load::{OnWorker, ReleaseGuard};
use super::policy::{self, DECODE_TARGETS};
use super::{relay, Inner};
use crate::error::{self, Error, Result};

/// What a request produces, in order: chunks, then one `Complete` or one `Failed`.
#[derive(Debug)]
pub enum Event {
    /// Text now safe to show and the tokens generated since the last chunk.
    Chunk { text: String, token_ids: Vec<u32> },
    /// The request ended well.
    Complete(Completion),
    /// The request failed after `delivered` tokens (0: before any).
    Failed { error: Error, delivered: u32 },
}

pub type Events = mpsc::Sender<Event>;

/// A request up to its first token.
pub struct Started {
    pub first: FirstToken,
    pub source: Source,
    pub attempts: u32,
    pub local: bool,
}

pub enum Source {
    /// Prefilled on a prefill worker, which is still shipping the state.
    Remote {
        stream: Streaming<PrefillResponse>,
        addr: String,
        on_prefill: OnWorker,
        release: ReleaseGuard,
        sequence_id: String,
    },
    /// Prefilled on the decode worker, which goes on decoding on this stream.
    Local { stream: Streaming<DecodeResponse>, addr: String, on_decode: OnWorker },
}

/// A failed attempt, with the worker it failed on (None: no worker was tried).
type Attempt<T> = std::result::Result<T, (Option<String>, Error)>;

/// Runs `job` to its end, sending its events; holds `_permit` (a router in-flight slot)
/// until then.
pub async fn run(inner: Arc<Inner>, job: Job, events: Events, _permit: OwnedSemaphorePermit) {
    let mut delivered = 0u32;
    let result = match first_token(&inner, &job, &events, &[], &[]).await {
        Ok(started) => relay::finish(&inner, &job, started, &events, &mut delivered).await,
        Err(e) => Err(e),
    };
    let Err(error) = result else { return };
    if matches!(error, Error::ClientGone) {
        inner.metrics.requests.with_label_values(&["cancelled"]).inc();
        tracing::info!(request_id = %job.request_id, delivered, "client went away");
        return;
    }
    inner.metrics.requests.with_label_values(&["error"]).inc();
    tracing::Span::current().set_status(opentelemetry::trace::Status::error(error.to_string()));
    tracing::warn!(request_id = %job.request_id, %error, delivered, "request failed");
    let _ = events.send(Event::Failed { error, delivered }).await;
}

/// Prefill up to the first token; a worker that fails first gets one retry elsewhere.
/// Workers in `exclude` are not tried; `replay` goes to the decode worker (a migration).
pub async fn first_token(inner: &Arc<Inner>, job: &Job, events: &Events, exclude: &[String], replay: &[u32]) -> Result<Started> {
    let local = policy::local_prefill(job.prompt_ids.len(), inner.policy.local_prefill_tokens);
    let (mut attempts, mut tried, mut first_error) = (0u32, exclude.to_vec(), None);
    loop {
        attempts += 1;
        let span = tracing::info_span!("prefill", otel.kind = "client", lazyserve.attempt = attempts, lazyserve.local = local);
        let r = if local {
            start_local(inner, job, &tried, replay, events).instrument(span).await
        } else {
            start_remote(inner, job, &tried, events).instrument(span).await
        };
        match r {
            Ok(source) => return Ok(Started { first: source.0, source: source.1, attempts, local }),
            Err((Some(addr), e)) if policy::retry_elsewhere(attempts, &e, job.remaining()) => {
                tracing::warn!(request_id = %job.request_id, worker = %addr, error = %e, "prefill failed before the first token; retrying on another worker");
                tried.push(addr);
                first_error = Some(e);
            }
            // No other worker to retry on: the first failure says more.
            Err((None, e)) => return Err(first_error.unwrap_or(e)),
            Err((_, e)) => return Err(e),
        }
    }
}

/// Workers of `role` that fit this router, except `exclude`.
fn candidates(inner: &Inner, role: Role, exclude: &[String]) -> Vec<WorkerInfo> {
    let fit = policy::Fit {
        model: &inner.meta.name,
        max_context: inner.meta.config.max_position_embeddings as u32,
        version: env!("CARGO_PKG_VERSION"),
    };
    policy::candidates(&inner.discovery.workers(), role, fit, exclude)
}

fn decode_order(inner: &Inner, bytes: u64, exclude: &[String]) -> Result<Vec<WorkerInfo>> {
    let routed = inner.routed.lock().unwrap_or_else(PoisonError::into_inner);
    policy::decode_order(candidates(inner, Role::Decode, exclude), &routed, bytes, &inner.meta.name, &mut rand::rng())
}

fn prefill_order(inner: &Inner, exclude: &[String]) -> Result<Vec<WorkerInfo>> {
    let routed = inner.routed.lock().unwrap_or_else(PoisonError::into_inner);
    policy::prefill_order(candidates(inner, Role::Prefill, exclude), &routed, &inner.meta.name, &mut rand::rng())
}

fn sequence_id(job: &Job) -> String {
    format!("{}-{:016x}", job.request_id, rand::random::<u64>())
}

/// Prefill on a prefill worker, up to its first token; the state goes to one of
/// [`DECODE_TARGETS`] decode workers. Workers in `exclude` (of either role) are not tried.
async fn start_remote(inner: &Arc<Inner>, job: &Job, exclude: &[String], events: &Events) -> Attempt<(FirstToken, Source)> {
    let prefill = prefill_order(inner, exclude).map_err(|e| (None, e))?.swap_remove(0);
    let decodes: Vec<String> =
        decode_order(inner, job.state_bytes, exclude).map_err(|e| (None, e))?.into_iter().take(DECODE_TARGETS).map(|w| w.address).collect();
    let addr = prefill.address;
    let fail = |e: Error| (Some(addr.clone()), e);
    let on_prefill = OnWorker::new(&inner.routed, Role::Prefill, &addr, job.prompt_ids.len() as u64);
    let sequence_id = sequence_id(job);
    let clients = decodes.iter().map(|a| Ok((a.clone(), DecodeClient::new(inner.channels.get(a)?)))).collect::<Result<Vec<_>>>();
    let release = ReleaseGuard::new(clients.map_err(fail)?, sequence_id.clone());
    let mut req = Request::new(PrefillRequest {
        sequence_id: sequence_id.clone(),
        prompt_ids: job.prompt_ids.clone(),
        prune: job.prune.clone(),
        sampling: Some((&job.sampling).into()),
        decode_addresses: decodes,
        encoding: StateEncoding::from(inner.policy.state_encoding) as i32,
        state_ttl_ms: inner.policy.state_ttl_secs.saturating_mul(1000),
    });
    req.set_timeout(job.remaining());
    lazyserve_telemetry::inject(&tracing::Span::current(), req.metadata_mut());
    let mut client = PrefillClient::new(inner.channels.get(&addr).map_err(fail)?);
    let mut stream = timeout_at(job.deadline, client.prefill(req))
        .await
        .map_err(|_| fail(job.late()))?
        .map_err(|s| fail(error::from_worker("prefill", &addr, s)))?
        .into_inner();
    let first = match next_event(&mut stream, job.deadline, &addr, events).await {
        Ok(Some(prefill_response::Event::FirstToken(f))) => f,
        Ok(_) => return Err(fail(Error::Unavailable(format!("prefill worker {addr} ended without a token")))),
        Err(e) => return Err(fail(e.unwrap_or_else(|| job.late()))),
    };
    Ok((first, Source::Remote { stream, addr, on_prefill, release, sequence_id }))
}

/// A short prompt: prefill on a decode worker itself, up to its first token (`replay[0]`
/// in a migration).
async fn start_local(inner: &Arc<Inner>, job: &Job, exclude: &[String], replay: &[u32], events: &Events) -> Attempt<(FirstToken, Source)> {
    let addr = decode_order(inner, job.state_bytes, exclude).map_err(|e| (None, e))?.swap_remove(0).address;
    let fail = |e: Error| (Some(addr.clone()), e);
    let on_decode = OnWorker::new(&inner.routed, Role::Decode, &addr, 0);
    let mut req = Request::new(DecodeRequest {
        sequence_id: sequence_id(job),
        first_token: 0,
        max_tokens: job.max_tokens as u32,
        local: Some(LocalPrefill { prompt_ids: job.prompt_ids.clone(), prune: job.prune.clone(), sampling: Some((&job.sampling).into()) }),
        replay: replay.to_vec(),
    });
    req.set_timeout(job.remaining());
    lazyserve_telemetry::inject(&tracing::Span::current(), req.metadata_mut());
    let mut client = DecodeClient::new(inner.channels.get(&addr).map_err(fail)?);
    let mut stream = timeout_at(job.deadline, client.decode(req))
        .await
        .map_err(|_| fail(job.late()))?
        .map_err(|s| fail(error::from_worker("decode", &addr, s)))?
        .into_inner();
    let first = tokio::select! {
        m = timeout_at(job.deadline, stream.message()) => m,
        _ = events.closed() => return Err((None, Error::ClientGone)),
    };
    let first = match first {
        Err(_) => return Err(fail(job.late())),
        Ok(Err(s)) => return Err(fail(error::from_worker("decode", &addr, s))),
        Ok(Ok(Some(DecodeResponse { event: Some(decode_response::Event::Prefilled(f)) }))) => f,
        Ok(Ok(_)) => return Err(fail(Error::Unavailable(format!("decode worker {addr} ended without a token")))),
    };
    Ok((first, Source::Local { stream, addr, on_decode }))
}

/// The next prefill event; `Err(None)` when the deadline passed. Gives up when the client
/// goes away, so that the prefill worker stops too.
pub async fn next_event(
    stream: &mut Streaming<PrefillResponse>,
    deadline: tokio::time::Instant,
    addr: &str,
    events: &Events,
) -> std::result::Result<Option<prefill_response::Event>, Option<Error>> {
    tokio::select! {
        m = timeout_at(deadline, stream.message()) => match m {
            Err(_) => Err(None),
            Ok(Err(s)) => Err(Some(error::from_worker("prefill", addr, s))),
            Ok(Ok(m)) => Ok(m.and_then(|m| m.event)),
        },
        _ = events.closed() => Err(Some(Error::ClientGone)),
    }
}
