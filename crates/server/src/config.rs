//! The workers' own flags (model, device, prefill, decode); every flag the services share
//! is lazyserve-service's, re-exported here so that a worker finds all of them in one place.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use lazyserve_engine::Engine;
use lazyserve_model::{DeviceSpec, KvDtype, WeightFormat};
pub use lazyserve_service::config::*;

/// How weights are held; see the README for the measured trade-off. Each role keeps only the
/// copies it uses: a prefill worker no Q8_0 copy, a decode worker no prompt copy unless its
/// prefill chunk is longer than 32 tokens.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Weights {
    /// f32 for everything (reference numerics).
    F32,
    /// f32 for prompts, Q8_0 (weight-only) for decode steps: faster decode.
    Q8Decode,
    /// f16 for prompts (widened to f32 in the GEMM), Q8_0 for decode steps: half the
    /// prompt copy's memory.
    #[value(name = "f16-q8-decode")]
    F16Q8Decode,
    /// f16 for prompts; decode steps on a GGUF file's own Q4_1 blocks where it stores a layer
    /// so (Q8_0 for the others): the file's exact values, at 0.625 bytes a weight.
    #[value(name = "f16-q4-decode")]
    F16Q4Decode,
}

impl From<Weights> for WeightFormat {
    fn from(w: Weights) -> Self {
        match w {
            Weights::F32 => WeightFormat::F32,
            Weights::Q8Decode => WeightFormat::Q8_DECODE,
            Weights::F16Q8Decode => WeightFormat::F16_Q8_DECODE,
            Weights::F16Q4Decode => WeightFormat::F16_Q4_DECODE,
        }
    }
}

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KvType {
    /// Exact.
    F32,
    /// Half the bytes a decode step reads.
    F16,
}

impl From<KvType> for KvDtype {
    fn from(k: KvType) -> Self {
        match k {
            KvType::F32 => KvDtype::F32,
            KvType::F16 => KvDtype::F16,
        }
    }
}

/// Element type of weights and products on a tensor device (`--device cuda`).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DeviceDtype {
    F32,
    F16,
    Bf16,
}

impl From<DeviceDtype> for candle_core::DType {
    fn from(d: DeviceDtype) -> Self {
        match d {
            DeviceDtype::F32 => Self::F32,
            DeviceDtype::F16 => Self::F16,
            DeviceDtype::Bf16 => Self::BF16,
        }
    }
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    s.parse().map_err(|e: lazyserve_model::Error| e.to_string())
}

/// Options every model-running command shares.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF file or Hugging Face checkpoint folder.
    #[arg(long, env = "LAZYSERVE_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Weight format in memory. A prefill worker keeps no Q8_0 copy; a decode worker keeps
    /// only the Q8_0 copy unless --prefill-chunk-tokens is over 32.
    #[arg(long, env = "LAZYSERVE_WEIGHTS", value_enum, default_value = "f16-q8-decode")]
    pub weights: Weights,
    /// KV cache element type.
    #[arg(long, env = "LAZYSERVE_KV_DTYPE", value_enum, default_value = "f16")]
    pub kv_dtype: KvType,
    /// Compute threads (default: all cores).
    #[arg(long, env = "LAZYSERVE_THREADS")]
    pub threads: Option<usize>,
    /// Where the forward pass runs: cpu (our kernels), cuda or cuda:N (candle's CUDA
    /// backend; needs a CUDA build), candle-cpu (the CUDA code path on candle's CPU device,
    /// for checks only: slow).
    #[arg(long, env = "LAZYSERVE_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceSpec,
    /// Weights and products on a tensor device (default: bf16 on CUDA, f32 on candle-cpu);
    /// --weights applies to cpu only.
    #[arg(long, env = "LAZYSERVE_DEVICE_DTYPE", value_enum)]
    pub device_dtype: Option<DeviceDtype>,
}

impl ModelArgs {
    /// Sets the compute thread count and checks that the model exists.
    fn prepare(&self) -> anyhow::Result<()> {
        if let Some(n) = self.threads {
            anyhow::ensure!(n > 0, "--threads must be at least 1");
            rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("thread pool")?;
        }
        if !self.model.exists() && self.model.as_path() == std::path::Path::new(DEFAULT_MODEL) {
            anyhow::bail!("model file not found: {DEFAULT_MODEL} (run scripts/fetch-model.sh, or pass --model)");
        }
        Ok(())
    }

    pub fn load(&self) -> anyhow::Result<Engine> {
        self.load_for(|format| format)
    }

    /// Loads the model with the weight copies `role` keeps of `--weights` (CPU only).
    pub fn load_for(&self, role: impl FnOnce(WeightFormat) -> WeightFormat) -> anyhow::Result<Engine> {
        self.prepare()?;
        let kv = self.kv_dtype.into();
        let engine = match self.device.candle_device()? {
            None => Engine::new(lazyserve_model::load(&self.model, role(self.weights.into()))?, kv),
            Some(device) => {
                let default = if device.is_cuda() { DeviceDtype::Bf16 } else { DeviceDtype::F32 };
                let dtype = self.device_dtype.unwrap_or(default).into();
                Engine::new(lazyserve_model::load_tensor(&self.model, &device, dtype)?, kv)
            }
        };
        tracing::info!(device = %engine.backend.describe(), "forward pass");
        Ok(engine)
    }

    /// The tokenizer and hyper-parameters only.
    pub fn load_meta(&self) -> anyhow::Result<lazyserve_model::ModelMeta> {
        MetaArgs { model: self.model.clone() }.load()
    }
}

/// Prefill worker options.
#[derive(Args, Debug, Clone)]
pub struct PrefillArgs {
    /// Prompts computed at once; each uses every compute thread.
    #[arg(long, env = "LAZYSERVE_PREFILL_CONCURRENCY", default_value_t = 1)]
    pub prefill_concurrency: usize,
    /// Prompts waiting for a slot; more get RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "LAZYSERVE_PREFILL_QUEUE", default_value_t = 64)]
    pub prefill_queue: usize,
}

/// Decode worker options.
#[derive(Args, Debug, Clone)]
pub struct DecodeArgs {
    /// Sequence states held at once (received or decoding); more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "LAZYSERVE_MAX_SEQUENCES", default_value_t = 64)]
    pub max_sequences: usize,
    /// Bytes of sequence state held at once (MiB).
    #[arg(long, env = "LAZYSERVE_MAX_STATE_MIB", default_value_t = 8192)]
    pub max_state_mib: usize,
    /// Prompt tokens prefilled here per engine-loop iteration (the chunk size of local
    /// prefill): bounds how much a new prompt delays the tokens of running streams.
    #[arg(long, env = "LAZYSERVE_PREFILL_CHUNK_TOKENS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub prefill_chunk_tokens: u32,
}

impl DecodeArgs {
    /// The weight copies a decode worker keeps: chunks of at most 32 tokens and decode steps
    /// run on the Q8_0 copy, so the prompt copy stays only for longer chunks.
    pub fn weights(&self, format: WeightFormat) -> WeightFormat {
        if self.prefill_chunk_tokens as usize <= lazyserve_model::kernels::linear::Q8_MAX_ROWS {
            format.without_dense_layers()
        } else {
            format
        }
    }
}
