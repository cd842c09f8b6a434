//! `lazyserve bench-device`: prefill TTFT of the tensor backend on `--device` against our CPU
//! kernels, dense and under LazyLLM presets, at several prompt lengths, in one table.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use lazyserve_engine::{Engine, Sampler, SamplingParams};
use lazyserve_model::DeviceSpec;

use crate::bench::prompt;
use crate::ModelArgs;

#[derive(Args, Debug)]
pub struct BenchDeviceArgs {
    /// The model, and the device to compare with our CPU kernels (--device cuda, or
    /// candle-cpu to try the table on a host without a GPU); --threads sets the CPU side.
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096,8000")]
    lengths: Vec<usize>,
    /// Presets: off (dense) first, then LazyLLM ones.
    #[arg(long, value_delimiter = ',', default_value = "off,default")]
    presets: Vec<String>,
    /// Timed prefills per row on the device (the fastest counts); the CPU runs once.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Text the prompts are cut from (repeated as needed).
    #[arg(long, default_value = "/usr/share/common-licenses/GPL-3")]
    corpus: PathBuf,
}

/// Seconds to the first token, and that token.
fn ttft(m: &Engine, ids: &[u32], preset: &str) -> anyhow::Result<(f64, u32)> {
    let mut sampler = Sampler::new(SamplingParams::default())?;
    let t = Instant::now();
    let pre = m.prefill(ids, m.schedule(preset)?, &mut sampler, &mut |_, _| Ok(()))?;
    Ok((t.elapsed().as_secs_f64(), pre.first_token))
}

pub fn run(args: BenchDeviceArgs) -> anyhow::Result<()> {
    if args.model.device == DeviceSpec::Cpu {
        bail!("bench-device compares a tensor device with our CPU kernels: pass --device cuda (or candle-cpu)");
    }
    let device = args.model.load()?;
    let cpu = ModelArgs { device: DeviceSpec::Cpu, threads: None, ..args.model.clone() }.load()?;
    let max = cpu.config().max_position_embeddings;
    if let Some(&n) = args.lengths.iter().find(|&&n| n == 0 || n >= max) {
        bail!("prompt length {n} does not fit the context of {max}");
    }
    let prompts: Vec<Vec<u32>> = args.lengths.iter().map(|&n| prompt(&cpu, &args.corpus, n)).collect::<Result<_, _>>()?;
    // The first device call loads kernels and libraries.
    ttft(&device, &prompts[0][..64.min(prompts[0].len())], "off").context("warm-up on the device")?;

    println!(
        "model {} | device {} | CPU: our kernels, weights {:?}, KV {:?}, {} threads | device: best of {}",
        cpu.name,
        device.backend.describe(),
        args.model.weights,
        args.model.kv_dtype,
        rayon::current_num_threads(),
        args.repeats
    );
    println!("| prompt tokens | preset | CPU TTFT s | device TTFT s | device speed-up | device TTFT vs dense | same first token |");
    println!("|---:|---|---:|---:|---:|---:|:---:|");
    for ids in &prompts {
        let mut dense = None;
        for preset in &args.presets {
            let (cpu_s, cpu_token) = ttft(&cpu, ids, preset)?;
            let mut best = f64::INFINITY;
            let mut token = 0;
            for _ in 0..args.repeats.max(1) {
                let (s, t) = ttft(&device, ids, preset)?;
                (best, token) = (best.min(s), t);
            }
            let dense_s = *dense.get_or_insert(best);
            println!(
                "| {} | {preset} | {cpu_s:.3} | {best:.4} | {:.1}x | {:.2}x | {} |",
                ids.len(),
                cpu_s / best,
                dense_s / best,
                if token == cpu_token { "yes" } else { "no" }
            );
        }
    }
    Ok(())
}
