//! `lazyserve bench-lazy`: LazyLLM presets and baselines against dense inference, in one
//! table per run: TTFT and its speed-up, % of prompt tokens computed, decode speed,
//! whole-generation time, passkey retrieval accuracy and agreement with dense on real
//! documents.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use lazyserve_engine::{Engine, GenerateRequest, Generation, SamplingParams};
use lazyserve_model::ChatMessage;

use crate::ModelArgs;

/// Real prose every Debian machine has.
pub(crate) const DOCUMENTS: &str = "/usr/share/common-licenses/GPL-3,/usr/share/common-licenses/GFDL-1.3,/usr/share/common-licenses/LGPL-2.1,/usr/share/common-licenses/GPL-2,/usr/share/common-licenses/MPL-2.0,/usr/share/common-licenses/Apache-2.0";

#[derive(Args, Debug)]
pub struct BenchLazyArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096,8000")]
    lengths: Vec<usize>,
    /// Schedules to compare with dense (`off` is always run first).
    #[arg(long, value_delimiter = ';', default_value = "conservative;default;aggressive;random:default;static:default")]
    schedules: Vec<String>,
    /// Passkey cases per length (needle depths spread evenly).
    #[arg(long, default_value_t = 40)]
    cases: usize,
    /// Documents (real prose) for the agreement check; the first long enough are used.
    #[arg(long, value_delimiter = ',', default_value = DOCUMENTS)]
    documents: Vec<PathBuf>,
    /// Greedy tokens compared with dense per document.
    #[arg(long, default_value_t = 32)]
    agreement_tokens: usize,
}

/// One prompt of the benchmark.
pub(crate) struct Case {
    /// The prompt as text (chat template applied), for services that tokenize it themselves.
    pub text: String,
    pub ids: Vec<u32>,
    /// The passkey, or None for an agreement document.
    pub key: Option<String>,
    max_tokens: usize,
}

#[derive(Default)]
struct Totals {
    n: usize,
    ttft: f64,
    speedup: f64,
    computed: f64,
    decode_ms: f64,
    decode_n: usize,
    whole: f64,
    passkey_ok: usize,
    passkey_n: usize,
    first_agree: usize,
    prefix: usize,
    docs: usize,
}

/// `content` as a user message in the chat template; a model without one (a base model)
/// gets `content` followed by `completion`, text it continues with the answer.
fn wrap(m: &Engine, content: String, completion: &str) -> anyhow::Result<String> {
    if m.tokenizer.has_chat_template() {
        Ok(m.tokenizer.apply_chat_template(&[ChatMessage { role: "user".into(), content }])?)
    } else {
        Ok(format!("{content}{completion}"))
    }
}

/// Splits `filler` tokens around a needle at `depth` and asks for it in the chat template.
pub(crate) fn passkey_case(m: &Engine, filler: &[u32], n: usize, case: usize, cases: usize) -> anyhow::Result<Case> {
    let key = format!("{}", 10_000 + (case as u64 * 7919 + n as u64 * 104_729) % 90_000);
    let needle = format!(" The pass key is {key}. Remember it. {key} is the pass key. ");
    let question = "\n\nWhat is the pass key? Answer with the number only.";
    let answer = " The pass key is";
    let overhead = m.tokenizer.encode(&wrap(m, format!("{needle}{question}"), answer)?)?.len();
    let body = n.checked_sub(overhead).context("length too short for a passkey prompt")?;
    let start = (case * 997) % filler.len().saturating_sub(body).max(1);
    let text_ids: Vec<u32> = filler.iter().copied().cycle().skip(start).take(body).collect();
    let depth = if cases > 1 { case as f64 / (cases - 1) as f64 } else { 0.5 };
    let cut = (body as f64 * depth) as usize;
    let before = m.tokenizer.decode(&text_ids[..cut])?;
    let after = m.tokenizer.decode(&text_ids[cut..])?;
    let text = wrap(m, format!("{before}{needle}{after}{question}"), answer)?;
    let ids = m.tokenizer.encode(&text)?;
    Ok(Case { text, ids, key: Some(key), max_tokens: 16 })
}

fn document_case(m: &Engine, doc: &[u32], n: usize, tokens: usize) -> anyhow::Result<Case> {
    let question = "\n\nSummarize the text above in two sentences.";
    let answer = "\n\nSummary:";
    let overhead = m.tokenizer.encode(&wrap(m, question.into(), answer)?)?.len();
    let text = m.tokenizer.decode(&doc[..n - overhead])?;
    let text = wrap(m, format!("{text}{question}"), answer)?;
    let ids = m.tokenizer.encode(&text)?;
    Ok(Case { text, ids, key: None, max_tokens: tokens })
}

/// The documents that can be read, tokenized.
pub(crate) fn read_documents(m: &Engine, paths: &[PathBuf]) -> anyhow::Result<Vec<Vec<u32>>> {
    let docs: Vec<Vec<u32>> = paths
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|t| m.tokenizer.encode(&t))
        .collect::<Result<_, _>>()?;
    if docs.is_empty() {
        bail!("none of the documents {paths:?} could be read");
    }
    Ok(docs)
}

fn run_case(m: &Engine, case: &Case, spec: &str) -> anyhow::Result<(Generation, f64)> {
    let req = GenerateRequest {
        prompt_ids: case.ids.clone(),
        max_tokens: case.max_tokens,
        stop: vec![],
        sampling: SamplingParams::default(),
        schedule: m.schedule(spec)?,
    };
    let t = Instant::now();
    let g = m.generate(&req, |_| true)?;
    Ok((g, t.elapsed().as_secs_f64()))
}

pub fn run(args: BenchLazyArgs) -> anyhow::Result<()> {
    let m = args.model.load()?;
    for s in &args.schedules {
        m.schedule(s)?;
    }
    let max = m.config().max_position_embeddings;
    if let Some(&n) = args.lengths.iter().find(|&&n| n + args.agreement_tokens > max) {
        bail!("length {n} does not fit the model's context of {max}");
    }
    let docs = read_documents(&m, &args.documents)?;
    let filler: Vec<u32> = docs.iter().flatten().copied().collect();
    let mut schedules = vec!["off".to_string()];
    schedules.extend(args.schedules.iter().cloned());

    println!(
        "model {} | weights {:?} | KV {:?} | {} threads | passkey: {} cases/length, 16 tokens | agreement: {} greedy tokens",
        m.name, args.model.weights, args.model.kv_dtype, rayon::current_num_threads(), args.cases, args.agreement_tokens
    );
    println!("| prompt tokens | schedule | TTFT s | TTFT speed-up | % prompt tokens computed | decode ms/token | whole generation s | passkey | same first token | common prefix / {} |", args.agreement_tokens);
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &args.lengths {
        let mut cases: Vec<Case> = (0..args.cases).map(|c| passkey_case(&m, &filler, n, c, args.cases)).collect::<Result<_, _>>()?;
        for doc in docs.iter().filter(|d| d.len() >= n) {
            cases.push(document_case(&m, doc, n, args.agreement_tokens)?);
        }
        let mut totals: Vec<Totals> = schedules.iter().map(|_| Totals::default()).collect();
        for (ci, case) in cases.iter().enumerate() {
            let mut dense: Option<(Generation, f64)> = None;
            for (si, spec) in schedules.iter().enumerate() {
                let (g, whole) = run_case(&m, case, spec)?;
                let t = &mut totals[si];
                t.n += 1;
                t.ttft += g.ttft.as_secs_f64();
                t.computed += g.computed_fraction;
                t.whole += whole;
                if g.token_ids.len() > 1 {
                    t.decode_ms += g.decode_per_token.as_secs_f64() * 1e3;
                    t.decode_n += 1;
                }
                let d_ttft = dense.as_ref().map_or(g.ttft, |(d, _)| d.ttft);
                t.speedup += d_ttft.as_secs_f64() / g.ttft.as_secs_f64();
                match &case.key {
                    Some(key) => {
                        t.passkey_n += 1;
                        t.passkey_ok += usize::from(g.text.contains(key.as_str()));
                    }
                    None => {
                        let d = dense.as_ref().map_or(&g.token_ids, |(d, _)| &d.token_ids);
                        t.docs += 1;
                        t.first_agree += usize::from(g.token_ids.first() == d.first());
                        t.prefix += g.token_ids.iter().zip(d).take_while(|(a, b)| a == b).count();
                    }
                }
                if dense.is_none() {
                    dense = Some((g, whole));
                }
            }
            eprintln!("n={n}: case {}/{} done", ci + 1, cases.len());
        }
        for (spec, t) in schedules.iter().zip(&totals) {
            let k = t.n as f64;
            let docs = if t.docs > 0 {
                format!("{}/{} | {:.1}", t.first_agree, t.docs, t.prefix as f64 / t.docs as f64)
            } else {
                "- | -".into()
            };
            println!(
                "| {n} | {spec} | {:.2} | {:.2}x | {:.1}% | {:.1} | {:.2} | {}/{} | {docs} |",
                t.ttft / k,
                t.speedup / k,
                100.0 * t.computed / k,
                t.decode_ms / t.decode_n.max(1) as f64,
                t.whole / k,
                t.passkey_ok,
                t.passkey_n,
            );
        }
    }
    Ok(())
}
