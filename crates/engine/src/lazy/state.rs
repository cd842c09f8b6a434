//! Per-sequence LazyLLM state: tokens, per-layer K/V with positions, Aux Cache, statistics.
//! A plain struct outside the weights, so that it can be shipped between workers.

use lazyserve_model::{Config, KvDtype, LayerKv};
use serde::Serialize;

use super::{Mode, Schedule, NONE};
use crate::{Error, Result};

/// Hidden states of tokens dropped after one layer, waiting to be revived there.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuxCache {
    /// Positions, in insertion order.
    pub positions: Vec<u32>,
    /// `[row][hidden]`: the input of the next layer for that token.
    pub hidden: Vec<f32>,
    width: usize,
}

impl AuxCache {
    fn new(width: usize) -> Self {
        Self { positions: Vec::new(), hidden: Vec::new(), width }
    }

    /// An Aux Cache of `positions.len()` rows of `width` values each.
    pub fn from_rows(width: usize, positions: Vec<u32>, hidden: Vec<f32>) -> Result<Self> {
        if hidden.len() != positions.len() * width {
            return Err(Error::InvalidState(format!(
                "Aux Cache has {} values for {} rows of {width}",
                hidden.len(),
                positions.len()
            )));
        }
        Ok(Self { positions, hidden, width })
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    pub fn bytes(&self) -> usize {
        4 * (self.positions.len() + self.hidden.len())
    }

    pub(crate) fn insert(&mut self, position: u32, hidden: &[f32]) {
        debug_assert!(!self.positions.contains(&position), "a token is computed once per layer");
        self.positions.push(position);
        self.hidden.extend_from_slice(hidden);
    }

    pub(crate) fn clear(&mut self) {
        self.positions.clear();
        self.hidden.clear();
    }

    /// Removes and returns the hidden state of `position`.
    pub(crate) fn take(&mut self, position: u32) -> Option<Vec<f32>> {
        let i = self.positions.iter().position(|&p| p == position)?;
        let w = self.width;
        let row = self.hidden[i * w..(i + 1) * w].to_vec();
        let last = self.positions.len() - 1;
        self.positions.swap_remove(i);
        if i != last {
            self.hidden.copy_within(last * w..(last + 1) * w, i * w);
        }
        self.hidden.truncate(last * w);
        Some(row)
    }
}

/// One layer's state.
#[derive(Debug, Clone)]
pub struct LayerState {
    pub kv: LayerKv,
    /// This layer's Aux Cache (tokens dropped after this layer).
    pub aux: AuxCache,
    /// Row in `kv` of each position, or NONE.
    pub(crate) row_of: Vec<u32>,
}

/// Counters of one sequence, over the whole generation so far.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LazyStats {
    /// Tokens computed at each layer.
    pub computed: Vec<usize>,
    /// Token-layers computed from an Aux Cache hidden state instead of flowing up.
    pub revived: usize,
}

/// Everything one sequence needs between steps.
#[derive(Debug, Clone)]
pub struct SequenceState {
    pub tokens: Vec<u32>,
    /// Set when the step that ends the prompt runs; 0 while the prompt is not complete.
    pub prompt_len: usize,
    pub schedule: Schedule,
    /// Seeds the random baseline.
    pub seed: u64,
    pub layers: Vec<LayerState>,
    pub stats: LazyStats,
}

impl SequenceState {
    pub fn new(cfg: &Config, schedule: Schedule, kv_dtype: KvDtype, seed: u64) -> Self {
        let layer = LayerState { kv: LayerKv::new(kv_dtype), aux: AuxCache::new(cfg.hidden_size), row_of: Vec::new() };
        Self {
            tokens: Vec::new(),
            prompt_len: 0,
            schedule,
            seed,
            layers: vec![layer; cfg.num_hidden_layers],
            stats: LazyStats { computed: vec![0; cfg.num_hidden_layers], revived: 0 },
        }
    }

    /// Rebuilds a prefilled state received from another worker from its tokens and, per
    /// layer, its K/V and Aux Cache. Refuses a state that decoding could not continue: rows
    /// out of range or repeated, or a token that neither flows up nor waits in an Aux Cache.
    pub fn restore(
        cfg: &Config,
        tokens: Vec<u32>,
        schedule: Schedule,
        seed: u64,
        layers: Vec<(LayerKv, AuxCache)>,
    ) -> Result<Self> {
        let n = tokens.len();
        if n == 0 || n >= cfg.max_position_embeddings {
            return Err(Error::InvalidState(format!("{n} tokens, expected 1..{}", cfg.max_position_embeddings)));
        }
        if layers.len() != cfg.num_hidden_layers {
            return Err(Error::InvalidState(format!("{} layers, the model has {}", layers.len(), cfg.num_hidden_layers)));
        }
        let kv_width = cfg.num_key_value_heads * cfg.head_dim;
        let mut state = Self::new(cfg, schedule, layers[0].0.k.dtype(), seed);
        state.push_tokens(&tokens);
        state.prompt_len = n;
        for (l, (kv, aux)) in layers.into_iter().enumerate() {
            let rows = kv.positions.len();
            if kv.k.len() != rows * kv_width || kv.v.len() != rows * kv_width || kv.k.dtype() != kv.v.dtype() {
                return Err(Error::InvalidState(format!("layer {l}: K/V sizes do not match {rows} rows")));
            }
            if aux.width != cfg.hidden_size {
                return Err(Error::InvalidState(format!("layer {l}: Aux Cache rows are not {} wide", cfg.hidden_size)));
            }
            let layer = &mut state.layers[l];
            for (r, &p) in kv.positions.iter().enumerate() {
                match layer.row_of.get_mut(p as usize) {
                    Some(slot) if *slot == NONE => *slot = r as u32,
                    _ => return Err(Error::InvalidState(format!("layer {l}: K/V position {p} out of range or repeated"))),
                }
            }
            state.stats.computed[l] = rows;
            layer.kv = kv;
            layer.aux = aux;
        }
        // Every position starts at layer 0; one with K/V at a layer goes on to the next
        // layer or waits in this layer's Aux Cache (static pruning drops it for good).
        if let Some(p) = (0..n as u32).find(|&p| !state.has_kv(0, p)) {
            return Err(Error::InvalidState(format!("position {p} has no K/V at layer 0")));
        }
        for l in 0..state.layers.len() - 1 {
            let mut waiting = vec![false; n];
            for &p in &state.layers[l].aux.positions {
                let ok = (p as usize) < n && !std::mem::replace(&mut waiting[p as usize], true);
                if !ok || !state.has_kv(l, p) || state.has_kv(l + 1, p) {
                    return Err(Error::InvalidState(format!("layer {l}: Aux Cache position {p} is not a token dropped there")));
                }
            }
            for p in 0..n as u32 {
                let up = state.has_kv(l + 1, p);
                if up && !state.has_kv(l, p) {
                    return Err(Error::InvalidState(format!("position {p} has K/V at layer {} but not at {l}", l + 1)));
                }
                // Decoding looks up the rows of the tokens alive since the last pruning layer:
                // a token may only stop where the schedule prunes (a state computed under
                // another schedule than the one it names would index rows that are not there).
                if state.has_kv(l, p) && !up && state.schedule.keep_after(l).is_none() {
                    return Err(Error::InvalidState(format!("layer {l}: position {p} was dropped, but the schedule does not prune there")));
                }
                if state.has_kv(l, p) && !up && !waiting[p as usize] && state.schedule.mode != Mode::Static {
                    return Err(Error::InvalidState(format!("layer {l}: position {p} was dropped without an Aux Cache row")));
                }
            }
        }
        Ok(state)
    }

    pub(crate) fn push_tokens(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
        for layer in &mut self.layers {
            layer.row_of.resize(self.tokens.len(), NONE);
        }
    }

    /// Whether `position` has K/V at `layer`.
    pub fn has_kv(&self, layer: usize, position: u32) -> bool {
        self.layers[layer].row_of.get(position as usize).is_some_and(|&r| r != NONE)
    }

    pub fn kv_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.kv.bytes()).sum()
    }

    pub fn aux_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.aux.bytes()).sum()
    }

    /// "% of prompt tokens computed" (paper, section 5): prompt token-layers computed so far
    /// over prompt tokens x layers. Each is computed at most once, so this only grows.
    pub fn computed_fraction(&self) -> f64 {
        let n = self.prompt_len as u32;
        let done: usize = (0..self.layers.len()).map(|l| (0..n).filter(|&p| self.has_kv(l, p)).count()).sum();
        done as f64 / (self.prompt_len.max(1) * self.layers.len()) as f64
    }
}
