//! `lazyserve bench-serve`: the services against in-process generation, in one run. Starts
//! a decode worker, a prefill worker and one router per state encoding as processes on
//! loopback, then for each prompt, pruning preset and encoding prints TTFT through the three
//! processes beside in-process TTFT, the state bytes shipped beside a dense f16 KV cache of
//! the same prompt (Aux Cache included), and whether the greedy tokens are the same.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use clap::ValueEnum;
use lazyserve_engine::{GenerateRequest, SamplingParams};
use lazyserve_proto::v1::generate_request::Input;
use lazyserve_proto::v1::generate_response::Event;
use lazyserve_proto::v1::generation_client::GenerationClient;
use lazyserve_proto::v1::GenerateRequest as WireRequest;

use crate::bench_lazy::{passkey_case, read_documents, DOCUMENTS};
use crate::ModelArgs;

#[derive(Args, Debug)]
pub struct BenchServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    lengths: Vec<usize>,
    /// Pruning presets or specs.
    #[arg(long, value_delimiter = ';', default_value = "off;default;aggressive")]
    presets: Vec<String>,
    /// State encodings (one router each).
    #[arg(long, value_delimiter = ',', default_value = "f16,f32,int8")]
    encodings: Vec<String>,
    /// Passkey prompts per length.
    #[arg(long, default_value_t = 3)]
    cases: usize,
    /// Greedy tokens generated and compared per prompt.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
}

/// A service process, killed on drop.
struct Service {
    child: Child,
    addr: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_addr() -> anyhow::Result<String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string())
}

fn start(bin: &str, args: &[String]) -> anyhow::Result<Service> {
    let path = std::env::current_exe()?.with_file_name(bin);
    if !path.exists() {
        bail!("{} is missing: run `cargo build --release --bins`", path.display());
    }
    let addr = free_addr()?;
    let child = Command::new(&path)
        .arg("--listen")
        .arg(&addr)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", path.display()))?;
    Ok(Service { child, addr })
}

/// Connects to a router and waits until a request goes through it (the workers load the
/// model meanwhile); that request also warms the path up.
pub(crate) async fn connect(addr: &str) -> anyhow::Result<GenerationClient<tonic::transport::Channel>> {
    let start = Instant::now();
    loop {
        if let Ok(mut c) = GenerationClient::connect(format!("http://{addr}")).await {
            if remote(&mut c, "Hello", "off", 2).await.is_ok() {
                return Ok(c);
            }
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("no request went through router {addr} in 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One call through the services: (client-side TTFT, token ids, state bytes).
pub(crate) async fn remote(
    client: &mut GenerationClient<tonic::transport::Channel>,
    text: &str,
    preset: &str,
    max_tokens: usize,
) -> anyhow::Result<(f64, Vec<u32>, u64)> {
    let req = WireRequest {
        input: Some(Input::Prompt(text.to_string())),
        max_tokens: max_tokens as u32,
        prune: Some(preset.to_string()),
        ..Default::default()
    };
    let start = Instant::now();
    let mut stream = client.generate(req).await?.into_inner();
    let (mut ttft, mut ids, mut bytes) = (None, Vec::new(), 0);
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(Event::Chunk(c)) => {
                ttft.get_or_insert(start.elapsed().as_secs_f64());
                ids.extend(c.token_ids);
            }
            Some(Event::Complete(c)) => bytes = c.timings.map_or(0, |t| t.state_bytes),
            Some(Event::Error(e)) => bail!("stream error: {e:?}"),
            None => {}
        }
    }
    Ok((ttft.context("no token")?, ids, bytes))
}

#[derive(Default)]
struct Row {
    n: usize,
    ttft_in: f64,
    ttft_remote: f64,
    bytes: f64,
    dense_bytes: f64,
    same: usize,
    passkey: usize,
}

pub fn run(args: BenchServeArgs) -> anyhow::Result<()> {
    let m = args.model.load()?;
    for p in &args.presets {
        m.schedule(p)?;
    }
    let cfg = m.config().clone();
    let docs = read_documents(&m, &DOCUMENTS.split(',').map(PathBuf::from).collect::<Vec<_>>())?;
    let filler: Vec<u32> = docs.iter().flatten().copied().collect();

    let model_flags = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["--model".into(), args.model.model.display().to_string()];
        if let Some(t) = args.model.threads {
            v.extend(["--threads".into(), t.to_string()]);
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let name = |v: Option<clap::builder::PossibleValue>| v.map(|v| v.get_name().to_string()).unwrap_or_default();
    let weights = name(args.model.weights.to_possible_value());
    let kv = name(args.model.kv_dtype.to_possible_value());
    let worker_flags = model_flags(&["--weights", &weights, "--kv-dtype", &kv]);
    let decode = start("lazyserve-decode-worker", &worker_flags)?;
    let prefill = start("lazyserve-prefill-worker", &worker_flags)?;
    let routers: Vec<Service> = args
        .encodings
        .iter()
        .map(|e| {
            start(
                "lazyserve-router",
                &model_flags(&["--prefill-workers", &prefill.addr, "--decode-workers", &decode.addr, "--state-encoding", e]),
            )
        })
        .collect::<anyhow::Result<_>>()?;

    let rt = tokio::runtime::Runtime::new()?;
    let mut clients = rt.block_on(async {
        let mut cs = Vec::new();
        for r in &routers {
            cs.push(connect(&r.addr).await?);
        }
        anyhow::Ok(cs)
    })?;

    println!(
        "model {} | weights {weights} | KV {kv} | {} threads per process | {} passkey prompts per length | {} greedy tokens",
        m.name,
        rayon::current_num_threads(),
        args.cases,
        args.max_tokens
    );
    println!("| prompt tokens | preset | encoding | TTFT in-process s | TTFT 3 processes s | ratio | state MiB | vs dense f16 KV | same greedy tokens | passkey |");
    println!("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &args.lengths {
        if n + args.max_tokens > cfg.max_position_embeddings {
            bail!("length {n} does not fit the model's context of {}", cfg.max_position_embeddings);
        }
        let dense_f16 = (n * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2) as f64;
        for preset in &args.presets {
            let mut rows: Vec<Row> = args.encodings.iter().map(|_| Row::default()).collect();
            for c in 0..args.cases {
                let case = passkey_case(&m, &filler, n, c, args.cases)?;
                let req = GenerateRequest {
                    prompt_ids: case.ids.clone(),
                    max_tokens: args.max_tokens,
                    stop: vec![],
                    sampling: SamplingParams::default(),
                    schedule: m.schedule(preset)?,
                };
                // Alternate which side runs first, so that neither gets the warmer machine.
                let mut remotes = Vec::new();
                let local_first = c % 2 == 0;
                let local = if local_first { Some(m.generate(&req, |_| true)?) } else { None };
                for client in clients.iter_mut() {
                    remotes.push(rt.block_on(remote(client, &case.text, preset, args.max_tokens))?);
                }
                let local = match local {
                    Some(l) => l,
                    None => m.generate(&req, |_| true)?,
                };
                let key = case.key.clone().unwrap_or_default();
                for (row, (ttft, ids, bytes)) in rows.iter_mut().zip(remotes) {
                    row.n += 1;
                    row.ttft_in += local.ttft.as_secs_f64();
                    row.ttft_remote += ttft;
                    row.bytes += bytes as f64;
                    row.dense_bytes += dense_f16 * case.ids.len() as f64 / n as f64;
                    row.same += usize::from(ids == local.token_ids);
                    row.passkey += usize::from(m.tokenizer.decode(&ids)?.contains(&key));
                }
                eprintln!("n={n} {preset}: case {}/{} done", c + 1, args.cases);
            }
            for (e, r) in args.encodings.iter().zip(&rows) {
                let k = r.n as f64;
                println!(
                    "| {n} | {preset} | {e} | {:.2} | {:.2} | {:.2}x | {:.1} | {:.2}x | {}/{} | {}/{} |",
                    r.ttft_in / k,
                    r.ttft_remote / k,
                    r.ttft_remote / r.ttft_in,
                    r.bytes / k / (1 << 20) as f64,
                    r.bytes / r.dense_bytes,
                    r.same,
                    r.n,
                    r.passkey,
                    r.n
                );
            }
        }
    }
    drop(routers);
    drop((prefill, decode));
    Ok(())
}
