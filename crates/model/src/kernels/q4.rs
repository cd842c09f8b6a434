//! Q4_1 weights kept as a GGUF file stores them (blocks of 32 four-bit values `q` with an f16
//! scale `d` and minimum `m`: `w = d * q + m`) and their products with int16-quantized
//! activations, for decode. A decode step reads every weight once and is bound by memory
//! bandwidth; these blocks are 0.625 bytes a weight against Q8_0's 1.125, and they are the
//! file's exact values where a Q8_0 copy would round them again.
//!
//! Rows are interleaved by 8 as in [`super::q8`], so that one 32-bit vector lane accumulates
//! one output row: per block, `dot = sum q * xq` in integers, then
//! `acc = fma(dot, d * xs, acc)` and `acc = fma(m, xs * sum xq, acc)`.

use half::f16;

use super::q8::{interleaved_matmul, Activations, BLOCK, GROUP, LANES, PAIRS};

/// Bytes of one GGUF Q4_1 block: f16 d, f16 m, 16 bytes of nibbles.
pub const Q4_1_BLOCK_BYTES: usize = 20;
/// Nibble bytes of one block of 8 interleaved rows.
const GROUP_BLOCK_BYTES: usize = BLOCK * LANES / 2;

/// A `[rows][cols]` matrix in Q4_1; `cols` is a multiple of 32.
#[derive(Debug, Clone)]
pub struct Q4Matrix {
    pub rows: usize,
    pub cols: usize,
    /// `[group][block][chunk 0..4][32 bytes]`: in chunk c, byte k holds (value pair
    /// `4c + k / 16`, row `k % 16 / 2`, element `k % 2`) in its low nibble and the same for
    /// pair `4c + 2 + k / 16` in its high nibble. A chunk's low and high nibbles widen to
    /// four vectors of 8 rows x one pair.
    quants: Vec<u8>,
    /// `[group][block][d for 8 rows, then m for 8 rows]`.
    dm: Vec<f16>,
}

/// Where value `i` (0..32) of a block sits in a group block's nibbles: (byte, high nibble).
fn nibble_at(lane: usize, i: usize) -> (usize, bool) {
    let (pair, elem) = (i / 2, i % 2);
    let (chunk, within) = (pair / 4, pair % 4);
    let k = (within % 2) * 16 + 2 * lane + elem;
    (chunk * 32 + k, within >= 2)
}

impl Q4Matrix {
    /// Repacks GGUF Q4_1 data (`rows` rows of `cols / 32` blocks, row-major); None when the
    /// shapes do not match it.
    pub fn from_gguf_q4_1(raw: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let nb = cols / BLOCK;
        if !cols.is_multiple_of(BLOCK) || raw.len() != rows * nb * Q4_1_BLOCK_BYTES {
            return None;
        }
        let groups = rows.div_ceil(LANES);
        let mut quants = vec![0u8; groups * nb * GROUP_BLOCK_BYTES];
        let mut dm = vec![f16::ZERO; groups * nb * 2 * LANES];
        for r in 0..rows {
            let (g, lane) = (r / LANES, r % LANES);
            for b in 0..nb {
                let block = &raw[(r * nb + b) * Q4_1_BLOCK_BYTES..][..Q4_1_BLOCK_BYTES];
                let at = (g * nb + b) * 2 * LANES;
                dm[at + lane] = f16::from_le_bytes([block[0], block[1]]);
                dm[at + LANES + lane] = f16::from_le_bytes([block[2], block[3]]);
                let nibbles = &block[4..];
                let dst = &mut quants[(g * nb + b) * GROUP_BLOCK_BYTES..][..GROUP_BLOCK_BYTES];
                for i in 0..BLOCK {
                    // ggml's order: values 0..16 in the low nibbles, 16..32 in the high ones.
                    let v = if i < 16 { nibbles[i] & 0x0f } else { nibbles[i - 16] >> 4 };
                    let (byte, high) = nibble_at(lane, i);
                    dst[byte] |= if high { v << 4 } else { v };
                }
            }
        }
        Some(Self { rows, cols, quants, dm })
    }

    pub fn bytes(&self) -> usize {
        self.quants.len() + 2 * self.dm.len()
    }

    /// Row `r` as f32 (`d * q + m`), for tests and reference paths.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let nb = self.cols / BLOCK;
        let (g, lane) = (r / LANES, r % LANES);
        (0..self.cols)
            .map(|c| {
                let b = c / BLOCK;
                let (byte, high) = nibble_at(lane, c % BLOCK);
                let v = self.quants[(g * nb + b) * GROUP_BLOCK_BYTES + byte];
                let q = if high { v >> 4 } else { v & 0x0f };
                let at = (g * nb + b) * 2 * LANES;
                self.dm[at + lane].to_f32() * q as f32 + self.dm[at + LANES + lane].to_f32()
            })
            .collect()
    }

    /// `y[j] = W x[j]` for `n` f32 activation rows (`y` is `[n][rows]`), with activations
    /// quantized to int16 per block as for [`super::q8::Q8Matrix::matmul`], and the same
    /// guarantee: a row's result does not depend on `n`, the rows beside it or the kernel.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let nb = self.cols / BLOCK;
        let act = Activations::quantize(x, n, self.cols);
        // xs * sum(xq) per block: the minimum's share of each block's dot.
        let sums: Vec<f32> = act
            .q
            .chunks_exact(BLOCK)
            .zip(&act.scales)
            .map(|(qb, &s)| s * qb.iter().map(|&v| v as i32).sum::<i32>() as f32)
            .collect();
        let group_len = nb * GROUP_BLOCK_BYTES;
        interleaved_matmul(self.rows, n, y, |g, j0, out| {
            let q = &self.quants[g * group_len..(g + 1) * group_len];
            let dm = &self.dm[g * nb * 2 * LANES..(g + 1) * nb * 2 * LANES];
            let (xq, xs) = act.rows(j0, out.len());
            group_dots(q, dm, xq, xs, &sums[j0 * nb..(j0 + out.len()) * nb], out);
        });
    }
}

/// `out[j][lane]` = row `lane` of one weight group dotted with activation row `j`, for at
/// most [`GROUP`] rows; `sums` holds `xs * sum xq` per activation block.
fn group_dots(q: &[u8], dm: &[f16], xq: &[i16], xs: &[f32], sums: &[f32], out: &mut [[f32; LANES]]) {
    let (m, nb) = (out.len(), dm.len() / (2 * LANES));
    assert!(
        m <= GROUP && q.len() == nb * GROUP_BLOCK_BYTES && xq.len() == m * nb * BLOCK && xs.len() == m * nb && sums.len() == m * nb
    );
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! run {
            ($kernel:ident) => {
                match m {
                    1 => $kernel::<1>(q, dm, xq, xs, sums, out),
                    2 => $kernel::<2>(q, dm, xq, xs, sums, out),
                    3 => $kernel::<3>(q, dm, xq, xs, sums, out),
                    _ => $kernel::<4>(q, dm, xq, xs, sums, out),
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
    group_dots_portable(q, dm, xq, xs, sums, out);
}

/// [`group_dots`] in plain Rust, in the same order of float operations.
fn group_dots_portable(q: &[u8], dm: &[f16], xq: &[i16], xs: &[f32], sums: &[f32], out: &mut [[f32; LANES]]) {
    let nb = dm.len() / (2 * LANES);
    for (j, o) in out.iter_mut().enumerate() {
        for (lane, acc) in o.iter_mut().enumerate() {
            *acc = 0.0;
            for b in 0..nb {
                let x = &xq[(j * nb + b) * BLOCK..][..BLOCK];
                let nibbles = &q[b * GROUP_BLOCK_BYTES..][..GROUP_BLOCK_BYTES];
                let dot: i32 = (0..BLOCK)
                    .map(|i| {
                        let (byte, high) = nibble_at(lane, i);
                        let v = if high { nibbles[byte] >> 4 } else { nibbles[byte] & 0x0f };
                        v as i32 * x[i] as i32
                    })
                    .sum();
                let (d, mn) = (dm[b * 2 * LANES + lane].to_f32(), dm[b * 2 * LANES + LANES + lane].to_f32());
                *acc = (dot as f32).mul_add(d * xs[j * nb + b], *acc);
                *acc = mn.mul_add(sums[j * nb + b], *acc);
            }
        }
    }
}

/// [`group_dots`] on 256-bit vectors. Each 32-byte chunk widens to four vectors of one value
/// pair for 8 rows; they go to four integer sums per activation row (exact, so the split does
/// not change the result) to keep the multiply-adds independent. `$madd_add(d, w, x)` is
/// `d + vpmaddwd(w, x)`: two instructions on AVX2, one (`vpdpwssd`) with AVX-512 VNNI.
macro_rules! group_kernel {
    ($name:ident, $features:literal, $madd_add:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const M: usize>(q: &[u8], dm: &[f16], xq: &[i16], xs: &[f32], sums: &[f32], out: &mut [[f32; LANES]]) {
            use std::arch::x86_64::*;
            let nb = dm.len() / (2 * LANES);
            let low = _mm256_set1_epi8(0x0f);
            let mut acc = [_mm256_setzero_ps(); M];
            for b in 0..nb {
                let mut dot = [[_mm256_setzero_si256(); 4]; M];
                let wb = q.as_ptr().add(b * GROUP_BLOCK_BYTES);
                for c in 0..4 {
                    let raw = _mm256_loadu_si256(wb.add(32 * c) as *const __m256i);
                    let lo = _mm256_and_si256(raw, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                    let w = [
                        _mm256_cvtepu8_epi16(_mm256_castsi256_si128(lo)),
                        _mm256_cvtepu8_epi16(_mm256_extracti128_si256(lo, 1)),
                        _mm256_cvtepu8_epi16(_mm256_castsi256_si128(hi)),
                        _mm256_cvtepu8_epi16(_mm256_extracti128_si256(hi, 1)),
                    ];
                    for (k, wk) in w.into_iter().enumerate() {
                        let pair = 4 * c + k;
                        for (j, d) in dot.iter_mut().enumerate() {
                            let x = (xq.as_ptr().add((j * nb + b) * BLOCK + 2 * pair) as *const i32).read_unaligned();
                            // 0 <= q <= 15 and |x| <= 32767: a block's 32 products sum within i32.
                            d[k] = $madd_add(d[k], wk, _mm256_set1_epi32(x));
                        }
                    }
                }
                let at = dm.as_ptr().add(b * 2 * LANES) as *const __m128i;
                let dv = _mm256_cvtph_ps(_mm_loadu_si128(at));
                let mv = _mm256_cvtph_ps(_mm_loadu_si128(at.add(1)));
                for (j, a) in acc.iter_mut().enumerate() {
                    let [d0, d1, d2, d3] = dot[j];
                    let d = _mm256_add_epi32(_mm256_add_epi32(d0, d1), _mm256_add_epi32(d2, d3));
                    let scale = _mm256_mul_ps(dv, _mm256_set1_ps(*xs.get_unchecked(j * nb + b)));
                    *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), scale, *a);
                    *a = _mm256_fmadd_ps(mv, _mm256_set1_ps(*sums.get_unchecked(j * nb + b)), *a);
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                _mm256_storeu_ps(o.as_mut_ptr(), a);
            }
        }
    };
}

group_kernel!(group_dots_avx2, "avx2,fma,f16c", |d, w, x| _mm256_add_epi32(d, _mm256_madd_epi16(w, x)));
group_kernel!(group_dots_vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", |d, w, x| _mm256_dpwssd_epi32(d, w, x));

const _: () = assert!(PAIRS == 16, "a group block is four chunks of four pairs");

#[cfg(test)]
mod tests {
    use super::*;

    /// GGUF Q4_1 bytes for a `rows x cols` matrix with varied nibbles, scales and minimums.
    fn gguf_blocks(rows: usize, cols: usize) -> Vec<u8> {
        let mut raw = Vec::new();
        for r in 0..rows {
            for b in 0..cols / BLOCK {
                let d = f16::from_f32(0.01 + ((r * 7 + b * 3) % 11) as f32 * 0.003);
                let m = f16::from_f32(-0.05 - ((r + b) % 5) as f32 * 0.01);
                raw.extend_from_slice(&d.to_le_bytes());
                raw.extend_from_slice(&m.to_le_bytes());
                raw.extend((0..16).map(|i| ((r * 31 + b * 17 + i * 5) % 256) as u8));
            }
        }
        raw
    }

    /// ggml's dequantization of one row.
    fn ggml_row(raw: &[u8], r: usize, cols: usize) -> Vec<f32> {
        let nb = cols / BLOCK;
        let mut row = Vec::with_capacity(cols);
        for b in 0..nb {
            let block = &raw[(r * nb + b) * Q4_1_BLOCK_BYTES..][..Q4_1_BLOCK_BYTES];
            let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
            let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
            row.extend(block[4..].iter().map(|&v| d * (v & 0x0f) as f32 + m));
            row.extend(block[4..].iter().map(|&v| d * (v >> 4) as f32 + m));
        }
        row
    }

    #[test]
    fn repacking_keeps_ggml_values_and_matmul_matches_them() {
        let (rows, cols) = (37, 5 * BLOCK);
        let raw = gguf_blocks(rows, cols);
        let m = Q4Matrix::from_gguf_q4_1(&raw, rows, cols).expect("shapes match");
        assert_eq!(m.bytes(), rows.div_ceil(LANES) * LANES * cols * 5 / 8);
        let x: Vec<f32> = (0..cols).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
        let mut y = vec![0f32; rows];
        m.matmul(&x, 1, &mut y);
        for (r, &got) in y.iter().enumerate() {
            let w = ggml_row(&raw, r, cols);
            assert_eq!(m.dequantize_row(r), w, "row {r} repacked");
            let exact: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
            // int16 activations: within 2^-15 of each block's largest value.
            assert!((got - exact).abs() < 1e-3 * (1.0 + exact.abs()), "row {r}: {got} vs {exact}");
        }
    }

    #[test]
    fn each_row_gets_the_same_bits_in_any_batch_and_kernel() {
        let (rows, cols, n) = (29, 7 * BLOCK, 6);
        let m = Q4Matrix::from_gguf_q4_1(&gguf_blocks(rows, cols), rows, cols).expect("shapes match");
        let x: Vec<f32> = (0..n * cols).map(|i| ((i * 17 % 53) as f32 - 26.0) / 5.0 * if i % 89 == 0 { 40.0 } else { 1.0 }).collect();
        let mut all = vec![0f32; n * rows];
        m.matmul(&x, n, &mut all);
        let nb = cols / BLOCK;
        for j in 0..n {
            let xj = &x[j * cols..(j + 1) * cols];
            let mut one = vec![0f32; rows];
            m.matmul(xj, 1, &mut one);
            assert_eq!(one, all[j * rows..(j + 1) * rows], "row {j} alone and in a batch of {n}");
            let act = Activations::quantize(xj, 1, cols);
            let sums: Vec<f32> =
                act.q.chunks_exact(BLOCK).zip(&act.scales).map(|(qb, &s)| s * qb.iter().map(|&v| v as i32).sum::<i32>() as f32).collect();
            for g in 0..rows.div_ceil(LANES) {
                let q = &m.quants[g * nb * GROUP_BLOCK_BYTES..(g + 1) * nb * GROUP_BLOCK_BYTES];
                let dm = &m.dm[g * nb * 2 * LANES..(g + 1) * nb * 2 * LANES];
                let mut portable = [[0f32; LANES]];
                group_dots_portable(q, dm, &act.q, &act.scales, &sums, &mut portable);
                let valid = LANES.min(rows - g * LANES);
                assert_eq!(portable[0][..valid], one[g * LANES..g * LANES + valid], "row {j}, group {g}: portable kernel");
                #[cfg(target_arch = "x86_64")]
                if crate::kernels::avx2_fma() {
                    let mut avx2 = [[0f32; LANES]];
                    // SAFETY: AVX2, FMA and F16C are present; the slices have group_dots' shapes.
                    unsafe { group_dots_avx2::<1>(q, dm, &act.q, &act.scales, &sums, &mut avx2) };
                    assert_eq!(avx2, portable, "row {j}, group {g}: AVX2 kernel");
                }
            }
        }
    }

    #[test]
    fn refuses_data_of_another_shape() {
        let raw = gguf_blocks(3, 2 * BLOCK);
        assert!(Q4Matrix::from_gguf_q4_1(&raw, 3, 2 * BLOCK).is_some());
        assert!(Q4Matrix::from_gguf_q4_1(&raw, 4, 2 * BLOCK).is_none());
        assert!(Q4Matrix::from_gguf_q4_1(&raw[..raw.len() - 1], 3, 2 * BLOCK).is_none());
    }
}
