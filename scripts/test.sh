#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine with Rust: installs what the tests need,
# fetches the model, builds the binaries the tests start, runs every test in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

scripts/fetch-model.sh
cargo build --release --workspace --bins
cargo test --release --workspace "$@"
