//! Our decoder for the Llama family and Gemma 3. Every layer runs over an explicit list of
//! token positions (RoPE at the original positions) against a per-layer KV store, so that a
//! caller can run a layer on any subset of tokens and read the last query's attention
//! scores: what LazyLLM (arXiv 2407.14057) needs. Per-sequence state lives in [`KvCache`], outside the weights.

use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::backend::Forward;
use crate::checkpoint::Checkpoint;
use crate::{Architecture, Config};
use crate::kernels::attention::{causal_attention, query_scores, AttnShape, KvRows, Rows};
use crate::kernels::kv::{KvBuf, KvDtype};
use crate::kernels::linear::{Dense, Linear};
use crate::kernels::math::{add_assign, axpy, gelu_mul, rms_norm, rms_norm_in_place, silu_mul};
use crate::kernels::rope::Rope;
use crate::tensor::DeviceKv;
use crate::{Error, Result};

/// Rows at or above this count run element-wise work on all threads.
const PAR_ROWS: usize = 32;

/// Element type of the dense weight copies (and of the embedding table).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DenseDtype {
    #[default]
    F32,
    /// Half the bytes, widened to f32 just before each GEMM.
    F16,
}

/// How the weights are held in memory: a dense copy for products over many rows (prompts,
/// long revivals), a quantized copy for few rows (decode steps), or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WeightFormat {
    /// Element type of the dense copies and of the embedding table.
    pub dense: DenseDtype,
    /// A quantized copy of every linear layer, used for at most 32 rows: Q8_0 reads about
    /// 3.5x fewer bytes than f32.
    pub q8: bool,
    /// Whether that copy keeps a GGUF file's Q4_1 blocks as they are, for the layers stored
    /// so (0.625 bytes a weight, the file's own values), instead of Q8_0 (1.125 bytes).
    pub keep_q4_1: bool,
    /// Whether the layers keep their dense copy. Without it (a decode worker, whose prompt
    /// chunks fit the Q8_0 kernel) every product runs on the Q8_0 copy; the embedding table
    /// stays.
    pub dense_layers: bool,
}

impl WeightFormat {
    /// f32 for every product: the reference numerics.
    pub const F32: Self = Self { dense: DenseDtype::F32, q8: false, keep_q4_1: false, dense_layers: true };
    /// f32 for prompts, Q8_0 for decode steps.
    pub const Q8_DECODE: Self = Self { q8: true, ..Self::F32 };
    /// f16 for prompts, Q8_0 for decode steps.
    pub const F16_Q8_DECODE: Self = Self { dense: DenseDtype::F16, ..Self::Q8_DECODE };
    /// f16 for prompts, the file's Q4_1 blocks (Q8_0 for other layers) for decode steps.
    pub const F16_Q4_DECODE: Self = Self { keep_q4_1: true, ..Self::F16_Q8_DECODE };

    /// This format without the quantized copy (a prefill worker never takes a decode step).
    pub fn without_q8(self) -> Self {
        Self { q8: false, keep_q4_1: false, dense_layers: true, ..self }
    }

    /// This format without the layers' dense copies, when a quantized copy can take their
    /// place.
    pub fn without_dense_layers(self) -> Self {
        Self { dense_layers: !self.q8, ..self }
    }

    /// Gives a freshly loaded f32 layer this format; `keep_dense` for a tied output head,
    /// whose dense copy is the embedding table.
    fn apply(self, lin: &mut Linear, keep_dense: bool) {
        if self.q8 {
            lin.quantize(self.keep_q4_1);
        } else {
            lin.drop_gguf_blocks();
        }
        if self.dense == DenseDtype::F16 {
            lin.dense_to_f16();
        }
        if !self.dense_layers && !keep_dense {
            lin.drop_dense();
        }
    }
}

/// Where a layer's weights come from: the checkpoint's tensors as f32 and, when the format
/// keeps them, its Q4_1 blocks.
pub(crate) struct Source<'a> {
    pub vb: VarBuilder<'static>,
    pub blocks: Option<&'a Checkpoint>,
}

impl Source<'_> {
    fn pp(&self, name: impl ToString) -> Self {
        Self { vb: self.vb.pp(name), blocks: self.blocks }
    }
}

fn load_linear(src: &Source<'_>, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    let vb = &src.vb;
    let w = vb.get((out, inp), "weight")?.flatten_all()?.to_vec1::<f32>()?;
    let b = if bias { Some(vb.get(out, "bias")?.to_vec1::<f32>()?) } else { None };
    let blocks = match src.blocks {
        Some(ckpt) => ckpt.gguf_q4_1(&format!("{}.weight", vb.prefix()))?,
        None => None,
    };
    Ok(Linear::new(w, b, out, inp).with_gguf_q4_1(blocks))
}

fn load_vec(vb: &VarBuilder, n: usize, name: &str) -> Result<Vec<f32>> {
    Ok(vb.get(n, name)?.to_vec1::<f32>()?)
}

/// Keys and values of one layer for the tokens that have them, in arrival order.
#[derive(Debug, Clone)]
pub struct LayerKv {
    /// Original position of each row.
    pub positions: Vec<u32>,
    /// `[row][kv_heads * head_dim]`, RoPE applied.
    pub k: KvBuf,
    pub v: KvBuf,
    /// A copy of the first rows of `k` and `v` on a [`crate::TensorModel`]'s device, so that
    /// it does not upload them again for every step; the host rows stay the state.
    pub(crate) device: Option<DeviceKv>,
}

impl PartialEq for LayerKv {
    fn eq(&self, other: &Self) -> bool {
        (&self.positions, &self.k, &self.v) == (&other.positions, &other.k, &other.v)
    }
}

impl LayerKv {
    pub fn new(dtype: KvDtype) -> Self {
        Self { positions: Vec::new(), k: KvBuf::new(dtype), v: KvBuf::new(dtype), device: None }
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    pub fn bytes(&self) -> usize {
        4 * self.positions.len() + self.k.bytes() + self.v.bytes()
    }

    /// Keeps the first `rows` rows (the device copy is dropped; it is uploaded again).
    pub fn truncate(&mut self, rows: usize) {
        if rows >= self.positions.len() {
            return;
        }
        let width = self.k.len() / self.positions.len();
        self.positions.truncate(rows);
        self.k.truncate(rows * width);
        self.v.truncate(rows * width);
        self.device = None;
    }
}

/// Per-sequence attention state: one [`LayerKv`] per layer.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(cfg: &Config, dtype: KvDtype) -> Self {
        Self { layers: vec![LayerKv::new(dtype); cfg.num_hidden_layers] }
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::bytes).sum()
    }
}

/// One sequence's rows in a batched layer: see [`Model::layer_forward`] for the fields.
pub struct Segment<'a> {
    pub positions: &'a [u32],
    pub kv: &'a mut LayerKv,
    pub keys: Option<&'a [u32]>,
    pub score_queries: usize,
}

/// Appends one segment's K/V, runs its attention into `attn` and returns its scores if
/// asked; `qkv` holds its rows of fused q/k/v (RoPE applied).
fn seg_attention(shape: AttnShape, seg: &mut Segment<'_>, qkv: &[f32], stride: usize, attn: &mut [f32]) -> Option<Vec<f32>> {
    let qd = shape.heads * shape.head_dim;
    let kvd = shape.kv_heads * shape.head_dim;
    let (n, kv) = (seg.positions.len(), &mut *seg.kv);
    kv.positions.extend_from_slice(seg.positions);
    kv.k.reserve(n * kvd);
    kv.v.reserve(n * kvd);
    for row in qkv.chunks_exact(stride) {
        kv.k.extend_from_f32(&row[qd..qd + kvd]);
        kv.v.extend_from_f32(&row[qd + kvd..]);
    }
    let subset = seg.keys.map(|rows| {
        let kpos: Vec<u32> = rows.iter().map(|&r| kv.positions[r as usize]).collect();
        (kpos, kv.k.gather(rows, kvd), kv.v.gather(rows, kvd))
    });
    let (kpos, k, v) = match &subset {
        Some((p, k, v)) => (p.as_slice(), k, v),
        None => (kv.positions.as_slice(), &kv.k, &kv.v),
    };
    causal_attention(
        shape,
        Rows { data: qkv, stride },
        seg.positions,
        KvRows { data: k.as_slice(), stride: kvd },
        KvRows { data: v.as_slice(), stride: kvd },
        kpos,
        attn,
    );
    (seg.score_queries > 0).then(|| {
        let w = seg.score_queries.min(n);
        let mut total = vec![0f32; kpos.len()];
        for r in n - w..n {
            let q = &qkv[r * stride..r * stride + qd];
            let s = query_scores(shape, q, seg.positions[r], KvRows { data: k.as_slice(), stride: kvd }, kpos);
            axpy(&mut total, 1.0 / w as f32, &s);
        }
        total
    })
}

/// Self-attention with fused q/k/v projections.
pub struct Attention {
    qkv: Linear,
    o: Linear,
    /// Gemma 3's RMSNorm of each query and key head (weights over head_dim), before RoPE.
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
}

impl Attention {
    fn new(cfg: &Config, vb: Source<'_>, format: WeightFormat) -> Result<Self> {
        let qk_norm = match cfg.architecture {
            Architecture::Gemma3 => Some((
                load_vec(&vb.vb.pp("q_norm"), cfg.head_dim, "weight")?,
                load_vec(&vb.vb.pp("k_norm"), cfg.head_dim, "weight")?,
            )),
            _ => None,
        };
        let (h, b) = (cfg.hidden_size, cfg.attention_bias);
        let mut qkv = Linear::concat(vec![
            load_linear(&vb.pp("q_proj"), cfg.q_dim(), h, b)?,
            load_linear(&vb.pp("k_proj"), cfg.kv_dim(), h, b)?,
            load_linear(&vb.pp("v_proj"), cfg.kv_dim(), h, b)?,
        ]);
        let mut o = load_linear(&vb.pp("o_proj"), h, cfg.q_dim(), false)?;
        format.apply(&mut qkv, false);
        format.apply(&mut o, false);
        Ok(Self { qkv, o, qk_norm })
    }
}

/// Gated feed-forward with fused gate/up projections: SwiGLU, or GeGLU (Gemma).
pub struct Mlp {
    gate_up: Linear,
    down: Linear,
    inter: usize,
    gelu: bool,
}

impl Mlp {
    fn new(cfg: &Config, vb: Source<'_>, format: WeightFormat) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mut gate_up = Linear::concat(vec![
            load_linear(&vb.pp("gate_proj"), i, h, false)?,
            load_linear(&vb.pp("up_proj"), i, h, false)?,
        ]);
        let mut down = load_linear(&vb.pp("down_proj"), h, i, false)?;
        format.apply(&mut gate_up, false);
        format.apply(&mut down, false);
        Ok(Self { gate_up, down, inter: i, gelu: cfg.architecture == Architecture::Gemma3 })
    }

    /// `down(act(gate(h)) * up(h))` over stacked segments of rows.
    fn forward(&self, h: &[f32], segments: &[usize]) -> Vec<f32> {
        let n: usize = segments.iter().sum();
        let gu = self.gate_up.forward_segments(h, segments);
        let i = self.inter;
        let mut act = vec![0f32; n * i];
        let gelu = self.gelu;
        let gated = |(a, g): (&mut [f32], &[f32])| {
            if gelu {
                gelu_mul(&g[..i], &g[i..], a)
            } else {
                silu_mul(&g[..i], &g[i..], a)
            }
        };
        if n >= PAR_ROWS {
            act.par_chunks_mut(i).zip(gu.par_chunks(2 * i)).for_each(gated);
        } else {
            act.chunks_mut(i).zip(gu.chunks(2 * i)).for_each(gated);
        }
        self.down.forward_segments(&act, segments)
    }
}

/// Borrowed weights of one decoder layer.
pub struct LayerWeights<'a> {
    pub input_norm: &'a [f32],
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// q, k and v biases, concatenated (Qwen2).
    pub qkv_bias: Option<&'a [f32]>,
    pub o: &'a [f32],
    pub post_norm: &'a [f32],
    pub gate: &'a [f32],
    pub up: &'a [f32],
    pub down: &'a [f32],
}

/// One pre-norm decoder layer.
pub struct DecoderLayer {
    input_layernorm: Vec<f32>,
    self_attn: Attention,
    /// The norm before the MLP (Llama's `post_attention_layernorm`).
    mlp_norm: Vec<f32>,
    mlp: Mlp,
    /// Gemma 3's norms of the attention and MLP outputs, before each is added to the residual.
    post_norms: Option<(Vec<f32>, Vec<f32>)>,
}

impl DecoderLayer {
    /// Loads one layer in `format` (one layer's f32 copy at a time is all that loading adds).
    fn new(cfg: &Config, vb: Source<'_>, format: WeightFormat) -> Result<Self> {
        let h = cfg.hidden_size;
        let norm = |name: &str| load_vec(&vb.vb.pp(name), h, "weight");
        let gemma = cfg.architecture == Architecture::Gemma3;
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"), format)?,
            mlp_norm: norm(if gemma { "pre_feedforward_layernorm" } else { "post_attention_layernorm" })?,
            mlp: Mlp::new(cfg, vb.pp("mlp"), format)?,
            post_norms: if gemma { Some((norm("post_attention_layernorm")?, norm("post_feedforward_layernorm")?)) } else { None },
        })
    }
}

/// The weights of a decoder and its forward pass over token sets.
pub struct Model {
    cfg: Config,
    /// None when the embeddings are tied to the output head (whose dense copy it then is).
    embed_tokens: Option<Dense>,
    /// Embedding rows are multiplied by this (Gemma: sqrt(hidden); 1 otherwise).
    embed_scale: f32,
    layers: Vec<DecoderLayer>,
    norm: Vec<f32>,
    lm_head: Linear,
    rope: Rope,
    /// The local layers' RoPE of a sliding-window model.
    rope_local: Option<Rope>,
}

impl Model {
    /// The model from f32 tensors alone (no checkpoint blocks to keep).
    pub fn new(cfg: &Config, vb: VarBuilder<'static>, format: WeightFormat) -> Result<Self> {
        Self::load(cfg, Source { vb, blocks: None }, format)
    }

    /// The model from a checkpoint, keeping its Q4_1 blocks where `format` asks for them.
    pub fn from_checkpoint(cfg: &Config, ckpt: &Checkpoint, format: WeightFormat) -> Result<Self> {
        let blocks = (format.q8 && format.keep_q4_1).then_some(ckpt);
        Self::load(cfg, Source { vb: ckpt.var_builder()?, blocks }, format)
    }

    fn load(cfg: &Config, vb: Source<'_>, format: WeightFormat) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let m = vb.pp("model");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, m.pp("layers").pp(i), format))
            .collect::<Result<Vec<_>>>()?;
        let norm = load_vec(&m.vb.pp("norm"), h, "weight")?;
        let mut embed = load_linear(&m.pp("embed_tokens"), v, h, false)?;
        let tied = cfg.tie_word_embeddings || !vb.vb.contains_tensor("lm_head.weight");
        let (embed_tokens, lm_head) = if tied {
            format.apply(&mut embed, true);
            (None, embed)
        } else {
            let table = Dense::F32(embed.weight().to_vec());
            let table = if format.dense == DenseDtype::F16 { table.to_f16() } else { table };
            let mut head = load_linear(&vb.pp("lm_head"), v, h, false)?;
            format.apply(&mut head, false);
            (Some(table), head)
        };
        let rope = Rope::new(&cfg.rope_inv_freq(), cfg.max_position_embeddings, cfg.rope_interleaved);
        let rope_local = cfg.rope_local_inv_freq().map(|f| Rope::new(&f, cfg.max_position_embeddings, cfg.rope_interleaved));
        let embed_scale = if cfg.architecture == Architecture::Gemma3 { (h as f32).sqrt() } else { 1.0 };
        Ok(Self { cfg: cfg.clone(), embed_tokens, embed_scale, layers, norm, lm_head, rope, rope_local })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Bytes held by the weights.
    pub fn weight_bytes(&self) -> usize {
        let lin = |l: &DecoderLayer| {
            l.self_attn.qkv.bytes() + l.self_attn.o.bytes() + l.mlp.gate_up.bytes() + l.mlp.down.bytes()
        };
        self.layers.iter().map(lin).sum::<usize>()
            + self.lm_head.bytes()
            + self.embed_tokens.as_ref().map_or(0, Dense::bytes)
    }

    /// Read-only view of layer `l`'s weights (row-major `[out][in]`), for reference
    /// implementations and tools.
    pub fn layer_weights(&self, l: usize) -> LayerWeights<'_> {
        let layer = &self.layers[l];
        let (qd, kvd, h, i) = (self.cfg.q_dim(), self.cfg.kv_dim(), self.cfg.hidden_size, self.cfg.intermediate_size);
        let qkv = layer.self_attn.qkv.weight();
        let gu = layer.mlp.gate_up.weight();
        LayerWeights {
            input_norm: &layer.input_layernorm,
            q: &qkv[..qd * h],
            k: &qkv[qd * h..(qd + kvd) * h],
            v: &qkv[(qd + kvd) * h..],
            qkv_bias: layer.self_attn.qkv.bias(),
            o: layer.self_attn.o.weight(),
            post_norm: &layer.mlp_norm,
            gate: &gu[..i * h],
            up: &gu[i * h..],
            down: layer.mlp.down.weight(),
        }
    }

    /// The embedding row of one token (`token` inside the vocabulary), scaled as the
    /// forward pass scales it.
    pub fn embedding(&self, token: u32) -> Vec<f32> {
        let mut row = vec![0f32; self.cfg.hidden_size];
        self.embedding_table().row_into(token as usize, &mut row);
        if self.embed_scale != 1.0 {
            super::kernels::math::scale(&mut row, self.embed_scale);
        }
        row
    }

    fn embedding_table(&self) -> &Dense {
        self.embed_tokens.as_ref().or(self.lm_head.dense()).expect("a tied output head keeps its dense copy")
    }

    /// RoPE tables (of the global layers), shared with reference implementations.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Layer `l`'s RoPE: the local one on a sliding-window layer.
    fn layer_rope(&self, l: usize) -> &Rope {
        match (&self.rope_local, self.cfg.layer_window(l)) {
            (Some(local), Some(_)) => local,
            _ => &self.rope,
        }
    }

    fn attn_shape(&self, l: usize) -> AttnShape {
        AttnShape {
            heads: self.cfg.num_attention_heads,
            kv_heads: self.cfg.num_key_value_heads,
            head_dim: self.cfg.head_dim,
            window: self.cfg.layer_window(l).map(|w| w.try_into().unwrap_or(u32::MAX)),
        }
    }

    /// Embedding rows for `tokens`, `[n][hidden]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let h = self.cfg.hidden_size;
        let table = self.embedding_table();
        let mut x = vec![0f32; tokens.len() * h];
        for (&t, row) in tokens.iter().zip(x.chunks_exact_mut(h)) {
            let t = t as usize;
            if t >= self.cfg.vocab_size {
                return Err(Error::InvalidInput(format!("token id {t} outside the vocabulary of {}", self.cfg.vocab_size)));
            }
            table.row_into(t, row);
        }
        if self.embed_scale != 1.0 {
            super::kernels::math::scale(&mut x, self.embed_scale);
        }
        Ok(x)
    }

    fn norm_rows(&self, x: &[f32], w: &[f32], n: usize) -> Vec<f32> {
        let h = self.cfg.hidden_size;
        let eps = self.cfg.rms_norm_eps as f32;
        let mut y = vec![0f32; n * h];
        let f = |(yr, xr): (&mut [f32], &[f32])| rms_norm(xr, w, eps, yr);
        if n >= PAR_ROWS {
            y.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(f);
        } else {
            y.chunks_mut(h).zip(x.chunks(h)).for_each(f);
        }
        y
    }

    /// Runs layer `l` over the tokens whose hidden states are the rows of `x` (updated in
    /// place) at original `positions`. Their keys and values are appended to `kv` (as rows
    /// `kv.len()..` in order), and each attends to the key rows `keys` (all rows of `kv` when
    /// None; the new rows must be among them) at positions not after its own.
    ///
    /// With `score_queries = w > 0`, also returns the LazyLLM importance of each key row (in
    /// `keys` order, or row order): the attention probabilities of the last `w` rows'
    /// queries, averaged over heads and over those queries (w = 1 is the paper's score).
    pub fn layer_forward(
        &self,
        l: usize,
        x: &mut [f32],
        positions: &[u32],
        kv: &mut LayerKv,
        keys: Option<&[u32]>,
        score_queries: usize,
    ) -> Result<Option<Vec<f32>>> {
        let mut seg = [Segment { positions, kv, keys, score_queries }];
        Ok(self.layer_forward_batch(l, x, &mut seg)?.pop().flatten())
    }

    /// [`Model::layer_forward`] for several sequences at once: `x` stacks their rows in
    /// segment order. The linear layers run once over all rows (each segment with the kernel
    /// it would get alone, so its numerics do not depend on the batch); attention and scores
    /// stay per sequence, over its own keys. Returns each segment's scores.
    pub fn layer_forward_batch(&self, l: usize, x: &mut [f32], segments: &mut [Segment<'_>]) -> Result<Vec<Option<Vec<f32>>>> {
        let cfg = &self.cfg;
        let (h, qd, kvd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let rows: Vec<usize> = segments.iter().map(|s| s.positions.len()).collect();
        let n: usize = rows.iter().sum();
        if x.len() != n * h {
            return Err(Error::InvalidInput(format!("{} hidden values for {n} positions", x.len())));
        }
        let layer = &self.layers[l];
        let normed = self.norm_rows(x, &layer.input_layernorm, n);
        let stride = qd + 2 * kvd;
        let mut qkv = layer.self_attn.qkv.forward_segments(&normed, &rows);
        if let Some((qn, kn)) = &layer.self_attn.qk_norm {
            let (d, eps) = (cfg.head_dim, cfg.rms_norm_eps as f32);
            let f = |row: &mut [f32]| {
                let (q, k) = row[..qd + kvd].split_at_mut(qd);
                q.chunks_exact_mut(d).for_each(|head| rms_norm_in_place(head, qn, eps));
                k.chunks_exact_mut(d).for_each(|head| rms_norm_in_place(head, kn, eps));
            };
            if n >= PAR_ROWS {
                qkv.par_chunks_mut(stride).for_each(f);
            } else {
                qkv.chunks_mut(stride).for_each(f);
            }
        }
        let positions: Vec<u32> = segments.iter().flat_map(|s| s.positions.iter().copied()).collect();
        let rope = self.layer_rope(l);
        rope.apply(&mut qkv, stride, cfg.num_attention_heads, &positions)?;
        rope.apply(&mut qkv[qd..], stride, cfg.num_key_value_heads, &positions)?;

        let mut attn = vec![0f32; n * qd];
        let mut parts = Vec::with_capacity(segments.len());
        let (mut qkv_rest, mut attn_rest) = (qkv.as_slice(), attn.as_mut_slice());
        for (seg, &r) in segments.iter_mut().zip(&rows) {
            let (q, qr) = qkv_rest.split_at(r * stride);
            let (a, ar) = std::mem::take(&mut attn_rest).split_at_mut(r * qd);
            (qkv_rest, attn_rest) = (qr, ar);
            parts.push((seg, q, a));
        }
        let shape = self.attn_shape(l);
        let scores: Vec<Option<Vec<f32>>> = if parts.len() > 1 {
            parts.into_par_iter().map(|(seg, q, a)| seg_attention(shape, seg, q, stride, a)).collect()
        } else {
            parts.into_iter().map(|(seg, q, a)| seg_attention(shape, seg, q, stride, a)).collect()
        };

        let post_norm = |y: Vec<f32>, w: Option<&Vec<f32>>| match w {
            Some(w) => self.norm_rows(&y, w, n),
            None => y,
        };
        let o = layer.self_attn.o.forward_segments(&attn, &rows);
        add_assign(x, &post_norm(o, layer.post_norms.as_ref().map(|p| &p.0)));
        let normed = self.norm_rows(x, &layer.mlp_norm, n);
        let y = layer.mlp.forward(&normed, &rows);
        add_assign(x, &post_norm(y, layer.post_norms.as_ref().map(|p| &p.1)));
        Ok(scores)
    }

    /// Logits for one hidden row (final norm, then the output head).
    pub fn logits(&self, hidden: &[f32]) -> Vec<f32> {
        self.logits_batch(hidden).pop().expect("one row")
    }

    /// Logits for each of the hidden rows stacked in `hidden`, one output-head pass for all
    /// (each row gets the numerics it would get alone).
    pub fn logits_batch(&self, hidden: &[f32]) -> Vec<Vec<f32>> {
        let n = hidden.len() / self.cfg.hidden_size;
        let normed = self.norm_rows(hidden, &self.norm, n);
        let all = self.lm_head.forward_segments(&normed, &vec![1; n]);
        all.chunks_exact(self.cfg.vocab_size).map(<[f32]>::to_vec).collect()
    }

    /// Dense forward of `tokens` appended after the `cache`'s tokens (positions continue from
    /// layer 0's count); returns the logits of the last token.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::InvalidInput("no tokens to run".into()));
        }
        let start = cache.layers.first().map_or(0, LayerKv::len);
        let max = self.cfg.max_position_embeddings;
        if start + tokens.len() > max {
            return Err(Error::ContextOverflow { tokens: start + tokens.len(), max });
        }
        let positions: Vec<u32> = (start..start + tokens.len()).map(|p| p as u32).collect();
        let mut x = self.embed(tokens)?;
        for (l, kv) in cache.layers.iter_mut().enumerate() {
            self.layer_forward(l, &mut x, &positions, kv, None, 0)?;
        }
        let h = self.cfg.hidden_size;
        Ok(self.logits(&x[(tokens.len() - 1) * h..]))
    }
}

impl Forward for Model {
    type Rows = Vec<f32>;

    fn config(&self) -> &Config {
        &self.cfg
    }

    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        Model::embed(self, tokens)
    }

    fn layer_forward_batch(&self, l: usize, x: &mut Vec<f32>, segments: &mut [Segment<'_>]) -> Result<Vec<Option<Vec<f32>>>> {
        Model::layer_forward_batch(self, l, x, segments)
    }

    fn logits_batch(&self, x: &Vec<f32>) -> Result<Vec<Vec<f32>>> {
        Ok(Model::logits_batch(self, x))
    }

    fn row_count(&self, x: &Vec<f32>) -> usize {
        x.len() / self.cfg.hidden_size
    }

    fn gather(&self, x: &Vec<f32>, rows: &[u32]) -> Result<Vec<f32>> {
        let h = self.cfg.hidden_size;
        let mut out = Vec::with_capacity(rows.len() * h);
        for &r in rows {
            let row = x.get(r as usize * h..(r as usize + 1) * h).ok_or_else(|| Error::InvalidInput(format!("no hidden row {r}")))?;
            out.extend_from_slice(row);
        }
        Ok(out)
    }

    fn concat(&self, mut parts: Vec<Vec<f32>>) -> Result<Vec<f32>> {
        Ok(if parts.len() == 1 { parts.pop().expect("one part") } else { parts.concat() })
    }

    fn split(&self, x: Vec<f32>, counts: &[usize]) -> Result<Vec<Vec<f32>>> {
        let h = self.cfg.hidden_size;
        if counts.iter().sum::<usize>() * h != x.len() {
            return Err(Error::InvalidInput(format!("cannot split {} hidden values into {counts:?} rows", x.len())));
        }
        if let [_] = counts {
            return Ok(vec![x]);
        }
        let mut rest = x.as_slice();
        Ok(counts
            .iter()
            .map(|&n| {
                let (part, tail) = rest.split_at(n * h);
                rest = tail;
                part.to_vec()
            })
            .collect())
    }

    fn download(&self, x: Vec<f32>) -> Result<Vec<f32>> {
        Ok(x)
    }

    fn upload(&self, data: Vec<f32>) -> Result<Vec<f32>> {
        Ok(data)
    }
}
