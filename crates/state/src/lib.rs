//! Sequence state on the wire (DESIGN.md section 3): a header, then per layer the K/V rows
//! that were computed (with their original positions) and the Aux Cache rows, in chunks well
//! below gRPC's message limit, then a trailer whose counts and CRC-32C let the receiver
//! refuse a truncated or corrupted stream before using any of it.
//!
//! The receiver trusts nothing it is sent: the header's shape must be the model's and its
//! tokens must fit the model's context, so every later length is checked against numbers it
//! already holds before anything is sliced or allocated; a layer can hold at most one row per
//! token, which bounds what a stream can make the receiver keep.

use half::f16;
use lazyserve_engine::lazy::{AuxCache, LayerState, Schedule, SequenceState};
use lazyserve_model::kernels::kv::KvBuf;
use lazyserve_model::{Config, KvDtype, LayerKv};

use lazyserve_proto::v1::{state_chunk::Part, AuxRows, KvRows, SamplingParams, StateChunk, StateEncoding, StateHeader, StateTrailer};

/// The wire format version this build writes and reads.
pub const STATE_VERSION: u32 = 1;

/// Payload bytes per chunk: a quarter of gRPC's default 4 MiB message limit.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Why a state stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The stream broke the format: out of order, wrong sizes, bad counts or checksum.
    #[error("invalid state stream: {0}")]
    Invalid(String),
    /// The state does not fit this worker's model.
    #[error("state does not match this model: {0}")]
    Mismatch(String),
    /// The stream ended before its trailer.
    #[error("state stream ended before its trailer ({0} chunks received)")]
    Truncated(u32),
    #[error(transparent)]
    Engine(#[from] lazyserve_engine::Error),
}

pub type Result<T> = std::result::Result<T, StateError>;

fn invalid(msg: impl Into<String>) -> StateError {
    StateError::Invalid(msg.into())
}

/// Shape numbers both ends must agree on, and the receiving model's limits.
#[derive(Debug, Clone, Copy)]
struct Shape {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    hidden: usize,
    /// The most prompt tokens a state may hold: room is left for one generated token.
    max_tokens: usize,
    vocab: usize,
}

impl Shape {
    fn of(cfg: &Config) -> Self {
        Self {
            layers: cfg.num_hidden_layers,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            hidden: cfg.hidden_size,
            max_tokens: cfg.max_position_embeddings.saturating_sub(1),
            vocab: cfg.vocab_size,
        }
    }

    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Running payload count and checksum, the same on both ends.
#[derive(Debug, Default)]
struct Tally {
    row_chunks: u32,
    bytes: u64,
    crc: u32,
}

impl Tally {
    fn add(&mut self, parts: &[&[u8]]) {
        self.row_chunks = self.row_chunks.saturating_add(1);
        for p in parts {
            self.bytes += p.len() as u64;
            self.crc = crc32c::crc32c_append(self.crc, p);
        }
    }
}

fn u32s_le(xs: &[u32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32s_le(xs: impl Iterator<Item = f32>) -> Vec<u8> {
    xs.flat_map(|x| x.to_le_bytes()).collect()
}

fn f16s_le(xs: impl Iterator<Item = f16>) -> Vec<u8> {
    xs.flat_map(|x| x.to_le_bytes()).collect()
}

/// Rows of one K or V buffer in the wire encoding: (values, scales).
fn encode_rows(buf: &KvBuf, rows: std::ops::Range<usize>, shape: Shape, encoding: StateEncoding) -> (Vec<u8>, Vec<u8>) {
    let w = shape.kv_width();
    let span = rows.start * w..rows.end * w;
    match (encoding, buf) {
        (StateEncoding::F16, KvBuf::F16(v)) => (f16s_le(v[span].iter().copied()), Vec::new()),
        (StateEncoding::F16, KvBuf::F32(v)) => (f16s_le(v[span].iter().map(|&x| f16::from_f32(x))), Vec::new()),
        (StateEncoding::F32, KvBuf::F16(v)) => (f32s_le(v[span].iter().map(|x| x.to_f32())), Vec::new()),
        (StateEncoding::F32, KvBuf::F32(v)) => (f32s_le(v[span].iter().copied()), Vec::new()),
        (StateEncoding::Int8, buf) => {
            let values = match buf {
                KvBuf::F32(v) => std::borrow::Cow::Borrowed(&v[span]),
                KvBuf::F16(v) => std::borrow::Cow::Owned(v[span].iter().map(|x| x.to_f32()).collect()),
            };
            let mut q = Vec::with_capacity(values.len());
            let mut scales = Vec::with_capacity(values.len() / shape.head_dim * 4);
            for head in values.chunks(shape.head_dim) {
                let max = head.iter().fold(0f32, |m, x| m.max(x.abs()));
                let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
                q.extend(head.iter().map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8 as u8));
                scales.extend_from_slice(&scale.to_le_bytes());
            }
            (q, scales)
        }
    }
}

/// Turns a prefill's finished layers into state chunks, keeping the tally for the trailer.
pub struct StateEncoder {
    shape: Shape,
    encoding: StateEncoding,
    tally: Tally,
    chunks: u32,
}

impl StateEncoder {
    pub fn new(cfg: &Config, encoding: StateEncoding) -> Self {
        Self { shape: Shape::of(cfg), encoding, tally: Tally::default(), chunks: 0 }
    }

    /// The first chunk.
    pub fn header(
        &mut self,
        sequence_id: &str,
        model: &str,
        tokens: &[u32],
        prune: &str,
        sampling: SamplingParams,
        ttl_ms: u32,
    ) -> StateChunk {
        self.chunks += 1;
        StateChunk {
            part: Some(Part::Header(StateHeader {
                version: STATE_VERSION,
                sequence_id: sequence_id.to_string(),
                model: model.to_string(),
                tokens: tokens.to_vec(),
                prune: prune.to_string(),
                sampling: Some(sampling),
                encoding: self.encoding as i32,
                num_layers: self.shape.layers as u32,
                kv_width: self.shape.kv_width() as u32,
                hidden_size: self.shape.hidden as u32,
                ttl_ms,
            })),
        }
    }

    /// The chunks of layer `l`, once it is done.
    pub fn layer(&mut self, l: usize, layer: &LayerState) -> Vec<StateChunk> {
        let shape = self.shape;
        let mut out = Vec::new();
        let kv = &layer.kv;
        let elem = match self.encoding {
            StateEncoding::F16 => 2,
            StateEncoding::F32 => 4,
            StateEncoding::Int8 => 1,
        };
        let rows_per_chunk = (CHUNK_BYTES / (2 * shape.kv_width() * elem)).max(1);
        let mut start = 0;
        while start < kv.len() {
            let end = (start + rows_per_chunk).min(kv.len());
            let positions = kv.positions[start..end].to_vec();
            let (k, k_scales) = encode_rows(&kv.k, start..end, shape, self.encoding);
            let (v, v_scales) = encode_rows(&kv.v, start..end, shape, self.encoding);
            self.tally.add(&[&u32s_le(&positions), &k, &v, &k_scales, &v_scales]);
            out.push(Part::Kv(KvRows { layer: l as u32, positions, k, v, k_scales, v_scales }));
            start = end;
        }
        let aux = &layer.aux;
        let aux_elem = if self.encoding == StateEncoding::Int8 { 2 } else { 4 };
        let rows_per_chunk = (CHUNK_BYTES / (shape.hidden * aux_elem)).max(1);
        for (i, positions) in aux.positions.chunks(rows_per_chunk).enumerate() {
            let first = i * rows_per_chunk;
            let values = &aux.hidden[first * shape.hidden..(first + positions.len()) * shape.hidden];
            let hidden = if self.encoding == StateEncoding::Int8 {
                f16s_le(values.iter().map(|&x| f16::from_f32(x)))
            } else {
                f32s_le(values.iter().copied())
            };
            let positions = positions.to_vec();
            self.tally.add(&[&u32s_le(&positions), &hidden]);
            out.push(Part::Aux(AuxRows { layer: l as u32, positions, hidden }));
        }
        self.chunks += out.len() as u32;
        out.into_iter().map(|part| StateChunk { part: Some(part) }).collect()
    }

    /// The last chunk.
    pub fn trailer(&mut self) -> StateChunk {
        self.chunks += 1;
        StateChunk {
            part: Some(Part::Trailer(StateTrailer {
                row_chunks: self.tally.row_chunks,
                payload_bytes: self.tally.bytes,
                crc32c: self.tally.crc,
            })),
        }
    }

    /// Payload bytes so far.
    pub fn bytes(&self) -> u64 {
        self.tally.bytes
    }

    /// Chunks so far, header and trailer included.
    pub fn chunks(&self) -> u32 {
        self.chunks
    }
}

/// A state stream's header, checked against the receiving model.
#[derive(Debug, Clone)]
pub struct Header {
    pub sequence_id: String,
    pub tokens: Vec<u32>,
    pub prune: String,
    pub sampling: SamplingParams,
    pub encoding: StateEncoding,
    pub ttl_ms: u32,
}

/// Which rows a chunk carries. A stream sends each layer's K/V rows, then its Aux Cache rows,
/// layer after layer, as the prefill finishes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rows {
    Kv,
    Aux,
}

impl Rows {
    fn name(self) -> &'static str {
        match self {
            Rows::Kv => "K/V",
            Rows::Aux => "Aux Cache",
        }
    }
}

/// Receives a state stream chunk by chunk; only a complete, verified stream yields a state.
pub struct StateAssembler {
    shape: Shape,
    header: Option<Header>,
    schedule: Option<Schedule>,
    kv: Vec<LayerKv>,
    aux: Vec<(Vec<u32>, Vec<f32>)>,
    /// The layer and kind of the last row chunk: they only move forward.
    last: Option<(usize, Rows)>,
    tally: Tally,
    chunks: u32,
    verified: bool,
    /// Set by the first refused chunk: a broken stream stays refused.
    failed: bool,
}

impl StateAssembler {
    /// Expects a state for `cfg`'s model, stores K/V as `kv_dtype`.
    pub fn new(cfg: &Config, kv_dtype: KvDtype) -> Self {
        let shape = Shape::of(cfg);
        Self {
            shape,
            header: None,
            schedule: None,
            kv: (0..shape.layers).map(|_| LayerKv::new(kv_dtype)).collect(),
            aux: vec![(Vec::new(), Vec::new()); shape.layers],
            last: None,
            tally: Tally::default(),
            chunks: 0,
            verified: false,
            failed: false,
        }
    }

    /// Bytes held so far (what the store accounts for).
    pub fn bytes(&self) -> usize {
        self.kv.iter().map(LayerKv::bytes).sum::<usize>() + self.aux.iter().map(|(p, h)| 4 * (p.len() + h.len())).sum::<usize>()
    }

    /// Chunks taken so far.
    pub fn chunks(&self) -> u32 {
        self.chunks
    }

    /// Takes the next chunk. Refuses anything after a verified trailer or a refused chunk.
    pub fn push(&mut self, chunk: StateChunk, model_id: &str) -> Result<()> {
        if self.failed {
            return Err(invalid("chunk after a refused one"));
        }
        if self.verified {
            return Err(invalid("chunk after the trailer"));
        }
        self.chunks = self.chunks.saturating_add(1);
        let taken = self.take(chunk, model_id);
        self.failed = taken.is_err();
        taken
    }

    fn take(&mut self, chunk: StateChunk, model_id: &str) -> Result<()> {
        let part = chunk.part.ok_or_else(|| invalid("empty chunk"))?;
        let Some(h) = &self.header else {
            let Part::Header(h) = part else { return Err(invalid("first chunk is not a header")) };
            let (header, schedule) = self.check_header(h, model_id)?;
            (self.header, self.schedule) = (Some(header), Some(schedule));
            return Ok(());
        };
        let (n_tokens, encoding) = (h.tokens.len(), h.encoding);
        match part {
            Part::Header(_) => return Err(invalid("second header")),
            Part::Kv(rows) => self.push_kv(rows, n_tokens, encoding)?,
            Part::Aux(rows) => self.push_aux(rows, n_tokens, encoding)?,
            Part::Trailer(t) => {
                let ours = (self.tally.row_chunks, self.tally.bytes, self.tally.crc);
                if ours != (t.row_chunks, t.payload_bytes, t.crc32c) {
                    return Err(invalid(format!(
                        "trailer says {} row chunks, {} bytes, crc {:08x}; received {}, {}, {:08x}",
                        t.row_chunks, t.payload_bytes, t.crc32c, ours.0, ours.1, ours.2
                    )));
                }
                self.verified = true;
            }
        }
        Ok(())
    }

    /// Checks everything later chunks are measured against: shape, token count and ids, schedule.
    fn check_header(&self, h: StateHeader, model_id: &str) -> Result<(Header, Schedule)> {
        if h.version != STATE_VERSION {
            return Err(invalid(format!("version {} (this worker reads {STATE_VERSION})", h.version)));
        }
        if h.model != model_id {
            return Err(StateError::Mismatch(format!("state is for model {:?}, this worker serves {model_id:?}", h.model)));
        }
        let shape = self.shape;
        let theirs = (h.num_layers as usize, h.kv_width as usize, h.hidden_size as usize);
        if theirs != (shape.layers, shape.kv_width(), shape.hidden) {
            return Err(StateError::Mismatch(format!(
                "layers/kv width/hidden {theirs:?}, expected {:?}",
                (shape.layers, shape.kv_width(), shape.hidden)
            )));
        }
        let encoding = StateEncoding::try_from(h.encoding).map_err(|_| invalid(format!("unknown encoding {}", h.encoding)))?;
        if h.tokens.is_empty() || h.sequence_id.is_empty() {
            return Err(invalid("header without tokens or sequence id"));
        }
        if h.tokens.len() > shape.max_tokens {
            return Err(StateError::Mismatch(format!("{} tokens, this model's context holds {}", h.tokens.len(), shape.max_tokens)));
        }
        if let Some(id) = h.tokens.iter().find(|&&id| id as usize >= shape.vocab) {
            return Err(StateError::Mismatch(format!("token {id} is not below the vocabulary size {}", shape.vocab)));
        }
        let schedule = Schedule::parse(&h.prune, shape.layers).map_err(lazyserve_engine::Error::from)?;
        let header = Header {
            sequence_id: h.sequence_id,
            tokens: h.tokens,
            prune: h.prune,
            sampling: h.sampling.ok_or_else(|| invalid("header without sampling params"))?,
            encoding,
            ttl_ms: h.ttl_ms,
        };
        Ok((header, schedule))
    }

    /// Checks a row chunk's layer, order and positions against the header before any of its
    /// payload is looked at.
    fn check_rows(&mut self, l: usize, kind: Rows, positions: &[u32], n_tokens: usize) -> Result<()> {
        let what = kind.name();
        if l >= self.shape.layers {
            return Err(invalid(format!("{what} rows for layer {l} of {}", self.shape.layers)));
        }
        if positions.is_empty() {
            return Err(invalid(format!("layer {l}: a {what} chunk without rows")));
        }
        if let Some(last) = self.last.filter(|&last| last > (l, kind)) {
            return Err(invalid(format!("layer {l}: {what} rows after {} rows of layer {} (out of order)", last.1.name(), last.0)));
        }
        self.last = Some((l, kind));
        let held = if kind == Rows::Kv { self.kv[l].len() } else { self.aux[l].0.len() };
        if held + positions.len() > n_tokens {
            return Err(invalid(format!("layer {l}: more {what} rows than tokens")));
        }
        if let Some(p) = positions.iter().find(|&&p| p as usize >= n_tokens) {
            return Err(invalid(format!("layer {l}: {what} position {p} is past the {n_tokens} tokens")));
        }
        Ok(())
    }

    fn push_kv(&mut self, rows: KvRows, n_tokens: usize, encoding: StateEncoding) -> Result<()> {
        let shape = self.shape;
        let l = rows.layer as usize;
        self.check_rows(l, Rows::Kv, &rows.positions, n_tokens)?;
        // n <= n_tokens <= the model's context: none of these products can overflow.
        let n = rows.positions.len();
        let w = shape.kv_width();
        let (elem, scales) = match encoding {
            StateEncoding::F16 => (2, 0),
            StateEncoding::F32 => (4, 0),
            StateEncoding::Int8 => (1, 4 * n * shape.kv_heads),
        };
        let sizes = (rows.k.len(), rows.v.len(), rows.k_scales.len(), rows.v_scales.len());
        if sizes != (n * w * elem, n * w * elem, scales, scales) {
            return Err(invalid(format!("layer {l}: K/V byte sizes {sizes:?} do not match {n} rows")));
        }
        self.tally.add(&[&u32s_le(&rows.positions), &rows.k, &rows.v, &rows.k_scales, &rows.v_scales]);
        let kv = &mut self.kv[l];
        kv.positions.extend_from_slice(&rows.positions);
        decode_into(&mut kv.k, &rows.k, &rows.k_scales, encoding, shape.head_dim);
        decode_into(&mut kv.v, &rows.v, &rows.v_scales, encoding, shape.head_dim);
        Ok(())
    }

    fn push_aux(&mut self, rows: AuxRows, n_tokens: usize, encoding: StateEncoding) -> Result<()> {
        let shape = self.shape;
        let l = rows.layer as usize;
        self.check_rows(l, Rows::Aux, &rows.positions, n_tokens)?;
        let n = rows.positions.len();
        let elem = if encoding == StateEncoding::Int8 { 2 } else { 4 };
        if rows.hidden.len() != n * shape.hidden * elem {
            return Err(invalid(format!("layer {l}: Aux Cache has {} bytes for {n} rows", rows.hidden.len())));
        }
        self.tally.add(&[&u32s_le(&rows.positions), &rows.hidden]);
        let (positions, hidden) = &mut self.aux[l];
        positions.extend_from_slice(&rows.positions);
        if elem == 2 {
            hidden.extend(rows.hidden.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()));
        } else {
            hidden.extend(rows.hidden.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        }
        Ok(())
    }

    /// The state, once the trailer has been verified; `Truncated` before that.
    pub fn finish(self, cfg: &Config) -> Result<(Header, SequenceState)> {
        let (header, schedule) = match (self.verified, self.header, self.schedule) {
            (true, Some(h), Some(s)) => (h, s),
            _ => return Err(StateError::Truncated(self.chunks)),
        };
        let hidden = self.shape.hidden;
        let layers = self
            .kv
            .into_iter()
            .zip(self.aux)
            .map(|(kv, (positions, values))| Ok((kv, AuxCache::from_rows(hidden, positions, values)?)))
            .collect::<std::result::Result<Vec<_>, lazyserve_engine::Error>>()?;
        let state = SequenceState::restore(cfg, header.tokens.clone(), schedule, header.sampling.seed, layers)?;
        Ok((header, state))
    }
}

fn decode_into(buf: &mut KvBuf, bytes: &[u8], scales: &[u8], encoding: StateEncoding, head_dim: usize) {
    let values: Vec<f32> = match encoding {
        StateEncoding::F16 => {
            if let KvBuf::F16(v) = buf {
                v.extend(bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])));
                return;
            }
            bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        }
        StateEncoding::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        StateEncoding::Int8 => bytes
            .chunks_exact(head_dim)
            .zip(scales.chunks_exact(4))
            .flat_map(|(q, s)| {
                let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                q.iter().map(move |&b| b as i8 as f32 * scale)
            })
            .collect(),
    };
    buf.extend_from_f32(&values);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_rows_round_trip_within_one_step() {
        let shape = Shape { layers: 1, kv_heads: 2, head_dim: 8, hidden: 16, max_tokens: 3, vocab: 10 };
        let w = shape.kv_width();
        let values: Vec<f32> = (0..3 * w).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let buf = KvBuf::F32(values.clone());
        let (q, s) = encode_rows(&buf, 0..3, shape, StateEncoding::Int8);
        let mut out = KvBuf::new(KvDtype::F32);
        decode_into(&mut out, &q, &s, StateEncoding::Int8, shape.head_dim);
        let KvBuf::F32(out) = out else { unreachable!() };
        for (head, got) in values.chunks(shape.head_dim).zip(out.chunks(shape.head_dim)) {
            let step = head.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for (a, b) in head.iter().zip(got) {
                assert!((a - b).abs() <= step / 2.0 + 1e-6, "{a} vs {b}");
            }
        }
    }
}
