//! The prefill worker: runs LazyLLM prefill and pushes the sequence state to a decode
//! worker layer by layer while later layers are still computing (DESIGN.md section 2).
//! If that decode worker fails before accepting the state, the whole state goes to the
//! next decode worker the router named.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lazyserve_discovery::Load;
use lazyserve_telemetry::metrics::Gauges;
use tracing::Instrument;
use lazyserve_engine::lazy::{Schedule, SequenceState};
use lazyserve_engine::{Engine, Sampler, SamplingParams};
use lazyserve_state::StateEncoder;
use lazyserve_proto::v1::decode_client::DecodeClient;
use lazyserve_proto::v1::prefill_server::{Prefill, PrefillServer};
use lazyserve_proto::v1::{
    prefill_response, FirstToken, PrefillRequest, PrefillResponse, PushStateResponse, StateChunk, StateEncoding, StateSent,
};
use lazyserve_request::limits;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use lazyserve_service::channels::{grpc_timeout, Channels, MAX_MESSAGE_BYTES};
use lazyserve_service::error::from_worker;

use crate::config::PrefillArgs;
use crate::error::{Error, Result, ServiceError};

/// The Prefill service; clones share the model, the slots and the counters.
#[derive(Clone)]
pub struct PrefillService {
    engine: Arc<Engine>,
    channels: Arc<Channels>,
    slots: Arc<Semaphore>,
    counters: Arc<Counters>,
    max_waiting: u32,
}

#[derive(Default)]
struct Counters {
    /// Requests computing or waiting for a slot, and their prompt tokens.
    inflight: AtomicU32,
    waiting: AtomicU32,
    tokens: AtomicU64,
    served: AtomicU64,
}

/// Counts a request while it is on this worker.
struct Admitted {
    counters: Arc<Counters>,
    tokens: u64,
    waiting: bool,
}

impl Admitted {
    fn started(&mut self) {
        if std::mem::take(&mut self.waiting) {
            self.counters.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.started();
        self.counters.inflight.fetch_sub(1, Ordering::SeqCst);
        self.counters.tokens.fetch_sub(self.tokens, Ordering::SeqCst);
    }
}

type Events = mpsc::Sender<std::result::Result<PrefillResponse, Status>>;

/// State chunks (up to 1 MiB each) encoded ahead of what the decode worker has taken.
const CHUNKS_AHEAD: usize = 4;
/// Decode workers one Prefill request may name (the router names a few, to fall back on).
const MAX_DECODE_ADDRESSES: usize = 16;
/// Prefill events (first token, state sent) queued for the router.
const EVENTS_BUFFER: usize = 4;

/// A PushState call in flight.
type PushHandle = tokio::task::JoinHandle<std::result::Result<Response<PushStateResponse>, Status>>;

/// What validation makes of a request.
type Checked = (Schedule, SamplingParams, StateEncoding);

/// What a state stream's header says, for every push of one state.
#[derive(Clone)]
struct HeaderInfo {
    sequence_id: String,
    model: String,
    tokens: Vec<u32>,
    prune: String,
    sampling: lazyserve_proto::v1::SamplingParams,
    ttl_ms: u32,
    encoding: StateEncoding,
}

impl HeaderInfo {
    fn chunk(&self, enc: &mut StateEncoder) -> StateChunk {
        enc.header(&self.sequence_id, &self.model, &self.tokens, &self.prune, self.sampling, self.ttl_ms)
    }
}

impl PrefillService {
    /// A prefill service that reaches decode workers over `channels`.
    pub fn new(engine: Arc<Engine>, args: &PrefillArgs, channels: Channels) -> Self {
        Self {
            engine,
            channels: Arc::new(channels),
            slots: Arc::new(Semaphore::new(args.prefill_concurrency.max(1))),
            counters: Arc::default(),
            max_waiting: args.prefill_queue as u32,
        }
    }

    pub fn into_server(self) -> PrefillServer<Self> {
        PrefillServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The metrics gauges.
    pub fn gauges(&self) -> Gauges {
        let l = self.load();
        Gauges { inflight_requests: l.inflight as i64, queued_prompt_tokens: l.queued_prompt_tokens as i64, ..Gauges::default() }
    }

    /// Load as reported to etcd.
    pub fn load(&self) -> Load {
        let c = &self.counters;
        Load {
            inflight: c.inflight.load(Ordering::SeqCst),
            queued_prompt_tokens: c.tokens.load(Ordering::SeqCst),
            served: c.served.load(Ordering::SeqCst),
            ..Load::default()
        }
    }

    fn validate(&self, req: &PrefillRequest) -> Result<Checked> {
        limits::token_ids(&req.prompt_ids, self.engine.config())?;
        limits::sequence_id(&req.sequence_id)?;
        if req.decode_addresses.is_empty() || req.decode_addresses.len() > MAX_DECODE_ADDRESSES {
            let reason = format!("give 1 to {MAX_DECODE_ADDRESSES} decode workers, got {}", req.decode_addresses.len());
            return Err(ServiceError::InvalidArgument { field: "decode_addresses", reason }.into());
        }
        let schedule = self.engine.schedule(&req.prune)?;
        let sampling = SamplingParams::from(req.sampling.unwrap_or_default());
        sampling.validate()?;
        let encoding = StateEncoding::try_from(req.encoding)
            .map_err(|_| ServiceError::InvalidArgument { field: "encoding", reason: format!("unknown value {}", req.encoding) })?;
        Ok((schedule, sampling, encoding))
    }

    /// Takes a request in, or refuses it when the queue is full.
    fn admit(&self, tokens: u64) -> Result<Admitted> {
        let c = &self.counters;
        if c.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
            c.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(ServiceError::Overloaded(format!("prefill queue is full ({} waiting)", self.max_waiting)).into());
        }
        c.inflight.fetch_add(1, Ordering::SeqCst);
        c.tokens.fetch_add(tokens, Ordering::SeqCst);
        Ok(Admitted { counters: c.clone(), tokens, waiting: true })
    }

    /// Starts a PushState stream to `addr`; the returned sender feeds it.
    fn open_push(
        &self,
        addr: &str,
        timeout: Option<Duration>,
        span: &tracing::Span,
    ) -> Result<(mpsc::Sender<StateChunk>, PushHandle)> {
        let mut client = DecodeClient::new(self.channels.get(addr)?);
        let (tx, rx) = mpsc::channel(CHUNKS_AHEAD);
        let mut req = Request::new(ReceiverStream::new(rx));
        if let Some(t) = timeout {
            req.set_timeout(t);
        }
        lazyserve_telemetry::inject(span, req.metadata_mut());
        Ok((tx, tokio::spawn(async move { client.push_state(req).await }.instrument(span.clone()))))
    }

    /// Pushes a finished state whole (after the first decode worker failed).
    async fn push_whole(
        &self,
        addr: &str,
        state: Arc<SequenceState>,
        header: &HeaderInfo,
        timeout: Option<Duration>,
    ) -> Result<(u64, u32)> {
        let span = transfer_span(addr);
        let (tx, push) = self.open_push(addr, timeout, &span)?;
        let engine = self.engine.clone();
        let header = header.clone();
        let encode = tokio::task::spawn_blocking(move || {
            let mut enc = StateEncoder::new(engine.config(), header.encoding);
            let mut send = |c| tx.blocking_send(c).is_ok();
            let mut ok = send(header.chunk(&mut enc));
            for (l, layer) in state.layers.iter().enumerate() {
                ok = ok && enc.layer(l, layer).into_iter().all(&mut send);
            }
            ok = ok && send(enc.trailer());
            (enc.bytes(), enc.chunks(), ok)
        });
        let (bytes, chunks, _) = encode.await.map_err(|_| Error::Engine(lazyserve_engine::Error::Internal("state encoding panicked")))?;
        span.record("lazyserve.bytes", bytes as i64).record("lazyserve.chunks", chunks as i64);
        match push.await {
            Ok(Ok(_)) => Ok((bytes, chunks)),
            Ok(Err(s)) => Err(from_worker("decode", addr, s).into()),
            Err(_) => Err(Error::Engine(lazyserve_engine::Error::Internal("state push panicked"))),
        }
    }

    /// Prefills and pushes; reports on `events`.
    async fn run(self, req: PrefillRequest, checked: Checked, timeout: Option<Duration>, events: Events) {
        if let Err(e) = self.run_inner(req, checked, timeout, &events).await {
            let _ = events.send(Err(e.into())).await;
        }
    }

    async fn run_inner(&self, req: PrefillRequest, checked: Checked, timeout: Option<Duration>, events: &Events) -> Result<()> {
        let (schedule, sampling, encoding) = checked;
        let mut admitted = self.admit(req.prompt_ids.len() as u64)?;
        let queue = tracing::info_span!("queue", lazyserve.waiting = i64::from(self.counters.waiting.load(Ordering::SeqCst)));
        let slot = self.slots.clone().acquire_owned().instrument(queue).await.expect("prefill slots are never closed");
        admitted.started();
        if events.is_closed() {
            return Ok(());
        }
        let header = HeaderInfo {
            sequence_id: req.sequence_id.clone(),
            model: self.engine.name.clone(),
            tokens: req.prompt_ids.clone(),
            prune: req.prune.clone(),
            sampling: req.sampling.unwrap_or_default(),
            ttl_ms: req.state_ttl_ms,
            encoding,
        };
        let addrs = req.decode_addresses;
        let transfer = transfer_span(&addrs[0]);
        let (chunks_tx, push) = self.open_push(&addrs[0], timeout, &transfer)?;

        let engine = self.engine.clone();
        let events_tx = events.clone();
        let stream_header = header.clone();
        let no_fallback = addrs.len() == 1;
        let compute_span = tracing::info_span!("compute", lazyserve.computed_percent = tracing::field::Empty);
        let compute = tokio::task::spawn_blocking(move || -> Result<(SequenceState, u64, u32, Instant)> {
            let _slot = slot;
            let _span = compute_span.enter();
            let mut alive = req.prompt_ids.len();
            let mut enc = StateEncoder::new(engine.config(), encoding);
            // While the decode worker takes chunks, stream them; if it fails, finish the
            // prefill anyway and push the whole state elsewhere.
            let mut streaming = chunks_tx.blocking_send(stream_header.chunk(&mut enc)).is_ok();
            let mut sampler = Sampler::new(sampling)?;
            let pre = engine.prefill(&req.prompt_ids, schedule, &mut sampler, &mut |l, layer| {
                if events_tx.is_closed() {
                    return Err(lazyserve_engine::Error::Cancelled);
                }
                if layer.kv.len() != alive {
                    // An event per pruning stage: the tokens computed from this layer on.
                    alive = layer.kv.len();
                    tracing::info!(layer = l as i64, tokens_kept = alive as i64, "pruned");
                }
                if streaming {
                    streaming = enc.layer(l, layer).into_iter().all(|c| chunks_tx.blocking_send(c).is_ok());
                }
                Ok(())
            })?;
            if !streaming && no_fallback {
                // The state has nowhere to go: fail before the first token, so the router
                // can still retry the whole request.
                return Err(ServiceError::Unavailable("the decode worker closed the state stream".into()).into());
            }
            let first = FirstToken {
                token_id: pre.first_token,
                prefill_ms: pre.prefill.as_secs_f64() * 1e3,
                computed_percent: 100.0 * pre.state.computed_fraction(),
            };
            tracing::Span::current().record("lazyserve.computed_percent", first.computed_percent);
            let event = prefill_response::Event::FirstToken(first);
            if events_tx.blocking_send(Ok(PrefillResponse { event: Some(event) })).is_err() {
                // The router went away: end the stream without a trailer, which the decode
                // worker refuses and frees.
                return Err(lazyserve_engine::Error::Cancelled.into());
            }
            let first_at = Instant::now();
            if streaming {
                let _ = chunks_tx.blocking_send(enc.trailer());
            }
            Ok((pre.state, enc.bytes(), enc.chunks(), first_at))
        });
        let computed = compute.await.map_err(|_| Error::Engine(lazyserve_engine::Error::Internal("prefill panicked")))?;
        let pushed = push.await.map_err(|_| Error::Engine(lazyserve_engine::Error::Internal("state push panicked")))?;
        let (state, mut bytes, mut chunks, first_at) = match (computed, &pushed) {
            (Ok(c), _) => c,
            // The push's own error says why the stream closed.
            (Err(Error::Service(ServiceError::Unavailable(_))), Err(status)) => return Err(from_worker("decode", &addrs[0], status.clone()).into()),
            (Err(e), _) => return Err(e),
        };
        let mut accepted = None;
        let mut last_error = None;
        match pushed {
            Ok(_) => {
                transfer.record("lazyserve.bytes", bytes as i64).record("lazyserve.chunks", chunks as i64);
                accepted = Some(addrs[0].clone());
            }
            Err(status) => {
                let e = Error::from(from_worker("decode", &addrs[0], status));
                tracing::warn!(sequence_id = %header.sequence_id, decode = %addrs[0], error = %e, "state push failed");
                last_error = Some(e);
                let state = Arc::new(state);
                for addr in &addrs[1..] {
                    match self.push_whole(addr, state.clone(), &header, timeout).await {
                        Ok((b, c)) => {
                            (bytes, chunks) = (b, c);
                            accepted = Some(addr.clone());
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(sequence_id = %header.sequence_id, decode = %addr, error = %e, "state push failed");
                            last_error = Some(e);
                        }
                    }
                }
            }
        }
        let Some(decode_address) = accepted else {
            return Err(last_error.expect("a failed push left its error"));
        };
        self.counters.served.fetch_add(1, Ordering::SeqCst);
        let sent = StateSent { bytes, chunks, transfer_ms: first_at.elapsed().as_secs_f64() * 1e3, decode_address };
        let event = prefill_response::Event::StateSent(sent);
        let _ = events.send(Ok(PrefillResponse { event: Some(event) })).await;
        Ok(())
    }
}

/// The client span of one state push (bytes and chunks recorded when it is accepted).
fn transfer_span(addr: &str) -> tracing::Span {
    let empty = tracing::field::Empty;
    tracing::info_span!("state_transfer", otel.kind = "client", lazyserve.decode_worker = %addr, lazyserve.bytes = empty, lazyserve.chunks = empty)
}

#[tonic::async_trait]
impl Prefill for PrefillService {
    type PrefillStream = ReceiverStream<std::result::Result<PrefillResponse, Status>>;

    async fn prefill(&self, request: Request<PrefillRequest>) -> std::result::Result<Response<Self::PrefillStream>, Status> {
        let timeout = grpc_timeout(request.metadata())?;
        let span = tracing::info_span!(
            "prefill",
            otel.kind = "server",
            sequence_id = %request.get_ref().sequence_id,
            trace_id = tracing::field::Empty,
            lazyserve.prompt_tokens = request.get_ref().prompt_ids.len() as i64,
            lazyserve.prune = %request.get_ref().prune,
        );
        lazyserve_telemetry::extract(&span, request.metadata());
        span.record("trace_id", lazyserve_telemetry::trace_id(&span));
        let req = request.into_inner();
        let checked = self.validate(&req)?;
        let (tx, rx) = mpsc::channel(EVENTS_BUFFER);
        tokio::spawn(self.clone().run(req, checked, timeout, tx).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
