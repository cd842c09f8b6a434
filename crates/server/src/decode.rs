//! The decode worker: receives sequence states from prefill workers, holds each with an
//! owner and a deadline, and decodes from it with LazyLLM revival (DESIGN.md section 2).
//!
//! A state is freed when its Decode stream ends for any reason (done, failed, or the caller
//! went away), when it is released, or when its deadline passes with nobody decoding it.
//! A state stream that breaks off or fails its checks is dropped whole.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use lazyserve_discovery::{Capacity, Load};
use lazyserve_telemetry::metrics::Gauges;
use tracing::Instrument;
use lazyserve_engine::lazy::{Schedule, SequenceState};
use lazyserve_engine::{Engine, Sampler, SamplingParams, MAX_NEW_TOKENS};
use lazyserve_proto::state::{StateAssembler, StateError};
use lazyserve_proto::v1::decode_server::{Decode, DecodeServer};
use lazyserve_proto::v1::{
    decode_response, DecodeDone, DecodeRequest, DecodeResponse, FirstToken, LocalPrefill, PushStateResponse,
    ReleaseRequest, ReleaseResponse, StateChunk, StatsRequest, StatsResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::DecodeArgs;
use crate::error::{Error, Result};

/// How often abandoned states are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How long a release of a state not received yet is remembered.
const RELEASED_MEMORY: Duration = Duration::from_secs(300);

struct Held {
    /// None while a Decode stream owns it.
    state: Option<Box<SequenceState>>,
    sampling: SamplingParams,
    bytes: usize,
    deadline: Instant,
}

#[derive(Default)]
struct Store {
    held: HashMap<String, Held>,
    /// Sequences released before their state arrived, until when to refuse it.
    released: HashMap<String, Instant>,
    /// State streams being received, and the bytes they hold so far.
    receiving: usize,
    receiving_bytes: HashMap<u64, usize>,
    next_stream: u64,
}

impl Store {
    fn bytes(&self) -> usize {
        self.held.values().map(|h| h.bytes).sum::<usize>() + self.receiving_bytes.values().sum::<usize>()
    }
}

struct Inner {
    engine: Arc<Engine>,
    store: Mutex<Store>,
    max_sequences: usize,
    max_bytes: usize,
    served: AtomicU64,
}

impl Inner {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().expect("state store lock")
    }
}

/// The Decode service; clones share one store.
#[derive(Clone)]
pub struct DecodeService {
    inner: Arc<Inner>,
}

/// Forgets a state stream being received when it ends, however it ends.
struct Receiving {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for Receiving {
    fn drop(&mut self) {
        let mut store = self.inner.store();
        store.receiving -= 1;
        store.receiving_bytes.remove(&self.id);
    }
}

/// Frees a held state when its Decode stream ends, however it ends.
struct Owned {
    inner: Arc<Inner>,
    sequence_id: String,
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.inner.store().held.remove(&self.sequence_id);
        tracing::debug!(sequence_id = %self.sequence_id, "state freed");
    }
}

impl DecodeService {
    /// A decode worker over `engine`; starts the task that frees abandoned states.
    pub fn new(engine: Arc<Engine>, args: &DecodeArgs) -> Self {
        let inner = Arc::new(Inner {
            engine,
            store: Mutex::default(),
            max_sequences: args.max_sequences,
            max_bytes: args.max_state_mib << 20,
            served: AtomicU64::new(0),
        });
        tokio::spawn(sweep(Arc::downgrade(&inner)));
        Self { inner }
    }

    pub fn into_server(self) -> DecodeServer<Self> {
        DecodeServer::new(self)
    }

    /// The capacity reported to etcd.
    pub fn capacity(&self) -> Capacity {
        Capacity { requests: self.inner.max_sequences as u32, state_bytes: self.inner.max_bytes as u64 }
    }

    /// The metrics gauges.
    pub fn gauges(&self) -> Gauges {
        let l = self.load();
        Gauges {
            inflight_requests: l.inflight as i64,
            decode_sequences_held: l.sequences as i64,
            decode_state_bytes_held: l.state_bytes as i64,
            ..Gauges::default()
        }
    }

    /// Load as reported to etcd.
    pub fn load(&self) -> Load {
        let store = self.inner.store();
        Load {
            inflight: store.held.values().filter(|h| h.state.is_none()).count() as u32,
            sequences: (store.held.len() + store.receiving) as u32,
            state_bytes: store.bytes() as u64,
            served: self.inner.served.load(Ordering::SeqCst),
            ..Load::default()
        }
    }

    /// Refuses a new sequence when the worker holds as many as it may.
    fn check_room(store: &Store, inner: &Inner) -> Result<()> {
        if store.held.len() + store.receiving >= inner.max_sequences {
            return Err(Error::Overloaded(format!("decode worker holds {} sequences already", inner.max_sequences)));
        }
        Ok(())
    }

    async fn receive(&self, mut stream: Streaming<StateChunk>) -> Result<u64> {
        let inner = &self.inner;
        let guard = {
            let mut store = inner.store();
            Self::check_room(&store, inner)?;
            store.receiving += 1;
            store.next_stream += 1;
            Receiving { inner: inner.clone(), id: store.next_stream }
        };
        let engine = &inner.engine;
        let mut asm = StateAssembler::new(engine.model.config(), engine.kv_dtype);
        loop {
            let chunk = match stream.message().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(status) => {
                    tracing::warn!(%status, "state stream broke off");
                    return Err(StateError::Truncated(asm.chunks()).into());
                }
            };
            asm.push(chunk, &engine.name)?;
            let mut store = inner.store();
            store.receiving_bytes.insert(guard.id, asm.bytes());
            if store.bytes() > inner.max_bytes {
                return Err(Error::Overloaded(format!("decode worker state memory is full ({} MiB)", inner.max_bytes >> 20)));
            }
        }
        let bytes = asm.bytes();
        let engine2 = engine.clone();
        let (header, state) = tokio::task::spawn_blocking(move || asm.finish(&engine2.model))
            .await
            .map_err(|_| Error::Engine(lazyserve_engine::Error::Internal("state assembly panicked")))??;
        let mut store = inner.store();
        if store.released.remove(&header.sequence_id).is_some() {
            tracing::debug!(sequence_id = %header.sequence_id, "state arrived after its release; dropped");
            return Err(Error::ClientGone);
        }
        if store.held.contains_key(&header.sequence_id) {
            return Err(Error::AlreadyExists(format!("sequence {} is held already", header.sequence_id)));
        }
        let ttl = Duration::from_millis(header.ttl_ms.max(1) as u64);
        store.held.insert(
            header.sequence_id.clone(),
            Held { state: Some(Box::new(state)), sampling: header.sampling.into(), bytes, deadline: Instant::now() + ttl },
        );
        tracing::debug!(sequence_id = %header.sequence_id, bytes, "state received");
        Ok(bytes as u64)
    }

    /// Takes a held state for decoding; the returned guard frees it.
    fn take(&self, sequence_id: &str) -> Result<(Box<SequenceState>, Sampler, Owned)> {
        let mut store = self.inner.store();
        let held = store
            .held
            .get_mut(sequence_id)
            .ok_or_else(|| Error::NotFound(format!("no state held for sequence {sequence_id}")))?;
        let state = held
            .state
            .take()
            .ok_or_else(|| Error::AlreadyExists(format!("sequence {sequence_id} is being decoded already")))?;
        let owned = Owned { inner: self.inner.clone(), sequence_id: sequence_id.to_string() };
        // Prefill drew once for the first token.
        let sampler = Sampler::after(held.sampling.clone(), 1)?;
        Ok((state, sampler, owned))
    }
}

impl DecodeService {
    /// Checks a prompt to prefill here.
    fn check_local(&self, local: &LocalPrefill) -> Result<(Schedule, Sampler)> {
        crate::prefill::check_prompt_ids(&self.inner.engine, &local.prompt_ids)?;
        let schedule = self.inner.engine.schedule(&local.prune)?;
        let sampler = Sampler::new(SamplingParams::from(local.sampling.unwrap_or_default()))?;
        Ok((schedule, sampler))
    }

    /// Registers a sequence prefilled here as held (for the limits and the stats).
    fn hold_local(&self, sequence_id: &str) -> Result<Owned> {
        let mut store = self.inner.store();
        Self::check_room(&store, &self.inner)?;
        if store.held.contains_key(sequence_id) {
            return Err(Error::AlreadyExists(format!("sequence {sequence_id} is held already")));
        }
        let held = Held { state: None, sampling: SamplingParams::default(), bytes: 0, deadline: Instant::now() };
        store.held.insert(sequence_id.to_string(), held);
        Ok(Owned { inner: self.inner.clone(), sequence_id: sequence_id.to_string() })
    }
}

impl Inner {
    fn set_bytes(&self, sequence_id: &str, bytes: usize) {
        if let Some(h) = self.store().held.get_mut(sequence_id) {
            h.bytes = bytes;
        }
    }
}

/// Frees states whose deadline passed with nobody decoding them.
async fn sweep(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let mut store = inner.store();
        store.released.retain(|_, until| *until > now);
        store.held.retain(|id, h| {
            let keep = h.state.is_none() || h.deadline > now;
            if !keep {
                tracing::warn!(sequence_id = %id, bytes = h.bytes, "freeing a state nobody decoded before its deadline");
            }
            keep
        });
    }
}

type DecodeStream = ReceiverStream<std::result::Result<DecodeResponse, Status>>;

/// Decodes until EOS, `max_tokens` in all, the end of the context, or the caller leaving.
fn decode_loop(
    engine: &Engine,
    mut state: Box<SequenceState>,
    mut sampler: Sampler,
    first_token: u32,
    max_tokens: usize,
    tx: &mpsc::Sender<std::result::Result<DecodeResponse, Status>>,
) -> Result<()> {
    let send = |event| tx.blocking_send(Ok(DecodeResponse { event: Some(event) })).is_ok();
    let ctx = engine.model.config().max_position_embeddings;
    let eos = engine.tokenizer.eos_ids();
    let prompt_len = state.tokens.len();
    let (mut produced, mut prev) = (1, first_token);
    if !eos.contains(&prev) {
        while produced < max_tokens && prompt_len + produced < ctx {
            let next = engine.decode_step(&mut state, &mut sampler, prev)?;
            produced += 1;
            if !send(decode_response::Event::TokenId(next)) {
                tracing::debug!("decode caller went away");
                return Ok(());
            }
            if eos.contains(&next) {
                break;
            }
            prev = next;
        }
    }
    tracing::Span::current().record("lazyserve.tokens", produced as i64).record("lazyserve.revived_tokens", state.stats.revived as i64);
    send(decode_response::Event::Done(DecodeDone {
        computed_percent: 100.0 * state.computed_fraction(),
        revived_tokens: state.stats.revived as u64,
    }));
    Ok(())
}

#[tonic::async_trait]
impl Decode for DecodeService {
    async fn push_state(&self, request: Request<Streaming<StateChunk>>) -> std::result::Result<Response<PushStateResponse>, Status> {
        let span = tracing::info_span!("receive_state", otel.kind = "server", trace_id = tracing::field::Empty, lazyserve.bytes = tracing::field::Empty);
        lazyserve_telemetry::extract(&span, request.metadata());
        span.record("trace_id", lazyserve_telemetry::trace_id(&span));
        let bytes = self.receive(request.into_inner()).instrument(span.clone()).await?;
        span.record("lazyserve.bytes", bytes as i64);
        Ok(Response::new(PushStateResponse { bytes }))
    }

    type DecodeStream = DecodeStream;

    async fn decode(&self, request: Request<DecodeRequest>) -> std::result::Result<Response<DecodeStream>, Status> {
        let empty = tracing::field::Empty;
        let span = tracing::info_span!(
            "decode",
            otel.kind = "server",
            sequence_id = %request.get_ref().sequence_id,
            trace_id = empty,
            lazyserve.local_prefill = request.get_ref().local.is_some(),
            lazyserve.tokens = empty,
            lazyserve.revived_tokens = empty,
        );
        lazyserve_telemetry::extract(&span, request.metadata());
        span.record("trace_id", lazyserve_telemetry::trace_id(&span));
        let req = request.into_inner();
        let vocab = self.inner.engine.model.config().vocab_size;
        if req.max_tokens == 0 || req.max_tokens as usize > MAX_NEW_TOKENS {
            let reason = format!("must be in 1..={MAX_NEW_TOKENS}, got {}", req.max_tokens);
            return Err(Error::InvalidArgument { field: "max_tokens", reason }.into());
        }
        if req.first_token as usize >= vocab {
            let reason = format!("{} is not below the vocabulary size {vocab}", req.first_token);
            return Err(Error::InvalidArgument { field: "first_token", reason }.into());
        }
        let (tx, rx) = mpsc::channel(16);
        let engine = self.inner.engine.clone();
        let max_tokens = req.max_tokens as usize;
        let inner = self.inner.clone();
        match req.local {
            None => {
                let (state, sampler, owned) = self.take(&req.sequence_id)?;
                tokio::task::spawn_blocking(move || {
                    let _span = span.enter();
                    let _owned = owned;
                    if let Err(e) = decode_loop(&engine, state, sampler, req.first_token, max_tokens, &tx) {
                        let _ = tx.blocking_send(Err(e.into()));
                    }
                    inner.served.fetch_add(1, Ordering::SeqCst);
                });
            }
            Some(local) => {
                let (schedule, sampler) = self.check_local(&local)?;
                let owned = self.hold_local(&req.sequence_id)?;
                tokio::task::spawn_blocking(move || {
                    let _span = span.enter();
                    let result = (|| -> Result<()> {
                        let mut sampler = sampler;
                        let pre = engine.prefill(&local.prompt_ids, schedule, &mut sampler, &mut |_, _| Ok(()))?;
                        inner.set_bytes(&owned.sequence_id, pre.state.kv_bytes() + pre.state.aux_bytes());
                        let first = FirstToken {
                            token_id: pre.first_token,
                            prefill_ms: pre.prefill.as_secs_f64() * 1e3,
                            computed_percent: 100.0 * pre.state.computed_fraction(),
                        };
                        let event = decode_response::Event::Prefilled(first);
                        if tx.blocking_send(Ok(DecodeResponse { event: Some(event) })).is_err() {
                            return Ok(());
                        }
                        decode_loop(&engine, Box::new(pre.state), sampler, pre.first_token, max_tokens, &tx)
                    })();
                    if let Err(e) = result {
                        let _ = tx.blocking_send(Err(e.into()));
                    }
                    inner.served.fetch_add(1, Ordering::SeqCst);
                    drop(owned);
                });
            }
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn release(&self, request: Request<ReleaseRequest>) -> std::result::Result<Response<ReleaseResponse>, Status> {
        let id = request.into_inner().sequence_id;
        let mut store = self.inner.store();
        // A state being decoded belongs to its Decode stream; ending that stream frees it.
        let released = store.held.get(&id).is_some_and(|h| h.state.is_some());
        if released {
            store.held.remove(&id);
        } else if !store.held.contains_key(&id) {
            // The state may still be on its way: refuse it when it arrives.
            store.released.insert(id, Instant::now() + RELEASED_MEMORY);
        }
        Ok(Response::new(ReleaseResponse { released }))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> std::result::Result<Response<StatsResponse>, Status> {
        let store = self.inner.store();
        Ok(Response::new(StatsResponse {
            sequences: store.held.len() as u32,
            state_bytes: store.bytes() as u64,
            receiving: store.receiving as u32,
        }))
    }
}
