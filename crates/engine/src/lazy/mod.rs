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

mod schedule;
mod state;

pub use schedule::{Mode, Schedule, Stage, PRESET_NAMES};
pub use state::{AuxCache, LayerState, LazyStats, SequenceState};

use lazyserve_model::Model;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::Result;

/// Runs `new_tokens` (appended after the state's tokens) through the model under the
/// state's schedule; returns the logits of the last token.
pub fn step(model: &Model, state: &mut SequenceState, new_tokens: &[u32]) -> Result<Vec<f32>> {
    step_with(model, state, new_tokens, &mut |_, _| Ok(()))
}

/// [`step`], calling `on_layer(l, layer)` as soon as layer `l` is done for this step: its
/// K/V and Aux Cache will not change again in this step, so a prefill worker can ship them
/// while later layers compute. An error from `on_layer` ends the step with that error.
pub fn step_with(
    model: &Model,
    state: &mut SequenceState,
    new_tokens: &[u32],
    on_layer: &mut dyn FnMut(usize, &LayerState) -> Result<()>,
) -> Result<Vec<f32>> {
    let cfg = model.config();
    let (h, num_layers) = (cfg.hidden_size, cfg.num_hidden_layers);
    let start = state.tokens.len();
    if new_tokens.is_empty() {
        return Err(crate::Error::InvalidParameter { field: "prompt", reason: "no tokens to run".into() });
    }
    if start + new_tokens.len() > cfg.max_position_embeddings {
        return Err(lazyserve_model::Error::ContextOverflow { tokens: start + new_tokens.len(), max: cfg.max_position_embeddings }.into());
    }
    let mut x = model.embed(new_tokens)?;
    state.push_tokens(new_tokens);
    let total = state.tokens.len() as u32;
    let last = total - 1;
    let prefill = start == 0;
    let schedule = state.schedule.clone();
    // Static pruning selects during prefill only; decode attends to whatever has K/V.
    let selecting = schedule.mode != Mode::Static || prefill;
    // The observation window scores (and keeps) the last prompt tokens; decode uses its token.
    let window = if prefill { schedule.window.min(new_tokens.len()) } else { 1 };
    let first_forced = total - window as u32;

    // `alive`: positions alive at this layer, ascending. None means every position.
    let mut alive: Option<Vec<u32>> = None;
    // `compute`: positions computed at this layer (rows of `x`), ascending; `last` is last.
    let mut compute: Vec<u32> = (start as u32..total).collect();
    for l in 0..num_layers {
        let layer = &mut state.layers[l];
        let base = layer.kv.len() as u32;
        for (i, &p) in compute.iter().enumerate() {
            layer.row_of[p as usize] = base + i as u32;
        }
        let keep = if selecting && l + 1 < num_layers { schedule.keep_after(l) } else { None };
        // Keys: the alive positions' rows (the new rows included), in position order.
        let keys: Option<Vec<u32>> = match (&alive, selecting) {
            (Some(a), true) => Some(a.iter().map(|&p| layer.row_of[p as usize]).collect()),
            _ => None,
        };
        let score_queries = if keep.is_some() { window } else { 0 };
        let scores = model.layer_forward(l, &mut x, &compute, &mut layer.kv, keys.as_deref(), score_queries)?;
        state.stats.computed[l] += compute.len();

        let Some(keep) = keep else {
            on_layer(l, &state.layers[l])?;
            continue;
        };
        let key_positions: Vec<u32> = match &keys {
            Some(rows) => rows.iter().map(|&r| layer.kv.positions[r as usize]).collect(),
            None => layer.kv.positions.clone(),
        };
        let mut scores = scores.expect("scores were asked for");
        if schedule.mode == Mode::Random {
            let mut rng = StdRng::seed_from_u64(state.seed ^ ((total as u64) << 20) ^ l as u64);
            scores.iter_mut().for_each(|s| *s = rng.random());
        }
        let selected = select(&key_positions, &scores, keep, &schedule, first_forced);

        // Tokens computed here that are dropped go to this layer's Aux Cache; the rest go on.
        let mut next_compute = Vec::with_capacity(compute.len());
        let mut next_x = Vec::with_capacity(x.len());
        for (i, &p) in compute.iter().enumerate() {
            let row = &x[i * h..(i + 1) * h];
            if selected.binary_search(&p).is_ok() {
                next_compute.push(p);
                next_x.extend_from_slice(row);
            } else if schedule.mode != Mode::Static {
                state.layers[l].aux.insert(p, row);
            }
        }
        // Selected tokens without K/V at the next layer that were not computed here: revive.
        let next_layer = &state.layers[l + 1];
        let revive: Vec<u32> = selected
            .iter()
            .copied()
            .filter(|&p| next_layer.row_of[p as usize] == NONE && compute.binary_search(&p).is_err())
            .collect();
        if !revive.is_empty() {
            let aux = &mut state.layers[l].aux;
            let mut merged: Vec<(u32, Vec<f32>)> = next_compute
                .iter()
                .enumerate()
                .map(|(i, &p)| (p, next_x[i * h..(i + 1) * h].to_vec()))
                .collect();
            for &p in &revive {
                let hidden = aux.take(p).ok_or(crate::Error::Internal("revived token missing from the Aux Cache"))?;
                merged.push((p, hidden));
            }
            merged.sort_unstable_by_key(|(p, _)| *p);
            next_compute = merged.iter().map(|(p, _)| *p).collect();
            next_x = merged.into_iter().flat_map(|(_, r)| r).collect();
            state.stats.revived += revive.len();
        }
        compute = next_compute;
        x = next_x;
        alive = Some(selected);
        on_layer(l, &state.layers[l])?;
    }
    debug_assert_eq!(compute.last(), Some(&last));
    Ok(model.logits(&x[x.len() - h..]))
}

/// Marks "no row" in [`state::LayerState::row_of`].
pub(crate) const NONE: u32 = u32::MAX;

/// The positions to keep: the top `keep` fraction by score (max-pooled over neighbours if
/// asked), plus the sinks and every position from `first_forced` on (the last token and the
/// observation window). Returned ascending.
fn select(positions: &[u32], scores: &[f32], keep: f32, schedule: &Schedule, first_forced: u32) -> Vec<u32> {
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
    let n_keep = ((keep * pairs.len() as f32).ceil() as usize).clamp(1, pairs.len());
    let forced = |p: u32| p >= first_forced || (p as usize) < schedule.sinks;
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
        assert_eq!(select(&positions, &scores, 0.3, &s, 9), vec![3, 6, 9]);
        let s = Schedule { sinks: 1, ..Schedule::off() };
        assert_eq!(select(&positions, &scores, 0.3, &s, 9), vec![0, 3, 9]);
        let s = Schedule { maxpool: 3, ..Schedule::off() };
        // Max-pooled: 2, 3, 4 all score 0.9; ties go to later positions.
        assert_eq!(select(&positions, &scores, 0.3, &s, 9), vec![3, 4, 9]);
    }
}
