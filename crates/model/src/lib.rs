//! lazyserve's model crate: checkpoint weights (GGUF, Hugging Face folders) and a
//! Llama-family forward pass over explicit token sets with our own CPU kernels. The config and
//! tokenizer come from `lazyserve-request`. No async, no networking.

pub mod backend;
pub mod checkpoint;
mod error;
pub mod kernels;
pub mod model;
pub mod tensor;

use std::path::Path;

pub use backend::Forward;
pub use checkpoint::Checkpoint;
pub use error::{Error, Result};
pub use kernels::kv::KvDtype;
pub use model::{DenseDtype, KvCache, LayerKv, LayerWeights, Model, Segment, WeightFormat};
pub use lazyserve_request::{load_meta, Architecture, ChatMessage, Config, ModelMeta, Tokenizer};
pub use tensor::{DeviceSpec, TensorModel};

/// A loaded model with its tokenizer.
pub struct LoadedModel<M = Model> {
    pub name: String,
    pub model: M,
    pub tokenizer: Tokenizer,
}

/// The checkpoint's weights and its metadata. A GGUF header is read twice, by our reader for
/// the config and tokenizer (as a router reads them) and by candle for the tensor index.
fn open(path: &Path) -> Result<(Checkpoint, ModelMeta)> {
    let meta = load_meta(path)?;
    Ok((Checkpoint::open(path)?, meta))
}

/// Loads a GGUF file or a Hugging Face checkpoint folder.
pub fn load(path: &Path, format: WeightFormat) -> Result<LoadedModel> {
    let (ckpt, ModelMeta { name, config: cfg, tokenizer }) = open(path)?;
    let model = Model::from_checkpoint(&cfg, &ckpt, format)?;
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
