#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine with Rust: installs what the tests need,
# fetches the model, builds the binaries the tests start, runs every test in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --workspace --bins
cargo test --release --workspace "$@"
