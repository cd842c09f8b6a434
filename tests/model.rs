//! The model crate on the real SmolLM2-135M-Instruct file: tokenizer, chat template, our
//! dense forward against candle-transformers' reference, incremental decoding, bad input.

use std::io::Write;

use anyhow::Result;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use lazyserve_engine::lazy::Schedule;
use lazyserve_engine::{Engine, GenerateRequest, SamplingParams};
use lazyserve_model::{load, ChatMessage, KvCache, KvDtype, LoadedModel, WeightFormat};
use lazyserve_tests::model_path;

fn smollm() -> Result<LoadedModel> {
    Ok(load(&model_path(), WeightFormat::F32)?)
}

fn chat(m: &LoadedModel, question: &str) -> Result<Vec<u32>> {
    let text = m.tokenizer.apply_chat_template(&[ChatMessage { role: "user".into(), content: question.into() }])?;
    Ok(m.tokenizer.encode(&text)?)
}

#[test]
fn tokenizer_matches_smollm2() -> Result<()> {
    let m = smollm()?;
    assert_eq!(m.tokenizer.encode("Hello")?, vec![19556]);
    let ids = chat(&m, "Hi")?;
    assert_eq!(&ids[..3], &[1, 9690, 198], "chat prompt starts with <|im_start|>system\\n");
    for s in ["héllo wörld, naïve café", "digits 1234567 and 3.14159", "line one\nline two\n\n  indented\ttab", "    fn main() {\n        println!(\"hi\");\n    }"] {
        assert_eq!(m.tokenizer.decode(&m.tokenizer.encode(s)?)?, s);
    }
    Ok(())
}

/// Streamed text (tokenizers' DecodeStream, one id at a time) adds up to the whole decode,
/// and no delta shows half a character, on text whose characters span several tokens.
#[test]
fn streamed_text_is_the_decoded_text() -> Result<()> {
    let m = load(&model_path(), WeightFormat::F32)?;
    for s in ["héllo wörld, naïve café", "東京は日本の首都です。", "emoji 🦀🚀 and ∑ symbols", "plain ascii text, no tricks"] {
        let ids = m.tokenizer.encode(s)?;
        let mut stream = m.tokenizer.text_stream();
        let mut text = String::new();
        for &id in &ids {
            let delta = stream.step(id).map_err(|e| anyhow::anyhow!("{e}"))?.unwrap_or_default();
            assert!(!delta.contains('\u{FFFD}'), "{s:?}: delta {delta:?} shows a broken character");
            text.push_str(&delta);
        }
        assert_eq!(text, m.tokenizer.decode(&ids)?, "{s:?}");
    }
    Ok(())
}

fn paris(weights: WeightFormat, kv: KvDtype) -> Result<Vec<u32>> {
    let m = load(&model_path(), weights)?;
    let req = GenerateRequest {
        prompt_ids: chat(&m, "What is the capital of France?")?,
        max_tokens: 24,
        stop: vec![],
        sampling: SamplingParams::default(),
        schedule: Schedule::off(),
    };
    let out = Engine::new(m, kv).generate(&req, |_| true)?;
    assert!(out.text.contains("Paris"), "{weights:?}/{kv:?} answer: {:?}", out.text);
    Ok(out.token_ids)
}

#[test]
fn answers_paris() -> Result<()> {
    paris(WeightFormat::F32, KvDtype::F32)?;
    Ok(())
}

/// The fast settings (Q8 decode weights with int16 activations, f16 KV) keep the f32 answer.
#[test]
fn fast_settings_answer_the_same() -> Result<()> {
    let reference = paris(WeightFormat::F32, KvDtype::F32)?;
    assert_eq!(paris(WeightFormat::Q8_DECODE, KvDtype::F32)?, reference);
    assert_eq!(paris(WeightFormat::F32, KvDtype::F16)?, reference);
    assert_eq!(paris(WeightFormat::Q8_DECODE, KvDtype::F16)?, reference);
    Ok(())
}

/// The weight copies each role keeps (f16 prompt weights; a prefill worker without the Q8_0
/// copy; a decode worker with the Q8_0 copy alone, its prompts run on Q8_0 too) keep the
/// f32 answer.
#[test]
fn every_role_s_weights_answer_the_same() -> Result<()> {
    let reference = paris(WeightFormat::F32, KvDtype::F32)?;
    let f16 = WeightFormat::F16_Q8_DECODE;
    for format in [f16, f16.without_q8(), f16.without_dense_layers()] {
        assert_eq!(paris(format, KvDtype::F16)?, reference, "{format:?}");
    }
    Ok(())
}

/// Decode steps on the file's own Q4_1 blocks (Q8_0 for the embedding table) keep the f32
/// answer too, and the decode copy is that many fewer bytes.
#[test]
fn file_q4_1_blocks_answer_the_same() -> Result<()> {
    let reference = paris(WeightFormat::F32, KvDtype::F32)?;
    let q4 = WeightFormat::F16_Q4_DECODE;
    for format in [q4, q4.without_dense_layers()] {
        assert_eq!(paris(format, KvDtype::F16)?, reference, "{format:?}");
    }
    let decode_bytes = |format: WeightFormat| -> Result<usize> { Ok(load(&model_path(), format.without_dense_layers())?.model.weight_bytes()) };
    let (q8, q4) = (decode_bytes(WeightFormat::F16_Q8_DECODE)?, decode_bytes(q4)?);
    eprintln!("decode copy: Q8_0 {} MiB, Q4_1 {} MiB", q8 >> 20, q4 >> 20);
    assert!((q4 as f64) < 0.8 * q8 as f64, "Q4_1 {q4} bytes against Q8_0 {q8}");
    Ok(())
}

/// What each role holds, against today's f32 + Q8_0 copies: counted bytes, not timings.
#[test]
fn each_role_holds_at_most_two_thirds_of_the_two_copies() -> Result<()> {
    let bytes = |format| -> Result<usize> { Ok(load(&model_path(), format)?.model.weight_bytes()) };
    let both = bytes(WeightFormat::Q8_DECODE)?;
    let f16 = WeightFormat::F16_Q8_DECODE;
    for (role, format, at_most) in [("serve", f16, 0.65), ("prefill", f16.without_q8(), 0.45), ("decode", f16.without_dense_layers(), 0.35)] {
        let ratio = bytes(format)? as f64 / both as f64;
        eprintln!("{role}: {:.0} MiB, {ratio:.2}x", bytes(format)? as f64 / 1048576.0);
        assert!(ratio <= at_most, "{role} holds {ratio:.2}x of f32 + Q8_0");
    }
    Ok(())
}

/// Our light GGUF reader (what a router loads) reads the file's metadata as candle does.
#[test]
fn light_gguf_reader_agrees_with_candle() -> Result<()> {
    use lazyserve_request::gguf::{Gguf, Value};
    fn ours(v: &gguf_file::Value) -> Value {
        use gguf_file::Value as C;
        match v {
            C::U8(x) => Value::U8(*x),
            C::I8(x) => Value::I8(*x),
            C::U16(x) => Value::U16(*x),
            C::I16(x) => Value::I16(*x),
            C::U32(x) => Value::U32(*x),
            C::I32(x) => Value::I32(*x),
            C::U64(x) => Value::U64(*x),
            C::I64(x) => Value::I64(*x),
            C::F32(x) => Value::F32(*x),
            C::F64(x) => Value::F64(*x),
            C::Bool(x) => Value::Bool(*x),
            C::String(x) => Value::String(x.clone()),
            C::Array(xs) => Value::Array(xs.iter().map(ours).collect()),
        }
    }
    let content = gguf_file::Content::read(&mut std::fs::File::open(model_path())?)?;
    let gguf = Gguf::open(&model_path())?;
    assert_eq!(gguf.metadata.len(), content.metadata.len());
    for (k, v) in &content.metadata {
        assert_eq!(gguf.get(k), Some(&ours(v)), "{k}");
    }
    assert_eq!(gguf.tensor_names, content.tensor_infos.keys().cloned().collect());
    Ok(())
}

/// Writes the GGUF with every tensor dequantized to f32, so that candle's reference model
/// computes in f32 as ours does.
fn f32_gguf(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let src = model_path();
    let mut reader = std::fs::File::open(&src)?;
    let content = gguf_file::Content::read(&mut reader)?;
    let mut tensors = Vec::new();
    for name in content.tensor_infos.keys() {
        let t = content.tensor(&mut reader, name, &Device::Cpu)?.dequantize(&Device::Cpu)?;
        tensors.push((name.clone(), QTensor::quantize(&t, GgmlDType::F32)?));
    }
    let out = dir.join("smollm2-f32.gguf");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&out)?);
    let metadata: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut w, &metadata, &tensors)?;
    w.flush()?;
    Ok(out)
}

#[test]
fn dense_forward_matches_candle_reference() -> Result<()> {
    let m = smollm()?;
    let dir = std::env::temp_dir().join(format!("lazyserve-ref-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = f32_gguf(&dir)?;
    let mut reader = std::fs::File::open(&path)?;
    let content = gguf_file::Content::read(&mut reader)?;
    let mut reference = ModelWeights::from_gguf(content, &mut reader, &Device::Cpu)?;
    std::fs::remove_dir_all(&dir)?;

    let text = "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting \
        the one hundred and twelve steps as his father had before him. From the lamp room he could \
        see the whole bay: the fishing boats returning, the gulls settling on the breakwater, and \
        the long grey line of the horizon where the weather came from.";
    let prompt: Vec<u32> = m.tokenizer.encode(text)?.into_iter().take(64).collect();
    assert_eq!(prompt.len(), 64);

    let mut cache = KvCache::new(m.model.config(), KvDtype::F32);
    let ours = m.model.forward(&prompt, &mut cache)?;
    let theirs = reference.forward(&Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?, 0)?;
    let theirs: Vec<f32> = theirs.flatten_all()?.to_vec1()?;
    let max_diff = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max_diff < 1e-3, "last-position logits differ by {max_diff}");

    // 32 greedy tokens, each side with its own KV cache.
    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap();
    let (mut a, mut b) = (argmax(&ours), argmax(&theirs));
    let (mut ours_tokens, mut theirs_tokens) = (vec![a], vec![b]);
    for step in 0..31 {
        let la = m.model.forward(&[a], &mut cache)?;
        let lb = reference.forward(&Tensor::new(&[b], &Device::Cpu)?.unsqueeze(0)?, prompt.len() + step)?;
        a = argmax(&la);
        b = argmax(&lb.flatten_all()?.to_vec1::<f32>()?);
        ours_tokens.push(a);
        theirs_tokens.push(b);
    }
    assert_eq!(ours_tokens, theirs_tokens);
    Ok(())
}

#[test]
fn incremental_decoding_matches_recompute() -> Result<()> {
    let m = smollm()?;
    let ids = chat(&m, "Write a haiku about the sea and the wind, then explain it.")?;
    let (prompt, rest) = ids.split_at(ids.len() - 6);
    let mut cache = KvCache::new(m.model.config(), KvDtype::F32);
    let mut logits = m.model.forward(prompt, &mut cache)?;
    for &t in rest {
        logits = m.model.forward(&[t], &mut cache)?;
    }
    let whole = m.model.forward(&ids, &mut KvCache::new(m.model.config(), KvDtype::F32))?;
    let max_diff = logits.iter().zip(&whole).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max_diff < 1e-4, "incremental vs whole differ by {max_diff}");
    Ok(())
}

/// The GGUF file converted to a Hugging Face folder (safetensors with the Hugging Face q/k
/// row order, config.json, tokenizer.json, tokenizer_config.json) loads and computes the same.
#[test]
fn hf_folder_matches_gguf() -> Result<()> {
    let m = smollm()?;
    let cfg = m.model.config().clone();
    let dir = std::env::temp_dir().join(format!("lazyserve-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut reader = std::fs::File::open(model_path())?;
    let content = gguf_file::Content::read(&mut reader)?;
    let hf_name = |g: &str| -> Option<String> {
        let fixed = [("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight")];
        if let Some((_, h)) = fixed.iter().find(|(k, _)| *k == g) {
            return Some(h.to_string());
        }
        let rest = g.strip_prefix("blk.")?;
        let (layer, name) = rest.split_once('.')?;
        let module = match name.strip_suffix(".weight")? {
            "attn_norm" => "input_layernorm",
            "ffn_norm" => "post_attention_layernorm",
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            _ => return None,
        };
        Some(format!("model.layers.{layer}.{module}.weight"))
    };
    let d = cfg.head_dim;
    let mut tensors = std::collections::HashMap::new();
    for name in content.tensor_infos.keys() {
        let t = content.tensor(&mut reader, name, &Device::Cpu)?.dequantize(&Device::Cpu)?;
        let hf = hf_name(name).unwrap_or_else(|| panic!("unmapped tensor {name}"));
        // llama.cpp stores q/k rows of each head interleaved (2i, 2i+1); Hugging Face uses halves.
        let t = if name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight") {
            let (rows, cols) = t.dims2()?;
            t.reshape((rows / d, d / 2, 2, cols))?.transpose(1, 2)?.reshape((rows, cols))?.contiguous()?
        } else {
            t
        };
        tensors.insert(hf, t);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": true,
        "eos_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    m.tokenizer.save_json(&dir.join("tokenizer.json"))?;
    let template = content.metadata["tokenizer.chat_template"].to_string()?.clone();
    let tc = serde_json::json!({"chat_template": template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string())?;

    let hf = load(&dir, WeightFormat::F32)?;
    std::fs::remove_dir_all(&dir)?;
    let prompt = chat(&m, "Name the largest planet of the solar system.")?;
    assert_eq!(chat(&hf, "Name the largest planet of the solar system.")?, prompt);
    assert_eq!(hf.tokenizer.eos_ids(), &[2]);
    let a = m.model.forward(&prompt, &mut KvCache::new(m.model.config(), KvDtype::F32))?;
    let b = hf.model.forward(&prompt, &mut KvCache::new(hf.model.config(), KvDtype::F32))?;
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-3, "GGUF and Hugging Face logits differ by {diff}");
    Ok(())
}
