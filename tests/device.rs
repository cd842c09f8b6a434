//! The tensor backend (the forward pass on candle tensors that `--device cuda` runs) against
//! our CPU kernels on SmolLM2: the same logits, greedy tokens and LazyLLM selections, and a
//! state it prefills decodes on a CPU decode worker with the tokens of the all-CPU path.
//!
//! It runs on candle's CPU device; `LAZYSERVE_TEST_DEVICE=cuda:0` runs the library tests on a
//! GPU (scripts/gpu-check.sh does, in a CUDA build).

use anyhow::Result;
use candle_core::DType;
use lazyserve_engine::lazy::{self, LayerState, Schedule, SequenceState};
use lazyserve_model::{load, load_tensor, DeviceSpec, Forward, KvDtype, LoadedModel, Model, TensorModel, WeightFormat};
use lazyserve_state::{StateAssembler, StateEncoder};
use lazyserve_proto::v1::generate_request::Input;
use lazyserve_proto::v1::generate_response::Event;
use lazyserve_proto::v1::{GenerateRequest, SamplingParams, StateEncoding};
use lazyserve_tests::cluster::{Cluster, Proc};
use lazyserve_tests::{in_process, model_path, repo_root, service_engine};

const DECODE_TOKENS: usize = 16;

fn device() -> DeviceSpec {
    let spec = std::env::var("LAZYSERVE_TEST_DEVICE").unwrap_or_else(|_| "candle-cpu".into());
    spec.parse().expect("LAZYSERVE_TEST_DEVICE is a device")
}

fn models() -> (LoadedModel, LoadedModel<TensorModel>) {
    let cpu = load(&model_path(), WeightFormat::F32).expect("model loads");
    let device = device().candle_device().expect("device opens").expect("a tensor device");
    let tensor = load_tensor(&model_path(), &device, DType::F32).expect("model loads on the device");
    (cpu, tensor)
}

/// About `n` tokens of English prose (the README).
fn prose(m: &LoadedModel, n: usize) -> Vec<u32> {
    let text = std::fs::read_to_string(repo_root().join("README.md")).expect("README");
    let ids = m.tokenizer.encode(&text).expect("tokenizes");
    ids[..n].to_vec()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Per layer: the positions with K/V there and those waiting in its Aux Cache.
fn selections(s: &SequenceState) -> Vec<(Vec<u32>, Vec<u32>)> {
    let sorted = |v: &[u32]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v
    };
    s.layers.iter().map(|l| (sorted(&l.kv.positions), sorted(&l.aux.positions))).collect()
}

/// Greedy decode from a prefilled state; returns the tokens (the first from `logits`).
fn greedy<F: Forward>(model: &F, state: &mut SequenceState, logits: &[f32], n: usize) -> Result<Vec<u32>> {
    let mut tokens = vec![argmax(logits)];
    while tokens.len() < n {
        let logits = lazy::step(model, state, &[*tokens.last().unwrap()])?;
        tokens.push(argmax(&logits));
    }
    Ok(tokens)
}

#[test]
fn tensor_backend_gives_the_cpu_kernels_logits_tokens_and_selections() -> Result<()> {
    let (cpu, tensor) = models();
    let (cpu_model, dev): (&Model, &TensorModel) = (&cpu.model, &tensor.model);
    let cfg = cpu_model.config();
    let ids = prose(&cpu, 300);
    for spec in ["off", "default"] {
        let schedule = Schedule::parse(spec, cfg.num_hidden_layers)?;
        let mut a = SequenceState::new(cfg, schedule.clone(), KvDtype::F32, 0);
        let mut b = SequenceState::new(cfg, schedule, KvDtype::F32, 0);
        let mut la = lazy::step(cpu_model, &mut a, &ids)?;
        let mut lb = lazy::step(dev, &mut b, &ids)?;
        for step in 0..DECODE_TOKENS {
            let diff = max_diff(&la, &lb);
            assert!(diff < 1e-3, "{spec}, step {step}: logits differ by {diff}");
            let next = argmax(&la);
            assert_eq!(next, argmax(&lb), "{spec}, step {step}: greedy tokens differ");
            assert_eq!(selections(&a), selections(&b), "{spec}, step {step}: LazyLLM kept different tokens");
            assert_eq!((&a.stats.computed, a.stats.revived), (&b.stats.computed, b.stats.revived), "{spec}, step {step}");
            la = lazy::step(cpu_model, &mut a, &[next])?;
            lb = lazy::step(dev, &mut b, &[next])?;
        }
        if spec == "default" {
            assert!(a.computed_fraction() < 0.95, "the preset pruned: {}", a.computed_fraction());
            assert!(a.stats.revived > 0, "decode revived pruned tokens");
        }
    }
    Ok(())
}

/// Prefills `ids` under `default` with f16 K/V, encoding each layer as a prefill worker does.
fn prefill_and_ship<F: Forward>(model: &F, ids: &[u32]) -> Result<(SequenceState, Vec<f32>, Vec<lazyserve_proto::v1::StateChunk>)> {
    let cfg = model.config();
    let mut state = SequenceState::new(cfg, Schedule::parse("default", cfg.num_hidden_layers)?, KvDtype::F16, 0);
    let mut enc = StateEncoder::new(cfg, StateEncoding::F16);
    let mut chunks = vec![enc.header("seq", "smollm2", ids, "default", SamplingParams::default(), 1000)];
    let logits = lazy::step_with(model, &mut state, ids, &mut |l, layer: &LayerState| {
        chunks.extend(enc.layer(l, layer));
        Ok(())
    })?;
    chunks.push(enc.trailer());
    Ok((state, logits, chunks))
}

#[test]
fn state_from_the_tensor_backend_decodes_on_cpu_with_the_same_tokens() -> Result<()> {
    let (cpu, tensor) = models();
    let cfg = cpu.model.config();
    let ids = prose(&cpu, 400);
    let (mut reference, logits, _) = prefill_and_ship(&cpu.model, &ids)?;
    let want = greedy(&cpu.model, &mut reference, &logits, DECODE_TOKENS)?;

    let (mut on_device, logits, chunks) = prefill_and_ship(&tensor.model, &ids)?;
    let mut asm = StateAssembler::new(cfg, KvDtype::F16);
    for c in chunks {
        asm.push(c, "smollm2")?;
    }
    let (_, shipped) = asm.finish(cfg)?;
    // On a CPU decode worker.
    assert_eq!(greedy(&cpu.model, &mut shipped.clone(), &logits, DECODE_TOKENS)?, want);
    // Kept on the device (its K/V copy reused), and received by a device decode worker (K/V
    // uploaded from the host state).
    assert_eq!(greedy(&tensor.model, &mut on_device, &logits, DECODE_TOKENS)?, want);
    assert_eq!(greedy(&tensor.model, &mut shipped.clone(), &logits, DECODE_TOKENS)?, want);
    Ok(())
}

fn generate_ids(addr: String, prompt: String, prune: &str) -> Result<Vec<u32>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let mut client = lazyserve_proto::v1::generation_client::GenerationClient::connect(addr).await?;
        let req = GenerateRequest {
            input: Some(Input::Prompt(prompt)),
            max_tokens: 8,
            prune: Some(prune.into()),
            ..Default::default()
        };
        let mut stream = client.generate(req).await?.into_inner();
        let mut ids = Vec::new();
        while let Some(msg) = stream.message().await? {
            match msg.event {
                Some(Event::Chunk(c)) => ids.extend(c.token_ids),
                Some(Event::Complete(c)) => assert_eq!(c.timings.expect("timings").prefill_path, "remote"),
                other => panic!("unexpected {other:?}"),
            }
        }
        Ok(ids)
    })
}

#[test]
fn a_candle_cpu_prefill_worker_feeds_a_cpu_decode_worker() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let (prefill, decode, router) = rt.block_on(async {
        let mut prefill = Proc::spawn("lazyserve-prefill-worker", &["--device", "candle-cpu"]);
        let mut decode = Proc::spawn("lazyserve-decode-worker", &[]);
        let mut router = Cluster::router_for(&prefill.addr, &decode.addr, &[]);
        prefill.ready().await;
        decode.ready().await;
        router.ready().await;
        (prefill, decode, router)
    });
    assert!(prefill.log_text().contains("candle-cpu f32"), "{}", prefill.log_text());
    let e = service_engine();
    let text = std::fs::read_to_string(repo_root().join("README.md"))?;
    let prompt = e.tokenizer.decode(&e.tokenizer.encode(&text)?[..320])?;
    for prune in ["off", "default"] {
        let got = generate_ids(router.url(), prompt.clone(), prune)?;
        assert_eq!(got, in_process(&prompt, 8, prune), "prune {prune}");
    }
    drop((router, decode));
    Ok(())
}

#[test]
fn cuda_without_a_usable_gpu_is_a_clear_error() {
    if candle_core::utils::cuda_is_available() && DeviceSpec::Cuda(0).candle_device().is_ok() {
        eprintln!("a GPU is usable here: nothing to refuse");
        return;
    }
    let out = std::process::Command::new(lazyserve_tests::binary("lazyserve"))
        .args(["generate", "--device", "cuda", "--prompt", "Hello", "--max-tokens", "2"])
        .env("LAZYSERVE_MODEL", model_path())
        .output()
        .expect("lazyserve runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("built without CUDA") || stderr.contains("cannot open the GPU"), "{stderr}");
    let out = std::process::Command::new(lazyserve_tests::binary("lazyserve"))
        .args(["generate", "--device", "tpu", "--prompt", "Hello"])
        .output()
        .expect("lazyserve runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expected cpu, cuda, cuda:N or candle-cpu"), "{stderr}");
}
