//! LazyLLM in the engine against the independent reference (tests/common/reference.rs), on
//! a tiny random model and on the real SmolLM2 file; dense equivalence; the once-per-layer
//! and revival guarantees.

use anyhow::Result;
use lazyserve_engine::lazy::{self, Schedule, SequenceState};
use lazyserve_model::{load, KvCache, KvDtype, Model, WeightFormat};
use lazyserve_tests::reference::Reference;
use lazyserve_tests::{model_path, tiny_model};

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// Prefill `prompt`, then `steps` greedy decode steps, engine and reference side by side.
fn compare_with_reference(model: &Model, spec: &str, prompt: &[u32], steps: usize) -> Result<SequenceState> {
    let schedule = Schedule::parse(spec, model.config().num_hidden_layers)?;
    let stages = schedule.stages.iter().map(|s| (s.layer, s.keep)).collect();
    let mut reference = Reference::new(model, stages);
    let mut state = SequenceState::new(model.config(), schedule, KvDtype::F32, 0);
    let mut input = prompt.to_vec();
    for step in 0..=steps {
        let ours = lazy::step(model, &mut state, &input)?;
        let theirs = reference.step(model, &input);
        let diff = max_diff(&ours, &theirs);
        assert!(diff < 1e-4, "step {step}: logits differ by {diff}");
        input = vec![argmax(&ours)];
    }
    assert_eq!(state.stats.computed, reference.computed, "tokens computed per layer");
    assert_eq!(state.stats.revived, reference.revived, "tokens revived");
    Ok(state)
}

/// Every token is computed at most once per layer, and pruned tokens come back from the Aux
/// Cache: the counters equal the K/V rows held, and tokens were revived.
fn check_counters(state: &SequenceState) {
    for (l, layer) in state.layers.iter().enumerate() {
        assert_eq!(state.stats.computed[l], layer.kv.len(), "layer {l}: computed once each");
        let mut positions = layer.kv.positions.clone();
        positions.sort_unstable();
        positions.dedup();
        assert_eq!(positions.len(), layer.kv.len(), "layer {l}: no position twice");
    }
}

#[test]
fn tiny_model_matches_reference_with_pruning_and_revival() -> Result<()> {
    let model = tiny_model();
    let prompt: Vec<u32> = (0..48).map(|i| (i * 37 + 11) % 101).collect();
    let state = compare_with_reference(&model, "1:0.6,3:0.5", &prompt, 12)?;
    check_counters(&state);
    assert!(state.stats.revived > 0, "the test must exercise revival");
    // A revived token is computed from the Aux Cache, not from layer 0: layers up to the first
    // pruning layer computed each token exactly once, however many were revived above.
    let total = state.tokens.len();
    assert_eq!(&state.stats.computed[..2], &[total, total]);
    Ok(())
}

#[test]
fn tiny_model_static_and_random_baselines_run() -> Result<()> {
    let model = tiny_model();
    let prompt: Vec<u32> = (0..40).map(|i| (i * 13 + 5) % 101).collect();
    // Runs a prompt and six decode steps; the positions kept at each layer after prefill.
    let run = |spec: &str, seed: u64| -> Result<(SequenceState, Vec<Vec<u32>>)> {
        let schedule = Schedule::parse(spec, model.config().num_hidden_layers)?;
        let mut state = SequenceState::new(model.config(), schedule, KvDtype::F32, seed);
        let mut next = argmax(&lazy::step(&model, &mut state, &prompt)?);
        let kept = state.layers.iter().map(|l| l.kv.positions.clone()).collect();
        for _ in 0..6 {
            next = argmax(&lazy::step(&model, &mut state, &[next])?);
        }
        check_counters(&state);
        Ok((state, kept))
    };
    let (fixed, _) = run("static:1:0.5", 7)?;
    assert_eq!(fixed.stats.revived, 0, "static pruning never revives");
    assert_eq!(fixed.aux_bytes(), 0, "static pruning keeps no Aux Cache");

    // Random selection: the same budget as attention's, other tokens, the same for a seed.
    let (_, attention) = run("1:0.6,3:0.5", 7)?;
    let (_, random) = run("random:1:0.6,3:0.5", 7)?;
    let (_, again) = run("random:1:0.6,3:0.5", 7)?;
    let (_, reseeded) = run("random:1:0.6,3:0.5", 8)?;
    assert_eq!(random, again, "reproducible from the seed");
    assert_ne!(random, reseeded, "another seed, another selection");
    assert_ne!(random[2], attention[2], "not attention's selection");
    assert_eq!(random[2].len(), attention[2].len(), "the same budget");
    Ok(())
}

#[test]
fn schedule_off_is_the_dense_engine() -> Result<()> {
    let m = load(&model_path(), WeightFormat::F32)?;
    let text = "Rust is a multi-paradigm, general-purpose programming language that emphasizes performance, \
        type safety and concurrency. It enforces memory safety without a garbage collector.";
    let prompt = m.tokenizer.encode(text)?;
    let mut cache = KvCache::new(m.model.config(), KvDtype::F32);
    let mut state = SequenceState::new(m.model.config(), Schedule::off(), KvDtype::F32, 0);
    let mut dense = m.model.forward(&prompt, &mut cache)?;
    let mut ours = lazy::step(&m.model, &mut state, &prompt)?;
    for _ in 0..16 {
        assert_eq!(dense, ours, "identical logits");
        let next = argmax(&dense);
        dense = m.model.forward(&[next], &mut cache)?;
        ours = lazy::step(&m.model, &mut state, &[next])?;
    }
    assert!((state.computed_fraction() - 1.0).abs() < 1e-12);
    Ok(())
}

#[test]
fn real_model_matches_reference() -> Result<()> {
    let m = load(&model_path(), WeightFormat::F32)?;
    let text = "The museum opens at nine. The secret code is 4817. Visitors must leave bags at the desk. \
        Guided tours start every hour from the main hall. What is the secret code?";
    let prompt = m.tokenizer.encode(text)?;
    let state = compare_with_reference(&m.model, "10:0.5,20:0.5", &prompt, 4)?;
    check_counters(&state);
    assert!(state.stats.revived > 0, "the test must exercise revival");
    assert!(state.computed_fraction() < 1.0);
    Ok(())
}
