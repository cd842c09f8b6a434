//! The forward pass on candle tensors, for a CUDA device (or candle's CPU device, where the
//! tests check it against our kernels). The same layer as [`crate::Model`]: any token subset
//! at its original positions, per-layer K/V appended in arrival order, the LazyLLM scores of
//! the last queries. Hidden states stay on the device between layers; per layer, one copy of
//! the new K/V rows goes to the host state (what a prefill worker ships), and the device keeps
//! its own copy of each layer's K/V for the following steps.
//!
//! Products run in the compute dtype (bf16 or f16 on a GPU, f32 on the CPU); the residual
//! stream, norms, RoPE and softmax stay in f32.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::backend::Forward;
use crate::kernels::kv::{KvBuf, KvDtype};
use crate::kernels::rope::Rope;
use crate::{Config, Error, LayerKv, Result, Segment};

/// Attention scores of at most this many elements are formed at once (queries are taken in
/// blocks), so an 8k-token prompt needs a few hundred MiB, not gigabytes.
const SCORE_BLOCK_ELEMS: usize = 1 << 26;

/// Added to the scores of keys a query may not see: exp() of it is exactly 0.
const MASKED: f64 = -1e30;

/// A layer's K/V rows on the device, in the KV dtype: a copy of the first rows of a
/// [`LayerKv`]'s host buffers.
#[derive(Debug, Clone)]
pub(crate) struct DeviceKv {
    k: Tensor,
    v: Tensor,
}

struct Linear {
    /// `[out][in]` in the compute dtype.
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    fn load(vbs: &[VarBuilder], out: &[usize], inp: usize, bias: bool, dtype: DType, device: &Device) -> Result<Self> {
        let ws = vbs.iter().zip(out).map(|(vb, &o)| vb.get((o, inp), "weight")).collect::<candle_core::Result<Vec<_>>>()?;
        let w = Tensor::cat(&ws, 0)?.to_dtype(dtype)?.to_device(device)?;
        let b = if bias {
            let bs = vbs.iter().zip(out).map(|(vb, &o)| vb.get(o, "bias")).collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&bs, 0)?.to_dtype(dtype)?.to_device(device)?)
        } else {
            None
        };
        Ok(Self { w, b })
    }

    /// `x @ w^T + b` for rows `x` in the compute dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.w.t()?)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct Layer {
    input_norm: Tensor,
    qkv: Linear,
    o: Linear,
    post_norm: Tensor,
    gate_up: Linear,
    down: Linear,
}

/// A Llama-family decoder whose weights live on a candle device.
pub struct TensorModel {
    cfg: Config,
    device: Device,
    dtype: DType,
    /// `[vocab][hidden]` in the compute dtype.
    embed: Tensor,
    /// None when tied to the embeddings.
    lm_head: Option<Tensor>,
    layers: Vec<Layer>,
    norm: Tensor,
    /// `[position][head_dim / 2]`, f32.
    cos: Tensor,
    sin: Tensor,
}

fn norm_weight(vb: &VarBuilder, n: usize, device: &Device) -> Result<Tensor> {
    Ok(vb.get(n, "weight")?.to_dtype(DType::F32)?.to_device(device)?)
}

impl TensorModel {
    /// Loads the weights onto `device`, products in `dtype` (f32, f16 or bf16).
    pub fn new(cfg: &Config, vb: VarBuilder, device: &Device, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::Unsupported(format!("compute dtype {dtype:?}: use f32, f16 or bf16")));
        }
        if cfg.architecture == crate::Architecture::Gemma3 {
            return Err(Error::Unsupported("Gemma 3 on the tensor (GPU) backend: serve it on the CPU backend".into()));
        }
        let (h, i, qd, kvd) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim());
        let m = vb.pp("model");
        let embed = m.pp("embed_tokens").get((cfg.vocab_size, h), "weight")?.to_dtype(dtype)?.to_device(device)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let vb = m.pp("layers").pp(l);
                let (a, f) = (vb.pp("self_attn"), vb.pp("mlp"));
                Ok(Layer {
                    input_norm: norm_weight(&vb.pp("input_layernorm"), h, device)?,
                    qkv: Linear::load(
                        &[a.pp("q_proj"), a.pp("k_proj"), a.pp("v_proj")],
                        &[qd, kvd, kvd],
                        h,
                        cfg.attention_bias,
                        dtype,
                        device,
                    )?,
                    o: Linear::load(&[a.pp("o_proj")], &[h], qd, false, dtype, device)?,
                    post_norm: norm_weight(&vb.pp("post_attention_layernorm"), h, device)?,
                    gate_up: Linear::load(&[f.pp("gate_proj"), f.pp("up_proj")], &[i, i], h, false, dtype, device)?,
                    down: Linear::load(&[f.pp("down_proj")], &[h], i, false, dtype, device)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = norm_weight(&m.pp("norm"), h, device)?;
        let tied = cfg.tie_word_embeddings || !vb.contains_tensor("lm_head.weight");
        let lm_head = if tied {
            None
        } else {
            Some(vb.pp("lm_head").get((cfg.vocab_size, h), "weight")?.to_dtype(dtype)?.to_device(device)?)
        };
        let inv_freq = cfg.rope_inv_freq();
        let (max, half) = (cfg.max_position_embeddings, inv_freq.len());
        let rope = Rope::new(&inv_freq, max, cfg.rope_interleaved);
        let (cos, sin) = rope.tables();
        Ok(Self {
            cfg: cfg.clone(),
            device: device.clone(),
            dtype,
            embed,
            lm_head,
            layers,
            norm,
            cos: Tensor::from_slice(cos, (max, half), device)?,
            sin: Tensor::from_slice(sin, (max, half), device)?,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes held by the weights on the device.
    pub fn weight_bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let lin = |l: &Linear| t(&l.w) + l.b.as_ref().map_or(0, t);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| t(&l.input_norm) + lin(&l.qkv) + lin(&l.o) + t(&l.post_norm) + lin(&l.gate_up) + lin(&l.down))
            .sum();
        layers + t(&self.embed) + self.lm_head.as_ref().map_or(0, t) + t(&self.norm) + t(&self.cos) + t(&self.sin)
    }

    /// RMSNorm of f32 rows, as the compute dtype.
    fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, w, self.cfg.rms_norm_eps as f32)?.to_dtype(self.dtype)?)
    }

    /// Rotates `[heads][rows][head_dim]` f32 values at `cos`/`sin` (`[rows][head_dim / 2]`).
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.unsqueeze(0)?;
        let y = if self.cfg.rope_interleaved {
            candle_nn::rotary_emb::rope_i(&x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(&x, cos, sin)?
        };
        Ok(y.squeeze(0)?)
    }

    /// The device copy of `kv`'s rows (None while it has none), uploading the host rows it
    /// does not have yet: a state restored from another worker, or rows our CPU kernels
    /// appended.
    fn device_kv(&self, kv: &LayerKv) -> Result<Option<DeviceKv>> {
        let kvd = self.cfg.kv_dim();
        let rows = kv.positions.len();
        let copy = match &kv.device {
            Some(d) if d.k.dim(0)? <= rows && d.k.device().same_device(&self.device) => Some(d),
            _ => None,
        };
        let have = match copy {
            Some(d) => d.k.dim(0)?,
            None => 0,
        };
        if have == rows {
            return Ok(copy.cloned());
        }
        let upload = |buf: &KvBuf| -> Result<Tensor> {
            Ok(match buf {
                KvBuf::F32(v) => Tensor::from_slice(&v[have * kvd..], (rows - have, kvd), &self.device)?,
                KvBuf::F16(v) => Tensor::from_slice(&v[have * kvd..], (rows - have, kvd), &self.device)?,
            })
        };
        let (k, v) = (upload(&kv.k)?, upload(&kv.v)?);
        Ok(Some(match copy {
            Some(d) => DeviceKv { k: Tensor::cat(&[&d.k, &k], 0)?, v: Tensor::cat(&[&d.v, &v], 0)? },
            None => DeviceKv { k, v },
        }))
    }

    /// Masked softmax attention of queries `q` (`[heads][n][d]`, compute dtype) at positions
    /// `qpos` (`[n]`, f32) over keys `k`/`v` (`[kv_heads][m][d]`, compute dtype) at `kpos`
    /// (`[1][m]`, f32). Returns the probabilities `[kv_heads][rep * n][m]` (f32) and the
    /// output `[n][heads * d]` (f32).
    fn attend(&self, q: &Tensor, qpos: &Tensor, k: &Tensor, v: &Tensor, kpos: &Tensor) -> Result<(Tensor, Tensor)> {
        let (heads, n, d) = q.dims3()?;
        let (kv_heads, m, _) = k.dims3()?;
        let rep = heads / kv_heads;
        // Query heads of one key/value group are consecutive: stack them as one matrix.
        let q = q.reshape((kv_heads, rep * n, d))?;
        let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * (1.0 / (d as f64).sqrt()))?;
        let mask = kpos.broadcast_gt(&qpos.unsqueeze(1)?)?.to_dtype(DType::F32)?.affine(MASKED, 0.0)?;
        let scores = scores.reshape((kv_heads, rep, n, m))?.broadcast_add(&mask)?.reshape((kv_heads, rep * n, m))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.to_dtype(self.dtype)?.matmul(v)?.to_dtype(DType::F32)?;
        let out = out.reshape((heads, n, d))?.transpose(0, 1)?.reshape((n, heads * d))?;
        Ok((probs, out))
    }

    /// One segment's attention: appends its new K/V rows (`new`, `[n][kv_dim]` in the KV
    /// dtype on the device, and `host`, their host copies) to the host state and the device
    /// copy, then attends `q` (`[heads][n][d]`). Returns the output rows and the scores if
    /// asked.
    fn seg_attention(&self, seg: &mut Segment<'_>, q: &Tensor, new: (Tensor, Tensor), host: (KvBuf, KvBuf)) -> Result<(Tensor, Option<Vec<f32>>)> {
        let cfg = &self.cfg;
        let (kv_heads, d) = (cfg.num_key_value_heads, cfg.head_dim);
        let heads = cfg.num_attention_heads;
        let kv = &mut *seg.kv;
        if (kv.k.dtype(), kv.v.dtype()) != (host.0.dtype(), host.1.dtype()) {
            return Err(Error::InvalidInput("K/V element types differ between sequences of one step".into()));
        }
        let old = self.device_kv(kv)?;
        kv.positions.extend_from_slice(seg.positions);
        match (&mut kv.k, host.0, &mut kv.v, host.1) {
            (KvBuf::F32(k), KvBuf::F32(nk), KvBuf::F32(v), KvBuf::F32(nv)) => (k.extend(nk), v.extend(nv)),
            (KvBuf::F16(k), KvBuf::F16(nk), KvBuf::F16(v), KvBuf::F16(nv)) => (k.extend(nk), v.extend(nv)),
            _ => unreachable!("element types checked above"),
        };
        let all = match old {
            None => DeviceKv { k: new.0, v: new.1 },
            Some(old) => DeviceKv { k: Tensor::cat(&[&old.k, &new.0], 0)?, v: Tensor::cat(&[&old.v, &new.1], 0)? },
        };
        let (kpos, k, v) = match seg.keys {
            Some(rows) => {
                let idx = Tensor::from_slice(rows, rows.len(), &self.device)?;
                let kpos: Vec<f32> = rows.iter().map(|&r| kv.positions[r as usize] as f32).collect();
                (kpos, all.k.index_select(&idx, 0)?, all.v.index_select(&idx, 0)?)
            }
            None => (kv.positions.iter().map(|&p| p as f32).collect(), all.k.clone(), all.v.clone()),
        };
        kv.device = Some(all);
        let m = kpos.len();
        let kpos = Tensor::from_vec(kpos, (1, m), &self.device)?;
        let by_head = |t: Tensor| -> Result<Tensor> {
            Ok(t.to_dtype(self.dtype)?.reshape((m, kv_heads, d))?.transpose(0, 1)?.contiguous()?)
        };
        let (k, v) = (by_head(k)?, by_head(v)?);
        let n = seg.positions.len();
        let qpos = Tensor::from_vec(seg.positions.iter().map(|&p| p as f32).collect::<Vec<_>>(), n, &self.device)?;

        let block = (SCORE_BLOCK_ELEMS / (heads * m)).max(1);
        let mut outs = Vec::with_capacity(n.div_ceil(block));
        for start in (0..n).step_by(block) {
            let len = block.min(n - start);
            let qb = q.narrow(1, start, len)?.contiguous()?;
            outs.push(self.attend(&qb, &qpos.narrow(0, start, len)?, &k, &v, &kpos)?.1);
        }
        let out = Tensor::cat(&outs, 0)?;
        let scores = if seg.score_queries > 0 {
            // The LazyLLM importance: probabilities of the last w queries, averaged over
            // heads and those queries.
            let w = seg.score_queries.min(n);
            let qw = q.narrow(1, n - w, w)?.contiguous()?;
            let (probs, _) = self.attend(&qw, &qpos.narrow(0, n - w, w)?, &k, &v, &kpos)?;
            let total = (probs.sum((0, 1))? / (heads * w) as f64)?;
            Some(total.to_vec1::<f32>()?)
        } else {
            None
        };
        Ok((out, scores))
    }
}

/// A KV dtype as a candle dtype.
fn kv_dtype(dtype: KvDtype) -> DType {
    match dtype {
        KvDtype::F32 => DType::F32,
        KvDtype::F16 => DType::F16,
    }
}

/// `[n][width]` rows to the host as a [`KvBuf`] of `dtype`.
fn host_rows(t: &Tensor, dtype: KvDtype) -> Result<KvBuf> {
    let flat = t.flatten_all()?;
    Ok(match dtype {
        KvDtype::F32 => KvBuf::F32(flat.to_vec1()?),
        KvDtype::F16 => KvBuf::F16(flat.to_vec1()?),
    })
}

impl Forward for TensorModel {
    /// `[n][hidden]`, f32, on the device.
    type Rows = Tensor;

    fn config(&self) -> &Config {
        &self.cfg
    }

    fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::InvalidInput(format!("token id {t} outside the vocabulary of {}", self.cfg.vocab_size)));
        }
        let ids = Tensor::from_slice(tokens, tokens.len(), &self.device)?;
        Ok(self.embed.index_select(&ids, 0)?.to_dtype(DType::F32)?)
    }

    fn layer_forward_batch(&self, l: usize, x: &mut Tensor, segments: &mut [Segment<'_>]) -> Result<Vec<Option<Vec<f32>>>> {
        let cfg = &self.cfg;
        let (h, qd, kvd, d) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let n: usize = segments.iter().map(|s| s.positions.len()).sum();
        if x.dims2()? != (n, h) {
            return Err(Error::InvalidInput(format!("hidden rows {:?} for {n} positions", x.shape())));
        }
        if let Some(p) = segments.iter().flat_map(|s| s.positions.iter()).find(|&&p| p as usize >= cfg.max_position_embeddings) {
            return Err(Error::ContextOverflow { tokens: *p as usize + 1, max: cfg.max_position_embeddings });
        }
        let layer = &self.layers[l];
        let qkv = layer.qkv.forward(&self.norm(x, &layer.input_norm)?)?.to_dtype(DType::F32)?;
        let positions: Vec<u32> = segments.iter().flat_map(|s| s.positions.iter().copied()).collect();
        let pos = Tensor::from_vec(positions, n, &self.device)?;
        let (cos, sin) = (self.cos.index_select(&pos, 0)?, self.sin.index_select(&pos, 0)?);
        let heads_first = |t: Tensor, heads: usize| -> Result<Tensor> { Ok(t.reshape((n, heads, d))?.transpose(0, 1)?.contiguous()?) };
        let q = self.rope(&heads_first(qkv.narrow(1, 0, qd)?, heads)?, &cos, &sin)?;
        let k = self.rope(&heads_first(qkv.narrow(1, qd, kvd)?, kv_heads)?, &cos, &sin)?;
        // New K/V rows in the KV dtype: the device copy, and one copy to the host per layer.
        let kv_dt = segments.first().map_or(KvDtype::F32, |s| s.kv.k.dtype());
        let k = k.transpose(0, 1)?.reshape((n, kvd))?.to_dtype(kv_dtype(kv_dt))?;
        let v = qkv.narrow(1, qd + kvd, kvd)?.contiguous()?.to_dtype(kv_dtype(kv_dt))?;
        let (k_host, v_host) = (host_rows(&k, kv_dt)?, host_rows(&v, kv_dt)?);

        let mut outs = Vec::with_capacity(segments.len());
        let mut scores = Vec::with_capacity(segments.len());
        let mut at = 0;
        for seg in segments.iter_mut() {
            let r = seg.positions.len();
            let rows = |b: &KvBuf| match b {
                KvBuf::F32(v) => KvBuf::F32(v[at * kvd..(at + r) * kvd].to_vec()),
                KvBuf::F16(v) => KvBuf::F16(v[at * kvd..(at + r) * kvd].to_vec()),
            };
            let new = (k.narrow(0, at, r)?, v.narrow(0, at, r)?);
            let (out, s) = self.seg_attention(seg, &q.narrow(1, at, r)?, new, (rows(&k_host), rows(&v_host)))?;
            outs.push(out);
            scores.push(s);
            at += r;
        }
        let attn = Tensor::cat(&outs, 0)?.to_dtype(self.dtype)?;
        let mut y = (&*x + layer.o.forward(&attn)?.to_dtype(DType::F32)?)?;
        let gu = layer.gate_up.forward(&self.norm(&y, &layer.post_norm)?)?;
        let i = cfg.intermediate_size;
        let act = (candle_nn::ops::silu(&gu.narrow(1, 0, i)?)? * gu.narrow(1, i, i)?)?;
        y = (y + layer.down.forward(&act)?.to_dtype(DType::F32)?)?;
        *x = y;
        Ok(scores)
    }

    fn logits_batch(&self, x: &Tensor) -> Result<Vec<Vec<f32>>> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = self.norm(x, &self.norm)?.matmul(&head.t()?)?.to_dtype(DType::F32)?;
        Ok(logits.to_vec2()?)
    }

    fn row_count(&self, x: &Tensor) -> usize {
        x.dim(0).unwrap_or(0)
    }

    fn gather(&self, x: &Tensor, rows: &[u32]) -> Result<Tensor> {
        let idx = Tensor::from_slice(rows, rows.len(), &self.device)?;
        Ok(x.index_select(&idx, 0)?)
    }

    fn concat(&self, parts: Vec<Tensor>) -> Result<Tensor> {
        match parts.len() {
            0 => Err(Error::InvalidInput("no hidden rows to stack".into())),
            1 => Ok(parts.into_iter().next().expect("one part")),
            _ => Ok(Tensor::cat(&parts, 0)?),
        }
    }

    fn split(&self, x: Tensor, counts: &[usize]) -> Result<Vec<Tensor>> {
        let mut at = 0;
        counts
            .iter()
            .map(|&n| {
                let part = x.narrow(0, at, n)?;
                at += n;
                Ok(part)
            })
            .collect()
    }

    fn download(&self, x: Tensor) -> Result<Vec<f32>> {
        Ok(x.flatten_all()?.to_vec1()?)
    }

    fn upload(&self, data: Vec<f32>) -> Result<Tensor> {
        let n = data.len() / self.cfg.hidden_size;
        Ok(Tensor::from_vec(data, (n, self.cfg.hidden_size), &self.device)?)
    }
}

/// Where a forward pass runs, as `--device` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// Our CPU kernels ([`crate::Model`]).
    Cpu,
    /// [`TensorModel`] on CUDA device N.
    Cuda(usize),
    /// [`TensorModel`] on candle's CPU device: the GPU code path on a host without one, for
    /// checks; much slower than `Cpu`.
    CandleCpu,
}

impl std::str::FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidInput(format!("device {s:?}: expected cpu, cuda, cuda:N or candle-cpu"));
        match s {
            "cpu" => Ok(Self::Cpu),
            "candle-cpu" => Ok(Self::CandleCpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Self::Cuda).ok_or_else(bad),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::CandleCpu => f.write_str("candle-cpu"),
        }
    }
}

impl DeviceSpec {
    /// The candle device a [`TensorModel`] runs on; None for our CPU kernels. Fails with a
    /// message a user can act on when CUDA is not compiled in or the GPU cannot be opened.
    pub fn candle_device(self) -> Result<Option<Device>> {
        match self {
            Self::Cpu => Ok(None),
            Self::CandleCpu => Ok(Some(Device::Cpu)),
            Self::Cuda(n) => match Device::new_cuda(n) {
                Ok(d) => Ok(Some(d)),
                Err(candle_core::Error::NotCompiledWithCudaSupport) => Err(Error::Unsupported(format!(
                    "device {self}: this binary was built without CUDA (build it with scripts/build-cuda.sh, or use deploy/Dockerfile.cuda)"
                ))),
                Err(e) => Err(Error::Unsupported(format!("device {self}: cannot open the GPU: {e}"))),
            },
        }
    }
}
