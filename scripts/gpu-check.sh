#!/usr/bin/env bash
# The GPU check, for a host with an NVIDIA GPU and its driver (none of our machines has
# one): builds with CUDA (scripts/build-cuda.sh), runs tests/device.rs with the tensor
# backend on cuda:0, then prints the bench-device table: prefill TTFT at 1k, 4k and 8k
# tokens, dense and `default`, on the GPU against our CPU kernels on 2 threads. Copies of
# the output go to $OUT (default target/gpu-check). Needs the model and protoc
# (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

out=${OUT:-target/gpu-check}
mkdir -p "$out"
nvidia-smi | tee "$out/nvidia-smi.txt"

scripts/build-cuda.sh
LAZYSERVE_TEST_DEVICE=cuda:0 scripts/build-cuda.sh --test -p lazyserve-tests --test device -- --test-threads 1 \
  2>&1 | tee "$out/tests.txt"
export LD_LIBRARY_PATH=$(scripts/build-cuda.sh --print-cuda-home)/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
target/cuda/release/lazyserve bench-device --device cuda:0 --threads 2 --lengths 1024,4096,8000 \
  | tee "$out/bench-device.md"
