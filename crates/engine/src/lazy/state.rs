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

    fn insert(&mut self, position: u32, hidden: &[f32]) {
        debug_assert!(!self.positions.contains(&position), "a token is computed once per layer");
        self.positions.push(position);
        self.hidden.extend_from_slice(hidden);
    }

    fn clear(&mut self) {
        self.positions.clear();
        self.hidden.clear();
    }

    /// Removes and returns the hidden state of `position`, with the index it had (the last
    /// row moves there).
    fn take(&mut self, position: u32) -> Option<(usize, Vec<f32>)> {
        let i = self.positions.iter().position(|&p| p == position)?;
        let w = self.width;
        let row = self.hidden[i * w..(i + 1) * w].to_vec();
        let last = self.positions.len() - 1;
        self.positions.swap_remove(i);
        if i != last {
            self.hidden.copy_within(last * w..(last + 1) * w, i * w);
        }
        self.hidden.truncate(last * w);
        Some((i, row))
    }

    /// Undoes [`take`](Self::take): the row at `index` moves back to the end, and `row`
    /// takes its place.
    fn put_back(&mut self, index: usize, position: u32, row: &[f32]) {
        let w = self.width;
        if index == self.positions.len() {
            self.insert(position, row);
            return;
        }
        let moved = self.positions[index];
        self.positions[index] = position;
        self.positions.push(moved);
        self.hidden.extend_from_within(index * w..(index + 1) * w);
        self.hidden[index * w..(index + 1) * w].copy_from_slice(row);
    }

    /// Undoes the last [`insert`](Self::insert).
    fn pop(&mut self) {
        if self.positions.pop().is_some() {
            self.hidden.truncate(self.positions.len() * self.width);
        }
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

/// An Aux Cache change a step made, to undo.
#[derive(Debug, Clone)]
enum AuxUndo {
    /// A row appended at `layer`.
    Insert { layer: usize },
    /// `row` of `position` taken from index `index` at `layer` (the last row moved there).
    Take { layer: usize, index: usize, position: u32, row: Vec<f32> },
    /// `layer`'s Aux Cache as it was before a clear.
    Clear { layer: usize, aux: AuxCache },
}

/// What a state looked like when its current step began, and the Aux Cache changes made
/// since: enough to put the state back as it was if the step fails part-way.
#[derive(Debug, Clone)]
struct Journal {
    tokens: usize,
    prompt_len: usize,
    stats: LazyStats,
    /// K/V rows per layer.
    kv_rows: Vec<usize>,
    aux: Vec<AuxUndo>,
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
    /// Set while a step runs.
    journal: Option<Journal>,
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
            journal: None,
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

    /// Starts a step: from here until [`commit`](Self::commit), [`rollback`](Self::rollback)
    /// can undo what the step changes.
    pub(crate) fn begin_step(&mut self) {
        self.journal = Some(Journal {
            tokens: self.tokens.len(),
            prompt_len: self.prompt_len,
            stats: self.stats.clone(),
            kv_rows: self.layers.iter().map(|l| l.kv.len()).collect(),
            aux: Vec::new(),
        });
    }

    /// Ends a step that succeeded.
    pub(crate) fn commit(&mut self) {
        self.journal = None;
    }

    /// Puts the state back as it was when the step that failed began (a batched step that
    /// failed is run again sequence by sequence, so that one bad sequence fails alone).
    /// False when no step was running.
    pub fn rollback(&mut self) -> bool {
        let Some(j) = self.journal.take() else { return false };
        for undo in j.aux.into_iter().rev() {
            match undo {
                AuxUndo::Insert { layer } => self.layers[layer].aux.pop(),
                AuxUndo::Take { layer, index, position, row } => self.layers[layer].aux.put_back(index, position, &row),
                AuxUndo::Clear { layer, aux } => self.layers[layer].aux = aux,
            }
        }
        for (layer, rows) in self.layers.iter_mut().zip(j.kv_rows) {
            layer.kv.truncate(rows);
            layer.row_of.truncate(j.tokens);
            // Rows added by the step (new tokens, revived ones) are gone again.
            layer.row_of.iter_mut().filter(|r| **r != NONE && **r as usize >= rows).for_each(|r| *r = NONE);
        }
        self.tokens.truncate(j.tokens);
        self.prompt_len = j.prompt_len;
        self.stats = j.stats;
        true
    }

    /// Appends `position`'s hidden state to layer `l`'s Aux Cache.
    pub(crate) fn aux_insert(&mut self, l: usize, position: u32, hidden: &[f32]) {
        self.layers[l].aux.insert(position, hidden);
        if let Some(j) = &mut self.journal {
            j.aux.push(AuxUndo::Insert { layer: l });
        }
    }

    /// Removes and returns `position`'s hidden state from layer `l`'s Aux Cache.
    pub(crate) fn aux_take(&mut self, l: usize, position: u32) -> Option<Vec<f32>> {
        let (index, row) = self.layers[l].aux.take(position)?;
        if let Some(j) = &mut self.journal {
            j.aux.push(AuxUndo::Take { layer: l, index, position, row: row.clone() });
        }
        Some(row)
    }

    /// Empties layer `l`'s Aux Cache.
    pub(crate) fn aux_clear(&mut self, l: usize) {
        let aux = &mut self.layers[l].aux;
        match &mut self.journal {
            Some(j) if !aux.is_empty() => j.aux.push(AuxUndo::Clear { layer: l, aux: std::mem::replace(aux, AuxCache::new(aux.width)) }),
            _ => aux.clear(),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollback_undoes_aux_inserts_takes_and_clears_in_order() {
        let cfg = Config::from_hf_json(include_str!("../../../../tests/tiny-config.json")).expect("tiny config");
        let row = |v: u32| vec![v as f32; cfg.hidden_size];
        let mut s = SequenceState::new(&cfg, Schedule::off(), KvDtype::F32, 0);
        s.push_tokens(&[10, 11, 12, 13, 14]);
        for p in 0..4 {
            s.aux_insert(0, p, &row(p));
        }
        s.aux_insert(1, 4, &row(4));
        let before = s.layers.iter().map(|l| l.aux.clone()).collect::<Vec<_>>();

        s.begin_step();
        s.push_tokens(&[15]);
        s.aux_insert(0, 5, &row(5));
        assert_eq!(s.aux_take(0, 1), Some(row(1)), "a middle row; the last moves into its place");
        s.aux_insert(0, 1, &row(1));
        assert_eq!(s.aux_take(0, 0), Some(row(0)), "the first row; 1, inserted last, moves there");
        assert_eq!(s.aux_take(0, 1), Some(row(1)), "a row that moved");
        s.aux_clear(1);
        assert!(s.layers[1].aux.is_empty());
        assert!(s.rollback());

        assert_eq!(s.layers.iter().map(|l| l.aux.clone()).collect::<Vec<_>>(), before, "every Aux Cache as it was, rows in order");
        assert_eq!(s.tokens, [10, 11, 12, 13, 14]);
        assert!(s.layers.iter().all(|l| l.row_of.len() == 5));
        assert!(!s.rollback(), "nothing left to undo");
    }
}
