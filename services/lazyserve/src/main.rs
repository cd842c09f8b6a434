//! `lazyserve`: run the model locally (`generate`) and measure it (`bench`, `bench-lazy`).

mod bench;
mod bench_lazy;
mod generate;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use lazyserve_engine::Engine;
use lazyserve_model::{KvDtype, WeightFormat};

/// The model `scripts/fetch-model.sh` fetches.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(name = "lazyserve", version, about = "LazyLLM serving: local generation and benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text in-process, for one prompt or a JSONL batch.
    Generate(generate::GenerateArgs),
    /// Prefill and decode timings at several prompt lengths, side by side with llama.cpp.
    Bench(bench::BenchArgs),
    /// LazyLLM presets and baselines against dense: speed, tokens computed, passkey accuracy,
    /// agreement with dense.
    BenchLazy(bench_lazy::BenchLazyArgs),
}

/// How weights are held; see the README for the measured trade-off.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Weights {
    /// f32 for everything (reference numerics).
    F32,
    /// f32 for prompts, Q8_0 (weight-only) for decode steps: faster decode.
    Q8Decode,
}

impl From<Weights> for WeightFormat {
    fn from(w: Weights) -> Self {
        match w {
            Weights::F32 => WeightFormat::F32,
            Weights::Q8Decode => WeightFormat::Q8Decode,
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

/// Options every model-running command shares.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF file or Hugging Face checkpoint folder.
    #[arg(long, env = "LAZYSERVE_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Weight format in memory.
    #[arg(long, env = "LAZYSERVE_WEIGHTS", value_enum, default_value = "q8-decode")]
    pub weights: Weights,
    /// KV cache element type.
    #[arg(long, env = "LAZYSERVE_KV_DTYPE", value_enum, default_value = "f16")]
    pub kv_dtype: KvType,
    /// Compute threads (default: all cores).
    #[arg(long, env = "LAZYSERVE_THREADS")]
    pub threads: Option<usize>,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<Engine> {
        if let Some(n) = self.threads {
            anyhow::ensure!(n > 0, "--threads must be at least 1");
            rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("thread pool")?;
        }
        if !self.model.exists() && self.model == PathBuf::from(DEFAULT_MODEL) {
            anyhow::bail!("model file not found: {DEFAULT_MODEL} (run scripts/fetch-model.sh, or pass --model)");
        }
        let loaded = lazyserve_model::load(&self.model, self.weights.into())?;
        Ok(Engine::new(loaded, self.kv_dtype.into()))
    }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::BenchLazy(args) => bench_lazy::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
