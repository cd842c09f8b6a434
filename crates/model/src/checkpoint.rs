//! Opening checkpoints: a GGUF file, or a Hugging Face folder (`config.json`,
//! `*.safetensors`, `tokenizer.json`, `tokenizer_config.json`). Both are exposed as a candle
//! `VarBuilder` under the Hugging Face tensor names, so the layers load the same way. Their
//! config and tokenizer are `lazyserve_request::load_meta`'s.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Seek};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// What a checkpoint path turned out to be.
pub enum Checkpoint {
    Gguf { path: PathBuf, content: gguf_file::Content },
    HfFolder { dir: PathBuf },
}

impl Checkpoint {
    /// Opens `path`; `load_meta` has refused a missing one with a clear error already.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Ok(Self::HfFolder { dir: path.to_path_buf() });
        }
        let file = File::open(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader).map_err(|e| Error::checkpoint(path, e))?;
        let file_len = reader.seek(std::io::SeekFrom::End(0)).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        // Refuse a truncated file up front rather than at the first missing tensor.
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count() as u64;
            let bytes = elems / info.ggml_dtype.block_size() as u64 * info.ggml_dtype.type_size() as u64;
            if content.tensor_data_offset + info.offset + bytes > file_len {
                return Err(Error::checkpoint(path, format!("truncated: tensor {name} ends past the end of the file")));
            }
        }
        Ok(Self::Gguf { path: path.to_path_buf(), content })
    }

    /// Tensors as f32 under Hugging Face names (quantized GGUF tensors are dequantized).
    pub fn var_builder(&self) -> Result<VarBuilder<'static>> {
        match self {
            Self::HfFolder { dir } => {
                let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                    .map_err(|source| Error::Io { path: dir.clone(), source })?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                    .collect();
                files.sort();
                if files.is_empty() {
                    return Err(Error::checkpoint(dir, "no *.safetensors files"));
                }
                // SAFETY: the files are mapped read-only; we do not mutate them while loaded.
                let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }
                    .map_err(|e| Error::checkpoint(dir, e))?;
                Ok(vb)
            }
            Self::Gguf { path, content } => {
                let file = File::open(path).map_err(|source| Error::Io { path: path.clone(), source })?;
                let backend = GgufBackend {
                    path: path.clone(),
                    arch: gguf_arch(content).to_string(),
                    infos: content
                        .tensor_infos
                        .iter()
                        .map(|(k, i)| {
                            let info = gguf_file::TensorInfo { ggml_dtype: i.ggml_dtype, shape: i.shape.clone(), offset: i.offset };
                            (k.clone(), info)
                        })
                        .collect(),
                    data_offset: content.tensor_data_offset,
                    reader: Mutex::new(BufReader::new(file)),
                };
                Ok(VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu))
            }
        }
    }
}

impl Checkpoint {
    /// The raw GGUF bytes of tensor `hf_name` (a Hugging Face name) when the file stores it as
    /// Q4_1; None for any other type, a missing tensor or a folder checkpoint.
    pub fn gguf_q4_1(&self, hf_name: &str) -> Result<Option<Vec<u8>>> {
        let Self::Gguf { path, content } = self else { return Ok(None) };
        let name = gguf_name(hf_name, gguf_arch(content)).unwrap_or_else(|| hf_name.to_string());
        let Some(info) = content.tensor_infos.get(&name).filter(|i| i.ggml_dtype == GgmlDType::Q4_1) else { return Ok(None) };
        let file = File::open(path).map_err(|source| Error::Io { path: path.clone(), source })?;
        let tensor = info.read(&mut BufReader::new(file), content.tensor_data_offset, &Device::Cpu).map_err(|e| Error::checkpoint(path, e))?;
        Ok(Some(tensor.data().map_err(|e| Error::checkpoint(path, e))?.into_owned()))
    }
}

/// The file's `general.architecture` ("" when it has none).
fn gguf_arch(content: &gguf_file::Content) -> &str {
    match content.metadata.get("general.architecture") {
        Some(gguf_file::Value::String(s)) => s,
        _ => "",
    }
}

/// Maps a Hugging Face tensor name to llama.cpp's GGUF name in a file of architecture `arch`
/// (Gemma 3 names its norms differently: its pre-MLP norm is `ffn_norm`).
fn gguf_name(hf: &str, arch: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, name) = rest.split_once('.')?;
    let (module, suffix) = name.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if arch == "gemma3" => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// Reads GGUF tensors on demand, dequantized to the requested dtype.
struct GgufBackend {
    path: PathBuf,
    arch: String,
    infos: HashMap<String, gguf_file::TensorInfo>,
    data_offset: u64,
    reader: Mutex<BufReader<File>>,
}

impl GgufBackend {
    fn read(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let gname = gguf_name(name, &self.arch).unwrap_or_else(|| name.to_string());
        let info = self
            .infos
            .get(&gname)
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: tensor {gname} not found", self.path.display())))?;
        let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        info.read(&mut *reader, self.data_offset, dev)?.dequantize(dev)?.to_dtype(dtype)
    }
}

impl SimpleBackend for GgufBackend {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.read(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!("{}: tensor {name} has shape {:?}, expected {s:?}", self.path.display(), t.shape());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.infos.contains_key(&gguf_name(name, &self.arch).unwrap_or_else(|| name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_hf_names_to_gguf() {
        let llama = |hf| gguf_name(hf, "llama");
        assert_eq!(llama("model.layers.3.self_attn.q_proj.weight").as_deref(), Some("blk.3.attn_q.weight"));
        assert_eq!(llama("model.layers.0.self_attn.k_proj.bias").as_deref(), Some("blk.0.attn_k.bias"));
        assert_eq!(llama("model.layers.12.mlp.down_proj.weight").as_deref(), Some("blk.12.ffn_down.weight"));
        assert_eq!(llama("model.layers.2.post_attention_layernorm.weight").as_deref(), Some("blk.2.ffn_norm.weight"));
        assert_eq!(llama("model.norm.weight").as_deref(), Some("output_norm.weight"));
        assert_eq!(llama("model.layers.1.unknown.weight"), None);
        let gemma = |hf| gguf_name(hf, "gemma3");
        assert_eq!(gemma("model.layers.2.post_attention_layernorm.weight").as_deref(), Some("blk.2.post_attention_norm.weight"));
        assert_eq!(gemma("model.layers.2.pre_feedforward_layernorm.weight").as_deref(), Some("blk.2.ffn_norm.weight"));
        assert_eq!(gemma("model.layers.2.post_feedforward_layernorm.weight").as_deref(), Some("blk.2.post_ffw_norm.weight"));
        assert_eq!(gemma("model.layers.0.self_attn.k_norm.weight").as_deref(), Some("blk.0.attn_k_norm.weight"));
    }
}
