//! The prefill worker: runs LazyLLM prefill and pushes the sequence state to a decode
//! worker layer by layer while later layers are still computing (DESIGN.md section 2).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use lazyserve_engine::{Engine, Sampler, SamplingParams};
use lazyserve_proto::state::StateEncoder;
use lazyserve_proto::v1::decode_client::DecodeClient;
use lazyserve_proto::v1::prefill_server::{Prefill, PrefillServer};
use lazyserve_proto::v1::{prefill_response, FirstToken, PrefillRequest, PrefillResponse, StateEncoding, StateSent};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::channels::Channels;
use crate::config::PrefillArgs;
use crate::error::{self, Error, Result};

/// The Prefill service; clones share the model and the slots.
#[derive(Clone)]
pub struct PrefillService {
    engine: Arc<Engine>,
    channels: Arc<Channels>,
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
}

/// Counts a request waiting for a compute slot while it waits.
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

type Events = mpsc::Sender<std::result::Result<PrefillResponse, Status>>;

impl PrefillService {
    pub fn new(engine: Arc<Engine>, args: &PrefillArgs) -> Self {
        Self {
            engine,
            channels: Arc::default(),
            slots: Arc::new(Semaphore::new(args.prefill_concurrency.max(1))),
            waiting: Arc::default(),
            max_waiting: args.prefill_queue,
        }
    }

    pub fn into_server(self) -> PrefillServer<Self> {
        PrefillServer::new(self)
    }

    fn validate(&self, req: &PrefillRequest) -> Result<(lazyserve_engine::lazy::Schedule, SamplingParams, StateEncoding)> {
        let cfg = self.engine.model.config();
        if req.prompt_ids.is_empty() {
            return Err(Error::InvalidArgument { field: "prompt_ids", reason: "is empty".into() });
        }
        if let Some(id) = req.prompt_ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            let reason = format!("token {id} is not below the vocabulary size {}", cfg.vocab_size);
            return Err(Error::InvalidArgument { field: "prompt_ids", reason });
        }
        if req.prompt_ids.len() + 1 > cfg.max_position_embeddings {
            let (tokens, max) = (req.prompt_ids.len(), cfg.max_position_embeddings - 1);
            return Err(lazyserve_engine::Error::PromptTooLong { tokens, max }.into());
        }
        if req.sequence_id.is_empty() || req.decode_address.is_empty() {
            let reason = "sequence_id and decode_address are required".into();
            return Err(Error::InvalidArgument { field: "sequence_id", reason });
        }
        let schedule = self.engine.schedule(&req.prune)?;
        let sampling = SamplingParams::from(req.sampling.unwrap_or_default());
        sampling.validate()?;
        let encoding = StateEncoding::try_from(req.encoding)
            .map_err(|_| Error::InvalidArgument { field: "encoding", reason: format!("unknown value {}", req.encoding) })?;
        Ok((schedule, sampling, encoding))
    }

    /// Prefills and pushes; reports on `events`.
    async fn run(self, req: PrefillRequest, events: Events) {
        if let Err(e) = self.run_inner(req, &events).await {
            let _ = events.send(Err(e.into())).await;
        }
    }

    async fn run_inner(&self, req: PrefillRequest, events: &Events) -> Result<()> {
        let (schedule, sampling, encoding) = self.validate(&req)?;
        let _waiting = {
            if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                return Err(Error::Overloaded(format!("prefill queue is full ({} waiting)", self.max_waiting)));
            }
            Waiting(self.waiting.clone())
        };
        let slot = self.slots.clone().acquire_owned().await.expect("prefill slots are never closed");
        drop(_waiting);
        if events.is_closed() {
            return Ok(());
        }

        let addr = req.decode_address.clone();
        let mut decode = DecodeClient::new(self.channels.get(&addr)?);
        let (chunks_tx, chunks_rx) = mpsc::channel(4);
        let push = tokio::spawn(async move { decode.push_state(ReceiverStream::new(chunks_rx)).await });

        let engine = self.engine.clone();
        let events_tx = events.clone();
        let wire_sampling = req.sampling.unwrap_or_default();
        let compute = tokio::task::spawn_blocking(move || -> Result<(u64, u32, Instant)> {
            let _slot = slot;
            let cfg = engine.model.config();
            let mut enc = StateEncoder::new(cfg, encoding);
            let ttl = req.state_ttl_ms;
            let header = enc.header(&req.sequence_id, &engine.name, &req.prompt_ids, &req.prune, wire_sampling, ttl);
            let closed = || Error::Unavailable(format!("decode worker {} closed the state stream", req.decode_address));
            chunks_tx.blocking_send(header).map_err(|_| closed())?;
            let mut sampler = Sampler::new(sampling)?;
            let mut push_error = None;
            let pre = engine.prefill(&req.prompt_ids, schedule, &mut sampler, &mut |l, layer| {
                if events_tx.is_closed() {
                    return Err(lazyserve_engine::Error::Cancelled);
                }
                for chunk in enc.layer(l, layer) {
                    if chunks_tx.blocking_send(chunk).is_err() {
                        push_error = Some(closed());
                        return Err(lazyserve_engine::Error::Cancelled);
                    }
                }
                Ok(())
            });
            let pre = match (pre, push_error) {
                (_, Some(e)) => return Err(e),
                (r, None) => r?,
            };
            let first = FirstToken {
                token_id: pre.first_token,
                prefill_ms: pre.prefill.as_secs_f64() * 1e3,
                computed_percent: 100.0 * pre.state.computed_fraction(),
            };
            let event = prefill_response::Event::FirstToken(first);
            if events_tx.blocking_send(Ok(PrefillResponse { event: Some(event) })).is_err() {
                // The router went away: end the stream without a trailer, which the decode
                // worker refuses and frees.
                return Err(lazyserve_engine::Error::Cancelled.into());
            }
            let first_at = Instant::now();
            chunks_tx.blocking_send(enc.trailer()).map_err(|_| closed())?;
            Ok((enc.bytes(), enc.chunks(), first_at))
        });
        let computed = compute.await.map_err(|_| Error::Engine(lazyserve_engine::Error::Internal("prefill panicked")))?;
        let pushed = push.await.map_err(|_| Error::Engine(lazyserve_engine::Error::Internal("state push panicked")))?;
        // A refused or failed push explains a closed chunk stream better than the closing.
        let (bytes, chunks, first_at) = match (computed, pushed) {
            (Ok(counts), Ok(_)) => counts,
            (Err(Error::Unavailable(_)), Err(status)) | (Ok(_), Err(status)) => {
                return Err(error::from_worker("decode", &addr, status));
            }
            (Err(e), _) => return Err(e),
        };
        let sent = StateSent { bytes, chunks, transfer_ms: first_at.elapsed().as_secs_f64() * 1e3 };
        let event = prefill_response::Event::StateSent(sent);
        let _ = events.send(Ok(PrefillResponse { event: Some(event) })).await;
        Ok(())
    }
}

#[tonic::async_trait]
impl Prefill for PrefillService {
    type PrefillStream = ReceiverStream<std::result::Result<PrefillResponse, Status>>;

    async fn prefill(&self, request: Request<PrefillRequest>) -> std::result::Result<Response<Self::PrefillStream>, Status> {
        let req = request.into_inner();
        self.validate(&req)?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(self.clone().run(req, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
