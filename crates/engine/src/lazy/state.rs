//! Per-sequence LazyLLM state: tokens, per-layer K/V with positions, Aux Cache, statistics.
//! A plain struct outside the weights, so that it can be shipped between workers.

use lazyserve_model::{KvDtype, LayerKv, Model};
use serde::Serialize;

use super::{Schedule, NONE};

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
    pub prompt_len: usize,
    pub schedule: Schedule,
    /// Seeds the random baseline.
    pub seed: u64,
    pub layers: Vec<LayerState>,
    pub stats: LazyStats,
}

impl SequenceState {
    pub fn new(model: &Model, schedule: Schedule, kv_dtype: KvDtype, seed: u64) -> Self {
        let cfg = model.config();
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

    pub(crate) fn push_tokens(&mut self, tokens: &[u32]) {
        if self.tokens.is_empty() {
            self.prompt_len = tokens.len();
        }
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
