//! Continuous batching (DESIGN.md section 7): one loop runs a step for every live sequence
//! together. Sequences join and leave between iterations; a prompt prefilled here goes in
//! fixed-size chunks under a per-iteration token budget, so a new prompt never stalls the
//! streams already running for longer than one chunk takes.
//!
//! Each sequence's numerics are those it would have alone: [`crate::lazy::step_batch`] keeps a
//! row's kernels independent of the batch, and a prompt's chunk boundaries depend only on
//! its own length, never on what else is running.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::lazy::{Schedule, SequenceState, StepInput};
use crate::sampling::Sampler;
use crate::{Engine, Error};

/// How a sequence joins the loop.
pub enum Start {
    /// A prompt to prefill here, in chunks.
    Prompt { prompt_ids: Vec<u32>, schedule: Schedule },
    /// A state prefilled elsewhere, and the token its prefill sampled.
    Prefilled { state: Box<SequenceState>, first_token: u32 },
}

/// A sequence for the loop: where it starts, how it samples, how long it may run, and
/// where its events go.
pub struct Join<S> {
    pub start: Start,
    pub sampler: Sampler,
    /// Tokens to produce in all, the prefill's first token included.
    pub max_tokens: usize,
    pub sink: S,
    /// Tokens a stream that moved here from a failed worker already delivered, the first one
    /// included: produced in order instead of sampled, and not sent again (except as the
    /// `Prefilled` first token of a prompt prefilled here). For a prefilled state the first
    /// one replaces its `first_token`. The sampler must stand where it would after them.
    pub replay: Vec<u32>,
}

/// What a sequence produces, in order: `Prefilled` (prompts prefilled here only), then
/// `Token`s, then `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    Prefilled { first_token: u32, prefill: Duration, computed_fraction: f64, state_bytes: usize },
    Token(u32),
    Done { tokens: usize, computed_fraction: f64, revived: usize },
    Failed(Error),
}

/// Where a sequence's events go.
pub trait Sink {
    /// Delivers an event; false when nobody listens any more (the sequence then leaves).
    fn send(&mut self, event: Event) -> bool;
    /// True when nobody listens any more; checked before each iteration.
    fn is_closed(&self) -> bool;
}

/// The loop's limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Prompt tokens prefilled per iteration over all prompts, and the size of a prompt
    /// chunk: bounds how much one iteration can add to the running streams' token latency.
    pub prefill_chunk: usize,
}

struct Seq<S> {
    state: Box<SequenceState>,
    sampler: Sampler,
    sink: S,
    max_tokens: usize,
    /// The prompt still to prefill here, from `cursor` on; empty for a prefilled state.
    prompt: Vec<u32>,
    cursor: usize,
    /// The token to run next once decoding.
    last: u32,
    produced: usize,
    /// Replayed tokens still to produce instead of sampling.
    forced: std::collections::VecDeque<u32>,
    joined: Instant,
}

impl<S> Seq<S> {
    fn prefilling(&self) -> bool {
        self.cursor < self.prompt.len()
    }

    fn next_chunk(&self, chunk: usize) -> usize {
        chunk_len(self.prompt.len() - self.cursor, chunk, self.state.schedule.window.min(self.prompt.len()))
    }
}

/// The next prompt chunk's length when `rest` prompt tokens are left: `chunk` tokens,
/// except that the chunk ending the prompt holds the whole observation `window` (its
/// queries score the prompt). Depends on the prompt alone, never on the batch.
fn chunk_len(rest: usize, chunk: usize, window: usize) -> usize {
    if rest <= chunk.max(window) {
        rest
    } else {
        chunk.min(rest - window)
    }
}

enum Work {
    Decode,
    Chunk(usize),
}

/// Steps `inputs` together; when that step fails (an error or a panic), puts every state
/// back as it was and steps each sequence alone, so that one bad sequence fails alone and
/// the others go on with the results they would have had (a row's result does not depend
/// on the rows beside it). One result per input: logits, or why its step failed.
fn step_isolated(backend: &Backend, inputs: &mut [StepInput<'_>]) -> Vec<std::result::Result<Option<Vec<f32>>, String>> {
    let run = |inputs: &mut [StepInput<'_>]| match std::panic::catch_unwind(AssertUnwindSafe(|| backend.step_batch(inputs, &mut |_, _, _| Ok(())))) {
        Ok(Ok(logits)) => Ok(logits),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the step panicked".to_string()),
    };
    let why = match run(inputs) {
        Ok(logits) => return logits.into_iter().map(Ok).collect(),
        Err(why) => why,
    };
    for input in inputs.iter_mut() {
        input.state.rollback();
    }
    if inputs.len() == 1 {
        tracing::error!(error = %why, "step failed; failing its sequence");
        return vec![Err(why)];
    }
    tracing::warn!(error = %why, sequences = inputs.len(), "batched step failed; stepping its sequences one by one");
    inputs
        .iter_mut()
        .map(|input| {
            let alone = run(std::slice::from_mut(input));
            match alone {
                Ok(mut logits) => Ok(logits.pop().flatten()),
                Err(why) => {
                    input.state.rollback();
                    tracing::error!(error = %why, "step failed; failing its sequence");
                    Err(why)
                }
            }
        })
        .collect()
}

/// The sequences of one decode loop. Not thread-safe by design: one thread owns it.
pub struct Batcher<S: Sink> {
    engine: Arc<Engine>,
    cfg: BatchConfig,
    seqs: Vec<Seq<S>>,
}

impl<S: Sink> Batcher<S> {
    pub fn new(engine: Arc<Engine>, cfg: BatchConfig) -> Self {
        Self { engine, cfg: BatchConfig { prefill_chunk: cfg.prefill_chunk.max(1) }, seqs: Vec::new() }
    }

    /// Sequences in the loop.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Sequences still prefilling their prompt (waiting to decode).
    pub fn prefilling(&self) -> usize {
        self.seqs.iter().filter(|s| s.prefilling()).count()
    }

    /// Adds a sequence; it runs from the next iteration on.
    pub fn join(&mut self, join: Join<S>) {
        let Join { start, sampler, max_tokens, mut sink, replay } = join;
        let engine = &self.engine;
        let mut forced: std::collections::VecDeque<u32> = replay.into();
        let (state, prompt, last, produced) = match start {
            Start::Prompt { prompt_ids, .. } if prompt_ids.is_empty() => {
                sink.send(Event::Failed(Error::InvalidParameter { field: "prompt", reason: "is empty".into() }));
                return;
            }
            Start::Prompt { prompt_ids, schedule } => {
                let seed = sampler.params().seed;
                (Box::new(SequenceState::new(engine.config(), schedule, engine.kv_dtype, seed)), prompt_ids, 0, 0)
            }
            Start::Prefilled { state, first_token } => (state, Vec::new(), forced.pop_front().unwrap_or(first_token), 1),
        };
        let mut seq = Seq { state, sampler, sink, max_tokens, prompt, cursor: 0, last, produced, forced, joined: Instant::now() };
        if seq.prompt.is_empty() && self.finished(&seq) {
            send_done(&mut seq);
            return;
        }
        self.seqs.push(seq);
    }

    /// Runs one step for every live sequence: one token for each decoding sequence, and
    /// prompt chunks, oldest prompt first, up to the prefill budget. Returns how many
    /// sequences it stepped.
    pub fn iterate(&mut self) -> usize {
        self.seqs.retain(|s| !s.sink.is_closed());
        let plan = self.plan();
        if plan.is_empty() {
            return 0;
        }
        let mut inputs = Vec::with_capacity(plan.len());
        let mut planned = plan.iter().peekable();
        for (i, seq) in self.seqs.iter_mut().enumerate() {
            let Some((_, work)) = planned.next_if(|(j, _)| *j == i) else { continue };
            let Seq { state, prompt, cursor, last, .. } = seq;
            let (tokens, partial) = match *work {
                Work::Decode => (std::slice::from_ref(&*last), false),
                Work::Chunk(n) => (&prompt[*cursor..*cursor + n], *cursor + n < prompt.len()),
            };
            inputs.push(StepInput { state, tokens, partial });
        }
        let results = step_isolated(&self.engine.backend, &mut inputs);
        drop(inputs);
        let stepped = plan.len();
        let mut leaving = Vec::new();
        for ((i, work), result) in plan.into_iter().zip(results) {
            let stays = match result {
                Ok(logits) => self.advance(i, work, logits),
                Err(why) => {
                    self.seqs[i].sink.send(Event::Failed(Error::Step(why)));
                    false
                }
            };
            if !stays {
                leaving.push(i);
            }
        }
        for i in leaving.into_iter().rev() {
            self.seqs.remove(i);
        }
        stepped
    }

    /// What each sequence runs this iteration, in sequence order.
    fn plan(&self) -> Vec<(usize, Work)> {
        let mut budget = self.cfg.prefill_chunk;
        let mut chunked = false;
        let mut plan = Vec::with_capacity(self.seqs.len());
        for (i, seq) in self.seqs.iter().enumerate() {
            if !seq.prefilling() {
                plan.push((i, Work::Decode));
                continue;
            }
            let n = seq.next_chunk(self.cfg.prefill_chunk);
            // The oldest prompt always moves on, even with a window longer than the budget.
            if n <= budget || !chunked {
                plan.push((i, Work::Chunk(n)));
                budget = budget.saturating_sub(n);
                chunked = true;
            }
        }
        plan
    }

    /// Takes one sequence's step result; false when it leaves the loop.
    fn advance(&mut self, i: usize, work: Work, logits: Option<Vec<f32>>) -> bool {
        let seq = &mut self.seqs[i];
        if let Work::Chunk(n) = work {
            seq.cursor += n;
            if seq.prefilling() {
                return true;
            }
        }
        let Some(logits) = logits else {
            seq.sink.send(Event::Failed(Error::Internal("a step that ends the prompt has logits")));
            return false;
        };
        let forced = seq.forced.pop_front();
        let next = forced.unwrap_or_else(|| seq.sampler.sample(&logits));
        seq.produced += 1;
        seq.last = next;
        let event = match work {
            Work::Chunk(_) => Some(Event::Prefilled {
                first_token: next,
                prefill: seq.joined.elapsed(),
                computed_fraction: seq.state.computed_fraction(),
                state_bytes: seq.state.kv_bytes() + seq.state.aux_bytes(),
            }),
            // Delivered before the migration.
            Work::Decode if forced.is_some() => None,
            Work::Decode => Some(Event::Token(next)),
        };
        if event.is_some_and(|e| !seq.sink.send(e)) {
            return false;
        }
        if self.finished(&self.seqs[i]) {
            send_done(&mut self.seqs[i]);
            return false;
        }
        true
    }

    /// Whether a sequence that has produced its last token is done: EOS, `max_tokens`, or
    /// the end of the context.
    fn finished(&self, seq: &Seq<S>) -> bool {
        let ctx = self.engine.config().max_position_embeddings;
        self.engine.tokenizer.eos_ids().contains(&seq.last)
            || seq.produced >= seq.max_tokens
            || seq.state.tokens.len() + 1 >= ctx
    }
}

fn send_done<S: Sink>(seq: &mut Seq<S>) {
    let state = &seq.state;
    let done = Event::Done { tokens: seq.produced, computed_fraction: state.computed_fraction(), revived: state.stats.revived };
    seq.sink.send(done);
}

#[cfg(test)]
mod tests {
    use super::chunk_len;

    /// The chunks a prompt of `len` tokens is cut into.
    fn chunks(len: usize, chunk: usize, window: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut rest = len;
        while rest > 0 {
            let n = chunk_len(rest, chunk, window);
            out.push(n);
            rest -= n;
        }
        out
    }

    #[test]
    fn prompts_are_cut_into_fixed_chunks_ending_with_the_window() {
        assert_eq!(chunks(5, 32, 1), vec![5]);
        assert_eq!(chunks(100, 32, 1), vec![32, 32, 32, 4]);
        assert_eq!(chunks(64, 32, 1), vec![32, 32]);
        // The last chunk holds the observation window, even when that is longer than a chunk.
        assert_eq!(chunks(70, 32, 8), vec![32, 30, 8]);
        assert_eq!(chunks(100, 32, 40), vec![32, 28, 40]);
        assert_eq!(chunks(30, 32, 40), vec![30]);
    }
}
