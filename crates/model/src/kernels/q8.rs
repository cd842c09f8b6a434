//! Q8_0 weights (blocks of 32 int8 with one f32 scale, as in ggml) and their products with
//! int16-quantized activations. Used for decode, where reading f32 weights would bound the
//! step by memory bandwidth: int8 reads about 3.8x fewer bytes.
//!
//! The weights are stored with 8 rows interleaved, so that one vector lane computes one
//! output row: a block's 32 products accumulate in integer lanes with no horizontal sums,
//! and each activation value is broadcast once for 8 rows. Up to 4 activation rows (a
//! decode batch) share each read of the weights.

use rayon::prelude::*;

use super::{multiversion, SendPtr};

pub const BLOCK: usize = 32;
/// Weight rows per interleaved group: one per 32-bit lane of a 256-bit vector.
pub(super) const LANES: usize = 8;
/// Activation pairs per block (int16 products are taken in pairs).
pub(super) const PAIRS: usize = BLOCK / 2;
/// Activation rows that share one read of a weight group.
pub(super) const GROUP: usize = 4;

/// A `[rows][cols]` matrix in Q8_0; `cols` is a multiple of 32. Stored by groups of 8 rows:
/// for each group and block, 16 pairs of 8 rows x 2 int8, then the group's 8 block scales.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    pub rows: usize,
    pub cols: usize,
    /// `[group][block][pair][row in group][2]`.
    quants: Vec<i8>,
    /// `[group][block][row in group]`.
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

impl Q8Matrix {
    /// Quantizes a row-major f32 matrix; None when `cols` is not a multiple of the block.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || w.len() != rows * cols {
            return None;
        }
        let nb = cols / BLOCK;
        let groups = rows.div_ceil(LANES);
        let mut quants = vec![0i8; groups * nb * BLOCK * LANES];
        let mut scales = vec![0f32; groups * nb * LANES];
        quants.par_chunks_mut(nb * BLOCK * LANES).zip(scales.par_chunks_mut(nb * LANES)).enumerate().for_each(|(g, (q, s))| {
            let mut block = [0i8; BLOCK];
            for lane in 0..LANES.min(rows - g * LANES) {
                let row = &w[(g * LANES + lane) * cols..][..cols];
                for (b, xb) in row.chunks_exact(BLOCK).enumerate() {
                    s[b * LANES + lane] = quantize_block(xb, &mut block);
                    for (p, pair) in block.chunks_exact(2).enumerate() {
                        let at = (b * PAIRS + p) * 2 * LANES + 2 * lane;
                        q[at..at + 2].copy_from_slice(pair);
                    }
                }
            }
        });
        Some(Self { rows, cols, quants, scales })
    }

    pub fn bytes(&self) -> usize {
        self.quants.len() + self.scales.len() * 4
    }

    /// `y[j] = W x[j]` for `n` f32 activation rows (`y` is `[n][rows]`). Activations are
    /// quantized to int16 per block: 8-bit activations flip close top tokens of small models
    /// (their outlier channels crush the other values of a block), 16 bits keep the f32
    /// answer. Each output is computed in one fixed order of operations whatever `n` is and
    /// whichever kernel runs, so a row's result never depends on the rows beside it.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let nb = self.cols / BLOCK;
        let act = Activations::quantize(x, n, self.cols);
        let group_len = nb * BLOCK * LANES;
        interleaved_matmul(self.rows, n, y, |g, j0, out| {
            let q = &self.quants[g * group_len..(g + 1) * group_len];
            let s = &self.scales[g * nb * LANES..(g + 1) * nb * LANES];
            let (xq, xs) = act.rows(j0, out.len());
            group_dots(q, s, xq, xs, out);
        });
    }
}

/// Activation rows quantized to int16 per block of 32, with one f32 scale per block: what the
/// interleaved kernels (Q8_0 and Q4_1) multiply.
pub(super) struct Activations {
    cols: usize,
    pub q: Vec<i16>,
    pub scales: Vec<f32>,
}

impl Activations {
    pub fn quantize(x: &[f32], n: usize, cols: usize) -> Self {
        assert!(x.len() == n * cols && cols.is_multiple_of(BLOCK), "activation shapes");
        let nb = cols / BLOCK;
        let mut q = vec![0i16; n * cols];
        let mut scales = vec![0f32; n * nb];
        for j in 0..n {
            quantize_row_i16(&x[j * cols..(j + 1) * cols], &mut q[j * cols..(j + 1) * cols], &mut scales[j * nb..(j + 1) * nb]);
        }
        Self { cols, q, scales }
    }

    /// Values and scales of rows `j0..j0 + m`.
    pub fn rows(&self, j0: usize, m: usize) -> (&[i16], &[f32]) {
        let nb = self.cols / BLOCK;
        (&self.q[j0 * self.cols..(j0 + m) * self.cols], &self.scales[j0 * nb..(j0 + m) * nb])
    }
}

/// The parallel loop of an interleaved product with `rows` weight rows and `n` activation
/// rows: `dots(g, j0, out)` fills `out[j][lane]` with weight row `8g + lane` dotted with
/// activation row `j0 + j`, for at most [`GROUP`] activation rows at a time, and this writes
/// them into `y` (`[n][rows]`).
pub(super) fn interleaved_matmul(rows: usize, n: usize, y: &mut [f32], dots: impl Fn(usize, usize, &mut [[f32; LANES]]) + Sync) {
    assert_eq!(y.len(), n * rows, "matmul shapes");
    let groups = rows.div_ceil(LANES);
    // Enough tasks for rayon to balance, large enough to amortise the fork.
    let per_task = (groups / (4 * rayon::current_num_threads())).max(8);
    let out = SendPtr(y.as_mut_ptr());
    (0..groups.div_ceil(per_task)).into_par_iter().for_each(|t| {
        let out = out;
        let mut d = [[0f32; LANES]; GROUP];
        for g in t * per_task..((t + 1) * per_task).min(groups) {
            let valid = LANES.min(rows - g * LANES);
            for j0 in (0..n).step_by(GROUP) {
                let m = GROUP.min(n - j0);
                dots(g, j0, &mut d[..m]);
                for (j, dj) in d[..m].iter().enumerate() {
                    for (lane, &v) in dj[..valid].iter().enumerate() {
                        // SAFETY: output rows of groups t*per_task.. belong to this task alone,
                        // and (j0 + j, g * 8 + lane) is inside the n x rows output.
                        unsafe { *out.0.add((j0 + j) * rows + g * LANES + lane) = v };
                    }
                }
            }
        }
    });
}

/// `out[j][lane]` = row `lane` of one weight group (quants `q`, scales `s`) dotted with
/// activation row `j` of `xq` (int16, scales `xs`), for at most [`GROUP`] rows.
///
/// The order of float operations is fixed: each block's integer dot is exact, then
/// `acc = fma(dot_b as f32, ws[b] * xs[b], acc)` over the blocks in order.
fn group_dots(q: &[i8], s: &[f32], xq: &[i16], xs: &[f32], out: &mut [[f32; LANES]]) {
    let (m, nb) = (out.len(), s.len() / LANES);
    assert!(m <= GROUP && q.len() == nb * BLOCK * LANES && xq.len() == m * nb * BLOCK && xs.len() == m * nb);
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! run {
            ($kernel:ident) => {
                match m {
                    1 => $kernel::<1, 2>(q, s, xq, xs, out),
                    2 => $kernel::<2, 2>(q, s, xq, xs, out),
                    3 => $kernel::<3, 1>(q, s, xq, xs, out),
                    _ => $kernel::<4, 1>(q, s, xq, xs, out),
                }
            };
        }
        if super::avx512_vnni() {
            // SAFETY: the CPU has the kernel's features; the assert bounds every read.
            return unsafe { run!(group_dots_vnni) };
        }
        if super::avx2_fma() {
            // SAFETY: as above.
            return unsafe { run!(group_dots_avx2) };
        }
    }
    group_dots_portable(q, s, xq, xs, out);
}

/// [`group_dots`] in plain Rust, in the same order of float operations.
fn group_dots_portable(q: &[i8], s: &[f32], xq: &[i16], xs: &[f32], out: &mut [[f32; LANES]]) {
    let nb = s.len() / LANES;
    for (j, o) in out.iter_mut().enumerate() {
        for (lane, acc) in o.iter_mut().enumerate() {
            *acc = 0.0;
            for b in 0..nb {
                let x = &xq[(j * nb + b) * BLOCK..][..BLOCK];
                let dot: i32 = (0..BLOCK)
                    .map(|k| q[(b * PAIRS + k / 2) * 2 * LANES + 2 * lane + k % 2] as i32 * x[k] as i32)
                    .sum();
                *acc = (dot as f32).mul_add(s[b * LANES + lane] * xs[j * nb + b], *acc);
            }
        }
    }
}

/// [`group_dots`] on 256-bit vectors: lane r of a vector is weight row r; each pair of
/// activation values is broadcast and multiplied into all 8 rows at once. `K` integer sums
/// per row shorten the dependency chain where registers allow (integer addition is exact,
/// so neither the split nor the instruction changes the result). `$madd_add(d, w, x)` is
/// `d + vpmaddwd(w, x)`: two instructions on AVX2, one (`vpdpwssd`) with AVX-512 VNNI.
macro_rules! group_kernel {
    ($name:ident, $features:literal, $madd_add:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const M: usize, const K: usize>(q: &[i8], s: &[f32], xq: &[i16], xs: &[f32], out: &mut [[f32; LANES]]) {
            use std::arch::x86_64::*;
            let nb = s.len() / LANES;
            let mut acc = [_mm256_setzero_ps(); M];
            for b in 0..nb {
                let mut dot = [[_mm256_setzero_si256(); K]; M];
                let wb = q.as_ptr().add(b * BLOCK * LANES);
                for p in 0..PAIRS {
                    let w = _mm256_cvtepi8_epi16(_mm_loadu_si128(wb.add(p * 2 * LANES) as *const __m128i));
                    for (j, d) in dot.iter_mut().enumerate() {
                        let pair = (xq.as_ptr().add((j * nb + b) * BLOCK + 2 * p) as *const i32).read_unaligned();
                        // |w| <= 127 and |x| <= 32767: a block's 32 products sum within i32.
                        d[p % K] = $madd_add(d[p % K], w, _mm256_set1_epi32(pair));
                    }
                }
                let ws = _mm256_loadu_ps(s.as_ptr().add(b * LANES));
                for (j, a) in acc.iter_mut().enumerate() {
                    let scale = _mm256_mul_ps(ws, _mm256_set1_ps(*xs.get_unchecked(j * nb + b)));
                    let d = dot[j][1..].iter().fold(dot[j][0], |a, &b| _mm256_add_epi32(a, b));
                    *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), scale, *a);
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                _mm256_storeu_ps(o.as_mut_ptr(), a);
            }
        }
    };
}

group_kernel!(group_dots_avx2, "avx2,fma", |d, w, x| _mm256_add_epi32(d, _mm256_madd_epi16(w, x)));
group_kernel!(group_dots_vnni, "avx2,fma,avx512f,avx512vl,avx512vnni", |d, w, x| _mm256_dpwssd_epi32(d, w, x));

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Row r of the matrix as stored: its int8 values and block scales.
    fn row(m: &Q8Matrix, r: usize) -> (Vec<i8>, Vec<f32>) {
        let nb = m.cols / BLOCK;
        let (g, lane) = (r / LANES, r % LANES);
        let q = &m.quants[g * nb * BLOCK * LANES..];
        let vals = (0..m.cols).map(|c| q[((c / BLOCK) * PAIRS + (c % BLOCK) / 2) * 2 * LANES + 2 * lane + c % 2]).collect();
        let scales = (0..nb).map(|b| m.scales[(g * nb + b) * LANES + lane]).collect();
        (vals, scales)
    }

    #[test]
    fn matvec_matches_dequantized_weights() {
        let (rows, cols) = (70, 96);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let x: Vec<f32> = (0..cols).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
        let m = Q8Matrix::quantize(&w, rows, cols).expect("multiple of 32");
        let mut y = vec![0f32; rows];
        m.matmul(&x, 1, &mut y);
        for r in 0..rows {
            let (vals, scales) = row(&m, r);
            let exact: f32 = (0..cols).map(|c| vals[c] as f32 * scales[c / BLOCK] * x[c]).sum();
            // int16 activations: within 2^-15 of each block's largest value.
            assert!((y[r] - exact).abs() < 1e-3 * (1.0 + exact.abs()), "row {r}: {} vs {exact}", y[r]);
            // Requantization moves each weight by at most half a step (amax / 254).
            let f32_dot: f32 = (0..cols).map(|c| w[r * cols + c] * x[c]).sum();
            let bound: f32 = (0..cols).map(|c| x[c].abs() / 254.0).sum();
            assert!((y[r] - f32_dot).abs() <= bound + 1e-3 * (1.0 + f32_dot.abs()));
        }
    }

    #[test]
    fn each_row_gets_the_same_bits_in_any_batch_and_kernel() {
        let (rows, cols) = (43, 11 * BLOCK);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 41 % 97) as f32 - 48.0) / 30.0).collect();
        let m = Q8Matrix::quantize(&w, rows, cols).expect("multiple of 32");
        let n = 7;
        let x: Vec<f32> = (0..n * cols).map(|i| ((i * 17 % 53) as f32 - 26.0) / 5.0 * if i % 97 == 0 { 40.0 } else { 1.0 }).collect();
        let mut all = vec![0f32; n * rows];
        m.matmul(&x, n, &mut all);
        let nb = cols / BLOCK;
        for j in 0..n {
            let mut one = vec![0f32; rows];
            m.matmul(&x[j * cols..(j + 1) * cols], 1, &mut one);
            assert_eq!(one, all[j * rows..(j + 1) * rows], "row {j} alone and in a batch of {n}");
            let (mut xq, mut xs) = (vec![0i16; cols], vec![0f32; nb]);
            quantize_row_i16(&x[j * cols..(j + 1) * cols], &mut xq, &mut xs);
            for g in 0..rows.div_ceil(LANES) {
                let mut portable = [[0f32; LANES]];
                let q = &m.quants[g * nb * BLOCK * LANES..(g + 1) * nb * BLOCK * LANES];
                let scales = &m.scales[g * nb * LANES..(g + 1) * nb * LANES];
                group_dots_portable(q, scales, &xq, &xs, &mut portable);
                let valid = LANES.min(rows - g * LANES);
                assert_eq!(portable[0][..valid], one[g * LANES..g * LANES + valid], "row {j}, group {g}: portable kernel");
                #[cfg(target_arch = "x86_64")]
                if crate::kernels::avx2_fma() {
                    let mut avx2 = [[0f32; LANES]];
                    // SAFETY: AVX2 and FMA are present; the slices have the shapes asserted above.
                    unsafe { group_dots_avx2::<1, 2>(q, scales, &xq, &xs, &mut avx2) };
                    assert_eq!(avx2, portable, "row {j}, group {g}: AVX2 kernel");
                }
            }
        }
    }

    #[test]
    fn refuses_ragged_columns() {
        assert!(Q8Matrix::quantize(&[0.0; 40], 1, 40).is_none());
    }
}
