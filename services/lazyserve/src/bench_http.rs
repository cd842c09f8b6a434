//! `lazyserve bench-http`: what the OpenAI HTTP front adds to TTFT. Starts `lazyserve serve`
//! with both fronts, then sends the same long prompt through gRPC Generate and through
//! `POST /v1/completions` (streamed) in turn, each over one kept-alive connection, and
//! prints the client-side TTFT of both, their ratio, and the median of the ratios of the
//! pairs run back to back (robust to the machine's drift).

use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::bench_load::start_serve;
use crate::bench_serve::{connect, free_addr, remote};

#[derive(Args, Debug)]
pub struct BenchHttpArgs {
    /// GGUF file or Hugging Face checkpoint folder.
    #[arg(long, env = "LAZYSERVE_MODEL", default_value = lazyserve_server::config::DEFAULT_MODEL)]
    model: std::path::PathBuf,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    /// Requests per front (after one warm-up each).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Pruning preset or spec of every request.
    #[arg(long, default_value = "off")]
    prune: String,
}

/// A prompt of at least `tokens` tokens.
fn prompt(model: &std::path::Path, tokens: usize) -> anyhow::Result<String> {
    let meta = lazyserve_model::load_meta(model)?;
    let sentence = "The quick brown fox jumps over the lazy dog near the river bank. ";
    let per = meta.tokenizer.encode(sentence)?.len().max(1);
    let mut text = sentence.repeat(tokens / per + 1);
    while meta.tokenizer.encode(&text)?.len() > tokens {
        text.truncate(text.len() - sentence.len());
    }
    Ok(text)
}

/// One streamed completion over `conn`: the time to the first event. Reads the whole
/// response so that the connection can carry the next one.
async fn http(conn: &mut TcpStream, host: &str, body: &str) -> anyhow::Result<f64> {
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let start = Instant::now();
    conn.write_all(req.as_bytes()).await?;
    let (mut buf, mut chunk, mut ttft) = (Vec::new(), [0u8; 8192], None);
    // The body is chunked; its last chunk is empty.
    while !buf.ends_with(b"\r\n0\r\n\r\n") {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
        if ttft.is_none() && buf.windows(6).any(|w| w == b"data: ") {
            ttft = Some(start.elapsed().as_secs_f64());
        }
    }
    if !buf.starts_with(b"HTTP/1.1 200") {
        bail!("HTTP error: {}", String::from_utf8_lossy(&buf));
    }
    ttft.context("no event")
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

pub fn run(args: BenchHttpArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    let text = prompt(&args.model, args.tokens)?;
    let http_addr = free_addr()?;
    let (_serve, grpc_addr) = start_serve(&args.model, &["--http-listen".to_string(), http_addr.clone()])?;
    let body = serde_json::json!({ "prompt": text, "max_tokens": 1, "temperature": 0, "stream": true, "prune": args.prune }).to_string();
    let rt = tokio::runtime::Runtime::new()?;
    let (grpc, http_ttft) = rt.block_on(async {
        let mut client = connect(&grpc_addr).await?;
        let mut conn = TcpStream::connect(&http_addr).await?;
        conn.set_nodelay(true)?;
        remote(&mut client, &text, &args.prune, 1).await?;
        http(&mut conn, &http_addr, &body).await?;
        let (mut g, mut h) = (Vec::new(), Vec::new());
        for round in 0..args.rounds {
            // Alternate which front goes first, so that neither gets the warmer machine.
            if round % 2 == 0 {
                g.push(remote(&mut client, &text, &args.prune, 1).await?.0);
                h.push(http(&mut conn, &http_addr, &body).await?);
            } else {
                h.push(http(&mut conn, &http_addr, &body).await?);
                g.push(remote(&mut client, &text, &args.prune, 1).await?.0);
            }
            eprintln!("round {}/{} done", round + 1, args.rounds);
        }
        anyhow::Ok((g, h))
    })?;
    let paired = median(grpc.iter().zip(&http_ttft).map(|(g, h)| h / g).collect());
    let (g, h) = (median(grpc), median(http_ttft));
    println!("model {} | {} prompt tokens | prune {} | {} rounds, median client-side TTFT", args.model.display(), args.tokens, args.prune, args.rounds);
    println!("| front | TTFT ms | vs gRPC | median of paired ratios |");
    println!("|---|---:|---:|---:|");
    println!("| gRPC Generate | {:.1} | 1.000x | |", g * 1e3);
    println!("| HTTP /v1/completions (stream) | {:.1} | {:.3}x | {paired:.3}x |", h * 1e3, h / g);
    Ok(())
}
