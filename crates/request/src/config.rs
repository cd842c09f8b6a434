//! Model hyper-parameters, read from a Hugging Face `config.json` or from GGUF metadata.

use serde::Deserialize;

use crate::gguf::{Gguf, Value};
use crate::{Error, Result};

/// Architectures whose decoder layer our forward pass implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3, SmolLM2 and other Llama-family checkpoints.
    Llama,
    /// Mistral without sliding-window attention (a Llama layer).
    Mistral,
    /// Qwen2: a Llama layer with biases on q, k and v.
    Qwen2,
    /// Gemma 3 (text): norms before and after attention and MLP, RMSNorm on q and k, GeGLU,
    /// embeddings scaled by sqrt(hidden), local (sliding-window) layers between global ones.
    Gemma3,
}

impl Architecture {
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama" | "llamaforcausallm" | "smollm" => Ok(Self::Llama),
            "mistral" | "mistralforcausallm" => Ok(Self::Mistral),
            "qwen2" | "qwen2forcausallm" => Ok(Self::Qwen2),
            "gemma3" | "gemma3_text" | "gemma3forcausallm" => Ok(Self::Gemma3),
            _ => Err(Error::UnsupportedArchitecture(name.to_string())),
        }
    }
}

/// Llama 3 style frequency-dependent RoPE scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// Local attention on some layers: a query there sees only the keys less than `size`
/// positions before it (itself included), and RoPE turns at its own base.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SlidingWindow {
    pub size: usize,
    /// Every `pattern`-th layer is global, the others local (Gemma 3: 6, so layers 5, 11, ...).
    pub pattern: usize,
    /// RoPE base of the local layers (global layers use `rope_theta`).
    pub rope_theta: f32,
}

/// The hyper-parameters the forward pass needs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// GGUF Llama checkpoints store q/k rows permuted for interleaved RoPE pairs (2i, 2i+1);
    /// Hugging Face checkpoints pair i with i + d/2.
    pub rope_interleaved: bool,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub sliding_window: Option<SlidingWindow>,
}

/// The subset of a Hugging Face `config.json` that we read.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    rope_scaling: Option<serde_json::Value>,
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    sliding_window: Option<serde_json::Value>,
    use_sliding_window: Option<bool>,
}

impl Config {
    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(json: &str) -> Result<Self> {
        let hf: HfConfig = serde_json::from_str(json)
            .map_err(|e| Error::Unsupported(format!("config.json: {e}")))?;
        let arch_name = hf
            .model_type
            .clone()
            .or_else(|| hf.architectures.first().cloned())
            .unwrap_or_default();
        let architecture = Architecture::parse(&arch_name)?;
        if architecture == Architecture::Gemma3 {
            // Its norms are stored as w - 1 there (GGUF stores w) and it has a query scale of its own.
            return Err(Error::Unsupported("Gemma 3 from a Hugging Face folder (load its GGUF file)".into()));
        }
        // Mistral's sliding window only matters past the window; refuse to silently ignore it.
        let sliding = match architecture {
            Architecture::Mistral => hf.sliding_window.as_ref().is_some_and(|w| !w.is_null()),
            Architecture::Qwen2 => hf.use_sliding_window.unwrap_or(false),
            Architecture::Llama | Architecture::Gemma3 => false,
        };
        if sliding {
            return Err(Error::Unsupported("sliding-window attention".into()));
        }
        let rope_scaling = match &hf.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(parse_rope_scaling(v)?),
        };
        let cfg = Config {
            architecture,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads),
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            rope_interleaved: false,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            attention_bias: hf.attention_bias.unwrap_or(architecture == Architecture::Qwen2),
            sliding_window: None,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads llama.cpp's GGUF metadata keys (`{arch}.embedding_length`, ...).
    pub fn from_gguf(gguf: &Gguf) -> Result<Self> {
        let bad = |reason: String| Error::Gguf(reason);
        let arch_name = gguf
            .require("general.architecture")?
            .as_str()
            .ok_or_else(|| bad("general.architecture is not a string".into()))?
            .to_string();
        let architecture = Architecture::parse(&arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let int = |k: &str| -> Result<usize> {
            let k = key(k);
            gguf.require(&k)?.as_u32().map(|v| v as usize).ok_or_else(|| bad(format!("{k} is not a u32")))
        };
        let hidden_size = int("embedding_length")?;
        let heads = int("attention.head_count")?;
        let kv_heads = int("attention.head_count_kv").unwrap_or(heads);
        let head_dim = int("attention.key_length").unwrap_or(hidden_size / heads.max(1));
        let eps_key = key("attention.layer_norm_rms_epsilon");
        let eps = gguf.require(&eps_key)?.as_f32().ok_or_else(|| bad(format!("{eps_key} is not a float")))? as f64;
        let rope_theta = gguf.get(&key("rope.freq_base")).and_then(Value::as_f32).unwrap_or(10_000.0);
        if gguf.get(&key("rope.scaling.type")).is_some_and(|t| t.as_str() != Some("none")) {
            return Err(Error::Unsupported("RoPE scaling in GGUF metadata".into()));
        }
        let window = gguf.get(&key("attention.sliding_window")).map(|_| int("attention.sliding_window")).transpose()?;
        let sliding_window = match (architecture, window) {
            (_, None) => None,
            // llama.cpp's values for Gemma 3: every sixth layer global, local RoPE base 10000.
            (Architecture::Gemma3, Some(size)) => Some(SlidingWindow {
                size,
                pattern: int("attention.sliding_window_pattern").unwrap_or(6),
                rope_theta: gguf.get(&key("rope.local.freq_base")).and_then(Value::as_f32).unwrap_or(10_000.0),
            }),
            (_, Some(_)) => return Err(Error::Unsupported(format!("sliding-window attention on {arch_name}"))),
        };
        if architecture == Architecture::Gemma3 && int("block_count")? == 62 {
            // llama.cpp scales its queries by 1/sqrt(hidden / heads), not 1/sqrt(head_dim).
            return Err(Error::Unsupported("Gemma 3 27B's query scale".into()));
        }
        let vocab_size = match gguf.get("tokenizer.ggml.tokens") {
            Some(v) => v.as_array().ok_or_else(|| bad("tokenizer.ggml.tokens is not an array".into()))?.len(),
            None => int("vocab_size")?,
        };
        let cfg = Config {
            architecture,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_hidden_layers: int("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: eps,
            rope_theta,
            rope_scaling: None,
            // llama.cpp's converter permutes Llama q/k rows for interleaved pairs; Qwen2 and
            // Gemma 3 keep halves.
            rope_interleaved: !matches!(architecture, Architecture::Qwen2 | Architecture::Gemma3),
            max_position_embeddings: int("context_length")?,
            tie_word_embeddings: !gguf.tensor_names.contains("output.weight"),
            attention_bias: gguf.tensor_names.contains("blk.0.attn_q.bias"),
            sliding_window,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the invariants the kernels rely on.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Unsupported(what.to_string()));
        if self.num_hidden_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return bad("empty model dimensions");
        }
        if self.num_key_value_heads == 0
            || !self.num_attention_heads.is_multiple_of(self.num_key_value_heads)
        {
            return bad("attention heads not a multiple of key/value heads");
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim == 0 {
            return bad("odd head dimension");
        }
        if self.sliding_window.is_some_and(|w| w.size == 0 || w.pattern == 0) {
            return bad("empty sliding window or pattern");
        }
        Ok(())
    }

    /// The window of layer `l` when it attends locally; None on a global layer.
    pub fn layer_window(&self, l: usize) -> Option<usize> {
        self.sliding_window.filter(|w| l % w.pattern < w.pattern - 1).map(|w| w.size)
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Inverse RoPE frequencies for the pairs of one head, Llama 3 scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        self.inv_freq(self.rope_theta, self.rope_scaling.as_ref())
    }

    /// The same for the local layers of a sliding-window model (no scaling there).
    pub fn rope_local_inv_freq(&self) -> Option<Vec<f32>> {
        self.sliding_window.map(|w| self.inv_freq(w.rope_theta, None))
    }

    fn inv_freq(&self, theta: f32, scaling: Option<&Llama3RopeScaling>) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / theta.powf(2.0 * i as f32 / d as f32);
                match scaling {
                    None => f,
                    Some(s) => llama3_scale(f, s),
                }
            })
            .collect()
    }
}

fn parse_rope_scaling(v: &serde_json::Value) -> Result<Llama3RopeScaling> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    if kind != "llama3" {
        return Err(Error::Unsupported(format!("rope_scaling type {kind:?} (only llama3)")));
    }
    serde_json::from_value(v.clone()).map_err(|e| Error::Unsupported(format!("rope_scaling: {e}")))
}

fn llama3_scale(freq: f32, s: &Llama3RopeScaling) -> f32 {
    let old = s.original_max_position_embeddings as f32;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    let wavelen = 2.0 * std::f32::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_smollm2_config() -> anyhow::Result<()> {
        let cfg = Config::from_hf_json(
            r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":576,
            "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
            "num_key_value_heads":3,"vocab_size":49152,"rms_norm_eps":1e-5,"rope_theta":100000,
            "max_position_embeddings":8192,"tie_word_embeddings":true,"rope_scaling":null}"#,
        )?;
        assert_eq!(cfg.architecture, Architecture::Llama);
        assert_eq!(cfg.head_dim, 64);
        assert_eq!(cfg.kv_dim(), 192);
        assert!(!cfg.rope_interleaved);
        Ok(())
    }

    #[test]
    fn reads_gguf_metadata() -> anyhow::Result<()> {
        let int = |v: u32| Value::U32(v);
        let mut metadata: std::collections::HashMap<String, Value> = [
            ("llama.embedding_length", int(576)),
            ("llama.feed_forward_length", int(1536)),
            ("llama.block_count", int(30)),
            ("llama.attention.head_count", int(9)),
            ("llama.attention.head_count_kv", int(3)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.context_length", int(8192)),
            ("llama.vocab_size", int(49152)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        metadata.insert("general.architecture".into(), Value::String("llama".into()));
        let tensor_names = ["blk.0.attn_q.weight".to_string()].into();
        let mut gguf = Gguf { version: 3, metadata, tensor_names };
        let cfg = Config::from_gguf(&gguf)?;
        assert_eq!((cfg.head_dim, cfg.kv_dim(), cfg.vocab_size), (64, 192, 49152));
        assert_eq!(cfg.rope_theta, 10_000.0);
        assert!(cfg.rope_interleaved && cfg.tie_word_embeddings && !cfg.attention_bias);
        gguf.metadata.remove("llama.block_count");
        let err = Config::from_gguf(&gguf).unwrap_err();
        assert!(err.to_string().contains("missing metadata llama.block_count"), "{err}");
        Ok(())
    }

    #[test]
    fn reads_gemma3_local_layers() -> anyhow::Result<()> {
        let int = |v: u32| Value::U32(v);
        let mut metadata: std::collections::HashMap<String, Value> = [
            ("gemma3.embedding_length", int(640)),
            ("gemma3.feed_forward_length", int(2048)),
            ("gemma3.block_count", int(18)),
            ("gemma3.attention.head_count", int(4)),
            ("gemma3.attention.head_count_kv", int(1)),
            ("gemma3.attention.key_length", int(256)),
            ("gemma3.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
            ("gemma3.rope.freq_base", Value::F32(1e6)),
            ("gemma3.attention.sliding_window", int(512)),
            ("gemma3.context_length", int(32768)),
            ("gemma3.vocab_size", int(262144)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        metadata.insert("general.architecture".into(), Value::String("gemma3".into()));
        let gguf = Gguf { version: 3, metadata, tensor_names: Default::default() };
        let cfg = Config::from_gguf(&gguf)?;
        assert_eq!((cfg.architecture, cfg.head_dim, cfg.rope_interleaved), (Architecture::Gemma3, 256, false));
        let global: Vec<usize> = (0..18).filter(|&l| cfg.layer_window(l).is_none()).collect();
        assert_eq!(global, [5, 11, 17]);
        assert_eq!(cfg.layer_window(0), Some(512));
        assert_eq!(cfg.rope_local_inv_freq().map(|f| f[1]), Some(1.0 / 10_000f32.powf(2.0 / 256.0)));
        // A sliding window on another architecture is still refused, not ignored.
        let mut llama = gguf.clone();
        llama.metadata = llama.metadata.into_iter().map(|(k, v)| (k.replace("gemma3", "llama"), v)).collect();
        llama.metadata.insert("general.architecture".into(), Value::String("llama".into()));
        let err = Config::from_gguf(&llama).unwrap_err();
        assert!(err.to_string().contains("sliding-window attention on llama"), "{err}");
        Ok(())
    }

    #[test]
    fn refuses_unknown_architecture() {
        let err = Config::from_hf_json(
            r#"{"model_type":"gpt_neox","hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"vocab_size":8,"rms_norm_eps":1e-5,"max_position_embeddings":8}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("gpt_neox"), "{err}");
    }

    #[test]
    fn refuses_mistral_sliding_window() {
        let err = Config::from_hf_json(
            r#"{"model_type":"mistral","hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"vocab_size":8,"rms_norm_eps":1e-5,"max_position_embeddings":8,
            "sliding_window":4096}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("sliding"), "{err}");
    }
}
