//! Rotary position embeddings applied at arbitrary (original) token positions.

use crate::{Error, Result};

/// cos/sin tables for every position up to the model's context.
#[derive(Debug, Clone)]
pub struct Rope {
    half: usize,
    interleaved: bool,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// `inv_freq` has head_dim / 2 entries.
    pub fn new(inv_freq: &[f32], max_positions: usize, interleaved: bool) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in inv_freq {
                let a = p as f64 * f as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self { half, interleaved, cos, sin }
    }

    /// The cos and sin tables, `[position][head_dim / 2]` each.
    pub fn tables(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    pub fn max_positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Rotates `x`, laid out `[token][head][head_dim]` with `row_stride` floats between tokens
    /// and `heads` heads starting at offset 0 of each row.
    pub fn apply(&self, x: &mut [f32], row_stride: usize, heads: usize, positions: &[u32]) -> Result<()> {
        let d = 2 * self.half;
        for (t, &p) in positions.iter().enumerate() {
            let p = p as usize;
            if p >= self.max_positions() {
                return Err(Error::ContextOverflow { tokens: p + 1, max: self.max_positions() });
            }
            let cos = &self.cos[p * self.half..(p + 1) * self.half];
            let sin = &self.sin[p * self.half..(p + 1) * self.half];
            let row = &mut x[t * row_stride..t * row_stride + heads * d];
            for head in row.chunks_exact_mut(d) {
                if self.interleaved {
                    for i in 0..self.half {
                        let (a, b) = (head[2 * i], head[2 * i + 1]);
                        head[2 * i] = a * cos[i] - b * sin[i];
                        head[2 * i + 1] = a * sin[i] + b * cos[i];
                    }
                } else {
                    let (lo, hi) = head.split_at_mut(self.half);
                    for i in 0..self.half {
                        let (a, b) = (lo[i], hi[i]);
                        lo[i] = a * cos[i] - b * sin[i];
                        hi[i] = a * sin[i] + b * cos[i];
                    }
                }
            }
        }
        Ok(())
    }
}
