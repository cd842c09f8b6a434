//! A slow, obviously-correct LazyLLM (arXiv 2407.14057, section 3), written independently of
//! the engine: per-token maps of K/V and Aux Cache hidden states per layer, plain loops, one
//! token at a time. Tests compare the engine's logits against it.

use std::collections::BTreeMap;

use lazyserve_model::Model;

/// Per-layer maps from position to state.
pub struct Reference {
    /// (pruning layer, keep fraction) pairs.
    pub stages: Vec<(usize, f32)>,
    kv: Vec<BTreeMap<u32, (Vec<f32>, Vec<f32>)>>,
    aux: Vec<BTreeMap<u32, Vec<f32>>>,
    pub tokens: Vec<u32>,
    /// Tokens computed per layer, over the whole generation.
    pub computed: Vec<usize>,
    pub revived: usize,
}

fn rms_norm(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(&v, &g)| (v as f64 * s) as f32 * g).collect()
}

/// `W x` with `W` row-major `[out][in]`.
fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks(x.len()).map(|row| row.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32).collect()
}

impl Reference {
    pub fn new(model: &Model, stages: Vec<(usize, f32)>) -> Self {
        let n = model.config().num_hidden_layers;
        Self {
            stages,
            kv: vec![BTreeMap::new(); n],
            aux: vec![BTreeMap::new(); n],
            tokens: vec![],
            computed: vec![0; n],
            revived: 0,
        }
    }

    fn rope(model: &Model, x: &mut [f32], pos: u32) {
        let cfg = model.config();
        let d = cfg.head_dim;
        let inv = cfg.rope_inv_freq();
        for head in x.chunks_mut(d) {
            for (i, &f) in inv.iter().enumerate() {
                let (c, s) = ((pos as f64 * f as f64).cos(), (pos as f64 * f as f64).sin());
                let (ia, ib) = if cfg.rope_interleaved { (2 * i, 2 * i + 1) } else { (i, i + d / 2) };
                let (a, b) = (head[ia] as f64, head[ib] as f64);
                head[ia] = (a * c - b * s) as f32;
                head[ib] = (a * s + b * c) as f32;
            }
        }
    }

    /// Softmax attention weights of one head's query over `keys` (position, key head slice).
    fn probs(q: &[f32], keys: &[(u32, &[f32])]) -> Vec<f64> {
        let scale = 1.0 / (q.len() as f64).sqrt();
        let s: Vec<f64> = keys.iter().map(|(_, k)| q.iter().zip(*k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale).collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|v| v / z).collect()
    }

    /// Feeds `new` tokens; returns the last token's logits.
    pub fn step(&mut self, model: &Model, new: &[u32]) -> Vec<f32> {
        let cfg = model.config().clone();
        let (d, heads, kvh) = (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
        let rep = heads / kvh;
        let start = self.tokens.len() as u32;
        self.tokens.extend_from_slice(new);
        let last = self.tokens.len() as u32 - 1;
        let mut alive: Vec<u32> = (0..=last).collect();
        let mut hidden: BTreeMap<u32, Vec<f32>> =
            new.iter().enumerate().map(|(i, &t)| (start + i as u32, model.embedding(t))).collect();
        for l in 0..cfg.num_hidden_layers {
            let w = model.layer_weights(l);
            // Phase 1: K/V (and Q) for every token computed at this layer.
            let mut queries = BTreeMap::new();
            for (&p, x) in &hidden {
                assert!(!self.kv[l].contains_key(&p), "token {p} computed twice at layer {l}");
                let n = rms_norm(x, w.input_norm, cfg.rms_norm_eps);
                let (mut q, mut k, mut v) = (matvec(w.q, &n), matvec(w.k, &n), matvec(w.v, &n));
                if let Some(b) = w.qkv_bias {
                    let (qd, kd) = (q.len(), k.len());
                    q.iter_mut().zip(&b[..qd]).for_each(|(a, b)| *a += b);
                    k.iter_mut().zip(&b[qd..qd + kd]).for_each(|(a, b)| *a += b);
                    v.iter_mut().zip(&b[qd + kd..]).for_each(|(a, b)| *a += b);
                }
                Self::rope(model, &mut q, p);
                Self::rope(model, &mut k, p);
                self.kv[l].insert(p, (k, v));
                queries.insert(p, q);
                self.computed[l] += 1;
            }
            // Phase 2: attention over the alive tokens, then the MLP.
            for (&p, x) in hidden.iter_mut() {
                let q = &queries[&p];
                let mut attn = vec![0f32; heads * d];
                for h in 0..heads {
                    let g = h / rep;
                    let keys: Vec<(u32, &[f32])> =
                        alive.iter().filter(|&&a| a <= p).map(|a| (*a, &self.kv[l][a].0[g * d..(g + 1) * d])).collect();
                    let pr = Self::probs(&q[h * d..(h + 1) * d], &keys);
                    for ((a, _), w8) in keys.iter().zip(&pr) {
                        let v = &self.kv[l][a].1[g * d..(g + 1) * d];
                        for c in 0..d {
                            attn[h * d + c] += (w8 * v[c] as f64) as f32;
                        }
                    }
                }
                let o = matvec(w.o, &attn);
                x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
                let n = rms_norm(x, w.post_norm, cfg.rms_norm_eps);
                let (g, u) = (matvec(w.gate, &n), matvec(w.up, &n));
                let act: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| (g as f64 / (1.0 + (-g as f64).exp()) * u as f64) as f32).collect();
                let down = matvec(w.down, &act);
                x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
            }
            // Pruning: rank the alive tokens by the last query's head-averaged attention.
            let Some(&(_, keep)) = self.stages.iter().find(|(pl, _)| *pl == l) else { continue };
            if l + 1 == cfg.num_hidden_layers {
                continue;
            }
            let q = &queries[&last];
            let mut score: BTreeMap<u32, f64> = alive.iter().map(|&a| (a, 0.0)).collect();
            for h in 0..heads {
                let g = h / rep;
                let keys: Vec<(u32, &[f32])> = alive.iter().map(|a| (*a, &self.kv[l][a].0[g * d..(g + 1) * d])).collect();
                for ((a, _), pr) in keys.iter().zip(Self::probs(&q[h * d..(h + 1) * d], &keys)) {
                    *score.get_mut(a).unwrap() += pr / heads as f64;
                }
            }
            let n_keep = ((keep * alive.len() as f32).ceil() as usize).max(1);
            let mut ranked: Vec<u32> = alive.iter().copied().filter(|&a| a != last).collect();
            ranked.sort_by(|a, b| score[b].total_cmp(&score[a]).then(b.cmp(a)));
            let mut kept: Vec<u32> = ranked.into_iter().take(n_keep - 1).collect();
            kept.push(last);
            kept.sort();
            // Dropped tokens computed here wait in this layer's Aux Cache.
            let dropped: Vec<u32> = hidden.keys().copied().filter(|p| !kept.contains(p)).collect();
            for p in dropped {
                self.aux[l].insert(p, hidden.remove(&p).unwrap());
            }
            // Kept tokens with no K/V at the next layer and not flowing up: revive.
            for &p in &kept {
                if !self.kv[l + 1].contains_key(&p) && !hidden.contains_key(&p) {
                    let h = self.aux[l].remove(&p).expect("a pruned token's hidden state is in the Aux Cache");
                    hidden.insert(p, h);
                    self.revived += 1;
                }
            }
            alive = kept;
        }
        model.logits(&hidden[&last])
    }
}
