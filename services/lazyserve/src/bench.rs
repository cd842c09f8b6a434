//! `lazyserve bench`: dense prefill and decode timings at several prompt lengths, and
//! llama.cpp's on the same GGUF file, token ids and thread count, as ratios in one table.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use lazyserve_engine::Engine;
use lazyserve_model::{KvCache, KvDtype, Model};
use serde::Deserialize;

use crate::ModelArgs;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,2048,4096")]
    lengths: Vec<usize>,
    /// Greedy decode steps timed after each prefill.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Python with llama-cpp-python (scripts/setup-llamacpp.sh makes .venv-llamacpp);
    /// "none" skips the llama.cpp column.
    #[arg(long, default_value = ".venv-llamacpp/bin/python")]
    llamacpp_python: String,
    /// Text the prompts are cut from (repeated as needed).
    #[arg(long, default_value = "/usr/share/common-licenses/GPL-3")]
    corpus: PathBuf,
}

struct Row {
    n: usize,
    prefill_s: f64,
    decode_ms: f64,
    first_token: u32,
}

#[derive(Deserialize)]
struct LlamaRow {
    n: usize,
    prefill_s: f64,
    decode_ms_per_token: f64,
    first_token: u32,
}

/// Token ids of real prose, `n` of them.
pub(crate) fn prompt(m: &Engine, corpus: &Path, n: usize) -> anyhow::Result<Vec<u32>> {
    let text = std::fs::read_to_string(corpus).with_context(|| format!("reading corpus {}", corpus.display()))?;
    let ids = m.tokenizer.encode(&text)?;
    if ids.is_empty() {
        bail!("corpus {} is empty", corpus.display());
    }
    Ok(ids.iter().copied().cycle().take(n).collect())
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32)
}

fn measure(m: &Model, kv: KvDtype, ids: &[u32], decode_tokens: usize) -> anyhow::Result<Row> {
    let mut cache = KvCache::new(m.config(), kv);
    let t = Instant::now();
    let logits = m.forward(ids, &mut cache)?;
    let prefill_s = t.elapsed().as_secs_f64();
    let first_token = argmax(&logits);
    let mut next = first_token;
    let t = Instant::now();
    for _ in 0..decode_tokens {
        next = argmax(&m.forward(&[next], &mut cache)?);
    }
    let decode_ms = t.elapsed().as_secs_f64() * 1e3 / decode_tokens.max(1) as f64;
    Ok(Row { n: ids.len(), prefill_s, decode_ms, first_token })
}

fn llama_cpp(args: &BenchArgs, threads: usize, prompts: &[Vec<u32>]) -> anyhow::Result<Vec<LlamaRow>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/llamacpp_bench.py");
    let request = serde_json::json!({
        "model": std::fs::canonicalize(&args.model.model)?,
        "threads": threads,
        "decode_tokens": args.decode_tokens,
        "flash_attn": false,
        "prompts": prompts.iter().map(|ids| serde_json::json!({"n": ids.len(), "ids": ids})).collect::<Vec<_>>(),
    });
    let req_path = std::env::temp_dir().join(format!("lazyserve-bench-{}.json", std::process::id()));
    std::fs::write(&req_path, request.to_string())?;
    let out = Command::new(&args.llamacpp_python).arg(&script).arg(&req_path).output();
    let _ = std::fs::remove_file(&req_path);
    let out = out.with_context(|| format!("running {} (make it with scripts/setup-llamacpp.sh)", args.llamacpp_python))?;
    if !out.status.success() {
        bail!("llama.cpp benchmark failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("llama.cpp output line {l:?}")))
        .collect()
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let m = args.model.load()?;
    let (model, kv) = (m.backend.cpu().context("lazyserve bench times our CPU kernels: use --device cpu (bench-device compares devices)")?, m.kv_dtype);
    let threads = rayon::current_num_threads();
    let max = m.config().max_position_embeddings;
    if let Some(&n) = args.lengths.iter().find(|&&n| n == 0 || n + args.decode_tokens > max) {
        bail!("prompt length {n} plus {} decode tokens does not fit the context of {max}", args.decode_tokens);
    }
    let prompts: Vec<Vec<u32>> = args.lengths.iter().map(|&n| prompt(&m, &args.corpus, n)).collect::<Result<_, _>>()?;
    // Warm caches and the thread pool.
    measure(model, kv, &prompts[0][..prompts[0].len().min(64)], 2)?;
    let ours: Vec<Row> = prompts
        .iter()
        .map(|ids| {
            let r = measure(model, kv, ids, args.decode_tokens);
            if let Ok(r) = &r {
                eprintln!("lazyserve n={} prefill {:.3} s, decode {:.2} ms/token", r.n, r.prefill_s, r.decode_ms);
            }
            r
        })
        .collect::<Result<_, _>>()?;
    let theirs = if args.llamacpp_python == "none" { None } else { Some(llama_cpp(&args, threads, &prompts)?) };

    println!(
        "model {} | weights {:?} | KV {:?} | {threads} threads | {} decode steps after each prefill | kernels {}, f32 GEMM {}",
        m.name,
        args.model.weights,
        args.model.kv_dtype,
        args.decode_tokens,
        lazyserve_model::kernels::simd_path(),
        lazyserve_model::kernels::gemm_path(),
    );
    println!("| prompt tokens | prefill s (lazyserve) | prefill s (llama.cpp) | ratio | decode ms/token (lazyserve) | decode ms/token (llama.cpp) | ratio | same first token |");
    println!("|---:|---:|---:|---:|---:|---:|---:|:---:|");
    for r in &ours {
        match theirs.as_ref().and_then(|t| t.iter().find(|l| l.n == r.n)) {
            Some(l) => println!(
                "| {} | {:.3} | {:.3} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
                r.n,
                r.prefill_s,
                l.prefill_s,
                r.prefill_s / l.prefill_s,
                r.decode_ms,
                l.decode_ms_per_token,
                r.decode_ms / l.decode_ms_per_token,
                if r.first_token == l.first_token { "yes" } else { "no" },
            ),
            None => println!("| {} | {:.3} | - | - | {:.2} | - | - | - |", r.n, r.prefill_s, r.decode_ms),
        }
    }
    Ok(())
}
