#!/usr/bin/env bash
# The full soak (tests/soak.rs): 1000 requests with prompts of up to 4096 tokens through a
# router, two prefill and two decode workers, 30% cancelled, a decode worker killed and
# restarted and a prefill worker killed on the way; prints the outcomes, resident memory and
# file descriptors. CI runs the same test with 96 requests of up to 1024 tokens.
# Usage: scripts/soak.sh [REQUESTS]
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --workspace --bins
LAZYSERVE_SOAK_REQUESTS=${1:-1000} LAZYSERVE_SOAK_FULL=1 \
  cargo test --release -p lazyserve-tests --test soak -- --nocapture
