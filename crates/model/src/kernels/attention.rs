//! Causal attention over explicit token positions, flash-style: queries and keys are walked
//! in tiles with an online softmax, so no full T x T matrix is ever formed. The query heads of
//! one key/value group are stacked into one tile, so K and V are read once per group and never
//! copied per head. Masking is by original position: a query at position p sees keys at
//! positions <= p (and, on a sliding-window layer, > p - window), whichever order the keys
//! are stored in.

use gemm::Parallelism;
use rayon::prelude::*;

use super::kv::{KvElem, KvSlice};
use super::math::{exp_sub_sum, max, scale};
use super::SendPtr;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// A local layer's window: a query sees the keys less than this many positions before it.
    pub window: Option<u32>,
}

impl AttnShape {
    /// Whether a query at `qpos` sees the key at `kpos`.
    #[inline]
    fn sees(&self, qpos: u32, kpos: u32) -> bool {
        kpos <= qpos && self.window.is_none_or(|w| qpos - kpos < w)
    }

    /// Whether no key in `kmin..=kmax` is seen by any query in `qmin..=qmax`.
    fn hides_range(&self, (qmin, qmax): (u32, u32), (kmin, kmax): (u32, u32)) -> bool {
        kmin > qmax || self.window.is_some_and(|w| qmin.saturating_sub(kmax) >= w)
    }
}

/// Rows of a `[token][heads][head_dim]` buffer with `stride` elements between tokens.
#[derive(Clone, Copy)]
pub struct Rows<'a, T = f32> {
    pub data: &'a [T],
    pub stride: usize,
}

/// Stored K or V rows, f32 or f16.
#[derive(Clone, Copy)]
pub struct KvRows<'a> {
    pub data: KvSlice<'a>,
    pub stride: usize,
}

const QUERY_TILE: usize = 64;
/// Up to this many queries (decode steps) take the split-key path.
const FEW_QUERIES: usize = 4;
/// Keys per task on the split-key path.
const KEY_SPLIT: usize = 256;

/// Partial softmax state of one query head over a range of keys.
struct Partial {
    m: f32,
    l: f32,
    acc: Vec<f32>,
}

/// `out[t] = q . k_t` for the rows `k_t` at `k[t * stride..]`, `t < out.len()`.
fn key_dots<T: KvElem>(q: &[f32], k: &[T], stride: usize, out: &mut [f32]) {
    let d = q.len();
    let mut t = 0;
    #[cfg(target_arch = "x86_64")]
    if super::avx2_fma() && d.is_multiple_of(8) {
        while t + 8 <= out.len() {
            assert!((t + 7) * stride + d <= k.len());
            // SAFETY: AVX2+FMA+F16C present; the assert bounds all 8 rows read.
            unsafe { dots8_avx2(q, k.as_ptr().add(t * stride), stride, out.as_mut_ptr().add(t)) };
            t += 8;
        }
    }
    for (i, o) in out.iter_mut().enumerate().skip(t) {
        *o = q.iter().zip(&k[i * stride..i * stride + d]).map(|(a, b)| a * b.get()).sum();
    }
}

/// Eight dot products at once, reduced with a transpose of horizontal adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots8_avx2<T: KvElem>(q: &[f32], k: *const T, stride: usize, out: *mut f32) {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 8];
    for c in (0..q.len()).step_by(8) {
        let qv = _mm256_loadu_ps(q.as_ptr().add(c));
        for (t, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(qv, T::load8(k.add(t * stride + c)), *a);
        }
    }
    let s01 = _mm256_hadd_ps(acc[0], acc[1]);
    let s23 = _mm256_hadd_ps(acc[2], acc[3]);
    let s45 = _mm256_hadd_ps(acc[4], acc[5]);
    let s67 = _mm256_hadd_ps(acc[6], acc[7]);
    let s0123 = _mm256_hadd_ps(s01, s23);
    let s4567 = _mm256_hadd_ps(s45, s67);
    let lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
    let hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
    _mm256_storeu_ps(out, _mm256_add_ps(lo, hi));
}

/// `acc += sum_t w[t] * v_t` for the rows `v_t` at `v[t * stride..]`.
fn weighted_rows<T: KvElem>(acc: &mut [f32], w: &[f32], v: &[T], stride: usize) {
    let d = acc.len();
    if let Some(last) = w.len().checked_sub(1) {
        assert!(last * stride + d <= v.len());
    }
    #[cfg(target_arch = "x86_64")]
    if super::avx2_fma() && d.is_multiple_of(64) {
        // Blocks of 64 columns (Gemma's head_dim 256 takes four).
        for (c, block) in acc.chunks_exact_mut(64).enumerate() {
            // SAFETY: features present; rows bounded by the assert above, block c inside d.
            unsafe { weighted_rows64_avx2(block, w, v.as_ptr().add(64 * c), stride) };
        }
        return;
    }
    for (t, &wt) in w.iter().enumerate() {
        if wt != 0.0 {
            for (a, x) in acc.iter_mut().zip(&v[t * stride..t * stride + d]) {
                *a += wt * x.get();
            }
        }
    }
}

/// [`weighted_rows`] for head_dim 64 with the accumulator held in eight registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_rows64_avx2<T: KvElem>(acc: &mut [f32], w: &[f32], v: *const T, stride: usize) {
    use std::arch::x86_64::*;
    let mut a = [_mm256_setzero_ps(); 8];
    for (c, r) in a.iter_mut().enumerate() {
        *r = _mm256_loadu_ps(acc.as_ptr().add(8 * c));
    }
    for (t, &wt) in w.iter().enumerate() {
        let wv = _mm256_set1_ps(wt);
        let row = v.add(t * stride);
        for (c, r) in a.iter_mut().enumerate() {
            *r = _mm256_fmadd_ps(wv, T::load8(row.add(8 * c)), *r);
        }
    }
    for (c, r) in a.iter().enumerate() {
        _mm256_storeu_ps(acc.as_mut_ptr().add(8 * c), *r);
    }
}

/// Decode-shaped attention: a handful of queries against many keys. Work is split over key
/// ranges (and groups) so that every thread streams its share of K and V once; the partial
/// softmax states are merged at the end.
fn few_query_attention<T: KvElem>(
    shape: AttnShape,
    q: Rows<'_>,
    qpos: &[u32],
    k: Rows<'_, T>,
    v: Rows<'_, T>,
    kpos: &[u32],
    out: &mut [f32],
) {
    let AttnShape { heads, kv_heads, head_dim: d, .. } = shape;
    let rep = heads / kv_heads;
    let nq = qpos.len();
    let splits = kpos.len().div_ceil(KEY_SPLIT).max(1);
    let qrange = (*qpos.iter().min().unwrap_or(&0), *qpos.iter().max().unwrap_or(&0));
    let sm_scale = 1.0 / (d as f32).sqrt();
    // partials[(g * splits + c)] holds nq * rep states.
    let partials: Vec<Vec<Partial>> = (0..kv_heads * splits)
        .into_par_iter()
        .map(|task| {
            let (g, c) = (task / splits, task % splits);
            let k0 = c * KEY_SPLIT;
            let k1 = (k0 + KEY_SPLIT).min(kpos.len());
            let mut states = Vec::with_capacity(nq * rep);
            let kp = &kpos[k0..k1];
            let krange = kp.iter().fold((u32::MAX, 0), |(lo, hi), &p| (lo.min(p), hi.max(p)));
            if shape.hides_range(qrange, krange) {
                // Keys outside every query's window (older than a local layer's): skip them.
                states.extend((0..nq * rep).map(|_| Partial { m: f32::NEG_INFINITY, l: 0.0, acc: vec![0f32; d] }));
                return states;
            }
            let mut s = vec![0f32; k1 - k0];
            for (i, &p) in qpos.iter().enumerate() {
                for j in 0..rep {
                    let qh = &q.data[i * q.stride + (g * rep + j) * d..][..d];
                    let kg = &k.data[k0 * k.stride + g * d..];
                    key_dots(qh, kg, k.stride, &mut s);
                    for (x, &kp) in s.iter_mut().zip(kp) {
                        *x = if shape.sees(p, kp) { *x * sm_scale } else { f32::NEG_INFINITY };
                    }
                    let m = max(&s);
                    let mut acc = vec![0f32; d];
                    let l = if m == f32::NEG_INFINITY {
                        0.0
                    } else {
                        let l = exp_sub_sum(&mut s, m);
                        weighted_rows(&mut acc, &s, &v.data[k0 * v.stride + g * d..], v.stride);
                        l
                    };
                    states.push(Partial { m, l, acc });
                }
            }
            states
        })
        .collect();
    for g in 0..kv_heads {
        for i in 0..nq {
            for j in 0..rep {
                let parts = (0..splits).map(|c| &partials[g * splits + c][i * rep + j]);
                let m = parts.clone().fold(f32::NEG_INFINITY, |m, p| m.max(p.m));
                let dst = &mut out[(i * heads + g * rep + j) * d..][..d];
                dst.fill(0.0);
                if m == f32::NEG_INFINITY {
                    continue;
                }
                let mut l = 0.0;
                for p in parts {
                    let w = super::math::exp_approx(p.m - m);
                    l += p.l * w;
                    super::math::axpy(dst, w, &p.acc);
                }
                scale(dst, 1.0 / l);
            }
        }
    }
}

/// `out[t][h] = softmax(q[t][h] K_g^T / sqrt(d), masked by position) V_g`, g = h's group.
/// `out` is `[nq][heads][head_dim]`, contiguous.
pub fn causal_attention(
    shape: AttnShape,
    q: Rows<'_>,
    qpos: &[u32],
    k: KvRows<'_>,
    v: KvRows<'_>,
    kpos: &[u32],
    out: &mut [f32],
) {
    assert_eq!(out.len(), qpos.len() * shape.heads * shape.head_dim);
    match (k.data, v.data) {
        (KvSlice::F32(kd), KvSlice::F32(vd)) if qpos.len() <= FEW_QUERIES => {
            few_query_attention(shape, q, qpos, Rows { data: kd, stride: k.stride }, Rows { data: vd, stride: v.stride }, kpos, out)
        }
        (KvSlice::F16(kd), KvSlice::F16(vd)) if qpos.len() <= FEW_QUERIES => {
            few_query_attention(shape, q, qpos, Rows { data: kd, stride: k.stride }, Rows { data: vd, stride: v.stride }, kpos, out)
        }
        _ => {
            // Tiles run on f32 GEMM: widen f16 rows once per call (cheap next to the tiles).
            let (kd, vd) = (k.data.to_f32(), v.data.to_f32());
            tiled_attention(shape, q, qpos, Rows { data: &kd, stride: k.stride }, Rows { data: &vd, stride: v.stride }, kpos, out)
        }
    }
}

/// Prompt-shaped attention: query tiles x key tiles on GEMM with an online softmax.
fn tiled_attention(
    shape: AttnShape,
    q: Rows<'_>,
    qpos: &[u32],
    k: Rows<'_>,
    v: Rows<'_>,
    kpos: &[u32],
    out: &mut [f32],
) {
    let AttnShape { heads, kv_heads, head_dim: d, .. } = shape;
    let nq = qpos.len();
    let nk = kpos.len();
    let rep = heads / kv_heads;
    let key_tile = 256;
    let key_tiles: Vec<(u32, u32)> = kpos
        .chunks(key_tile)
        .map(|c| (*c.iter().min().unwrap(), *c.iter().max().unwrap()))
        .collect();
    let q_tiles = nq.div_ceil(QUERY_TILE);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let sm_scale = 1.0 / (d as f32).sqrt();

    (0..kv_heads * q_tiles).into_par_iter().for_each(|task| {
        let g = task % kv_heads;
        let qt = task / kv_heads;
        let q0 = qt * QUERY_TILE;
        let q1 = (q0 + QUERY_TILE).min(nq);
        let rows = (q1 - q0) * rep;
        let qp = &qpos[q0..q1];
        let (qmin, qmax) = (*qp.iter().min().unwrap(), *qp.iter().max().unwrap());

        // Row r = (query i, head j of the group), pre-scaled.
        let mut qt_buf = vec![0f32; rows * d];
        for i in 0..q1 - q0 {
            for j in 0..rep {
                let src = &q.data[(q0 + i) * q.stride + (g * rep + j) * d..][..d];
                let dst = &mut qt_buf[(i * rep + j) * d..][..d];
                for (o, &x) in dst.iter_mut().zip(src) {
                    *o = x * sm_scale;
                }
            }
        }
        let mut acc = vec![0f32; rows * d];
        let mut m = vec![f32::NEG_INFINITY; rows];
        let mut l = vec![0f32; rows];
        let mut s = vec![0f32; rows * key_tile];

        for (kt, &(kmin, kmax)) in key_tiles.iter().enumerate() {
            if shape.hides_range((qmin, qmax), (kmin, kmax)) {
                continue;
            }
            let k0 = kt * key_tile;
            let bk = (k0 + key_tile).min(nk) - k0;
            let s = &mut s[..rows * bk];
            // SAFETY: every pointer/stride pair addresses the matrices described.
            unsafe {
                gemm::gemm(
                    rows, bk, d,
                    s.as_mut_ptr(), 1, bk as isize,
                    false,
                    qt_buf.as_ptr(), 1, d as isize,
                    k.data.as_ptr().add(k0 * k.stride + g * d), k.stride as isize, 1,
                    0.0, 1.0,
                    false, false, false,
                    Parallelism::None,
                );
            }
            // Unless every query sees every key of the tile.
            if kmax > qmin || shape.window.is_some_and(|w| qmax - kmin >= w) {
                let kp = &kpos[k0..k0 + bk];
                for (i, &p) in qp.iter().enumerate() {
                    for j in 0..rep {
                        let row = &mut s[(i * rep + j) * bk..][..bk];
                        for (x, &kp) in row.iter_mut().zip(kp) {
                            if !shape.sees(p, kp) {
                                *x = f32::NEG_INFINITY;
                            }
                        }
                    }
                }
            }
            for r in 0..rows {
                let row = &mut s[r * bk..(r + 1) * bk];
                let tile_max = max(row);
                if tile_max == f32::NEG_INFINITY {
                    row.fill(0.0);
                    continue;
                }
                let m_new = m[r].max(tile_max);
                let alpha = super::math::exp_approx(m[r] - m_new);
                let sum = exp_sub_sum(row, m_new);
                l[r] = l[r] * alpha + sum;
                m[r] = m_new;
                if alpha != 1.0 {
                    scale(&mut acc[r * d..(r + 1) * d], alpha);
                }
            }
            // SAFETY: as above; acc is rows x d.
            unsafe {
                gemm::gemm(
                    rows, d, bk,
                    acc.as_mut_ptr(), 1, d as isize,
                    true,
                    s.as_ptr(), 1, bk as isize,
                    v.data.as_ptr().add(k0 * v.stride + g * d), 1, v.stride as isize,
                    1.0, 1.0,
                    false, false, false,
                    Parallelism::None,
                );
            }
        }

        let out_ptr = out_ptr;
        for i in 0..q1 - q0 {
            for j in 0..rep {
                let r = i * rep + j;
                let inv = if l[r] > 0.0 { 1.0 / l[r] } else { 0.0 };
                // SAFETY: (query q0+i, head g*rep+j) is written by this task alone.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(out_ptr.0.add(((q0 + i) * heads + g * rep + j) * d), d)
                };
                for (o, &a) in dst.iter_mut().zip(&acc[r * d..(r + 1) * d]) {
                    *o = a * inv;
                }
            }
        }
    });
}

/// LazyLLM importance (arXiv 2407.14057, eq. 1): the attention probabilities of one query
/// (`q`, `[heads][head_dim]` at position `qpos`) over the keys it may see, averaged over heads.
/// Keys it may not see (after qpos, or outside a local layer's window) score 0. Returns one
/// score per key row.
pub fn query_scores(shape: AttnShape, q: &[f32], qpos: u32, k: KvRows<'_>, kpos: &[u32]) -> Vec<f32> {
    let AttnShape { heads, kv_heads, head_dim: d, .. } = shape;
    let rep = heads / kv_heads;
    let sm_scale = 1.0 / (d as f32).sqrt();
    let mut total = vec![0f32; kpos.len()];
    let mut row = vec![0f32; kpos.len()];
    for h in 0..heads {
        let g = h / rep;
        let qh = &q[h * d..(h + 1) * d];
        match k.data {
            KvSlice::F32(kd) => key_dots(qh, &kd[g * d..], k.stride, &mut row),
            KvSlice::F16(kd) => key_dots(qh, &kd[g * d..], k.stride, &mut row),
        }
        for (x, &p) in row.iter_mut().zip(kpos) {
            *x = if shape.sees(qpos, p) { *x * sm_scale } else { f32::NEG_INFINITY };
        }
        let mx = max(&row);
        let sum = exp_sub_sum(&mut row, mx);
        let w = 1.0 / (sum * heads as f32);
        for (a, &x) in total.iter_mut().zip(&row) {
            *a += x * w;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0).collect()
    }

    /// Plain softmax attention, one query and head at a time.
    fn naive(shape: AttnShape, q: &[f32], qpos: &[u32], k: &[f32], v: &[f32], kpos: &[u32]) -> Vec<f32> {
        let AttnShape { heads, kv_heads, head_dim: d, .. } = shape;
        let (qs, ks) = (heads * d, kv_heads * d);
        let mut out = vec![0f32; qpos.len() * qs];
        for (t, &p) in qpos.iter().enumerate() {
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let scores: Vec<f32> = kpos
                    .iter()
                    .enumerate()
                    .map(|(j, &kp)| {
                        if kp > p || shape.window.is_some_and(|w| p - kp >= w) {
                            return f32::NEG_INFINITY;
                        }
                        (0..d).map(|c| q[t * qs + h * d + c] * k[j * ks + g * d + c]).sum::<f32>()
                            / (d as f32).sqrt()
                    })
                    .collect();
                let mx = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f32 = e.iter().sum();
                for c in 0..d {
                    out[t * qs + h * d + c] =
                        e.iter().enumerate().map(|(j, w)| w * v[j * ks + g * d + c]).sum::<f32>() / z;
                }
            }
        }
        out
    }

    /// Runs the kernel on `k`/`v` (as stored) and checks it against the naive attention on
    /// `kf`/`vf` (the same values in f32).
    fn check(shape: AttnShape, qpos: &[u32], kpos: &[u32], kv: (KvSlice<'_>, KvSlice<'_>), kf: &[f32], vf: &[f32]) {
        let (qs, ks) = (shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim);
        let q = data(qpos.len() * qs, qpos.len());
        let mut out = vec![0f32; q.len()];
        let rows = |data| KvRows { data, stride: ks };
        causal_attention(shape, Rows { data: &q, stride: qs }, qpos, rows(kv.0), rows(kv.1), kpos, &mut out);
        let want = naive(shape, &q, qpos, kf, vf, kpos);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn matches_naive_with_gqa_and_scattered_positions() {
        let shape = AttnShape { heads: 6, kv_heads: 2, head_dim: 16, window: None };
        // Keys out of order and with gaps, as after pruning and revival.
        let mut kpos: Vec<u32> = (0..300).map(|i| i * 2).collect();
        kpos.swap(3, 250);
        kpos.swap(100, 7);
        let qpos: Vec<u32> = vec![1, 2, 50, 51, 200, 333, 598, 599].into_iter().cycle().take(90).collect();
        let (k, v) = (data(kpos.len() * 32, 2), data(kpos.len() * 32, 3));
        check(shape, &qpos, &kpos, (KvSlice::F32(&k), KvSlice::F32(&v)), &k, &v);
    }

    #[test]
    fn few_queries_match_naive() {
        let shape = AttnShape { heads: 6, kv_heads: 2, head_dim: 16, window: None };
        let mut kpos: Vec<u32> = (0..700).collect();
        kpos.swap(10, 600);
        let (k, v) = (data(kpos.len() * 32, 2), data(kpos.len() * 32, 3));
        for qpos in [vec![699u32], vec![5, 650, 699]] {
            check(shape, &qpos, &kpos, (KvSlice::F32(&k), KvSlice::F32(&v)), &k, &v);
        }
    }

    #[test]
    fn f16_rows_match_naive_on_rounded_values() {
        use half::f16;
        let shape = AttnShape { heads: 6, kv_heads: 2, head_dim: 64, window: None };
        let kpos: Vec<u32> = (0..300).collect();
        let round = |x: Vec<f32>| -> (Vec<f16>, Vec<f32>) {
            let h: Vec<f16> = x.iter().map(|&a| f16::from_f32(a)).collect();
            let r = h.iter().map(|a| a.to_f32()).collect();
            (h, r)
        };
        let (kh, kr) = round(data(300 * 128, 2));
        let (vh, vr) = round(data(300 * 128, 3));
        for qpos in [vec![299u32], (200..300).collect()] {
            check(shape, &qpos, &kpos, (KvSlice::F16(&kh), KvSlice::F16(&vh)), &kr, &vr);
        }
    }

    #[test]
    fn scores_are_head_averaged_probabilities() {
        let shape = AttnShape { heads: 4, kv_heads: 2, head_dim: 8, window: None };
        let kpos: Vec<u32> = (0..20).collect();
        let k = data(20 * 16, 5);
        let q = data(32, 6);
        let s = query_scores(shape, &q, 15, KvRows { data: KvSlice::F32(&k), stride: 16 }, &kpos);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(s[16..].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn sliding_window_masks_old_keys() {
        // head_dim 128 (the fast paths in two blocks), keys out of order, a window shorter
        // than a tile.
        let shape = AttnShape { heads: 4, kv_heads: 1, head_dim: 128, window: Some(40) };
        let mut kpos: Vec<u32> = (0..600).collect();
        kpos.swap(5, 590);
        let (k, v) = (data(600 * 128, 2), data(600 * 128, 3));
        for qpos in [vec![599u32], vec![30, 300, 599], (0..600).collect()] {
            check(shape, &qpos, &kpos, (KvSlice::F32(&k), KvSlice::F32(&v)), &k, &v);
        }
        let q = data(4 * 128, 7);
        let s = query_scores(shape, &q, 599, KvRows { data: KvSlice::F32(&k), stride: 128 }, &kpos);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        for (&p, &x) in kpos.iter().zip(&s) {
            assert_eq!(x > 0.0, p > 559, "position {p} scores {x}");
        }
    }
}
