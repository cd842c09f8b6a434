//! Linear layers: f32 GEMM for prompts, optionally Q8_0 matrix-vector products for decode.

use gemm::Parallelism;

use super::q8::Q8Matrix;

/// At or below this many token rows (decode steps, revived tokens) a layer with a Q8_0 copy
/// uses it: reading int8 weights once beats f32 GEMM until the product becomes compute-bound.
const Q8_MAX_ROWS: usize = 32;

/// `y = x W^T + b` with `W` stored row-major `[out][in]` as in the checkpoints.
#[derive(Debug, Clone)]
pub struct Linear {
    pub in_dim: usize,
    pub out_dim: usize,
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    q8: Option<Q8Matrix>,
}

impl Linear {
    pub fn new(weight: Vec<f32>, bias: Option<Vec<f32>>, out_dim: usize, in_dim: usize) -> Self {
        assert_eq!(weight.len(), out_dim * in_dim, "weight shape");
        Self { in_dim, out_dim, weight, bias, q8: None }
    }

    /// Stacks layers that read the same input into one (q, k, v or gate, up).
    pub fn concat(parts: Vec<Linear>) -> Self {
        let in_dim = parts[0].in_dim;
        assert!(parts.iter().all(|p| p.in_dim == in_dim), "fused layers share the input");
        let out_dim = parts.iter().map(|p| p.out_dim).sum();
        let has_bias = parts.iter().any(|p| p.bias.is_some());
        let mut weight = Vec::with_capacity(out_dim * in_dim);
        let mut bias = has_bias.then(|| Vec::with_capacity(out_dim));
        for p in parts {
            weight.extend_from_slice(&p.weight);
            if let Some(b) = bias.as_mut() {
                match &p.bias {
                    Some(pb) => b.extend_from_slice(pb),
                    None => b.extend(std::iter::repeat_n(0.0, p.out_dim)),
                }
            }
        }
        Self { in_dim, out_dim, weight, bias, q8: None }
    }

    /// Adds a Q8_0 copy used for few-row inputs (decode). No-op if `in_dim % 32 != 0`.
    pub fn quantize_q8(&mut self) {
        self.q8 = Q8Matrix::quantize(&self.weight, self.out_dim, self.in_dim);
    }

    pub fn weight(&self) -> &[f32] {
        &self.weight
    }

    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    pub fn bytes(&self) -> usize {
        4 * (self.weight.len() + self.bias.as_ref().map_or(0, Vec::len))
            + self.q8.as_ref().map_or(0, Q8Matrix::bytes)
    }

    /// `x` holds `rows` rows of `in_dim`; returns `rows` rows of `out_dim`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        self.forward_segments(x, &[rows])
    }

    /// `x` holds the rows of several sequences, `segments[i]` rows each, stacked. Each
    /// segment gets the kernel it would get alone (Q8_0 for a few rows, f32 GEMM for many),
    /// so a row's result does not depend on what else is in the batch; consecutive Q8_0
    /// segments share one pass over the weights (its rows are independent of each other).
    pub fn forward_segments(&self, x: &[f32], segments: &[usize]) -> Vec<f32> {
        let (inp, out) = (self.in_dim, self.out_dim);
        let rows: usize = segments.iter().sum();
        assert_eq!(x.len(), rows * inp, "input rows");
        let mut y = vec![0f32; rows * out];
        let q8_rows = |n: usize| self.q8.is_some() && n <= Q8_MAX_ROWS;
        let (mut r0, mut i) = (0, 0);
        while i < segments.len() {
            let start = r0;
            if q8_rows(segments[i]) {
                while i < segments.len() && q8_rows(segments[i]) {
                    r0 += segments[i];
                    i += 1;
                }
                let q8 = self.q8.as_ref().expect("checked above");
                q8.matmul(&x[start * inp..r0 * inp], r0 - start, &mut y[start * out..r0 * out]);
            } else {
                r0 += segments[i];
                i += 1;
                matmul_wt(&x[start * inp..r0 * inp], r0 - start, &self.weight, out, inp, &mut y[start * out..r0 * out]);
            }
        }
        if let Some(b) = &self.bias {
            for yr in y.chunks_exact_mut(out) {
                super::math::add_assign(yr, b);
            }
        }
        y
    }
}

/// `y[rows][out] = x[rows][in] * w[out][in]^T`, multithreaded.
pub fn matmul_wt(x: &[f32], rows: usize, w: &[f32], out: usize, inner: usize, y: &mut [f32]) {
    let threads = rayon::current_num_threads();
    let par = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: the slices hold rows*inner, out*inner and rows*out floats, row-major.
    unsafe {
        gemm::gemm(
            rows, out, inner,
            y.as_mut_ptr(), 1, out as isize,
            false,
            x.as_ptr(), 1, inner as isize,
            w.as_ptr(), inner as isize, 1,
            0.0, 1.0,
            false, false, false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_matches_naive_and_q8_is_close() {
        let (out, inner, rows) = (40, 64, 3);
        let w: Vec<f32> = (0..out * inner).map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0).collect();
        let b: Vec<f32> = (0..out).map(|i| i as f32 * 0.1).collect();
        let x: Vec<f32> = (0..rows * inner).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
        let mut lin = Linear::new(w.clone(), Some(b.clone()), out, inner);
        let y = lin.forward(&x, rows);
        for r in 0..rows {
            for o in 0..out {
                let want: f32 = (0..inner).map(|i| x[r * inner + i] * w[o * inner + i]).sum::<f32>() + b[o];
                assert!((y[r * out + o] - want).abs() < 1e-4);
            }
        }
        lin.quantize_q8();
        let yq = lin.forward(&x, rows);
        for (a, b) in y.iter().zip(&yq) {
            assert!((a - b).abs() < 0.05 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn stacked_segments_give_each_segment_its_own_result() {
        let (out, inner) = (48, 64);
        let w: Vec<f32> = (0..out * inner).map(|i| ((i * 29 % 23) as f32 - 11.0) / 11.0).collect();
        let mut lin = Linear::new(w, None, out, inner);
        lin.quantize_q8();
        // A decode row, a chunk too long for Q8_0, and two more few-row segments.
        let segments = [1, Q8_MAX_ROWS + 8, 3, 1];
        let rows: usize = segments.iter().sum();
        let x: Vec<f32> = (0..rows * inner).map(|i| ((i * 13 % 31) as f32 - 15.0) / 9.0).collect();
        let stacked = lin.forward_segments(&x, &segments);
        let mut r0 = 0;
        for &n in &segments {
            let alone = lin.forward(&x[r0 * inner..(r0 + n) * inner], n);
            assert_eq!(alone, stacked[r0 * out..(r0 + n) * out], "segment of {n} rows at row {r0}");
            r0 += n;
        }
    }
}
