//! The router: the public Generate RPC. It tokenizes and validates, picks a prefill and a
//! decode worker, streams the first token as soon as prefill has it, then relays the decode
//! stream. TTFT is measured here, where the client sees it (DESIGN.md section 2).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lazyserve_engine::lazy::{Schedule, PRESET_NAMES};
use lazyserve_engine::{FinishReason, Output, SamplingParams, MAX_NEW_TOKENS};
use lazyserve_model::{ChatMessage, ModelMeta};
use lazyserve_proto::v1::decode_client::DecodeClient;
use lazyserve_proto::v1::generate_request::Input;
use lazyserve_proto::v1::generate_response::Event;
use lazyserve_proto::v1::generation_server::{Generation, GenerationServer};
use lazyserve_proto::v1::prefill_client::PrefillClient;
use lazyserve_proto::v1::{
    decode_response, prefill_response, Completion, DecodeRequest, GenerateRequest, GenerateResponse, ModelInfoRequest,
    ModelInfoResponse, PrefillRequest, PrefillResponse, ReleaseRequest, StreamError, TextChunk, Timings, Usage,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout_at;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::channels::Channels;
use crate::config::RouterPolicy;
use crate::error::{self, Error, Result};

/// Where the workers are. A static list here; discovery comes in through this type.
#[derive(Debug, Clone)]
pub struct Workers {
    pub prefill: Vec<String>,
    pub decode: Vec<String>,
}

/// The Generation service.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    meta: ModelMeta,
    policy: RouterPolicy,
    workers: Workers,
    next_prefill: AtomicUsize,
    next_decode: AtomicUsize,
    channels: Channels,
    inflight: Arc<Semaphore>,
    next_id: AtomicUsize,
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
}

type Events = mpsc::Sender<std::result::Result<GenerateResponse, Status>>;

/// Releases a state pushed to a decode worker that no Decode stream took, when the request
/// ends early (the client left, an error, or one token was all it needed).
struct ReleaseGuard {
    client: Option<DecodeClient<tonic::transport::Channel>>,
    sequence_id: String,
}

impl ReleaseGuard {
    fn disarm(&mut self) {
        self.client = None;
    }
}

impl Drop for ReleaseGuard {
    fn drop(&mut self) {
        if let Some(mut client) = self.client.take() {
            let sequence_id = std::mem::take(&mut self.sequence_id);
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

/// Parses a `grpc-timeout` header value ("100m", "5S", ...).
fn grpc_timeout(req: &Request<GenerateRequest>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Router {
    /// A router for the model described by `meta`, over a static set of workers.
    pub fn new(meta: ModelMeta, policy: RouterPolicy, workers: Workers) -> anyhow::Result<Self> {
        anyhow::ensure!(!workers.prefill.is_empty(), "no prefill workers given");
        anyhow::ensure!(!workers.decode.is_empty(), "no decode workers given");
        Schedule::parse(&policy.default_prune, meta.config.num_hidden_layers)
            .map_err(|e| anyhow::anyhow!("--default-prune: {e}"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                inflight: Arc::new(Semaphore::new(policy.max_inflight)),
                meta,
                policy,
                workers,
                next_prefill: AtomicUsize::new(0),
                next_decode: AtomicUsize::new(0),
                channels: Channels::default(),
                next_id: AtomicUsize::new(0),
            }),
        })
    }

    pub fn into_server(self) -> GenerationServer<Self> {
        GenerationServer::new(self)
    }

    fn job(&self, req: GenerateRequest, timeout: Option<Duration>) -> Result<Job> {
        let inner = &self.inner;
        let (meta, policy) = (&inner.meta, &inner.policy);
        let start = Instant::now();
        if let Some(model) = req.model.as_deref().filter(|m| !m.is_empty() && *m != meta.name) {
            return Err(invalid("model", format!("unknown model {model:?}; this router serves {:?}", meta.name)));
        }
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
        Ok(Job { request_id, prompt_ids, max_tokens, stop: req.stop, sampling, prune, start, deadline })
    }

    fn pick(list: &[String], next: &AtomicUsize) -> String {
        list[next.fetch_add(1, Ordering::Relaxed) % list.len()].clone()
    }

    /// Runs a job, sending its events; a failure before any token becomes the RPC status,
    /// a later one a `StreamError` that says how many tokens were delivered.
    async fn run(self, job: Job, events: Events, _permit: OwnedSemaphorePermit) {
        let mut delivered = 0u32;
        let request_id = job.request_id.clone();
        let result = self.run_inner(job, &events, &mut delivered).await;
        if let Err(e) = result {
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

    async fn run_inner(&self, job: Job, events: &Events, delivered: &mut u32) -> Result<()> {
        let inner = &self.inner;
        let prefill_addr = Self::pick(&inner.workers.prefill, &inner.next_prefill);
        let decode_addr = Self::pick(&inner.workers.decode, &inner.next_decode);
        let sequence_id = format!("{}-{:016x}", job.request_id, rand::random::<u64>());
        let deadline = job.deadline;
        let remaining = || deadline.saturating_duration_since(tokio::time::Instant::now());
        let late = || Error::DeadlineExceeded(format!("request deadline passed after {:.0} ms", ms(job.start.elapsed())));

        let mut prefill = PrefillClient::new(inner.channels.get(&prefill_addr)?);
        let mut req = Request::new(PrefillRequest {
            sequence_id: sequence_id.clone(),
            prompt_ids: job.prompt_ids.clone(),
            prune: job.prune.clone(),
            sampling: Some((&job.sampling).into()),
            decode_address: decode_addr.clone(),
            encoding: lazyserve_proto::v1::StateEncoding::from(inner.policy.state_encoding) as i32,
            state_ttl_ms: inner.policy.state_ttl_secs.saturating_mul(1000),
        });
        req.set_timeout(remaining());
        let decode_client = DecodeClient::new(inner.channels.get(&decode_addr)?);
        let mut release = ReleaseGuard { client: Some(decode_client.clone()), sequence_id: sequence_id.clone() };
        let mut pstream: Streaming<_> = timeout_at(deadline, prefill.prefill(req))
            .await
            .map_err(|_| late())?
            .map_err(|s| error::from_worker("prefill", &prefill_addr, s))?
            .into_inner();
        let first = match next_event(&mut pstream, deadline, &prefill_addr).await {
            Ok(Some(prefill_response::Event::FirstToken(f))) => f,
            Ok(_) => return Err(Error::Unavailable(format!("prefill worker {prefill_addr} ended without a token"))),
            Err(e) => return Err(e.unwrap_or_else(late)),
        };
        let meta = &inner.meta;
        let mut out = Output::new(&meta.tokenizer, &job.stop, job.max_tokens, job.prompt_ids.len(), meta.config.max_position_embeddings);
        let step = out.push(first.token_id)?;
        let ids = if step.finish == Some(FinishReason::Eos) { vec![] } else { vec![first.token_id] };
        let ttft = job.start.elapsed();
        if !send_chunk(events, step.text, ids).await {
            return Ok(());
        }
        *delivered = out.token_ids().len() as u32;
        let mut computed_percent = first.computed_percent;
        let mut revived = 0;

        let sent = match next_event(&mut pstream, deadline, &prefill_addr).await {
            Ok(Some(prefill_response::Event::StateSent(s))) => s,
            Ok(_) => return Err(Error::Unavailable(format!("prefill worker {prefill_addr} ended before the state was sent"))),
            Err(e) => return Err(e.unwrap_or_else(late)),
        };
        let decode_start = Instant::now();
        let mut finish = step.finish;
        if finish.is_none() {
            let mut decode = decode_client;
            let mut req = Request::new(DecodeRequest {
                sequence_id: sequence_id.clone(),
                first_token: first.token_id,
                max_tokens: job.max_tokens as u32,
            });
            req.set_timeout(remaining());
            let mut dstream = timeout_at(deadline, decode.decode(req))
                .await
                .map_err(|_| late())?
                .map_err(|s| error::from_worker("decode", &decode_addr, s))?
                .into_inner();
            // The Decode stream owns the state now; ending it frees the state.
            release.disarm();
            while finish.is_none() {
                let msg = tokio::select! {
                    m = timeout_at(deadline, dstream.message()) => m.map_err(|_| late())?,
                    _ = events.closed() => return Ok(()),
                };
                match msg.map_err(|s| error::from_worker("decode", &decode_addr, s))?.and_then(|m| m.event) {
                    Some(decode_response::Event::TokenId(id)) => {
                        let step = out.push(id)?;
                        let ids = if step.finish == Some(FinishReason::Eos) { vec![] } else { vec![id] };
                        if !send_chunk(events, step.text, ids).await {
                            return Ok(());
                        }
                        *delivered = out.token_ids().len() as u32;
                        finish = step.finish;
                    }
                    _ => return Err(Error::Unavailable(format!("decode worker {decode_addr} ended the stream early"))),
                }
            }
            // At EOS or the length limit the decode worker ends too, and reports its counters;
            // at a stop string dropping the stream stops it.
            if finish != Some(FinishReason::Stop) {
                if let Ok(Ok(Some(m))) = timeout_at(deadline, dstream.message()).await {
                    if let Some(decode_response::Event::Done(done)) = m.event {
                        computed_percent = done.computed_percent;
                        revived = done.revived_tokens;
                    }
                }
            }
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
                state_transfer_ms: sent.transfer_ms,
                decode_ms: ms(decode_start.elapsed()),
                state_bytes: sent.bytes,
                total_ms: ms(total),
            }),
            request_id: job.request_id.clone(),
        };
        tracing::info!(request_id = %job.request_id, prompt_tokens = job.prompt_ids.len(), completion_tokens = out.token_ids().len(),
            finish = finish.as_str(), ttft_ms = ms(ttft), total_ms = ms(total), prefill = %prefill_addr, decode = %decode_addr, "request done");
        let _ = events.send(Ok(GenerateResponse { event: Some(Event::Complete(completion)) })).await;
        Ok(())
    }
}

/// The next prefill event; `Err(None)` when the deadline passed.
async fn next_event(
    stream: &mut Streaming<PrefillResponse>,
    deadline: tokio::time::Instant,
    addr: &str,
) -> std::result::Result<Option<prefill_response::Event>, Option<Error>> {
    match timeout_at(deadline, stream.message()).await {
        Err(_) => Err(None),
        Ok(Err(s)) => Err(Some(error::from_worker("prefill", addr, s))),
        Ok(Ok(m)) => Ok(m.and_then(|m| m.event)),
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
        let timeout = grpc_timeout(&request);
        let permit = self.inner.inflight.clone().try_acquire_owned().map_err(|_| {
            Error::Overloaded(format!("router has {} requests in flight; retry later", self.inner.policy.max_inflight))
        })?;
        let job = self.job(request.into_inner(), timeout)?;
        let (tx, rx) = mpsc::channel(32);
        tokio::spawn(self.clone().run(job, tx, permit));
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
