//! Causal attention over explicit token positions, flash-style: queries and keys are walked
//! in tiles with an online softmax, so no full T x T matrix is ever formed. The query heads of
//! one key/value group are stacked into one tile, so K and V are read once per group and never
//! copied per head. Masking is by original position: a query at position p sees keys at
//! positions <= p, whichever order the keys are stored in.

use gemm::Parallelism;
use rayon::prelude::*;

use super::math::{exp_sub_sum, max, scale};
use super::SendPtr;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Rows of a `[token][heads][head_dim]` buffer with `stride` floats between tokens.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub data: &'a [f32],
    pub stride: usize,
}

const QUERY_TILE: usize = 64;

/// `out[t][h] = softmax(q[t][h] K_g^T / sqrt(d), masked by position) V_g`, g = h's group.
/// `out` is `[nq][heads][head_dim]`, contiguous.
pub fn causal_attention(
    shape: AttnShape,
    q: Rows<'_>,
    qpos: &[u32],
    k: Rows<'_>,
    v: Rows<'_>,
    kpos: &[u32],
    out: &mut [f32],
) {
    let AttnShape { heads, kv_heads, head_dim: d } = shape;
    let nq = qpos.len();
    let nk = kpos.len();
    assert_eq!(out.len(), nq * heads * d);
    let rep = heads / kv_heads;
    // Few queries (decode): long key tiles keep the per-tile overhead low.
    let key_tile = if nq * rep <= 16 { 1024 } else { 128 };
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
            if kmin > qmax {
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
            if kmax > qmin {
                let kp = &kpos[k0..k0 + bk];
                for (i, &p) in qp.iter().enumerate() {
                    for j in 0..rep {
                        let row = &mut s[(i * rep + j) * bk..][..bk];
                        for (x, &kp) in row.iter_mut().zip(kp) {
                            if kp > p {
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
/// Keys it may not see (position > qpos) score 0. Returns one score per key row.
pub fn query_scores(shape: AttnShape, q: &[f32], qpos: u32, k: Rows<'_>, kpos: &[u32]) -> Vec<f32> {
    let AttnShape { heads, kv_heads, head_dim: d } = shape;
    let rep = heads / kv_heads;
    let sm_scale = 1.0 / (d as f32).sqrt();
    let mut total = vec![0f32; kpos.len()];
    let mut row = vec![0f32; kpos.len()];
    for h in 0..heads {
        let g = h / rep;
        let qh = &q[h * d..(h + 1) * d];
        for (t, (x, &p)) in row.iter_mut().zip(kpos).enumerate() {
            *x = if p <= qpos {
                super::math::dot(qh, &k.data[t * k.stride + g * d..][..d]) * sm_scale
            } else {
                f32::NEG_INFINITY
            };
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
        let AttnShape { heads, kv_heads, head_dim: d } = shape;
        let (qs, ks) = (heads * d, kv_heads * d);
        let mut out = vec![0f32; qpos.len() * qs];
        for (t, &p) in qpos.iter().enumerate() {
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let scores: Vec<f32> = kpos
                    .iter()
                    .enumerate()
                    .map(|(j, &kp)| {
                        if kp > p {
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

    #[test]
    fn matches_naive_with_gqa_and_scattered_positions() {
        let shape = AttnShape { heads: 6, kv_heads: 2, head_dim: 16 };
        // Keys out of order and with gaps, as after pruning and revival.
        let mut kpos: Vec<u32> = (0..300).map(|i| i * 2).collect();
        kpos.swap(3, 250);
        kpos.swap(100, 7);
        let qpos: Vec<u32> = vec![1, 2, 50, 51, 200, 333, 598, 599].into_iter().cycle().take(90).collect();
        let q = data(qpos.len() * 96, 1);
        let k = data(kpos.len() * 32, 2);
        let v = data(kpos.len() * 32, 3);
        let mut out = vec![0f32; q.len()];
        causal_attention(
            shape,
            Rows { data: &q, stride: 96 },
            &qpos,
            Rows { data: &k, stride: 32 },
            Rows { data: &v, stride: 32 },
            &kpos,
            &mut out,
        );
        let want = naive(shape, &q, &qpos, &k, &v, &kpos);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn scores_are_head_averaged_probabilities() {
        let shape = AttnShape { heads: 4, kv_heads: 2, head_dim: 8 };
        let kpos: Vec<u32> = (0..20).collect();
        let k = data(20 * 16, 5);
        let q = data(32, 6);
        let s = query_scores(shape, &q, 15, Rows { data: &k, stride: 16 }, &kpos);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(s[16..].iter().all(|&x| x == 0.0));
    }
}
