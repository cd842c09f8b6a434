#!/usr/bin/env bash
# Resident memory of each process kind after start-up, for each --weights value: starts the
# router, a prefill worker, a decode worker and `lazyserve serve` one at a time on a free
# port, waits for the line that says it serves, and prints VmRSS from /proc. Extra flags go
# to every process, e.g. `scripts/rss-per-role.sh --model other.gguf`.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --workspace --bins >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Prints the VmRSS (MiB) of "$@" once it logs that it serves, then stops it.
rss_mib() {
  "$@" >"$log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 600); do
    grep -q "serving addr=" "$log" && break
    kill -0 $pid 2>/dev/null || { cat "$log" >&2; echo "$1 exited" >&2; return 1; }
    sleep 0.2
  done
  sleep 1
  awk '/^VmRSS/ { printf "%.0f", $2 / 1024 }' /proc/$pid/status
  kill $pid
  wait $pid || true
}

bin=target/release
printf '%-15s %10s %10s %10s %10s\n' weights router prefill decode serve
for weights in q8-decode f16-q8-decode; do
  common=(--listen 127.0.0.1:0 --weights "$weights" "$@")
  router=$(rss_mib $bin/lazyserve-router --listen 127.0.0.1:0 --prefill-workers 127.0.0.1:9 --decode-workers 127.0.0.1:9 "$@")
  prefill=$(rss_mib $bin/lazyserve-prefill-worker "${common[@]}")
  decode=$(rss_mib $bin/lazyserve-decode-worker "${common[@]}")
  serve=$(rss_mib $bin/lazyserve serve "${common[@]}")
  printf '%-15s %10s %10s %10s %10s\n' "$weights" "$router" "$prefill" "$decode" "$serve"
done
