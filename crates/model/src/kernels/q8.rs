//! Q8_0 weights (blocks of 32 int8 with one f32 scale, as in ggml) and their matrix-vector
//! product with int16-quantized activations. Used for decode, where reading f32 weights would bound the
//! step by memory bandwidth: int8 reads about 3.8x fewer bytes.

use rayon::prelude::*;

use super::{multiversion, SendPtr};

pub const BLOCK: usize = 32;

/// A row-major `[rows][cols]` matrix in Q8_0; `cols` is a multiple of 32.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    pub rows: usize,
    pub cols: usize,
    quants: Vec<i8>,
    scales: Vec<f32>,
}

/// Quantizes one block of 32 values to int8 with a shared scale.
#[inline(always)]
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (v * inv).round() as i8;
    }
    d
}

/// Quantizes `x` (length a multiple of 32) into `q` and per-block `scales`.
fn quantize_row(x: &[f32], q: &mut [i8], scales: &mut [f32]) {
    for ((xb, qb), s) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(scales.iter_mut()) {
        *s = quantize_block(xb, qb);
    }
}

impl Q8Matrix {
    /// Quantizes a row-major f32 matrix; None when `cols` is not a multiple of the block.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || w.len() != rows * cols {
            return None;
        }
        let mut quants = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows * cols / BLOCK];
        quants
            .par_chunks_mut(cols)
            .zip(scales.par_chunks_mut(cols / BLOCK))
            .zip(w.par_chunks(cols))
            .for_each(|((q, s), row)| quantize_row(row, q, s));
        Some(Self { rows, cols, quants, scales })
    }

    pub fn bytes(&self) -> usize {
        self.quants.len() + self.scales.len() * 4
    }

    /// `y[j] = W x[j]` for `n` f32 activation rows (`y` is `[n][rows]`). Activations are
    /// quantized to int16 per block: 8-bit activations flip close top tokens of small models
    /// (their outlier channels crush the other values of a block), 16 bits keep the f32
    /// answer. Each weight row is read once for all activation rows.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let nb = self.cols / BLOCK;
        let mut xq = vec![0i16; n * self.cols];
        let mut xs = vec![0f32; n * nb];
        for j in 0..n {
            quantize_row_i16(&x[j * self.cols..(j + 1) * self.cols], &mut xq[j * self.cols..(j + 1) * self.cols], &mut xs[j * nb..(j + 1) * nb]);
        }
        // Enough chunks for rayon to balance, large enough to amortise the fork.
        let chunk = (self.rows / (4 * rayon::current_num_threads())).max(64);
        let out = SendPtr(y.as_mut_ptr());
        let rows = self.rows;
        (0..self.rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let r0 = c * chunk;
            let r1 = (r0 + chunk).min(self.rows);
            let out = out;
            for r in r0..r1 {
                let q = &self.quants[r * self.cols..(r + 1) * self.cols];
                let s = &self.scales[r * nb..(r + 1) * nb];
                for j in 0..n {
                    let d = dot_q8_i16(q, s, &xq[j * self.cols..(j + 1) * self.cols], &xs[j * nb..(j + 1) * nb]);
                    // SAFETY: weight rows r0..r1 (of every output row) belong to this task alone.
                    unsafe { *out.0.add(j * rows + r) = d };
                }
            }
        });
    }
}

multiversion! {
    /// Quantizes activations to int16 per block of 32, with one f32 scale per block.
    fn quantize_row_i16(x: &[f32], q: &mut [i16], scales: &mut [f32]) -> () {
        for ((xb, qb), s) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(scales.iter_mut()) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 32767.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (o, &v) in qb.iter_mut().zip(xb) {
                *o = (v * inv + 0.5).floor() as i16;
            }
            *s = d;
        }
    }
}

/// Sum over blocks of (int8 weights . int16 activations) * both block scales.
#[inline]
fn dot_q8_i16(wq: &[i8], ws: &[f32], xq: &[i16], xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::avx2_fma() {
        // SAFETY: AVX2 and FMA are present.
        return unsafe { dot_q8_i16_avx2(wq, ws, xq, xs) };
    }
    dot_q8_i16_generic(wq, ws, xq, xs)
}

multiversion! {
    fn dot_q8_i16_generic(wq: &[i8], ws: &[f32], xq: &[i16], xs: &[f32]) -> f32 {
        let mut sum = 0f32;
        for (b, (w, x)) in wq.chunks_exact(BLOCK).zip(xq.chunks_exact(BLOCK)).enumerate() {
            let acc: i32 = w.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum();
            sum += acc as f32 * (ws[b] * xs[b]);
        }
        sum
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q8_i16_avx2(wq: &[i8], ws: &[f32], xq: &[i16], xs: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut total = _mm256_setzero_ps();
    for b in 0..ws.len() {
        let w = wq.as_ptr().add(b * BLOCK);
        let x = xq.as_ptr().add(b * BLOCK);
        let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(w as *const __m128i));
        let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(16) as *const __m128i));
        let x0 = _mm256_loadu_si256(x as *const __m256i);
        let x1 = _mm256_loadu_si256(x.add(16) as *const __m256i);
        // |w| <= 127 and |x| <= 32767: each pair sum fits i32, and so do 16 of them.
        let p = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
        let d = _mm256_set1_ps(*ws.get_unchecked(b) * *xs.get_unchecked(b));
        total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, total);
    }
    let hi = _mm256_extractf128_ps(total, 1);
    let lo = _mm256_castps256_ps128(total);
    let s = _mm_add_ps(hi, lo);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matvec_matches_dequantized_weights() {
        let (rows, cols) = (70, 96);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let x: Vec<f32> = (0..cols).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
        let m = Q8Matrix::quantize(&w, rows, cols).expect("multiple of 32");
        let mut y = vec![0f32; rows];
        m.matmul(&x, 1, &mut y);
        for r in 0..rows {
            let deq = |c: usize| m.quants[r * cols + c] as f32 * m.scales[r * cols / BLOCK + c / BLOCK];
            let exact: f32 = (0..cols).map(|c| deq(c) * x[c]).sum();
            // int16 activations: within 2^-15 of each block's largest value.
            assert!((y[r] - exact).abs() < 1e-3 * (1.0 + exact.abs()), "row {r}: {} vs {exact}", y[r]);
            // Requantization moves each weight by at most half a step (amax / 254).
            let f32_dot: f32 = (0..cols).map(|c| w[r * cols + c] * x[c]).sum();
            let bound: f32 = (0..cols).map(|c| x[c].abs() / 254.0).sum();
            assert!((y[r] - f32_dot).abs() <= bound + 1e-3 * (1.0 + f32_dot.abs()));
            let (mut xq, mut xs) = (vec![0i16; cols], vec![0f32; cols / BLOCK]);
            quantize_row_i16(&x, &mut xq, &mut xs);
            let generic = dot_q8_i16_generic(&m.quants[r * cols..][..cols], &m.scales[r * 3..][..3], &xq, &xs);
            assert!((generic - y[r]).abs() < 1e-5 * (1.0 + exact.abs()), "SIMD and portable kernels agree");
        }
    }

    #[test]
    fn refuses_ragged_columns() {
        assert!(Q8Matrix::quantize(&[0.0; 40], 1, 40).is_none());
    }
}
