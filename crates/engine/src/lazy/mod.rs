//! LazyLLM: dynamic token pruning with an Aux Cache (Fu et al., arXiv 2407.14057, section 3).
//!
//! Every forward step (the prompt, then each decode token) starts with every token of the
//! context alive. After a pruning layer the alive tokens are ranked by the last token's
//! attention (averaged over heads) and only the top fraction stays alive for the following
//! layers. A token alive at a layer either has K/V there already (it is only attended to), or
//! is computed through that layer: new tokens flow up from below, and a token pruned at an
//! earlier step is *revived* from the Aux Cache, which holds its hidden state from the layer
//! where it was dropped. So every token is computed at most once per layer over the whole
//! generation, and the worst case does no more work than dense inference.

mod state;

pub use lazyserve_request::schedule::{Mode, Schedule, Stage, PRESET_NAMES};
pub use state::{AuxCache, LayerState, LazyStats, SequenceState};

use lazyserve_model::{Config, Forward, Segment};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

/// Runs `new_tokens` (appended after the state's tokens) through the model under the
/// state's schedule; returns the logits of the last token.
pub fn step<F: Forward>(model: &F, state: &mut SequenceState, new_tokens: &[u32]) -> Result<Vec<f32>> {
    step_with(model, state, new_tokens, &mut |_, _| Ok(()))
}

/// [`step`], calling `on_layer(l, layer)` as soon as layer `l` is done for this step: its
/// K/V and Aux Cache will not change again in this step, so a prefill worker can ship them
/// while later layers compute. An error from `on_layer` ends the step with that error.
pub fn step_with<F: Forward>(
    model: &F,
    state: &mut SequenceState,
    new_tokens: &[u32],
    on_layer: &mut dyn FnMut(usize, &LayerState) -> Result<()>,
) -> Result<Vec<f32>> {
    let mut input = [StepInput { state, tokens: new_tokens, partial: false }];
    let logits = step_batch(model, &mut input, &mut |_, l, layer| on_layer(l, layer))?;
    logits.into_iter().next().flatten().ok_or(Error::Internal("a whole step has logits"))
}

/// One sequence's part of a batched step.
pub struct StepInput<'a> {
    pub state: &'a mut SequenceState,
    /// Tokens appended after the state's tokens: a prompt, a chunk of one, or decode tokens.
    pub tokens: &'a [u32],
    /// A prompt chunk that more of the prompt follows (chunked prefill). It runs up to the
    /// schedule's first pruning layer only and leaves its hidden states in that layer's Aux
    /// Cache: the chunk that ends the prompt scores every prompt token there and revives the
    /// ones it selects, as a decode step would. Dense schedules run chunks through every
    /// layer. Gives no logits.
    pub partial: bool,
}

/// Refuses a step that cannot run: no tokens, or more than the context holds.
fn check_step(cfg: &Config, state: &SequenceState, tokens: &[u32]) -> Result<()> {
    if tokens.is_empty() {
        return Err(Error::InvalidParameter { field: "prompt", reason: "no tokens to run".into() });
    }
    let (total, max) = (state.tokens.len() + tokens.len(), cfg.max_position_embeddings);
    if total > max {
        return Err(lazyserve_model::Error::ContextOverflow { tokens: total, max }.into());
    }
    Ok(())
}

/// Where one sequence stands inside a step.
struct Run<R> {
    /// Positions computed at this layer (rows of `x`), ascending; the last token is last.
    compute: Vec<u32>,
    /// Their hidden states (taken while a layer runs).
    x: Option<R>,
    /// Positions alive at this layer, ascending. None means every position.
    alive: Option<Vec<u32>>,
    selecting: bool,
    window: usize,
    first_forced: u32,
    /// A partial prompt chunk stops after this layer.
    stop_after: Option<usize>,
    done: bool,
}

/// Runs one step for several sequences at once: each layer's linear products over the rows
/// of all of them together, attention and LazyLLM selection per sequence. A sequence's
/// numerics do not depend on the others. `on_layer(i, l, layer)` sees input `i`'s layer `l`
/// when it is done. Returns the logits of each input's last token (None for partial chunks).
pub fn step_batch<F: Forward>(
    model: &F,
    inputs: &mut [StepInput<'_>],
    on_layer: &mut dyn FnMut(usize, usize, &LayerState) -> Result<()>,
) -> Result<Vec<Option<Vec<f32>>>> {
    let cfg = model.config();
    let (h, num_layers) = (cfg.hidden_size, cfg.num_hidden_layers);
    // Every input is checked before any state changes.
    let embedded = inputs
        .iter()
        .map(|input| {
            check_step(cfg, input.state, input.tokens)?;
            Ok(model.embed(input.tokens)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut runs = Vec::with_capacity(inputs.len());
    for (input, x) in inputs.iter_mut().zip(embedded) {
        let state = &mut *input.state;
        state.begin_step();
        let start = state.tokens.len();
        let prefill = state.prompt_len == 0;
        state.push_tokens(input.tokens);
        let total = state.tokens.len();
        if prefill && !input.partial {
            state.prompt_len = total;
        }
        let schedule = &state.schedule;
        // The observation window scores (and keeps) the last prompt tokens; decode uses its token.
        let window = if prefill { schedule.window.min(input.tokens.len()) } else { 1 };
        let first_pruning = schedule.stages.first().map_or(num_layers - 1, |s| s.layer);
        runs.push(Run {
            compute: (start as u32..total as u32).collect(),
            x: Some(x),
            alive: None,
            // Static pruning selects during prefill only; decode attends to whatever has K/V.
            selecting: schedule.mode != Mode::Static || prefill,
            window,
            first_forced: (total - window) as u32,
            stop_after: input.partial.then_some(first_pruning),
            done: false,
        });
    }
    for l in 0..num_layers {
        // Each running sequence's rows at this layer, its key rows and what to score.
        let mut plans = Vec::with_capacity(runs.len());
        for (input, run) in inputs.iter_mut().zip(&runs).filter(|(_, r)| !r.done) {
            let state = &mut *input.state;
            let layer = &mut state.layers[l];
            let base = layer.kv.len() as u32;
            for (i, &p) in run.compute.iter().enumerate() {
                layer.row_of[p as usize] = base + i as u32;
            }
            let keep = match run.stop_after {
                None if run.selecting && l + 1 < num_layers => state.schedule.keep_after(l),
                _ => None,
            };
            // Keys: the alive positions' rows (the new rows included), in position order.
            let keys: Option<Vec<u32>> = match (&run.alive, run.selecting) {
                (Some(a), true) => Some(a.iter().map(|&p| layer.row_of[p as usize]).collect()),
                _ => None,
            };
            plans.push((keep, keys));
        }
        if plans.is_empty() {
            break;
        }
        // Several sequences' rows are stacked, and split back after.
        let counts: Vec<usize> = runs.iter().filter(|r| !r.done).map(|r| r.compute.len()).collect();
        let parts = runs.iter_mut().filter(|r| !r.done).map(|r| r.x.take().ok_or(Error::Internal("hidden rows of a running sequence")));
        let mut x = model.concat(parts.collect::<Result<Vec<_>>>()?)?;
        let mut segments: Vec<Segment<'_>> = inputs
            .iter_mut()
            .zip(&runs)
            .filter(|(_, r)| !r.done)
            .zip(&plans)
            .map(|((input, run), (keep, keys))| Segment {
                positions: &run.compute,
                kv: &mut input.state.layers[l].kv,
                keys: keys.as_deref(),
                score_queries: if keep.is_some() { run.window } else { 0 },
            })
            .collect();
        let scores = model.layer_forward_batch(l, &mut x, &mut segments)?;
        drop(segments);

        let mut pieces = model.split(x, &counts)?.into_iter();
        let running = inputs.iter_mut().zip(runs.iter_mut()).enumerate().filter(|(_, (_, r))| !r.done);
        for (((i, (input, run)), (keep, keys)), scores) in running.zip(plans).zip(scores) {
            let x = pieces.next().ok_or(Error::Internal("one piece per running sequence"))?;
            let state = &mut *input.state;
            state.stats.computed[l] += run.compute.len();
            if run.stop_after == Some(l) {
                // A partial chunk waits where the prompt's end will score it.
                if l + 1 < num_layers {
                    let hidden = model.download(x)?;
                    for (p, row) in run.compute.iter().zip(hidden.chunks_exact(h)) {
                        state.aux_insert(l, *p, row);
                    }
                }
                run.done = true;
            } else if let Some(keep) = keep {
                let scores = scores.ok_or(Error::Internal("scores were asked for"))?;
                prune(model, state, l, run, x, keep, keys.as_deref(), scores)?;
            } else {
                run.x = Some(x);
            }
            on_layer(i, l, &state.layers[l])?;
        }
    }
    let mut last_rows = Vec::with_capacity(runs.len());
    for run in runs.iter().filter(|r| r.stop_after.is_none()) {
        let x = run.x.as_ref().ok_or(Error::Internal("hidden rows of a finished sequence"))?;
        last_rows.push(model.gather(x, &[model.row_count(x) as u32 - 1])?);
    }
    let mut logits = if last_rows.is_empty() { Vec::new() } else { model.logits_batch(&model.concat(last_rows)?)? }.into_iter();
    for input in inputs.iter_mut() {
        input.state.commit();
    }
    Ok(runs.iter().map(|r| if r.stop_after.is_none() { logits.next() } else { None }).collect())
}

/// After pruning layer `l`: keeps the selected tokens alive, sends the dropped ones computed
/// here (rows of `x`) to the Aux Cache, and revives selected tokens that have no K/V at the
/// next layer.
#[allow(clippy::too_many_arguments)]
fn prune<F: Forward>(
    model: &F,
    state: &mut SequenceState,
    l: usize,
    run: &mut Run<F::Rows>,
    x: F::Rows,
    keep: f32,
    keys: Option<&[u32]>,
    mut scores: Vec<f32>,
) -> Result<()> {
    let h = model.config().hidden_size;
    let schedule = &state.schedule;
    let layer = &state.layers[l];
    let key_positions: Vec<u32> = match keys {
        Some(rows) => rows.iter().map(|&r| layer.kv.positions[r as usize]).collect(),
        None => layer.kv.positions.clone(),
    };
    let total = state.tokens.len() as u64;
    if schedule.mode == Mode::Random {
        let mut rng = StdRng::seed_from_u64(state.seed ^ (total << 20) ^ l as u64);
        scores.iter_mut().for_each(|s| *s = rng.random());
    }
    // On a local (sliding-window) layer the scoring queries see only their window: older
    // tokens are not judged there and stay alive for the next global layer to judge.
    let unscored_before = model.config().layer_window(l).map_or(0, |w| (run.first_forced + 1).saturating_sub(w as u32));
    let selected = select(&key_positions, &scores, keep, schedule, run.first_forced, unscored_before);

    // Tokens computed here that are dropped go to this layer's Aux Cache; the rest go on.
    let stash = schedule.mode != Mode::Static;
    let (mut next_compute, mut kept, mut dropped) = (Vec::new(), Vec::new(), Vec::new());
    for (row, &p) in run.compute.iter().enumerate() {
        if selected.binary_search(&p).is_ok() {
            next_compute.push(p);
            kept.push(row as u32);
        } else if stash {
            dropped.push(row as u32);
        }
    }
    if !dropped.is_empty() {
        let hidden = model.download(model.gather(&x, &dropped)?)?;
        for (&row, values) in dropped.iter().zip(hidden.chunks_exact(h)) {
            state.aux_insert(l, run.compute[row as usize], values);
        }
    }
    let mut next_x = if kept.len() == run.compute.len() { x } else { model.gather(&x, &kept)? };
    // Selected tokens without K/V at the next layer that were not computed here: revive.
    let next_layer = &state.layers[l + 1];
    let revive: Vec<u32> = selected
        .iter()
        .copied()
        .filter(|&p| next_layer.row_of[p as usize] == NONE && run.compute.binary_search(&p).is_err())
        .collect();
    if !revive.is_empty() {
        let mut hidden = Vec::with_capacity(revive.len() * h);
        for &p in &revive {
            hidden.extend(state.aux_take(l, p).ok_or(Error::Internal("revived token missing from the Aux Cache"))?);
        }
        let stacked = model.concat(vec![next_x, model.upload(hidden)?])?;
        // Back in position order.
        let mut order: Vec<(u32, u32)> = next_compute.iter().chain(&revive).zip(0..).map(|(&p, row)| (p, row)).collect();
        order.sort_unstable();
        next_compute = order.iter().map(|&(p, _)| p).collect();
        let rows: Vec<u32> = order.iter().map(|&(_, row)| row).collect();
        next_x = model.gather(&stacked, &rows)?;
        state.stats.revived += revive.len();
    }
    if !stash {
        // Static pruning never revives: prompt chunks left here are dropped for good.
        state.aux_clear(l);
    }
    run.compute = next_compute;
    run.x = Some(next_x);
    run.alive = Some(selected);
    Ok(())
}

/// Marks "no row" in [`state::LayerState::row_of`].
pub(crate) const NONE: u32 = u32::MAX;

/// The positions to keep: the top `keep` fraction by score (max-pooled over neighbours if
/// asked), plus the sinks and every position from `first_forced` on (the last token and the
/// observation window). Positions before `unscored_before` (outside a local layer's window)
/// are kept and the fraction is of the others. Returned ascending.
fn select(positions: &[u32], scores: &[f32], keep: f32, schedule: &Schedule, first_forced: u32, unscored_before: u32) -> Vec<u32> {
    let mut pairs: Vec<(u32, f32)> = positions.iter().copied().zip(scores.iter().copied()).collect();
    pairs.sort_unstable_by_key(|(p, _)| *p);
    if schedule.maxpool > 1 {
        let r = schedule.maxpool / 2;
        let raw: Vec<f32> = pairs.iter().map(|(_, s)| *s).collect();
        for (i, pair) in pairs.iter_mut().enumerate() {
            let (lo, hi) = (i.saturating_sub(r), (i + r + 1).min(raw.len()));
            pair.1 = raw[lo..hi].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        }
    }
    let unscored = pairs.iter().filter(|(p, _)| *p < unscored_before).count();
    let n_keep = (unscored + (keep * (pairs.len() - unscored) as f32).ceil() as usize).clamp(1, pairs.len());
    let forced = |p: u32| p >= first_forced || p < unscored_before || (p as usize) < schedule.sinks;
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    // Forced tokens first, then by score (ties to the later position).
    order.sort_unstable_by(|&a, &b| {
        let (pa, pb) = (pairs[a], pairs[b]);
        forced(pb.0).cmp(&forced(pa.0)).then(pb.1.total_cmp(&pa.1)).then(pb.0.cmp(&pa.0))
    });
    let n_forced = pairs.iter().filter(|(p, _)| forced(*p)).count();
    let mut kept: Vec<u32> = order[..n_keep.max(n_forced)].iter().map(|&i| pairs[i].0).collect();
    kept.sort_unstable();
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_keeps_top_fraction_last_token_and_sinks() {
        let positions: Vec<u32> = (0..10).collect();
        let scores = [0.0, 0.5, 0.1, 0.9, 0.2, 0.3, 0.8, 0.05, 0.01, 0.0];
        let s = Schedule::off();
        assert_eq!(select(&positions, &scores, 0.3, &s, 9, 0), vec![3, 6, 9]);
        let s = Schedule { sinks: 1, ..Schedule::off() };
        assert_eq!(select(&positions, &scores, 0.3, &s, 9, 0), vec![0, 3, 9]);
        let s = Schedule { maxpool: 3, ..Schedule::off() };
        // Max-pooled: 2, 3, 4 all score 0.9; ties go to later positions.
        assert_eq!(select(&positions, &scores, 0.3, &s, 9, 0), vec![3, 4, 9]);
    }

    #[test]
    fn select_keeps_tokens_outside_a_local_window() {
        // A local layer whose window starts at 4: 0..4 are not judged, the fraction is of 4..10.
        let positions: Vec<u32> = (0..10).collect();
        let scores = [0.0, 0.0, 0.0, 0.0, 0.2, 0.3, 0.8, 0.05, 0.01, 0.6];
        assert_eq!(select(&positions, &scores, 0.5, &Schedule::off(), 9, 4), vec![0, 1, 2, 3, 5, 6, 9]);
    }
}
