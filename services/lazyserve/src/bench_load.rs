//! `lazyserve bench-load`: the server under concurrent load. For each prompt length and
//! concurrency, that many clients keep one streamed request each in flight; the table gives
//! aggregate output tokens/s (prefill included), time to first token and inter-token
//! latency percentiles, each beside its value at concurrency 1 in the same run. A second
//! table gives the aggregate decode rate of 16 streams while all of them decode, beside
//! one stream's, and what local-path prompts arriving one after another meanwhile do to
//! their inter-token latency.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use lazyserve_proto::v1::generate_request::Input;
use lazyserve_proto::v1::generate_response::Event;
use lazyserve_proto::v1::generation_client::GenerationClient;
use lazyserve_proto::v1::GenerateRequest as WireRequest;
use tonic::transport::Channel;

#[derive(Args, Debug)]
pub struct BenchLoadArgs {
    /// Model file; also what `lazyserve serve` is started with.
    #[arg(long, env = "LAZYSERVE_MODEL", default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// A running router to load (host:port); unset: start `lazyserve serve` for the run.
    #[arg(long)]
    target: Option<String>,
    /// Extra flags for the `lazyserve serve` this command starts (repeat the flag).
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    serve_args: Vec<String>,
    /// Prompt lengths in tokens (below `--local-prefill-tokens`, 256 by default, prompts are
    /// prefilled on the decode worker).
    #[arg(long, value_delimiter = ',', default_value = "240,2048")]
    lengths: Vec<usize>,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32")]
    concurrency: Vec<usize>,
    /// Requests per client at each level.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Tokens generated per request (greedy).
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Also measure 16 streams with and without local-path prompts arriving meanwhile.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    interference: bool,
    /// Text the prompts are cut from (each request a different window).
    #[arg(long, default_value = "/usr/share/common-licenses/GPL-3")]
    corpus: PathBuf,
}

/// What one request saw: when it started, and when each chunk of tokens arrived.
struct Sample {
    start: Instant,
    arrivals: Vec<(Instant, usize)>,
    path: String,
}

impl Sample {
    fn ttft(&self) -> Option<f64> {
        self.arrivals.first().map(|(t, _)| t.duration_since(self.start).as_secs_f64())
    }

    fn tokens(&self) -> usize {
        self.arrivals.iter().map(|(_, n)| n).sum()
    }

    /// Gaps between tokens after the first, in seconds (a chunk of n tokens counts its gap
    /// n times, at gap / n), for gaps that start inside `window`.
    fn inter_token(&self, window: (Instant, Instant)) -> Vec<f64> {
        self.arrivals
            .windows(2)
            .filter(|w| w[0].0 >= window.0 && w[0].0 < window.1)
            .flat_map(|w| {
                let (gap, n) = (w[1].0.duration_since(w[0].0).as_secs_f64(), w[1].1.max(1));
                std::iter::repeat_n(gap / n as f64, n)
            })
            .collect()
    }
}

/// `lazyserve serve`, killed on drop.
/// A `lazyserve serve` child process, killed on drop.
pub(crate) struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Prompts of `n` tokens cut from the corpus at different places, as text.
struct Prompts {
    ids: Vec<u32>,
    tokenizer: lazyserve_model::Tokenizer,
    next: AtomicUsize,
}

impl Prompts {
    fn take(&self, n: usize) -> anyhow::Result<String> {
        let k = self.next.fetch_add(1, Ordering::SeqCst);
        let at = (k * 7919) % self.ids.len();
        let window: Vec<u32> = self.ids.iter().copied().cycle().skip(at).take(n).collect();
        Ok(self.tokenizer.decode(&window)?)
    }
}

async fn request(client: GenerationClient<Channel>, text: String, max_tokens: u32) -> anyhow::Result<Sample> {
    request_counted(client, text, max_tokens, None).await
}

/// [`request`], counting in `decoding` the streams that have their first token.
async fn request_counted(
    mut client: GenerationClient<Channel>,
    text: String,
    max_tokens: u32,
    decoding: Option<&AtomicUsize>,
) -> anyhow::Result<Sample> {
    let req = WireRequest { input: Some(Input::Prompt(text)), max_tokens, ..Default::default() };
    let start = Instant::now();
    let mut stream = client.generate(req).await?.into_inner();
    let mut sample = Sample { start, arrivals: Vec::new(), path: String::new() };
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(Event::Chunk(c)) => {
                if sample.arrivals.is_empty() {
                    decoding.inspect(|d| _ = d.fetch_add(1, Ordering::SeqCst));
                }
                sample.arrivals.push((Instant::now(), c.token_ids.len()));
            }
            Some(Event::Complete(c)) => sample.path = c.timings.map(|t| t.prefill_path).unwrap_or_default(),
            Some(Event::Error(e)) => bail!("stream error: {e:?}"),
            None => {}
        }
    }
    Ok(sample)
}

/// `clients` clients, `rounds` requests each; the samples and the wall time.
async fn level(client: &GenerationClient<Channel>, prompts: &Arc<Prompts>, n: usize, clients: usize, rounds: usize, max_tokens: u32) -> anyhow::Result<(Vec<Sample>, f64)> {
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, prompts) = (client.clone(), prompts.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..rounds {
                    out.push(request(client.clone(), prompts.take(n)?, max_tokens).await?);
                }
                anyhow::Ok(out)
            })
        })
        .collect();
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await??);
    }
    Ok((samples, start.elapsed().as_secs_f64()))
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    xs[((p * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1]
}

/// One table row's numbers.
#[derive(Clone, Copy)]
struct Stats {
    /// Output tokens over the level's wall time, prefill included.
    throughput: f64,
    ttft: (f64, f64),
    itl: (f64, f64),
    mean_itl: f64,
}

fn stats(samples: &[Sample], wall: f64) -> Stats {
    let all = (Instant::now() - Duration::from_secs(1 << 20), Instant::now());
    let mut ttft: Vec<f64> = samples.iter().filter_map(Sample::ttft).collect();
    let mut itl: Vec<f64> = samples.iter().flat_map(|s| s.inter_token(all)).collect();
    let tokens: usize = samples.iter().map(Sample::tokens).sum();
    Stats {
        throughput: tokens as f64 / wall,
        mean_itl: mean(&itl),
        ttft: (percentile(&mut ttft, 0.5), percentile(&mut ttft, 0.99)),
        itl: (percentile(&mut itl, 0.5), percentile(&mut itl, 0.99)),
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// 16 streams of `max_tokens`; with `interfere`, local-path prompts arrive one after another
/// from when all 16 decode until the first one ends. Returns the streams' inter-token
/// latency (mean, p50, p99) over that window, and the prompts that arrived in it.
async fn interference(
    client: &GenerationClient<Channel>,
    prompts: &Arc<Prompts>,
    n: usize,
    max_tokens: u32,
    interfere: bool,
) -> anyhow::Result<([f64; 3], usize)> {
    const STREAMS: usize = 16;
    let decoding = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicUsize::new(0));
    let streams: Vec<_> = (0..STREAMS)
        .map(|_| {
            let (client, prompts, decoding, ended) = (client.clone(), prompts.clone(), decoding.clone(), ended.clone());
            tokio::spawn(async move {
                let sample = request_counted(client, prompts.take(n)?, max_tokens, Some(&decoding)).await;
                ended.fetch_add(1, Ordering::SeqCst);
                sample
            })
        })
        .collect();
    let injector = {
        let (client, prompts, decoding, ended) = (client.clone(), prompts.clone(), decoding.clone(), ended.clone());
        tokio::spawn(async move {
            while decoding.load(Ordering::SeqCst) < STREAMS && ended.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut injected = 0;
            while interfere && ended.load(Ordering::SeqCst) == 0 {
                request(client.clone(), prompts.take(n)?, 1).await?;
                injected += 1;
            }
            anyhow::Ok(injected)
        })
    };
    let mut samples = Vec::new();
    for s in streams {
        samples.push(s.await??);
    }
    let injected = injector.await??;
    let decoding_from = samples.iter().filter_map(|s| s.arrivals.first().map(|a| a.0)).max().context("no tokens")?;
    let until = samples.iter().filter_map(|s| s.arrivals.last().map(|a| a.0)).min().context("no tokens")?;
    let mut itl: Vec<f64> = samples.iter().flat_map(|s| s.inter_token((decoding_from, until))).collect();
    Ok(([mean(&itl), percentile(&mut itl, 0.5), percentile(&mut itl, 0.99)], injected))
}

/// Starts `lazyserve serve` for `model` with `args` on a free gRPC address (returned); the
/// HTTP API goes to a port of its own unless `args` name one.
pub(crate) fn start_serve(model: &std::path::Path, args: &[String]) -> anyhow::Result<(Server, String)> {
    let addr = crate::bench_serve::free_addr()?;
    let own_http = args.iter().any(|a| a.starts_with("--http-listen"));
    let child = Command::new(std::env::current_exe()?)
        .args(["serve", "--listen", &addr, "--model"])
        .arg(model)
        .args(if own_http { &[][..] } else { &["--http-listen", "127.0.0.1:0"][..] })
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting lazyserve serve")?;
    Ok((Server(child), addr))
}

async fn connect(addr: &str) -> anyhow::Result<GenerationClient<Channel>> {
    let start = Instant::now();
    loop {
        if let Ok(c) = GenerationClient::connect(format!("http://{addr}")).await {
            if request(c.clone(), "Hello".into(), 2).await.is_ok() {
                return Ok(c);
            }
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("no request went through {addr} in 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn run(args: BenchLoadArgs) -> anyhow::Result<()> {
    let meta = lazyserve_model::load_meta(&args.model)?;
    let text = std::fs::read_to_string(&args.corpus).with_context(|| format!("reading corpus {}", args.corpus.display()))?;
    let ids = meta.tokenizer.encode(&text)?;
    if ids.is_empty() {
        bail!("corpus {} is empty", args.corpus.display());
    }
    let prompts = Arc::new(Prompts { ids, tokenizer: meta.tokenizer, next: AtomicUsize::new(0) });
    let (server, addr) = match &args.target {
        Some(a) => (None, a.clone()),
        None => {
            let (s, a) = start_serve(&args.model, &args.serve_args)?;
            (Some(s), a)
        }
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = connect(&addr).await?;
        println!(
            "model {} | {} | {} tokens per request, greedy | {} requests per client | {} cores, kernels {}, f32 GEMM {}",
            meta.name,
            if server.is_some() { format!("lazyserve serve {}", args.serve_args.join(" ")) } else { format!("router at {addr}") },
            args.max_tokens,
            args.rounds,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            lazyserve_model::kernels::simd_path(),
            lazyserve_model::kernels::gemm_path(),
        );
        println!("| prompt tokens | path | clients | requests | output tok/s | vs 1 | TTFT p50 s | TTFT p99 s | vs 1 (p99) | ITL p50 ms | ITL p99 ms | vs 1 (p99) |");
        println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        // One stream's decode rate (1 / mean inter-token latency) at the shortest length.
        let mut one_stream: Option<f64> = None;
        for &n in &args.lengths {
            let mut base: Option<Stats> = None;
            for &c in &args.concurrency {
                let (samples, wall) = level(&client, &prompts, n, c, args.rounds, args.max_tokens).await?;
                let s = stats(&samples, wall);
                let b = *base.get_or_insert(s);
                one_stream.get_or_insert(1.0 / b.mean_itl);
                let path = samples.first().map_or("", |x| x.path.as_str());
                println!(
                    "| {n} | {path} | {c} | {} | {:.1} | {:.2}x | {:.2} | {:.2} | {:.2}x | {:.1} | {:.1} | {:.2}x |",
                    samples.len(),
                    s.throughput,
                    s.throughput / b.throughput,
                    s.ttft.0,
                    s.ttft.1,
                    s.ttft.1 / b.ttft.1,
                    s.itl.0 * 1e3,
                    s.itl.1 * 1e3,
                    s.itl.1 / b.itl.1,
                );
            }
        }
        if args.interference {
            let n = args.lengths.iter().copied().min().unwrap_or(240);
            // Long enough that the 16 all decode for a while after the last one's prefill.
            let max_tokens = args.max_tokens * 4;
            let (none, _) = interference(&client, &prompts, n, max_tokens, false).await?;
            let (with, injected) = interference(&client, &prompts, n, max_tokens, true).await?;
            let one = one_stream.unwrap_or(f64::NAN);
            println!();
            println!("16 streams of {max_tokens} tokens ({n}-token prompts), while all 16 decode; one stream alone decodes {one:.1} tok/s:");
            println!("| local-path prompts arriving | decode tok/s | vs one stream | ITL p50 ms | ITL p99 ms | p99 vs none |");
            println!("|---|---:|---:|---:|---:|---:|");
            for (label, [mean, p50, p99]) in [("none".to_string(), none), (format!("{injected}, one after another"), with)] {
                let rate = 16.0 / mean;
                println!("| {label} | {rate:.1} | {:.2}x | {:.1} | {:.1} | {:.2}x |", rate / one, p50 * 1e3, p99 * 1e3, p99 / none[2]);
            }
        }
        anyhow::Ok(())
    })?;
    drop(server);
    Ok(())
}
