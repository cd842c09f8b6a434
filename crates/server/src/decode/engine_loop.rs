//! The decode worker's engine loop: one thread owns a [`Batcher`] and steps every live
//! sequence together (continuous batching). Decode calls hand their sequence over through a
//! channel and read its tokens from another; a caller that goes away closes that channel,
//! and the sequence leaves the loop, freeing its state, before the next iteration.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Instant;

use lazyserve_engine::batch::{BatchConfig, Batcher, Event, Join, Sink};
use lazyserve_engine::Engine;
use lazyserve_proto::v1::{decode_response, DecodeDone, DecodeResponse, FirstToken};
use lazyserve_telemetry::metrics::Metrics;
use tokio::sync::mpsc;
use tonic::Status;

use super::store::Owned;
use crate::error::{Error, Result, ServiceError};

pub(super) type Responses = mpsc::UnboundedSender<std::result::Result<DecodeResponse, Status>>;

/// Where one sequence's events go: its Decode stream. Dropping it (the sequence left the
/// loop) frees the sequence's entry in the store.
pub(super) struct StreamSink {
    pub tx: Responses,
    pub span: tracing::Span,
    pub owned: Owned,
}

impl Sink for StreamSink {
    fn send(&mut self, event: Event) -> bool {
        let event = match event {
            Event::Prefilled { first_token, prefill, computed_fraction, state_bytes } => {
                self.owned.inner.set_bytes(&self.owned.sequence_id, state_bytes);
                decode_response::Event::Prefilled(FirstToken {
                    token_id: first_token,
                    prefill_ms: prefill.as_secs_f64() * 1e3,
                    computed_percent: 100.0 * computed_fraction,
                })
            }
            Event::Token(id) => decode_response::Event::TokenId(id),
            Event::Done { tokens, computed_fraction, revived } => {
                self.span.record("lazyserve.tokens", tokens as i64).record("lazyserve.revived_tokens", revived as i64);
                decode_response::Event::Done(DecodeDone { computed_percent: 100.0 * computed_fraction, revived_tokens: revived as u64 })
            }
            Event::Failed(e) => return self.tx.send(Err(Error::from(e).into())).is_ok(),
        };
        self.tx.send(Ok(DecodeResponse { event: Some(event) })).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl Drop for StreamSink {
    fn drop(&mut self) {
        self.owned.inner.served.fetch_add(1, Ordering::SeqCst);
    }
}

/// What the loop reports for load and metrics.
#[derive(Default)]
pub(super) struct LoopStats {
    /// Sequences stepped in the last iteration.
    pub batch: AtomicUsize,
    /// Sequences handed over that the loop has not taken yet.
    queued: AtomicUsize,
    /// Sequences in the loop still prefilling their prompt.
    prefilling: AtomicUsize,
}

impl LoopStats {
    /// Sequences waiting to decode: queued for the loop or prefilling.
    pub fn waiting(&self) -> usize {
        self.queued.load(Ordering::SeqCst) + self.prefilling.load(Ordering::SeqCst)
    }
}

/// The handle the service keeps; the loop thread ends when it is dropped and the last
/// sequence has left.
pub(super) struct EngineLoop {
    tx: std_mpsc::Sender<Join<StreamSink>>,
    pub stats: Arc<LoopStats>,
}

impl EngineLoop {
    pub fn start(engine: Arc<Engine>, cfg: BatchConfig, metrics: Option<Metrics>) -> Self {
        let (tx, rx) = std_mpsc::channel();
        let stats = Arc::new(LoopStats::default());
        let loop_stats = stats.clone();
        // Compute threads of its own: where prefill shares the process (`lazyserve serve`),
        // a long prompt's tasks would otherwise queue ahead of every decode step's, and the
        // streams would stall for the whole prefill instead of sharing the cores with it.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("decode-{i}"))
            .build()
            .expect("building the decode thread pool");
        std::thread::Builder::new()
            .name("decode-loop".into())
            .spawn(move || pool.install(move || run(Batcher::new(engine, cfg), &rx, &loop_stats, metrics.as_ref())))
            .expect("spawning the decode loop thread");
        Self { tx, stats }
    }

    /// Hands a sequence to the loop.
    pub fn submit(&self, join: Join<StreamSink>) -> Result<()> {
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        self.tx.send(join).map_err(|_| {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            ServiceError::Unavailable("the decode loop has stopped".into()).into()
        })
    }
}

fn run(mut batcher: Batcher<StreamSink>, rx: &std_mpsc::Receiver<Join<StreamSink>>, stats: &LoopStats, metrics: Option<&Metrics>) {
    let join = |batcher: &mut Batcher<StreamSink>, j| {
        batcher.join(j);
        stats.queued.fetch_sub(1, Ordering::SeqCst);
    };
    loop {
        if batcher.is_empty() {
            match rx.recv() {
                Ok(j) => join(&mut batcher, j),
                Err(_) => return,
            }
        }
        for j in rx.try_iter() {
            join(&mut batcher, j);
        }
        stats.prefilling.store(batcher.prefilling(), Ordering::SeqCst);
        let started = Instant::now();
        let stepped = batcher.iterate();
        stats.prefilling.store(batcher.prefilling(), Ordering::SeqCst);
        stats.batch.store(stepped, Ordering::SeqCst);
        if let Some(m) = metrics.filter(|_| stepped > 0) {
            m.observe_iteration(stepped, started.elapsed().as_secs_f64());
        }
    }
}
