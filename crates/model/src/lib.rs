//! lazyserve's model crate: checkpoint loading (GGUF, Hugging Face folders), tokenizer and
//! chat template, and a Llama-family forward pass over explicit token sets with our own CPU
//! kernels. No async, no networking.

pub mod backend;
pub mod checkpoint;
pub mod config;
mod error;
pub mod kernels;
pub mod model;
pub mod tensor;
pub mod tokenizer;

use std::path::Path;

pub use backend::Forward;
pub use checkpoint::Checkpoint;
pub use config::{Architecture, Config};
pub use error::{Error, Result};
pub use kernels::kv::KvDtype;
pub use model::{KvCache, LayerKv, LayerWeights, Model, Segment, WeightFormat};
pub use tensor::{DeviceSpec, TensorModel};
pub use tokenizer::{ChatMessage, Tokenizer};

/// A loaded model with its tokenizer.
pub struct LoadedModel<M = Model> {
    pub name: String,
    pub model: M,
    pub tokenizer: Tokenizer,
}

/// A checkpoint's id, hyper-parameters and tokenizer, without its weights: what a router
/// needs to tokenize and validate requests.
pub struct ModelMeta {
    pub name: String,
    pub config: Config,
    pub tokenizer: Tokenizer,
}

fn open(path: &Path) -> Result<(Checkpoint, ModelMeta)> {
    let ckpt = Checkpoint::open(path)?;
    let config = ckpt.config()?;
    let tokenizer = match &ckpt {
        Checkpoint::Gguf { content, .. } => Tokenizer::from_gguf(content)?,
        Checkpoint::HfFolder { dir, .. } => Tokenizer::from_hf_folder(dir)?,
    };
    let name = ckpt.name();
    Ok((ckpt, ModelMeta { name, config, tokenizer }))
}

/// Reads a checkpoint's metadata and tokenizer; the weights stay on disk.
pub fn load_meta(path: &Path) -> Result<ModelMeta> {
    Ok(open(path)?.1)
}

/// Loads a GGUF file or a Hugging Face checkpoint folder.
pub fn load(path: &Path, format: WeightFormat) -> Result<LoadedModel> {
    let (ckpt, ModelMeta { name, config: cfg, tokenizer }) = open(path)?;
    let model = Model::new(&cfg, ckpt.var_builder()?, format)?;
    tracing::info!(model = %name, layers = cfg.num_hidden_layers, hidden = cfg.hidden_size,
        context = cfg.max_position_embeddings, weight_mib = model.weight_bytes() >> 20, ?format, "model loaded");
    Ok(LoadedModel { name, model, tokenizer })
}

/// Loads a GGUF file or a Hugging Face checkpoint folder onto a candle device, products in
/// `dtype` (see [`TensorModel`]).
pub fn load_tensor(path: &Path, device: &candle_core::Device, dtype: candle_core::DType) -> Result<LoadedModel<TensorModel>> {
    let (ckpt, ModelMeta { name, config: cfg, tokenizer }) = open(path)?;
    let model = TensorModel::new(&cfg, ckpt.var_builder()?, device, dtype)?;
    tracing::info!(model = %name, layers = cfg.num_hidden_layers, hidden = cfg.hidden_size,
        context = cfg.max_position_embeddings, weight_mib = model.weight_bytes() >> 20, ?device, ?dtype, "model loaded");
    Ok(LoadedModel { name, model, tokenizer })
}
