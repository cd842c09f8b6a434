//! `lazyserve generate`: one prompt from flags, or a JSONL batch with one model load.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lazyserve_engine::{Engine, GenerateRequest, Generation, SamplingParams};
use lazyserve_model::ChatMessage;
use serde::Deserialize;

use crate::ModelArgs;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text.
    #[arg(long, conflicts_with_all = ["prompt_file", "input"])]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long, conflicts_with = "input")]
    prompt_file: Option<PathBuf>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 keeps all tokens.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// LazyLLM pruning: a preset (off, conservative, default, aggressive, early) or a spec such as
    /// `18:0.5,24:0.5`, `random:18:0.5,24:0.5`, `static:default`, `default+sinks=4`.
    #[arg(long, env = "LAZYSERVE_PRUNE", default_value = "off")]
    prune: String,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    json: bool,
    /// Batch mode: JSONL requests, one per line.
    #[arg(long, requires = "output")]
    input: Option<PathBuf>,
    /// Batch mode: where the JSONL results go.
    #[arg(long, requires = "input")]
    output: Option<PathBuf>,
}

/// One batch line. Unset fields take the command line's values.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    id: serde_json::Value,
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    seed: Option<u64>,
    stop: Option<Vec<String>>,
    prune: Option<String>,
}

fn result_json(g: &Generation) -> serde_json::Value {
    serde_json::json!({
        "text": g.text,
        "token_ids": g.token_ids,
        "prompt_tokens": g.prompt_tokens,
        "ttft_ms": g.ttft.as_secs_f64() * 1e3,
        "prefill_ms": g.prefill.as_secs_f64() * 1e3,
        "decode_ms_per_token": g.decode_per_token.as_secs_f64() * 1e3,
        "finish_reason": g.finish_reason,
        "computed_fraction": g.computed_fraction,
        "revived_tokens": g.revived_tokens,
        "computed_per_layer": g.computed_per_layer,
        "kv_bytes": g.kv_bytes,
        "aux_bytes": g.aux_bytes,
    })
}

impl GenerateArgs {
    fn sampling(&self) -> SamplingParams {
        SamplingParams { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, seed: self.seed }
    }
}

fn prompt_ids(m: &Engine, text: Option<&str>, messages: Option<Vec<ChatMessage>>, chat: bool) -> anyhow::Result<Vec<u32>> {
    let rendered = match (text, messages) {
        (Some(_), Some(_)) => bail!("give either prompt or messages, not both"),
        (None, Some(msgs)) => m.tokenizer.apply_chat_template(&msgs)?,
        (Some(t), None) if chat => {
            m.tokenizer.apply_chat_template(&[ChatMessage { role: "user".into(), content: t.to_string() }])?
        }
        (Some(t), None) => t.to_string(),
        (None, None) => bail!("no prompt: give --prompt, --prompt-file or --input"),
    };
    Ok(m.tokenizer.encode(&rendered)?)
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if let (Some(input), Some(output)) = (&args.input, &args.output) {
        return run_batch(&args, input, output);
    }
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        (None, None) => bail!("no prompt: give --prompt, --prompt-file or --input"),
    };
    let m = args.model.load()?;
    let req = GenerateRequest {
        prompt_ids: prompt_ids(&m, Some(&prompt), None, args.chat)?,
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        sampling: args.sampling(),
        schedule: m.schedule(&args.prune)?,
    };
    let mut stdout = std::io::stdout().lock();
    let stream = !args.json;
    let out = m.generate(&req, |delta| {
        if stream {
            let _ = write!(stdout, "{delta}");
            let _ = stdout.flush();
        }
        true
    })?;
    if args.json {
        writeln!(stdout, "{}", result_json(&out))?;
    } else {
        writeln!(stdout)?;
    }
    Ok(())
}

fn run_batch(args: &GenerateArgs, input: &PathBuf, output: &PathBuf) -> anyhow::Result<()> {
    let file = std::fs::File::open(input).with_context(|| format!("reading {}", input.display()))?;
    let lines: Vec<String> = std::io::BufReader::new(file)
        .lines()
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let m = args.model.load()?;
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(output).with_context(|| format!("creating {}", output.display()))?,
    );
    let bar = ProgressBar::new(lines.len() as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests, {elapsed} elapsed, eta {eta}")?,
    );
    let mut failed = 0;
    for (n, line) in lines.iter().enumerate() {
        let result = serde_json::from_str::<BatchLine>(line)
            .map_err(|e| anyhow::anyhow!("line {}: {e}", n + 1))
            .and_then(|b| {
                let id = b.id.clone();
                let req = GenerateRequest {
                    prompt_ids: prompt_ids(&m, b.prompt.as_deref(), b.messages, args.chat)?,
                    max_tokens: b.max_tokens.unwrap_or(args.max_tokens),
                    stop: b.stop.unwrap_or_else(|| args.stop.clone()),
                    sampling: SamplingParams {
                        temperature: b.temperature.unwrap_or(args.temperature),
                        top_k: b.top_k.unwrap_or(args.top_k),
                        top_p: b.top_p.unwrap_or(args.top_p),
                        seed: b.seed.unwrap_or(args.seed),
                    },
                    schedule: m.schedule(b.prune.as_deref().unwrap_or(&args.prune))?,
                };
                let g = m.generate(&req, |_| true).map_err(|e| anyhow::anyhow!("id {id}: {e}"))?;
                let mut v = result_json(&g);
                v["id"] = id;
                Ok(v)
            });
        let v = result.unwrap_or_else(|e| {
            failed += 1;
            bar.suspend(|| eprintln!("error: {e:#}"));
            let id = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v.get("id").cloned());
            serde_json::json!({ "id": id, "error": format!("{e:#}") })
        });
        writeln!(out, "{v}")?;
        bar.inc(1);
    }
    bar.finish();
    out.flush()?;
    if failed > 0 {
        bail!("{failed} of {} requests failed (see their \"error\" fields in {})", lines.len(), output.display());
    }
    Ok(())
}
