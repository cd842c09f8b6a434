//! What a request is and what a model allows, with no compute: a checkpoint's config and
//! tokenizer (with its chat template), read from GGUF metadata or a Hugging Face folder
//! without touching the weights; the request checks every service shares, sampling
//! settings, pruning schedules, detokenization and stop strings. A router depends on this
//! crate alone.

pub mod config;
pub mod deadline;
mod error;
pub mod gguf;
pub mod limits;
pub mod output;
pub mod sampling;
pub mod schedule;
pub mod tokenizer;

use std::path::Path;

pub use config::{Architecture, Config, Llama3RopeScaling, SlidingWindow};
pub use deadline::{parse_grpc_timeout, TimeoutError};
pub use error::{Error, Result};
pub use gguf::Gguf;
pub use limits::MAX_NEW_TOKENS;
pub use output::{FinishReason, Output, OutputStep, StopMatcher};
pub use tokenizer::TextStream;
pub use sampling::SamplingParams;
pub use schedule::{Mode, Schedule, Stage, PRESET_NAMES};
pub use tokenizer::{ChatMessage, Tokenizer};

/// A checkpoint's id, hyper-parameters and tokenizer, without its weights: what a router
/// needs to tokenize and validate requests.
pub struct ModelMeta {
    pub name: String,
    pub config: Config,
    pub tokenizer: Tokenizer,
}

/// Reads the config and tokenizer of a GGUF file or a Hugging Face checkpoint folder; the
/// weights stay on disk.
pub fn load_meta(path: &Path) -> Result<ModelMeta> {
    if !path.exists() {
        return Err(Error::NotFound(path.to_path_buf()));
    }
    let (config, tokenizer) = if path.is_dir() {
        let cfg_path = path.join("config.json");
        let json = std::fs::read_to_string(&cfg_path).map_err(|source| Error::Io { path: cfg_path, source })?;
        (Config::from_hf_json(&json)?, Tokenizer::from_hf_folder(path)?)
    } else {
        let gguf = Gguf::open(path)?;
        let config = Config::from_gguf(&gguf).map_err(|e| e.in_file(path))?;
        (config, Tokenizer::from_gguf(&gguf)?)
    };
    let name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(ModelMeta { name, config, tokenizer })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_meta_names_what_is_wrong() -> anyhow::Result<()> {
        let err = |path: &Path| load_meta(path).err().expect("refused").to_string();
        assert_eq!(err(Path::new("/nonexistent/model.gguf")), "model file not found: /nonexistent/model.gguf");
        let dir = std::env::temp_dir().join(format!("lazyserve-request-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let corrupt = dir.join("corrupt.gguf");
        std::fs::write(&corrupt, b"this is not a gguf file at all")?;
        let short = dir.join("short.gguf");
        std::fs::write(&short, b"GGUF\x03\0\0\0\0\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0")?;
        let (corrupt_err, short_err, folder_err) = (err(&corrupt), err(&short), err(&dir));
        std::fs::remove_dir_all(&dir)?;
        assert!(corrupt_err.starts_with("invalid checkpoint") && corrupt_err.contains("not a GGUF file"), "{corrupt_err}");
        assert!(short_err.starts_with("invalid checkpoint") && short_err.contains("truncated"), "{short_err}");
        assert!(folder_err.starts_with("cannot read") && folder_err.contains("config.json"), "{folder_err}");
        Ok(())
    }
}
