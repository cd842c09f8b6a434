//! Linear layers: a dense copy (f32, or f16 widened to f32 block by block) through GEMM for
//! prompts, and optionally a quantized copy (Q8_0, or the checkpoint's own Q4_1 blocks) for
//! matrix-vector products in decode. A layer holds either copy or both.

use gemm::Parallelism;
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::q4::Q4Matrix;
use super::q8::Q8Matrix;
use super::SendPtr;

/// At or below this many token rows (decode steps, revived tokens) a layer with a quantized
/// copy uses it: reading 4- or 8-bit weights once beats f32 GEMM until the product becomes
/// compute-bound.
pub const Q8_MAX_ROWS: usize = 32;
/// Most f16 weights one task widens to f32 at a time (4 MiB of f32: within a core's L2 and
/// L3 share, large enough that each GEMM call amortises its packing).
const F16_BLOCK_ELEMS: usize = 1 << 20;

/// A dense `[out][in]` weight matrix.
#[derive(Debug, Clone)]
pub enum Dense {
    F32(Vec<f32>),
    /// Half the bytes; widened to f32 in blocks of rows just before each GEMM, so products
    /// keep f32 activations and accumulation.
    F16(Vec<f16>),
}

impl Dense {
    pub fn bytes(&self) -> usize {
        match self {
            Self::F32(w) => 4 * w.len(),
            Self::F16(w) => 2 * w.len(),
        }
    }

    /// Row `r` of a matrix with rows of `out.len()` values, as f32.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Self::F32(w) => out.copy_from_slice(&w[r * n..(r + 1) * n]),
            Self::F16(w) => w[r * n..(r + 1) * n].convert_to_f32_slice(out),
        }
    }

    /// The same values rounded to f16.
    pub fn to_f16(&self) -> Self {
        match self {
            Self::F32(w) => Self::F16(w.iter().map(|&v| f16::from_f32(v)).collect()),
            Self::F16(w) => Self::F16(w.clone()),
        }
    }
}

/// The copy of a layer that few-row products (decode) read.
#[derive(Debug, Clone)]
pub enum Quantized {
    Q8(Q8Matrix),
    /// The checkpoint's Q4_1 blocks, repacked.
    Q4(Q4Matrix),
}

impl Quantized {
    fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        match self {
            Self::Q8(m) => m.matmul(x, n, y),
            Self::Q4(m) => m.matmul(x, n, y),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Q8(m) => m.bytes(),
            Self::Q4(m) => m.bytes(),
        }
    }
}

/// `y = x W^T + b` with `W` stored row-major `[out][in]` as in the checkpoints.
#[derive(Debug, Clone)]
pub struct Linear {
    pub in_dim: usize,
    pub out_dim: usize,
    /// None when the layer keeps its quantized copy only (a decode worker, whose prompt
    /// chunks fit the quantized kernel).
    dense: Option<Dense>,
    bias: Option<Vec<f32>>,
    quant: Option<Quantized>,
    /// The checkpoint's GGUF Q4_1 bytes of the weight, while loading: [`Linear::quantize`]
    /// turns them into the quantized copy.
    gguf_q4_1: Option<Vec<u8>>,
}

impl Linear {
    pub fn new(weight: Vec<f32>, bias: Option<Vec<f32>>, out_dim: usize, in_dim: usize) -> Self {
        assert_eq!(weight.len(), out_dim * in_dim, "weight shape");
        Self { in_dim, out_dim, dense: Some(Dense::F32(weight)), bias, quant: None, gguf_q4_1: None }
    }

    /// The same layer with the checkpoint's Q4_1 bytes of its weight (rows of `in_dim / 32`
    /// GGUF blocks), for [`Linear::quantize`].
    pub fn with_gguf_q4_1(self, raw: Option<Vec<u8>>) -> Self {
        Self { gguf_q4_1: raw, ..self }
    }

    /// Stacks layers that read the same input into one (q, k, v or gate, up). The parts hold
    /// f32 weights (as loaded).
    pub fn concat(parts: Vec<Linear>) -> Self {
        let in_dim = parts[0].in_dim;
        assert!(parts.iter().all(|p| p.in_dim == in_dim), "fused layers share the input");
        let out_dim = parts.iter().map(|p| p.out_dim).sum();
        let has_bias = parts.iter().any(|p| p.bias.is_some());
        // Rows of GGUF blocks stack like the rows they encode.
        let q4_1 = parts.iter().all(|p| p.gguf_q4_1.is_some()).then(|| parts.iter().flat_map(|p| p.gguf_q4_1.iter().flatten().copied()).collect());
        let mut weight = Vec::with_capacity(out_dim * in_dim);
        let mut bias = has_bias.then(|| Vec::with_capacity(out_dim));
        for p in parts {
            weight.extend_from_slice(p.weight());
            if let Some(b) = bias.as_mut() {
                match &p.bias {
                    Some(pb) => b.extend_from_slice(pb),
                    None => b.extend(std::iter::repeat_n(0.0, p.out_dim)),
                }
            }
        }
        Self::new(weight, bias, out_dim, in_dim).with_gguf_q4_1(q4_1)
    }

    /// Adds the quantized copy used for few-row inputs (decode): the checkpoint's Q4_1 blocks
    /// when `keep_q4_1` and the layer came with them, else Q8_0 from the f32 weights (none if
    /// `in_dim % 32 != 0`). Frees the checkpoint's bytes either way.
    pub fn quantize(&mut self, keep_q4_1: bool) {
        let raw = self.gguf_q4_1.take();
        let q4 = raw.filter(|_| keep_q4_1).and_then(|r| Q4Matrix::from_gguf_q4_1(&r, self.out_dim, self.in_dim));
        self.quant = match q4 {
            Some(m) => Some(Quantized::Q4(m)),
            None => Q8Matrix::quantize(self.weight(), self.out_dim, self.in_dim).map(Quantized::Q8),
        };
    }

    /// Forgets the checkpoint's Q4_1 bytes (a layer that keeps no quantized copy).
    pub fn drop_gguf_blocks(&mut self) {
        self.gguf_q4_1 = None;
    }

    /// Keeps the dense copy in f16.
    pub fn dense_to_f16(&mut self) {
        self.dense = self.dense.as_ref().map(Dense::to_f16);
    }

    /// Drops the dense copy when a quantized copy can take every product.
    pub fn drop_dense(&mut self) {
        if self.quant.is_some() {
            self.dense = None;
        }
    }

    pub fn dense(&self) -> Option<&Dense> {
        self.dense.as_ref()
    }

    /// The f32 weights, as loaded; panics once they are converted or dropped (reference
    /// implementations and tools load with `WeightFormat::F32`).
    pub fn weight(&self) -> &[f32] {
        match &self.dense {
            Some(Dense::F32(w)) => w,
            _ => panic!("f32 weights were not kept (load with WeightFormat::F32)"),
        }
    }

    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    pub fn bytes(&self) -> usize {
        self.dense.as_ref().map_or(0, Dense::bytes)
            + 4 * self.bias.as_ref().map_or(0, Vec::len)
            + self.quant.as_ref().map_or(0, Quantized::bytes)
    }

    /// `x` holds `rows` rows of `in_dim`; returns `rows` rows of `out_dim`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        self.forward_segments(x, &[rows])
    }

    /// `x` holds the rows of several sequences, `segments[i]` rows each, stacked. Each
    /// segment gets the kernel it would get alone (the quantized copy for a few rows or when
    /// it is the only copy, the dense GEMM for many), so a row's result does not depend on
    /// what else is in the batch; consecutive quantized segments share one pass over the
    /// weights (its rows are independent of each other).
    pub fn forward_segments(&self, x: &[f32], segments: &[usize]) -> Vec<f32> {
        let (inp, out) = (self.in_dim, self.out_dim);
        let rows: usize = segments.iter().sum();
        assert_eq!(x.len(), rows * inp, "input rows");
        let mut y = vec![0f32; rows * out];
        let quantized_rows = |n: usize| self.quant.is_some() && (n <= Q8_MAX_ROWS || self.dense.is_none());
        let (mut r0, mut i) = (0, 0);
        while i < segments.len() {
            let start = r0;
            if quantized_rows(segments[i]) {
                while i < segments.len() && quantized_rows(segments[i]) {
                    r0 += segments[i];
                    i += 1;
                }
                let quant = self.quant.as_ref().expect("checked above");
                quant.matmul(&x[start * inp..r0 * inp], r0 - start, &mut y[start * out..r0 * out]);
            } else {
                r0 += segments[i];
                i += 1;
                let (xs, ys) = (&x[start * inp..r0 * inp], &mut y[start * out..r0 * out]);
                match self.dense.as_ref().expect("a layer without a quantized copy keeps its dense copy") {
                    Dense::F32(w) => matmul_wt(xs, r0 - start, w, out, inp, ys),
                    Dense::F16(w) => matmul_wt_f16(xs, r0 - start, w, out, inp, ys),
                }
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
    gemm_into(x, rows, w, (out, inner), y.as_mut_ptr(), out, par);
}

/// As [`matmul_wt`] with f16 weights: each task widens a block of weight rows to f32 and
/// computes that block's output columns for every input row. The blocks depend only on the
/// weight shape and thread count, never on `rows`.
pub fn matmul_wt_f16(x: &[f32], rows: usize, w: &[f16], out: usize, inner: usize, y: &mut [f32]) {
    assert!(x.len() == rows * inner && w.len() == out * inner && y.len() == rows * out, "matmul shapes");
    let tasks = (2 * rayon::current_num_threads()).max((out * inner).div_ceil(F16_BLOCK_ELEMS));
    let block = out.div_ceil(tasks).next_multiple_of(16).min(out);
    let dst = SendPtr(y.as_mut_ptr());
    (0..out.div_ceil(block)).into_par_iter().for_each_init(Vec::new, |wide: &mut Vec<f32>, b| {
        let dst = dst;
        let (o0, o1) = (b * block, ((b + 1) * block).min(out));
        wide.resize((o1 - o0) * inner, 0.0);
        w[o0 * inner..o1 * inner].convert_to_f32_slice(wide);
        // Columns o0..o1 of every output row belong to this task alone.
        gemm_into(x, rows, wide, (o1 - o0, inner), dst.0.wrapping_add(o0), out, Parallelism::None);
    });
}

/// `dst[r * dst_stride + o] = x[r] . w[o]` for `rows` x `out` outputs.
fn gemm_into(x: &[f32], rows: usize, w: &[f32], (out, inner): (usize, usize), dst: *mut f32, dst_stride: usize, par: Parallelism) {
    assert!(x.len() >= rows * inner && w.len() >= out * inner && out <= dst_stride, "gemm shapes");
    // SAFETY: x and w hold rows*inner and out*inner floats, row-major (asserted); the callers
    // own `rows` rows of `dst_stride` floats at `dst`, of which this call writes `out` columns.
    unsafe {
        gemm::gemm(
            rows, out, inner,
            dst, 1, dst_stride as isize,
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
        lin.quantize(false);
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
        lin.quantize(false);
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

    #[test]
    fn f16_weights_give_the_f32_product_of_the_rounded_weights() {
        // Enough output rows for several widening blocks, and a ragged last one.
        let (out, inner, rows) = (2 * F16_BLOCK_ELEMS / 64 + 40, 64, 5);
        let w: Vec<f32> = (0..out * inner).map(|i| ((i * 37 % 101) as f32 - 50.0) / 47.0).collect();
        let x: Vec<f32> = (0..rows * inner).map(|i| ((i * 11 % 19) as f32 - 9.0) / 7.0).collect();
        let mut lin = Linear::new(w.clone(), None, out, inner);
        lin.dense_to_f16();
        assert_eq!(lin.bytes(), 2 * out * inner);
        let y = lin.forward(&x, rows);
        let rounded: Vec<f32> = w.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        let want = Linear::new(rounded, None, out, inner).forward(&x, rows);
        for (i, (a, b)) in y.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "output {i}: {a} vs {b}");
        }
    }

    #[test]
    fn a_layer_without_its_dense_copy_runs_every_row_on_q8() {
        let (out, inner, rows) = (24, 64, Q8_MAX_ROWS + 9);
        let w: Vec<f32> = (0..out * inner).map(|i| ((i * 29 % 23) as f32 - 11.0) / 11.0).collect();
        let x: Vec<f32> = (0..rows * inner).map(|i| ((i * 13 % 31) as f32 - 15.0) / 9.0).collect();
        let mut lin = Linear::new(w.clone(), None, out, inner);
        lin.drop_dense();
        assert!(lin.dense().is_some(), "without a Q8_0 copy the dense one stays");
        lin.quantize(false);
        lin.drop_dense();
        assert!(lin.dense().is_none());
        let mut want = vec![0f32; rows * out];
        Q8Matrix::quantize(&w, out, inner).expect("block-aligned").matmul(&x, rows, &mut want);
        assert_eq!(lin.forward(&x, rows), want);
    }
}
