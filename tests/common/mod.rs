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

/// A binary of this workspace, built by `cargo build --release --bins` (scripts/test.sh does).
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"));
    let path = target.join("release").join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --release --bins` first", path.display());
    path
}
