//! The router: the public Generate RPC. It tokenizes and validates, picks a prefill and a
//! decode worker, streams the first token as soon as prefill has it, then relays the decode
//! stream. TTFT is measured here, where the client sees it (DESIGN.md section 2).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lazyserve_discovery::{Discovery, Role, WorkerInfo};
use lazyserve_engine::lazy::{Schedule, PRESET_NAMES};
use lazyserve_engine::{FinishReason, Output, SamplingParams, MAX_NEW_TOKENS};
use lazyserve_model::{ChatMessage, ModelMeta};
use lazyserve_proto::v1::admin_server::{Admin, AdminServer};
use lazyserve_proto::v1::decode_client::DecodeClient;
use lazyserve_proto::v1::generate_request::Input;
use lazyserve_proto::v1::generate_response::Event;
use lazyserve_proto::v1::generation_server::{Generation, GenerationServer};
use lazyserve_proto::v1::prefill_client::PrefillClient;
use lazyserve_proto::v1::{
    decode_response, prefill_response, Completion, DecodeRequest, DecodeResponse, FirstToken, GenerateRequest,
    GenerateResponse, ListWorkersRequest, ListWorkersResponse, LocalPrefill, ModelInfoRequest, ModelInfoResponse,
    PrefillRequest, PrefillResponse, ReleaseRequest, StreamError, TextChunk, Timings, Usage, WorkerStatus,
};
use lazyserve_telemetry::metrics::Gauges;
use lazyserve_telemetry::Metrics;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tokio::time::timeout_at;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::channels::{grpc_timeout, Channels};
use crate::config::RouterPolicy;
use crate::error::{self, Error, Result};

/// The Generation and Admin services; clones share everything.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    meta: ModelMeta,
    policy: RouterPolicy,
    discovery: Arc<dyn Discovery>,
    /// What this router has in flight on each worker (by address).
    routed: Mutex<HashMap<String, Routed>>,
    channels: Channels,
    inflight: Arc<Semaphore>,
    next_id: AtomicUsize,
    metrics: Metrics,
}

#[derive(Debug, Default, Clone, Copy)]
struct Routed {
    requests: u32,
    prompt_tokens: u64,
}

/// Counts a request against a worker while it is there.
struct OnWorker {
    inner: Arc<Inner>,
    key: String,
    prompt_tokens: u64,
}

impl OnWorker {
    fn new(inner: &Arc<Inner>, role: Role, address: &str, prompt_tokens: u64) -> Self {
        let key = routed_key(role, address);
        let mut routed = inner.routed.lock().expect("routed lock");
        let r = routed.entry(key.clone()).or_default();
        r.requests += 1;
        r.prompt_tokens += prompt_tokens;
        Self { inner: inner.clone(), key, prompt_tokens }
    }
}

impl Drop for OnWorker {
    fn drop(&mut self) {
        let mut routed = self.inner.routed.lock().expect("routed lock");
        if let Some(r) = routed.get_mut(&self.key) {
            r.requests -= 1;
            r.prompt_tokens -= self.prompt_tokens;
        }
    }
}

/// A validated request, ready to route.
struct Job {
    request_id: String,
    prompt_ids: Vec<u32>,
    max_tokens: usize,
    stop: Vec<String>,
    sampling: SamplingParams,
    prune: String,
    start: Instant,
    deadline: tokio::time::Instant,
    /// Upper bound of the state's size: a dense f16 KV cache of the prompt.
    state_bytes: u64,
    /// The GenAI operation: `chat` or `text_completion`.
    operation: &'static str,
}

impl Job {
    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(tokio::time::Instant::now())
    }

    fn late(&self) -> Error {
        Error::DeadlineExceeded(format!("request deadline passed after {:.0} ms", ms(self.start.elapsed())))
    }
}

type Events = mpsc::Sender<std::result::Result<GenerateResponse, Status>>;

/// Releases a state pushed to a decode worker that no Decode stream took, when the request
/// ends early (the client left, an error, or one token was all it needed). Until the
/// prefill worker says which decode worker accepted the state, every candidate is asked.
struct ReleaseGuard {
    /// (address, client) of every decode worker that may hold the state.
    clients: Vec<(String, DecodeClient<Channel>)>,
    sequence_id: String,
}

impl ReleaseGuard {
    fn disarm(&mut self) {
        self.clients.clear();
    }

    /// Once the prefill worker says which decode worker accepted the state, only that one.
    fn only(&mut self, address: &str) {
        self.clients.retain(|(a, _)| a == address);
    }
}

impl Drop for ReleaseGuard {
    fn drop(&mut self) {
        for (_, mut client) in self.clients.drain(..) {
            let sequence_id = self.sequence_id.clone();
            tokio::spawn(async move {
                let mut req = Request::new(ReleaseRequest { sequence_id });
                req.set_timeout(Duration::from_secs(5));
                let _ = client.release(req).await;
            });
        }
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidArgument { field, reason: reason.into() }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Router {
    /// A router for the model described by `meta`, over the workers `discovery` finds.
    pub fn new(meta: ModelMeta, policy: RouterPolicy, discovery: Arc<dyn Discovery>, metrics: Metrics) -> anyhow::Result<Self> {
        Schedule::parse(&policy.default_prune, meta.config.num_hidden_layers)
            .map_err(|e| anyhow::anyhow!("--default-prune: {e}"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                inflight: Arc::new(Semaphore::new(policy.max_inflight)),
                meta,
                policy,
                discovery,
                routed: Mutex::default(),
                channels: Channels::default(),
                next_id: AtomicUsize::new(0),
                metrics,
            }),
        })
    }

    /// Requests in flight and prompt tokens sent to prefill workers and not yet prefilled.
    pub fn gauges(&self) -> Gauges {
        let inner = &self.inner;
        let routed = inner.routed.lock().expect("routed lock");
        let queued: u64 = routed.iter().filter(|(k, _)| k.starts_with("prefill/")).map(|(_, r)| r.prompt_tokens).sum();
        Gauges {
            inflight_requests: (inner.policy.max_inflight - inner.inflight.available_permits()) as i64,
            queued_prompt_tokens: queued as i64,
            ..Gauges::default()
        }
    }

    pub fn into_server(self) -> GenerationServer<Self> {
        GenerationServer::new(self)
    }

    pub fn admin_server(self) -> AdminServer<Self> {
        AdminServer::new(self)
    }

    fn job(&self, req: GenerateRequest, timeout: Option<Duration>) -> Result<Job> {
        let inner = &self.inner;
        let (meta, policy) = (&inner.meta, &inner.policy);
        let start = Instant::now();
        if let Some(model) = req.model.as_deref().filter(|m| !m.is_empty() && *m != meta.name) {
            return Err(invalid("model", format!("unknown model {model:?}; this router serves {:?}", meta.name)));
        }
        let operation = if matches!(req.input, Some(Input::Chat(_))) { "chat" } else { "text_completion" };
        let text = match req.input {
            None => return Err(invalid("prompt", "is missing: set prompt or chat")),
            Some(Input::Prompt(p)) if p.is_empty() => return Err(invalid("prompt", "is empty")),
            Some(Input::Prompt(p)) => p,
            Some(Input::Chat(c)) if c.messages.is_empty() => return Err(invalid("chat.messages", "is empty")),
            Some(Input::Chat(c)) => {
                let msgs: Vec<ChatMessage> =
                    c.messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect();
                meta.tokenizer.apply_chat_template(&msgs).map_err(|e| invalid("chat", e.to_string()))?
            }
        };
        let prompt_ids = meta.tokenizer.encode(&text).map_err(|e| invalid("prompt", e.to_string()))?;
        if prompt_ids.is_empty() {
            return Err(invalid("prompt", "has no tokens"));
        }
        let max = meta.config.max_position_embeddings - 1;
        if prompt_ids.len() > max {
            return Err(invalid("prompt", format!("has {} tokens, at most {max} fit the model's context", prompt_ids.len())));
        }
        let max_tokens = req.max_tokens as usize;
        if max_tokens == 0 || max_tokens > MAX_NEW_TOKENS {
            return Err(invalid("max_tokens", format!("must be in 1..={MAX_NEW_TOKENS}, got {max_tokens}")));
        }
        if req.stop.iter().any(String::is_empty) {
            return Err(invalid("stop", "stop strings must not be empty"));
        }
        let sampling = SamplingParams {
            temperature: req.temperature.unwrap_or(0.0),
            top_k: req.top_k as usize,
            top_p: req.top_p.unwrap_or(1.0),
            seed: req.seed,
        };
        sampling.validate()?;
        let prune = match req.prune {
            Some(p) => p,
            None if prompt_ids.len() < policy.prune_min_tokens => "off".to_string(),
            None => policy.default_prune.clone(),
        };
        Schedule::parse(&prune, meta.config.num_hidden_layers)?;
        let request_id = req.request_id.filter(|id| !id.is_empty()).unwrap_or_else(|| {
            format!("r{}-{:x}", inner.next_id.fetch_add(1, Ordering::Relaxed), rand::random::<u32>())
        });
        let limit = Duration::from_secs(policy.request_timeout_secs);
        let deadline = tokio::time::Instant::now() + timeout.map_or(limit, |t| t.min(limit));
        let cfg = &meta.config;
        let state_bytes = (prompt_ids.len() * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2) as u64;
        Ok(Job { request_id, prompt_ids, max_tokens, stop: req.stop, sampling, prune, start, deadline, state_bytes, operation })
    }

    /// Workers of `role` serving this router's model, except `exclude`d addresses.
    fn candidates(&self, role: Role, exclude: &[String]) -> Vec<WorkerInfo> {
        let model = &self.inner.meta.name;
        self.inner
            .discovery
            .workers()
            .iter()
            .filter(|w| w.role == role && (w.model.is_empty() || &w.model == model) && !exclude.contains(&w.address))
            .cloned()
            .collect()
    }

    /// `workers` by `score` (reported load plus what this router has in flight there),
    /// lowest first, ties in random order.
    fn ranked(&self, role: Role, workers: Vec<WorkerInfo>, score: impl Fn(&WorkerInfo, Routed) -> u64) -> Vec<WorkerInfo> {
        let routed = self.inner.routed.lock().expect("routed lock");
        let mut keyed: Vec<(u64, u32, WorkerInfo)> = workers
            .into_iter()
            .map(|w| {
                let r = routed.get(&routed_key(role, &w.address)).copied().unwrap_or_default();
                (score(&w, r), rand::random::<u32>(), w)
            })
            .collect();
        keyed.sort_by_key(|(score, tie, _)| (*score, *tie));
        keyed.into_iter().map(|(_, _, w)| w).collect()
    }

    /// Prefill workers, fewest outstanding prompt tokens first.
    fn prefill_order(&self, exclude: &[String]) -> Result<Vec<WorkerInfo>> {
        let ranked = self.ranked(Role::Prefill, self.candidates(Role::Prefill, exclude), |w, r| {
            w.load.queued_prompt_tokens + r.prompt_tokens
        });
        if ranked.is_empty() {
            return Err(Error::Unavailable(format!("no prefill worker for model {:?} is available", self.inner.meta.name)));
        }
        Ok(ranked)
    }

    /// Decode workers with room for a state of `bytes`, fewest held sequences first.
    fn decode_order(&self, bytes: u64, exclude: &[String]) -> Result<Vec<WorkerInfo>> {
        let all = self.candidates(Role::Decode, exclude);
        if all.is_empty() {
            return Err(Error::Unavailable(format!("no decode worker for model {:?} is available", self.inner.meta.name)));
        }
        let with_room: Vec<WorkerInfo> = all
            .into_iter()
            .filter(|w| {
                let c = &w.capacity;
                (c.requests == 0 || w.load.sequences < c.requests) && (c.state_bytes == 0 || w.load.state_bytes + bytes <= c.state_bytes)
            })
            .collect();
        if with_room.is_empty() {
            return Err(Error::Overloaded("every decode worker is full; retry later".into()));
        }
        Ok(self.ranked(Role::Decode, with_room, |w, r| u64::from(w.load.sequences + r.requests)))
    }

    /// Runs a job, sending its events; a failure before any token becomes the RPC status,
    /// a later one a `StreamError` that says how many tokens were delivered.
    async fn run(self, job: Job, events: Events, _permit: OwnedSemaphorePermit) {
        let mut delivered = 0u32;
        let request_id = job.request_id.clone();
        let result = self.run_inner(job, &events, &mut delivered).await;
        if let Err(e) = result {
            if matches!(e, Error::ClientGone) {
                self.inner.metrics.requests.with_label_values(&["cancelled"]).inc();
                tracing::info!(%request_id, delivered, "client went away");
                return;
            }
            self.inner.metrics.requests.with_label_values(&["error"]).inc();
            tracing::Span::current().set_status(opentelemetry::trace::Status::error(e.to_string()));
            tracing::warn!(%request_id, error = %e, delivered, "request failed");
            let msg = if delivered == 0 {
                Err(e.into())
            } else {
                let status = Status::from(e);
                let error = StreamError { code: format!("{:?}", status.code()), message: status.message().into(), tokens_delivered: delivered };
                Ok(GenerateResponse { event: Some(Event::Error(error)) })
            };
            let _ = events.send(msg).await;
        }
    }

    /// Prefill on a prefill worker, up to its first token; the state goes to one of two
    /// decode workers. Errors name the prefill worker, for a retry elsewhere.
    async fn start_remote(&self, job: &Job, exclude: &[String], events: &Events) -> std::result::Result<Started, (Option<String>, Error)> {
        let inner = &self.inner;
        let prefill = self.prefill_order(exclude).map_err(|e| (None, e))?.swap_remove(0);
        let decodes: Vec<String> =
            self.decode_order(job.state_bytes, &[]).map_err(|e| (None, e))?.into_iter().take(2).map(|w| w.address).collect();
        let addr = prefill.address.clone();
        let fail = |e: Error| (Some(addr.clone()), e);
        let on_prefill = OnWorker::new(inner, Role::Prefill, &addr, job.prompt_ids.len() as u64);
        let sequence_id = format!("{}-{:016x}", job.request_id, rand::random::<u64>());
        let clients = decodes.iter().map(|a| Ok((a.clone(), DecodeClient::new(inner.channels.get(a)?)))).collect::<Result<Vec<_>>>();
        let release = ReleaseGuard { clients: clients.map_err(fail)?, sequence_id: sequence_id.clone() };
        let mut req = Request::new(PrefillRequest {
            sequence_id: sequence_id.clone(),
            prompt_ids: job.prompt_ids.clone(),
            prune: job.prune.clone(),
            sampling: Some((&job.sampling).into()),
            decode_addresses: decodes,
            encoding: lazyserve_proto::v1::StateEncoding::from(inner.policy.state_encoding) as i32,
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
        Ok(Started { first, source: Source::Remote { stream, addr, _on_prefill: on_prefill, release, sequence_id } })
    }

    /// A short prompt: prefill on a decode worker itself, up to its first token.
    async fn start_local(&self, job: &Job, exclude: &[String], events: &Events) -> std::result::Result<Started, (Option<String>, Error)> {
        let inner = &self.inner;
        let decode = self.decode_order(job.state_bytes, exclude).map_err(|e| (None, e))?.swap_remove(0);
        let addr = decode.address.clone();
        let fail = |e: Error| (Some(addr.clone()), e);
        let on_decode = OnWorker::new(inner, Role::Decode, &addr, 0);
        let mut req = Request::new(DecodeRequest {
            sequence_id: format!("{}-{:016x}", job.request_id, rand::random::<u64>()),
            first_token: 0,
            max_tokens: job.max_tokens as u32,
            local: Some(LocalPrefill {
                prompt_ids: job.prompt_ids.clone(),
                prune: job.prune.clone(),
                sampling: Some((&job.sampling).into()),
            }),
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
        Ok(Started { first, source: Source::Local { stream, addr, _on_decode: on_decode } })
    }

    async fn run_inner(&self, job: Job, events: &Events, delivered: &mut u32) -> Result<()> {
        let inner = &self.inner;
        let local = job.prompt_ids.len() < inner.policy.local_prefill_tokens;
        // A worker that fails before the first token gets one retry elsewhere.
        let (mut attempts, mut tried, mut first_error) = (0u32, Vec::new(), None);
        let started = loop {
            attempts += 1;
            let span = tracing::info_span!("prefill", otel.kind = "client", lazyserve.attempt = attempts, lazyserve.local = local);
            let r = if local {
                self.start_local(&job, &tried, events).instrument(span).await
            } else {
                self.start_remote(&job, &tried, events).instrument(span).await
            };
            match r {
                Ok(s) => break s,
                Err((Some(addr), e)) if attempts < 2 && e.retryable() && !job.remaining().is_zero() => {
                    tracing::warn!(request_id = %job.request_id, worker = %addr, error = %e, "prefill failed before the first token; retrying on another worker");
                    tried.push(addr);
                    first_error = Some(e);
                }
                // No other worker to retry on: the first failure says more.
                Err((None, e)) => return Err(first_error.unwrap_or(e)),
                Err((_, e)) => return Err(e),
            }
        };

        let meta = &inner.meta;
        let mut out = Output::new(&meta.tokenizer, &job.stop, job.max_tokens, job.prompt_ids.len(), meta.config.max_position_embeddings);
        let first = started.first;
        let step = out.push(first.token_id)?;
        let ids = if step.finish == Some(FinishReason::Eos) { vec![] } else { vec![first.token_id] };
        let ttft = job.start.elapsed();
        if !send_chunk(events, step.text, ids).await {
            return Err(Error::ClientGone);
        }
        let request_span = tracing::Span::current();
        request_span.record("lazyserve.ttft_ms", ms(ttft));
        tracing::info!(ttft_ms = ms(ttft), "first token");
        inner.metrics.observe_ttft(ttft.as_secs_f64());
        *delivered = out.token_ids().len() as u32;
        let mut finish = step.finish;
        let (mut computed_percent, mut revived) = (first.computed_percent, 0);
        let (mut transfer_ms, mut state_bytes) = (0.0, 0);

        let decode_start = Instant::now();
        let decode_span = tracing::info_span!("decode", otel.kind = "client", lazyserve.tokens = tracing::field::Empty);
        let (prefill_worker, decode_worker, stream, _on_decode) = match started.source {
            Source::Local { stream, addr, _on_decode } => (String::new(), addr, Some(stream), _on_decode),
            Source::Remote { mut stream, addr, _on_prefill, mut release, sequence_id } => {
                let span = tracing::info_span!("state_transfer", lazyserve.bytes = tracing::field::Empty, lazyserve.chunks = tracing::field::Empty);
                let sent = match next_event(&mut stream, job.deadline, &addr, events).instrument(span.clone()).await {
                    Ok(Some(prefill_response::Event::StateSent(s))) => s,
                    Ok(_) => return Err(Error::Unavailable(format!("prefill worker {addr} ended before the state was sent"))),
                    Err(e) => return Err(e.unwrap_or_else(|| job.late())),
                };
                span.record("lazyserve.bytes", sent.bytes as i64).record("lazyserve.chunks", sent.chunks as i64);
                inner.metrics.observe_transfer(sent.transfer_ms / 1e3, sent.bytes);
                drop(_on_prefill);
                (transfer_ms, state_bytes) = (sent.transfer_ms, sent.bytes);
                let decode_addr = sent.decode_address;
                release.only(&decode_addr);
                let on_decode = OnWorker::new(inner, Role::Decode, &decode_addr, 0);
                let stream = if finish.is_none() {
                    let mut req = Request::new(DecodeRequest {
                        sequence_id,
                        first_token: first.token_id,
                        max_tokens: job.max_tokens as u32,
                        local: None,
                    });
                    req.set_timeout(job.remaining());
                    lazyserve_telemetry::inject(&decode_span, req.metadata_mut());
                    let mut decode = DecodeClient::new(inner.channels.get(&decode_addr)?);
                    let stream = timeout_at(job.deadline, decode.decode(req))
                        .await
                        .map_err(|_| job.late())?
                        .map_err(|s| error::from_worker("decode", &decode_addr, s))?
                        .into_inner();
                    // The Decode stream owns the state now; ending it frees the state.
                    release.disarm();
                    Some(stream)
                } else {
                    None
                };
                (addr, decode_addr, stream, on_decode)
            }
        };

        if let (Some(mut stream), None) = (stream, finish) {
            let relay = async {
                let mut last = Instant::now();
                while finish.is_none() {
                    let msg = tokio::select! {
                        m = timeout_at(job.deadline, stream.message()) => m.map_err(|_| job.late())?,
                        _ = events.closed() => return Err(Error::ClientGone),
                    };
                    match msg.map_err(|s| error::from_worker("decode", &decode_worker, s))?.and_then(|m| m.event) {
                        Some(decode_response::Event::TokenId(id)) => {
                            inner.metrics.observe_inter_token(last.elapsed().as_secs_f64());
                            last = Instant::now();
                            let step = out.push(id)?;
                            let ids = if step.finish == Some(FinishReason::Eos) { vec![] } else { vec![id] };
                            if !send_chunk(events, step.text, ids).await {
                                return Err(Error::ClientGone);
                            }
                            *delivered = out.token_ids().len() as u32;
                            finish = step.finish;
                        }
                        _ => return Err(Error::Unavailable(format!("decode worker {decode_worker} ended the stream early"))),
                    }
                }
                // At EOS or the length limit the decode worker ends too, and reports its
                // counters; at a stop string dropping the stream stops it.
                if finish != Some(FinishReason::Stop) {
                    if let Ok(Ok(Some(m))) = timeout_at(job.deadline, stream.message()).await {
                        if let Some(decode_response::Event::Done(done)) = m.event {
                            computed_percent = done.computed_percent;
                            revived = done.revived_tokens;
                        }
                    }
                }
                Ok(())
            };
            relay.instrument(decode_span.clone()).await?;
            decode_span.record("lazyserve.tokens", out.token_ids().len() as i64);
        }
        let finish = finish.expect("the loop ends with a reason");
        let total = job.start.elapsed();
        let completion = Completion {
            finish_reason: finish.as_str().to_string(),
            usage: Some(Usage {
                prompt_tokens: job.prompt_ids.len() as u32,
                completion_tokens: out.token_ids().len() as u32,
                prompt_tokens_computed_percent: computed_percent,
                revived_tokens: revived,
            }),
            timings: Some(Timings {
                ttft_ms: ms(ttft),
                prefill_ms: first.prefill_ms,
                state_transfer_ms: transfer_ms,
                decode_ms: ms(decode_start.elapsed()),
                state_bytes,
                total_ms: ms(total),
                prefill_path: if local { "local" } else { "remote" }.to_string(),
                local_prefill_below_tokens: inner.policy.local_prefill_tokens as u32,
                prefill_worker: prefill_worker.clone(),
                decode_worker: decode_worker.clone(),
                prefill_attempts: attempts,
            }),
            request_id: job.request_id.clone(),
        };
        let m = &inner.metrics;
        m.observe_request(total.as_secs_f64());
        m.prompt_tokens.inc_by(job.prompt_ids.len() as u64);
        m.generation_tokens.inc_by(out.token_ids().len() as u64);
        m.computed_ratio.observe(computed_percent / 100.0);
        m.requests.with_label_values(&[finish.as_str()]).inc();
        request_span
            .record("gen_ai.usage.output_tokens", out.token_ids().len() as i64)
            .record("lazyserve.prompt_tokens_computed_percent", computed_percent)
            .record("lazyserve.revived_tokens", revived as i64)
            .record("lazyserve.prefill_path", if local { "local" } else { "remote" });
        lazyserve_telemetry::set_finish_reasons(&request_span, &[finish.as_str()]);
        tracing::info!(request_id = %job.request_id, prompt_tokens = job.prompt_ids.len(), completion_tokens = out.token_ids().len(),
            finish = finish.as_str(), ttft_ms = ms(ttft), total_ms = ms(total), prefill = %prefill_worker, decode = %decode_worker,
            local, attempts, "request done");
        let _ = events.send(Ok(GenerateResponse { event: Some(Event::Complete(completion)) })).await;
        Ok(())
    }
}

/// A request up to its first token.
struct Started {
    first: FirstToken,
    source: Source,
}

enum Source {
    /// Prefilled on a prefill worker, which is still shipping the state.
    Remote {
        stream: Streaming<PrefillResponse>,
        addr: String,
        _on_prefill: OnWorker,
        release: ReleaseGuard,
        sequence_id: String,
    },
    /// Prefilled on the decode worker, which goes on decoding on this stream.
    Local { stream: Streaming<DecodeResponse>, addr: String, _on_decode: OnWorker },
}

fn routed_key(role: Role, address: &str) -> String {
    format!("{}/{address}", role.as_str())
}

/// The next prefill event; `Err(None)` when the deadline passed. Gives up when the client
/// goes away, so that the prefill worker stops too.
async fn next_event(
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

/// Sends a chunk unless it is empty; false when the client went away.
async fn send_chunk(events: &Events, text: String, token_ids: Vec<u32>) -> bool {
    if text.is_empty() && token_ids.is_empty() {
        return !events.is_closed();
    }
    let chunk = GenerateResponse { event: Some(Event::Chunk(TextChunk { text, token_ids })) };
    events.send(Ok(chunk)).await.is_ok()
}

#[tonic::async_trait]
impl Generation for Router {
    type GenerateStream = ReceiverStream<std::result::Result<GenerateResponse, Status>>;

    async fn generate(&self, request: Request<GenerateRequest>) -> std::result::Result<Response<Self::GenerateStream>, Status> {
        let timeout = grpc_timeout(request.metadata());
        let metadata = request.metadata().clone();
        let permit = self.inner.inflight.clone().try_acquire_owned().map_err(|_| {
            Error::Overloaded(format!("router has {} requests in flight; retry later", self.inner.policy.max_inflight))
        })?;
        let job = self.job(request.into_inner(), timeout)?;
        let model = &self.inner.meta.name;
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
        lazyserve_telemetry::extract(&span, &metadata);
        span.record("trace_id", lazyserve_telemetry::trace_id(&span));
        let (tx, rx) = mpsc::channel(32);
        tokio::spawn(self.clone().run(job, tx, permit).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn model_info(&self, _: Request<ModelInfoRequest>) -> std::result::Result<Response<ModelInfoResponse>, Status> {
        let (meta, policy) = (&self.inner.meta, &self.inner.policy);
        Ok(Response::new(ModelInfoResponse {
            model: meta.name.clone(),
            architecture: format!("{:?}", meta.config.architecture).to_lowercase(),
            max_context: meta.config.max_position_embeddings as u32,
            max_tokens_limit: MAX_NEW_TOKENS as u32,
            num_layers: meta.config.num_hidden_layers as u32,
            default_prune: policy.default_prune.clone(),
            prune_presets: PRESET_NAMES.split(", ").map(String::from).collect(),
        }))
    }
}

#[tonic::async_trait]
impl Admin for Router {
    async fn list_workers(&self, _: Request<ListWorkersRequest>) -> std::result::Result<Response<ListWorkersResponse>, Status> {
        let inner = &self.inner;
        let routed = inner.routed.lock().expect("routed lock").clone();
        let workers = inner
            .discovery
            .workers()
            .iter()
            .map(|w| WorkerStatus {
                id: w.id.clone(),
                role: w.role.as_str().to_string(),
                address: w.address.clone(),
                model: w.model.clone(),
                inflight: w.load.inflight,
                queued_prompt_tokens: w.load.queued_prompt_tokens,
                sequences: w.load.sequences,
                state_bytes: w.load.state_bytes,
                served: w.load.served,
                routed_inflight: routed.get(&routed_key(w.role, &w.address)).map_or(0, |r| r.requests),
            })
            .collect();
        Ok(Response::new(ListWorkersResponse { workers, fresh: inner.discovery.fresh() }))
    }
}
