//! The decode worker: receives sequence states from prefill workers, holds each with an
//! owner and a deadline, and decodes from it with LazyLLM revival (DESIGN.md section 2).
//! Every sequence it decodes, received or prefilled here, runs in one engine loop that
//! steps them all together (continuous batching, section 7).
//!
//! A state is freed when its Decode stream ends for any reason (done, failed, or the caller
//! went away), when it is released, or when its deadline passes with nobody decoding it.
//! A state stream that breaks off or fails its checks is dropped whole.

mod engine_loop;
mod store;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lazyserve_discovery::{Capacity, Load};
use lazyserve_engine::batch::{BatchConfig, Join, Start};
use lazyserve_engine::lazy::{Schedule, SequenceState};
use lazyserve_engine::{Engine, Sampler, SamplingParams};
use lazyserve_state::{StateAssembler, StateError};
use lazyserve_proto::v1::decode_server::{Decode, DecodeServer};
use lazyserve_proto::v1::{
    DecodeRequest, DecodeResponse, LocalPrefill, PushStateResponse, ReleaseRequest, ReleaseResponse, StateChunk,
    StatsRequest, StatsResponse,
};
use lazyserve_request::limits;
use lazyserve_service::channels::MAX_MESSAGE_BYTES;
use lazyserve_telemetry::metrics::{Gauges, Metrics};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::config::DecodeArgs;
use crate::error::{Error, Result, ServiceError};
use engine_loop::{EngineLoop, StreamSink};
use store::{Held, Inner, Owned, Receiving};


/// The Decode service; clones share one store and one engine loop.
#[derive(Clone)]
pub struct DecodeService {
    inner: Arc<Inner>,
}

impl DecodeService {
    /// A decode worker over `engine`; starts its engine loop and the task that frees
    /// abandoned states. `metrics` gets the loop's batch sizes and iteration times.
    pub fn new(engine: Arc<Engine>, args: &DecodeArgs, metrics: Option<Metrics>) -> Self {
        let cfg = BatchConfig { prefill_chunk: args.prefill_chunk_tokens as usize };
        let inner = Arc::new(Inner {
            engine_loop: EngineLoop::start(engine.clone(), cfg, metrics),
            engine,
            store: Mutex::default(),
            max_sequences: args.max_sequences,
            max_bytes: args.max_state_mib << 20,
            served: AtomicU64::new(0),
        });
        tokio::spawn(store::sweep(Arc::downgrade(&inner)));
        Self { inner }
    }

    pub fn into_server(self) -> DecodeServer<Self> {
        DecodeServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES)
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
            decode_sequences_waiting: l.waiting as i64,
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
            batch: self.inner.engine_loop.stats.batch.load(Ordering::SeqCst) as u32,
            waiting: self.inner.engine_loop.stats.waiting() as u32,
            served: self.inner.served.load(Ordering::SeqCst),
            ..Load::default()
        }
    }

    async fn receive(&self, mut stream: Streaming<StateChunk>) -> Result<u64> {
        let inner = &self.inner;
        let guard = {
            let mut store = inner.store();
            inner.check_room(&store)?;
            store.receiving += 1;
            store.next_stream += 1;
            Receiving { inner: inner.clone(), id: store.next_stream }
        };
        let engine = &inner.engine;
        let mut asm = StateAssembler::new(engine.config(), engine.kv_dtype);
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
                return Err(ServiceError::Overloaded(format!("decode worker state memory is full ({} MiB)", inner.max_bytes >> 20)).into());
            }
        }
        let bytes = asm.bytes();
        let engine2 = engine.clone();
        let (header, state) = tokio::task::spawn_blocking(move || asm.finish(engine2.config()))
            .await
            .map_err(|_| Error::Engine(lazyserve_engine::Error::Internal("state assembly panicked")))??;
        limits::sequence_id(&header.sequence_id).map_err(Error::from)?;
        let mut store = inner.store();
        if store.released.remove(&header.sequence_id).is_some() {
            tracing::debug!(sequence_id = %header.sequence_id, "state arrived after its release; dropped");
            return Err(ServiceError::ClientGone.into());
        }
        if store.held.contains_key(&header.sequence_id) {
            return Err(ServiceError::AlreadyExists(format!("sequence {} is held already", header.sequence_id)).into());
        }
        let ttl = Duration::from_millis(header.ttl_ms.max(1) as u64);
        store.held.insert(
            header.sequence_id.clone(),
            Held { state: Some(Box::new(state)), sampling: header.sampling.into(), bytes, deadline: Instant::now() + ttl },
        );
        tracing::debug!(sequence_id = %header.sequence_id, bytes, "state received");
        Ok(bytes as u64)
    }

    /// Takes a held state for decoding, with its sampling parameters; the returned guard frees it.
    fn take(&self, sequence_id: &str) -> Result<(Box<SequenceState>, SamplingParams, Owned)> {
        let mut store = self.inner.store();
        let held = store
            .held
            .get_mut(sequence_id)
            .ok_or_else(|| ServiceError::NotFound(format!("no state held for sequence {sequence_id}")))?;
        let state = held
            .state
            .take()
            .ok_or_else(|| ServiceError::AlreadyExists(format!("sequence {sequence_id} is being decoded already")))?;
        let owned = Owned { inner: self.inner.clone(), sequence_id: sequence_id.to_string() };
        Ok((state, held.sampling.clone(), owned))
    }
}

impl DecodeService {
    /// Checks a prompt to prefill here.
    fn check_local(&self, local: &LocalPrefill) -> Result<(Schedule, SamplingParams)> {
        limits::token_ids(&local.prompt_ids, self.inner.engine.config())?;
        let schedule = self.inner.engine.schedule(&local.prune)?;
        Ok((schedule, SamplingParams::from(local.sampling.unwrap_or_default())))
    }

    /// Checks the tokens a migrated stream delivered: in the vocabulary, fewer than
    /// `max_tokens`.
    fn check_replay(&self, replay: &[u32], max_tokens: usize) -> Result<()> {
        let cfg = self.inner.engine.config();
        for &id in replay {
            limits::token_id("replay", id, cfg)?;
        }
        if replay.len() >= max_tokens {
            let reason = format!("holds {} tokens, max_tokens is {max_tokens}", replay.len());
            return Err(lazyserve_request::Error::Invalid { field: "replay", reason }.into());
        }
        Ok(())
    }

    /// Registers a sequence prefilled here as held (for the limits and the stats).
    fn hold_local(&self, sequence_id: &str) -> Result<Owned> {
        let mut store = self.inner.store();
        self.inner.check_room(&store)?;
        if store.held.contains_key(sequence_id) {
            return Err(ServiceError::AlreadyExists(format!("sequence {sequence_id} is held already")).into());
        }
        let held = Held { state: None, sampling: SamplingParams::default(), bytes: 0, deadline: Instant::now() };
        store.held.insert(sequence_id.to_string(), held);
        Ok(Owned { inner: self.inner.clone(), sequence_id: sequence_id.to_string() })
    }
}

type DecodeStream = UnboundedReceiverStream<std::result::Result<DecodeResponse, Status>>;

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
        limits::sequence_id(&req.sequence_id).map_err(Error::from)?;
        let max_tokens = limits::max_tokens(req.max_tokens as usize).map_err(Error::from)?;
        limits::token_id("first_token", req.first_token, self.inner.engine.config()).map_err(Error::from)?;
        self.check_replay(&req.replay, max_tokens)?;
        let (start, params, owned) = match req.local {
            None => {
                let (state, params, owned) = self.take(&req.sequence_id)?;
                (Start::Prefilled { state, first_token: req.first_token }, params, owned)
            }
            Some(local) => {
                let (schedule, params) = self.check_local(&local)?;
                let owned = self.hold_local(&req.sequence_id)?;
                (Start::Prompt { prompt_ids: local.prompt_ids, schedule }, params, owned)
            }
        };
        // Sampled so far: the prefill worker's first token, or every replayed one.
        let sampled = match (&start, req.replay.len()) {
            (Start::Prefilled { .. }, 0) => 1,
            (_, replayed) => replayed,
        };
        let sampler = Sampler::after(params, sampled).map_err(Error::from)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = StreamSink { tx, span, owned };
        self.inner.engine_loop.submit(Join { start, sampler, max_tokens, sink, replay: req.replay })?;
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn release(&self, request: Request<ReleaseRequest>) -> std::result::Result<Response<ReleaseResponse>, Status> {
        let id = request.into_inner().sequence_id;
        limits::sequence_id(&id).map_err(Error::from)?;
        let mut store = self.inner.store();
        // A state being decoded belongs to its Decode stream; ending that stream frees it.
        let released = store.held.get(&id).is_some_and(|h| h.state.is_some());
        if released {
            store.held.remove(&id);
        } else if !store.held.contains_key(&id) {
            // The state may still be on its way: refuse it when it arrives.
            store.remember_release(id, Instant::now());
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
