//! After the first token: hands the state over to a decode worker (remote path), relays
//! the decode stream as text, and ends with the completion's usage and timings.

use std::sync::Arc;
use std::time::Instant;

use lazyserve_discovery::Role;
use lazyserve_proto::v1::decode_client::DecodeClient;
use lazyserve_proto::v1::{decode_response, prefill_response, Completion, DecodeDone, DecodeRequest, DecodeResponse, Timings, Usage};
use lazyserve_request::{FinishReason, Output};
use tokio::time::timeout_at;
use tonic::{Request, Streaming};
use tracing::Instrument;

use super::job::{ms, Job};
use super::load::OnWorker;
use super::pipeline::{self, next_event, Event, Events, Source, Started};
use super::Inner;
use crate::error::{self, Error, Result};

/// What the decode side reported, for the completion.
#[derive(Default)]
struct DecodeReport {
    computed_percent: f64,
    revived: u64,
    transfer_ms: f64,
    state_bytes: u64,
    migrations: u32,
}

/// How a started request goes on to its decode worker.
struct Handover<'a> {
    /// The first token, or `replay[0]` in a migration.
    first_token: u32,
    /// The tokens delivered so far, in a migration.
    replay: &'a [u32],
    /// False when the first token ended the request: the state is shipped but not decoded.
    decode: bool,
}

/// The prefill worker (empty on the local path), the decode worker, its token stream
/// (None when nothing is left to decode) and its load slot.
type Decoding = (String, String, Option<Streaming<DecodeResponse>>, OnWorker);

/// After the first token: on the remote path waits until the prefill worker has shipped the
/// state, then starts decoding it; the local path decodes on the stream it prefilled on.
async fn open_decode(
    inner: &Inner,
    job: &Job,
    source: Source,
    handover: Handover<'_>,
    report: &mut DecodeReport,
    decode_span: &tracing::Span,
    events: &Events,
) -> Result<Decoding> {
    match source {
        Source::Local { stream, addr, on_decode } => Ok((String::new(), addr, Some(stream), on_decode)),
        Source::Remote { mut stream, addr, on_prefill, mut release, sequence_id } => {
            let span = tracing::info_span!("state_transfer", lazyserve.bytes = tracing::field::Empty, lazyserve.chunks = tracing::field::Empty);
            let sent = match next_event(&mut stream, job.deadline, &addr, events).instrument(span.clone()).await {
                Ok(Some(prefill_response::Event::StateSent(s))) => s,
                Ok(_) => return Err(Error::Unavailable(format!("prefill worker {addr} ended before the state was sent"))),
                Err(e) => return Err(e.unwrap_or_else(|| job.late())),
            };
            span.record("lazyserve.bytes", sent.bytes as i64).record("lazyserve.chunks", sent.chunks as i64);
            inner.metrics.observe_transfer(sent.transfer_ms / 1e3, sent.bytes);
            drop(on_prefill);
            (report.transfer_ms, report.state_bytes) = (sent.transfer_ms, sent.bytes);
            let decode_addr = sent.decode_address;
            release.only(&decode_addr);
            let on_decode = OnWorker::new(&inner.routed, Role::Decode, &decode_addr, 0);
            if !handover.decode {
                return Ok((addr, decode_addr, None, on_decode));
            }
            let mut req = Request::new(DecodeRequest {
                sequence_id,
                first_token: handover.first_token,
                max_tokens: job.max_tokens as u32,
                local: None,
                replay: handover.replay.to_vec(),
            });
            req.set_timeout(job.remaining());
            lazyserve_telemetry::inject(decode_span, req.metadata_mut());
            let mut decode = DecodeClient::new(inner.channels.get(&decode_addr)?);
            let stream = timeout_at(job.deadline, decode.decode(req))
                .await
                .map_err(|_| job.late())?
                .map_err(|s| error::from_worker("decode", &decode_addr, s))?
                .into_inner();
            release.disarm();
            Ok((addr, decode_addr, Some(stream), on_decode))
        }
    }
}

/// Rebuilds a stream whose decode worker failed on another decode worker: the prompt is
/// prefilled again by the usual rule (remote or local, same schedule), then the tokens
/// delivered so far are replayed there through decode steps, which rebuilds the lost state
/// (pruning decisions included) as the first worker had it; the sampler goes on from there.
async fn migrate(inner: &Arc<Inner>, job: &Job, failed: &[String], delivered: &[u32], report: &mut DecodeReport, events: &Events) -> Result<Decoding> {
    inner.metrics.migrations.inc();
    let span = tracing::info_span!("migrate", otel.kind = "client", lazyserve.replayed = delivered.len(), lazyserve.from = failed.last().map(String::as_str));
    async {
        let started = pipeline::first_token(inner, job, events, failed, delivered).await?;
        if started.first.token_id != delivered[0] {
            tracing::warn!(request_id = %job.request_id, first = started.first.token_id, delivered = delivered[0], "the prefill again gave another first token; replaying the delivered one");
        }
        let handover = Handover { first_token: delivered[0], replay: delivered, decode: true };
        open_decode(inner, job, started.source, handover, report, &tracing::Span::current(), events).await
    }
    .instrument(span)
    .await
}

/// Sends the first token, then the rest, then the completion. `delivered` counts the tokens
/// sent, for the error of a stream that breaks off. A decode worker that fails mid-stream
/// hands the stream to another one, up to `--migration-limit` times ([`migrate`]).
pub async fn finish(inner: &Arc<Inner>, job: &Job, started: Started, events: &Events, delivered: &mut u32) -> Result<()> {
    let meta = &inner.meta;
    let mut out = Output::new(&meta.tokenizer, &job.stop, job.max_tokens, job.prompt_ids.len(), meta.config.max_position_embeddings);
    let Started { first, source, attempts, local } = started;
    let step = out.push(first.token_id)?;
    let ttft = job.start.elapsed();
    if !send_chunk(events, step.text, first.token_id, step.finish).await {
        return Err(Error::ClientGone);
    }
    let request_span = tracing::Span::current();
    request_span.record("lazyserve.ttft_ms", ms(ttft));
    tracing::info!(ttft_ms = ms(ttft), "first token");
    inner.metrics.observe_ttft(ttft.as_secs_f64());
    *delivered = out.token_ids().len() as u32;
    let mut finish = step.finish;
    let mut report = DecodeReport { computed_percent: first.computed_percent, ..DecodeReport::default() };

    let decode_start = Instant::now();
    let decode_span = tracing::info_span!("decode", otel.kind = "client", lazyserve.tokens = tracing::field::Empty);
    let handover = Handover { first_token: first.token_id, replay: &[], decode: finish.is_none() };
    let (mut prefill_worker, mut decode_worker, mut stream, mut _on_decode) =
        open_decode(inner, job, source, handover, &mut report, &decode_span, events).await?;
    let mut failed = Vec::new();
    while let (Some(s), None) = (stream.take(), finish) {
        let relayed = relay(inner, job, s, &decode_worker, &mut out, events).instrument(decode_span.clone()).await;
        *delivered = out.token_ids().len() as u32;
        match relayed {
            Ok((reason, done)) => {
                if let Some(done) = done {
                    (report.computed_percent, report.revived) = (done.computed_percent, done.revived_tokens);
                }
                finish = Some(reason);
            }
            Err(e @ Error::Unavailable(_)) if report.migrations < inner.policy.migration_limit => {
                report.migrations += 1;
                failed.push(std::mem::take(&mut decode_worker));
                tracing::warn!(request_id = %job.request_id, error = %e, delivered = *delivered, "decode worker failed mid-stream; migrating");
                match migrate(inner, job, &failed, out.token_ids(), &mut report, events).await {
                    Ok(moved) => (prefill_worker, decode_worker, stream, _on_decode) = moved,
                    Err(why) => {
                        tracing::warn!(request_id = %job.request_id, error = %why, "migration failed");
                        return Err(e);
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    decode_span.record("lazyserve.tokens", out.token_ids().len() as i64);
    let finish = finish.expect("the relay ends with a reason");
    let total = job.start.elapsed();
    let completion = Completion {
        finish_reason: finish.as_str().to_string(),
        usage: Some(Usage {
            prompt_tokens: job.prompt_ids.len() as u32,
            completion_tokens: out.token_ids().len() as u32,
            prompt_tokens_computed_percent: report.computed_percent,
            revived_tokens: report.revived,
        }),
        timings: Some(Timings {
            ttft_ms: ms(ttft),
            prefill_ms: first.prefill_ms,
            state_transfer_ms: report.transfer_ms,
            decode_ms: ms(decode_start.elapsed()),
            state_bytes: report.state_bytes,
            total_ms: ms(total),
            prefill_path: if local { "local" } else { "remote" }.to_string(),
            local_prefill_below_tokens: inner.policy.local_prefill_tokens as u32,
            prefill_worker: prefill_worker.clone(),
            decode_worker: decode_worker.clone(),
            prefill_attempts: attempts,
            migrations: report.migrations,
        }),
        request_id: job.request_id.clone(),
    };
    let m = &inner.metrics;
    m.observe_request(total.as_secs_f64());
    m.prompt_tokens.inc_by(job.prompt_ids.len() as u64);
    m.generation_tokens.inc_by(out.token_ids().len() as u64);
    m.computed_ratio.observe(report.computed_percent / 100.0);
    m.requests.with_label_values(&[finish.as_str()]).inc();
    request_span
        .record("gen_ai.usage.output_tokens", out.token_ids().len() as i64)
        .record("lazyserve.prompt_tokens_computed_percent", report.computed_percent)
        .record("lazyserve.revived_tokens", report.revived as i64)
        .record("lazyserve.prefill_path", if local { "local" } else { "remote" });
    lazyserve_telemetry::set_finish_reasons(&request_span, &[finish.as_str()]);
    tracing::info!(request_id = %job.request_id, prompt_tokens = job.prompt_ids.len(), completion_tokens = out.token_ids().len(),
        finish = finish.as_str(), ttft_ms = ms(ttft), total_ms = ms(total), prefill = %prefill_worker, decode = %decode_worker,
        local, attempts, migrations = report.migrations, "request done");
    let _ = events.send(Event::Complete(completion)).await;
    Ok(())
}

/// Relays decode tokens as text until a finish reason; with it, the decode worker's
/// counters when it reported them.
async fn relay(
    inner: &Inner,
    job: &Job,
    mut stream: Streaming<DecodeResponse>,
    worker: &str,
    out: &mut Output<'_>,
    events: &Events,
) -> Result<(FinishReason, Option<DecodeDone>)> {
    let mut last = Instant::now();
    let finish = loop {
        let msg = tokio::select! {
            m = timeout_at(job.deadline, stream.message()) => m.map_err(|_| job.late())?,
            _ = events.closed() => return Err(Error::ClientGone),
        };
        match msg.map_err(|s| error::from_worker("decode", worker, s))?.and_then(|m| m.event) {
            Some(decode_response::Event::TokenId(id)) => {
                inner.metrics.observe_inter_token(last.elapsed().as_secs_f64());
                last = Instant::now();
                let step = out.push(id)?;
                if !send_chunk(events, step.text, id, step.finish).await {
                    return Err(Error::ClientGone);
                }
                if let Some(f) = step.finish {
                    break f;
                }
            }
            _ => return Err(Error::Unavailable(format!("decode worker {worker} ended the stream early"))),
        }
    };
    // At EOS or the length limit the decode worker ends too and reports its counters; at a
    // stop string dropping the stream stops it.
    if finish != FinishReason::Stop {
        if let Ok(Ok(Some(DecodeResponse { event: Some(decode_response::Event::Done(done)) }))) = timeout_at(job.deadline, stream.message()).await {
            return Ok((finish, Some(done)));
        }
    }
    Ok((finish, None))
}

/// Sends the text of token `id` (an end-of-sequence token is not part of the output) unless
/// there is nothing to send; false when the client went away.
async fn send_chunk(events: &Events, text: String, id: u32, finish: Option<FinishReason>) -> bool {
    let token_ids = if finish == Some(FinishReason::Eos) { vec![] } else { vec![id] };
    if text.is_empty() && token_ids.is_empty() {
        return !events.is_closed();
    }
    events.send(Event::Chunk { text, token_ids }).await.is_ok()
}
