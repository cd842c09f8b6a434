//! Continuous batching on the real model: a sequence's greedy tokens do not depend on what
//! else is in the batch. Sequences of different lengths and schedules, prefilled elsewhere
//! or prefilled in chunks in the loop, decode together; one joins mid-way, one is cancelled
//! mid-way. Each must give exactly the tokens it gives alone.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use anyhow::Result;
use lazyserve_engine::batch::{BatchConfig, Batcher, Event, Join, Sink, Start};
use lazyserve_engine::{Engine, Sampler, SamplingParams};
use lazyserve_model::{KvDtype, WeightFormat};
use lazyserve_tests::model_path;

/// Prompt tokens per loop iteration: small, so that most prompts take several chunks.
const CHUNK: usize = 32;
const MAX_TOKENS: usize = 64;

/// Collects one sequence's events; `closed` plays a client that went away.
#[derive(Clone, Default)]
struct Collect {
    events: Rc<RefCell<Vec<Event>>>,
    closed: Rc<Cell<bool>>,
}

impl Collect {
    /// The first token and every decoded one, in order.
    fn tokens(&self) -> Vec<u32> {
        self.events
            .borrow()
            .iter()
            .filter_map(|e| match e {
                Event::Prefilled { first_token, .. } => Some(*first_token),
                Event::Token(t) => Some(*t),
                _ => None,
            })
            .collect()
    }

    fn done(&self) -> bool {
        self.events.borrow().iter().any(|e| matches!(e, Event::Done { .. }))
    }
}

impl Sink for Collect {
    fn send(&mut self, event: Event) -> bool {
        assert!(!self.closed.get(), "an event after the client left: {event:?}");
        self.events.borrow_mut().push(event);
        true
    }

    fn is_closed(&self) -> bool {
        self.closed.get()
    }
}

/// Real prose around a pass key, about `words` words long (just the question when short).
fn prose(words: usize, key: u32) -> String {
    if words < 34 {
        return format!("The pass key is {key}. What is the pass key? The pass key is");
    }
    let text = "The old lighthouse stood at the edge of the cliff, and every evening the keeper climbed \
                its narrow stairs to light the lamp. Ships passing in the night relied on its steady beam. ";
    let n = words / 34 + 1;
    format!("{} The pass key is {key}. Remember it. {} What is the pass key? The pass key is", text.repeat(n / 2 + 1), text.repeat(n / 2))
}

struct Case {
    words: usize,
    prune: &'static str,
    /// Prefilled by the engine outside the loop (a state from a prefill worker) or here.
    remote: bool,
}

const CASES: &[Case] = &[
    Case { words: 3, prune: "off", remote: false },
    Case { words: 60, prune: "off", remote: false },
    Case { words: 120, prune: "default", remote: false },
    Case { words: 200, prune: "aggressive+window=40", remote: false },
    Case { words: 420, prune: "default", remote: true },
    Case { words: 300, prune: "conservative", remote: true },
    Case { words: 500, prune: "random:default", remote: false },
    Case { words: 250, prune: "static:default", remote: true },
    Case { words: 350, prune: "off", remote: true },
    Case { words: 180, prune: "default+sinks=4+maxpool=3", remote: false },
];

fn engine() -> Arc<Engine> {
    let loaded = lazyserve_model::load(&model_path(), WeightFormat::Q8_DECODE).expect("model loads");
    Arc::new(Engine::new(loaded, KvDtype::F16))
}

fn join(engine: &Engine, case: &Case, key: u32) -> Result<(Join<Collect>, Collect)> {
    let prompt_ids = engine.tokenizer.encode(&prose(case.words, key))?;
    let schedule = engine.schedule(case.prune)?;
    let mut sampler = Sampler::new(SamplingParams::default())?;
    let sink = Collect::default();
    let start = if case.remote {
        let pre = engine.prefill(&prompt_ids, schedule, &mut sampler, &mut |_, _| Ok(()))?;
        sink.events.borrow_mut().push(Event::Token(pre.first_token));
        Start::Prefilled { state: Box::new(pre.state), first_token: pre.first_token }
    } else {
        Start::Prompt { prompt_ids, schedule }
    };
    Ok((Join { start, sampler, max_tokens: MAX_TOKENS, sink: sink.clone(), replay: Vec::new() }, sink))
}

/// Runs the loop until every sequence has left it.
fn drain(batcher: &mut Batcher<Collect>) {
    while !batcher.is_empty() {
        batcher.iterate();
    }
}

/// The tokens of `case` stepped alone: a remote state decodes with the plain unbatched step;
/// a local prompt runs in a loop of its own (its chunking is the same in any batch).
fn alone_tokens(engine: &Arc<Engine>, case: &Case, key: u32) -> Result<Vec<u32>> {
    let (j, sink) = join(engine, case, key)?;
    let tokens = match j.start {
        Start::Prefilled { mut state, first_token } => {
            let mut sampler = j.sampler;
            let mut tokens = vec![first_token];
            let eos = engine.tokenizer.eos_ids();
            while tokens.len() < MAX_TOKENS && !eos.contains(tokens.last().unwrap()) {
                tokens.push(engine.decode_step(&mut state, &mut sampler, *tokens.last().unwrap())?);
            }
            tokens
        }
        start => {
            let mut one = Batcher::new(engine.clone(), BatchConfig { prefill_chunk: CHUNK });
            one.join(Join { start, ..j });
            drain(&mut one);
            assert!(sink.done(), "{} words, {} finished", case.words, case.prune);
            sink.tokens()
        }
    };
    assert!(tokens.len() > 1, "{} words, {} decodes", case.words, case.prune);
    Ok(tokens)
}

/// A sequence whose step panics part-way through a batched step (its last layer's keys are
/// gone, after every sequence's earlier layers changed their states) fails alone: the
/// others are put back as they were, stepped one by one, and give their tokens alone.
#[test]
fn a_step_that_panics_fails_only_its_sequence() -> Result<()> {
    let engine = engine();
    let healthy = [&CASES[2], &CASES[3], &CASES[5], &CASES[7]];
    let mut batcher = Batcher::new(engine.clone(), BatchConfig { prefill_chunk: CHUNK });
    let mut sinks = Vec::new();
    for (i, case) in healthy.iter().enumerate() {
        let (j, sink) = join(&engine, case, 2000 + i as u32)?;
        batcher.join(j);
        sinks.push(sink);
    }
    let (bad, bad_sink) = join(&engine, &CASES[4], 2999)?;
    let Start::Prefilled { mut state, first_token } = bad.start else { panic!("case 4 is prefilled remotely") };
    let last = state.layers.len() - 1;
    let dtype = state.layers[last].kv.k.dtype();
    state.layers[last].kv.k = lazyserve_model::kernels::kv::KvBuf::new(dtype);
    batcher.join(Join { start: Start::Prefilled { state, first_token }, ..bad });
    drain(&mut batcher);

    let failed = bad_sink.events.borrow().iter().any(|e| matches!(e, Event::Failed(lazyserve_engine::Error::Step(_))));
    assert!(failed && !bad_sink.done(), "the broken sequence failed: {:?}", bad_sink.events.borrow().last());
    for (i, (case, sink)) in healthy.iter().zip(&sinks).enumerate() {
        assert!(sink.done(), "{} words, {}: finished", case.words, case.prune);
        assert_eq!(sink.tokens(), alone_tokens(&engine, case, 2000 + i as u32)?, "{} words, {}: beside a broken sequence vs alone", case.words, case.prune);
    }
    Ok(())
}

#[test]
fn batched_greedy_tokens_equal_each_sequence_alone() -> Result<()> {
    let engine = engine();
    let cfg = BatchConfig { prefill_chunk: CHUNK };

    let mut alone = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        alone.push(alone_tokens(&engine, case, 1000 + i as u32)?);
    }
    // A prompt that fits one chunk is prefilled exactly as `generate` does it.
    let short = engine.tokenizer.encode(&prose(CASES[0].words, 1000))?;
    assert!(short.len() <= CHUNK, "{} tokens", short.len());
    // The loop sends an end-of-sequence token on (the router's `Output` ends the text there);
    // `generate` leaves it out of its ids.
    let eos = engine.tokenizer.eos_ids();
    let text_ids: Vec<u32> = alone[0].iter().copied().filter(|t| !eos.contains(t)).collect();
    assert_eq!(text_ids, lazyserve_tests::in_process(&prose(CASES[0].words, 1000), MAX_TOKENS, "off"));

    // Together: eight join at once, two more after a few iterations; one leaves mid-way.
    let mut batcher = Batcher::new(engine.clone(), cfg);
    let mut sinks = Vec::new();
    for (i, case) in CASES.iter().enumerate().take(8) {
        let (j, sink) = join(&engine, case, 1000 + i as u32)?;
        batcher.join(j);
        sinks.push(sink);
    }
    let cancelled = 2;
    let mut max_batch = 0;
    for _ in 0..6 {
        max_batch = max_batch.max(batcher.iterate());
    }
    for (i, case) in CASES.iter().enumerate().skip(8) {
        let (j, sink) = join(&engine, case, 1000 + i as u32)?;
        batcher.join(j);
        sinks.push(sink);
    }
    while sinks[cancelled].tokens().len() < 3 {
        max_batch = max_batch.max(batcher.iterate());
    }
    let before = batcher.len();
    sinks[cancelled].closed.set(true);
    batcher.iterate();
    assert!(batcher.len() < before, "the cancelled sequence left at the next iteration");
    while !batcher.is_empty() {
        max_batch = max_batch.max(batcher.iterate());
    }
    for (i, (sink, want)) in sinks.iter().zip(&alone).enumerate() {
        let got = sink.tokens();
        if i == cancelled {
            assert!(!sink.done() && got.len() < want.len(), "case {i} stopped when cancelled");
            assert_eq!(got, want[..got.len()], "case {i} before it was cancelled");
        } else {
            assert!(sink.done(), "case {i} finished");
            assert_eq!(&got, want, "case {i} ({}, {} words): batched vs alone", CASES[i].prune, CASES[i].words);
        }
    }
    assert!(max_batch >= 8, "at least 8 sequences stepped together, got {max_batch}");
    Ok(())
}
