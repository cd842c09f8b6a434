//! `lazyserve`: serve every role in one process (`serve`), run the model locally
//! (`generate`) and measure it (`bench`, `bench-lazy`, `bench-serve`, `bench-load`,
//! `bench-device`, `bench-http`).

mod bench;
mod bench_device;
mod bench_http;
mod bench_lazy;
mod bench_load;
mod bench_serve;
mod generate;
mod serve;

use clap::{Parser, Subcommand};

pub use lazyserve_server::config::ModelArgs;

#[derive(Parser)]
#[command(name = "lazyserve", version, about = "LazyLLM serving: the embedded server, local generation and benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve Generate with the router, a prefill worker and a decode worker in one process.
    Serve(serve::ServeArgs),
    /// Generate text in-process, for one prompt or a JSONL batch.
    Generate(generate::GenerateArgs),
    /// Prefill and decode timings at several prompt lengths, side by side with llama.cpp.
    Bench(bench::BenchArgs),
    /// LazyLLM presets and baselines against dense: speed, tokens computed, passkey accuracy,
    /// agreement with dense.
    BenchLazy(bench_lazy::BenchLazyArgs),
    /// The three services against in-process generation: TTFT, state bytes per preset and
    /// encoding against a dense f16 KV cache, greedy agreement.
    BenchServe(bench_serve::BenchServeArgs),
    /// The server under concurrent load: throughput, TTFT and inter-token latency
    /// percentiles at several concurrencies, as ratios to one client.
    BenchLoad(bench_load::BenchLoadArgs),
    /// Prefill TTFT on a tensor device (--device cuda) against our CPU kernels, dense and
    /// under LazyLLM presets.
    BenchDevice(bench_device::BenchDeviceArgs),
    /// TTFT through the OpenAI HTTP front beside gRPC Generate, on one `lazyserve serve`.
    BenchHttp(bench_http::BenchHttpArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The server sets up its own logs, traces and metrics; the local commands log warnings.
    if !matches!(cli.command, Command::Serve(_)) {
        tracing_subscriber::fmt()
            .with_ansi(lazyserve_telemetry::ansi_colours())
            .with_writer(std::io::stderr)
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
            .init();
    }
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::BenchLazy(args) => bench_lazy::run(args),
        Command::BenchServe(args) => bench_serve::run(args),
        Command::BenchLoad(args) => bench_load::run(args),
        Command::BenchDevice(args) => bench_device::run(args),
        Command::BenchHttp(args) => bench_http::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
