//! Helpers shared by the integration tests.

use std::path::PathBuf;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF that `scripts/fetch-model.sh` puts in `models/`
/// (or `LAZYSERVE_MODEL`). Tests need the real file: a missing one is a failure, not a skip.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("LAZYSERVE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(path.exists(), "{} is missing: run scripts/fetch-model.sh", path.display());
    path
}

/// The Gemma 3 270M Q4_K_M GGUF that `scripts/fetch-model.sh gemma3-270m` puts in `models/`
/// (or `LAZYSERVE_GEMMA3_MODEL`): the second architecture's tests. Missing is a failure.
pub fn gemma3_path() -> PathBuf {
    let path = std::env::var_os("LAZYSERVE_GEMMA3_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/gemma-3-270m-q4_k_m.gguf"));
    assert!(path.exists(), "{} is missing: run scripts/fetch-model.sh gemma3-270m", path.display());
    path
}

/// A binary of this workspace, built by `cargo build --release --bins` (scripts/test.sh does).
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"));
    let path = target.join("release").join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --release --bins` first", path.display());
    path
}

pub mod cluster;
pub mod etcd;
pub mod reference;
pub mod tls;

/// A tiny Llama with random weights (deterministic), for fast algorithm tests.
pub fn tiny_model() -> lazyserve_model::Model {
    use candle_core::{Device, Tensor};
    // tests/tiny-config.json: the cargo-fuzz state_decoder target expects the same model.
    let cfg = lazyserve_model::Config::from_hf_json(include_str!("../tiny-config.json")).expect("tiny config");
    let (h, i, v, kv) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.kv_dim());
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = |shape: &[usize], scale: f32| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                ((seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    };
    let mut t = std::collections::HashMap::new();
    t.insert("model.embed_tokens.weight".to_string(), rand(&[v, h], 1.0));
    t.insert("model.norm.weight".to_string(), (rand(&[h], 0.2) + 1.0).unwrap());
    t.insert("lm_head.weight".to_string(), rand(&[v, h], 0.3));
    for l in 0..cfg.num_hidden_layers {
        let p = |n: &str| format!("model.layers.{l}.{n}.weight");
        t.insert(p("input_layernorm"), (rand(&[h], 0.2) + 1.0).unwrap());
        t.insert(p("post_attention_layernorm"), (rand(&[h], 0.2) + 1.0).unwrap());
        t.insert(p("self_attn.q_proj"), rand(&[h, h], 0.4));
        t.insert(p("self_attn.k_proj"), rand(&[kv, h], 0.4));
        t.insert(p("self_attn.v_proj"), rand(&[kv, h], 0.4));
        t.insert(p("self_attn.o_proj"), rand(&[h, h], 0.2));
        t.insert(p("mlp.gate_proj"), rand(&[i, h], 0.3));
        t.insert(p("mlp.up_proj"), rand(&[i, h], 0.3));
        t.insert(p("mlp.down_proj"), rand(&[h, i], 0.2));
    }
    let vb = candle_nn::VarBuilder::from_tensors(t, candle_core::DType::F32, &Device::Cpu);
    lazyserve_model::Model::new(&cfg, vb, lazyserve_model::WeightFormat::F32).expect("tiny model")
}

/// Prefills `prompt` under `spec`, encoding each layer as soon as it is done, like a prefill
/// worker: the state and its chunks (header for model "tiny", rows, trailer).
pub fn prefill_and_encode(
    model: &lazyserve_model::Model,
    kv: lazyserve_model::KvDtype,
    encoding: lazyserve_proto::v1::StateEncoding,
    spec: &str,
    prompt: &[u32],
) -> anyhow::Result<(lazyserve_engine::lazy::SequenceState, Vec<lazyserve_proto::v1::StateChunk>)> {
    use lazyserve_engine::lazy::{self, Schedule, SequenceState};
    let layers = model.config().num_hidden_layers;
    let mut state = SequenceState::new(model.config(), Schedule::parse(spec, layers)?, kv, 0);
    let mut enc = lazyserve_state::StateEncoder::new(model.config(), encoding);
    let mut chunks = vec![enc.header("seq", "tiny", prompt, spec, Default::default(), 1000)];
    lazy::step_with(model, &mut state, prompt, &mut |l, layer| {
        chunks.extend(enc.layer(l, layer));
        Ok(())
    })?;
    chunks.push(enc.trailer());
    Ok((state, chunks))
}

/// The Python with grpcio and openai that the client tests use: `.venv-grpc`, made from
/// tests/python/requirements.txt when it is missing (scripts/test.sh makes it first).
pub fn python_grpc() -> PathBuf {
    let root = repo_root();
    let python = root.join(".venv-grpc/bin/python");
    let ready = || {
        std::process::Command::new(&python)
            .args(["-c", "import grpc_tools, grpc_health, grpc_reflection, openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready() {
        let run = |cmd: &mut std::process::Command| assert!(cmd.status().expect("runs").success(), "{cmd:?} failed");
        if !python.exists() {
            run(std::process::Command::new("python3").args(["-m", "venv"]).arg(root.join(".venv-grpc")));
        }
        run(std::process::Command::new(&python).args(["-m", "pip", "install", "-q", "-r"]).arg(root.join("tests/python/requirements.txt")));
    }
    python
}

/// The model with f32 prompt weights and every copy in one process (q8-decode weights, f16
/// KV), loaded once per test binary: the services, which run f16 prompt weights and keep
/// only their role's copies, must give its tokens.
pub fn service_engine() -> &'static lazyserve_engine::Engine {
    static ENGINE: std::sync::OnceLock<lazyserve_engine::Engine> = std::sync::OnceLock::new();
    ENGINE.get_or_init(|| {
        let loaded = lazyserve_model::load(&model_path(), lazyserve_model::WeightFormat::Q8_DECODE).expect("model loads");
        lazyserve_engine::Engine::new(loaded, lazyserve_model::KvDtype::F16)
    })
}

/// Greedy token ids for `prompt` from [`service_engine`], under pruning `prune`.
pub fn in_process(prompt: &str, max_tokens: usize, prune: &str) -> Vec<u32> {
    let e = service_engine();
    let req = lazyserve_engine::GenerateRequest {
        prompt_ids: e.tokenizer.encode(prompt).expect("tokenizes"),
        max_tokens,
        stop: vec![],
        sampling: lazyserve_engine::SamplingParams::default(),
        schedule: e.schedule(prune).expect("schedule"),
    };
    e.generate(&req, |_| true).expect("generates").token_ids
}
