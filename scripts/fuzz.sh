#!/usr/bin/env bash
# Runs every cargo-fuzz target for N seconds each (default 120): scripts/fuzz.sh [SECONDS].
#
# The targets (fuzz/fuzz_targets) take what lazyserve parses from the network: grpc_timeout
# (the grpc-timeout header), prune_spec (a request's prune spec) and state_decoder (a state
# chunk stream, seeded from fuzz/seeds/state_decoder). Needs `cargo install cargo-fuzz`;
# on stable rustc, RUSTC_BOOTSTRAP=1 lends it the nightly flags it uses. Sanitizers are off
# (-s none, the code is safe Rust; overflow checks and debug assertions stay on), which keeps
# the instrumented candle build and each execution fast. A crash is saved under
# fuzz/artifacts/TARGET/ and ends the script with a failure.
set -euo pipefail
seconds="${1:-120}"
cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$PWD/target"
for target in grpc_timeout prune_spec state_decoder; do
    mkdir -p "corpus/$target"
    seeds=()
    [[ -d "seeds/$target" ]] && seeds=("seeds/$target")
    echo "== $target: ${seconds}s"
    cargo fuzz run -s none "$target" "corpus/$target" "${seeds[@]}" -- \
        -max_total_time="$seconds" -max_len=65536 -print_final_stats=1 2>&1 | grep -E "stat::number_of_executed_units|Done|ERROR|panicked|SUMMARY" || true
    if compgen -G "artifacts/$target/crash-*" > /dev/null; then
        echo "== $target crashed: see fuzz/artifacts/$target" >&2
        exit 1
    fi
done
