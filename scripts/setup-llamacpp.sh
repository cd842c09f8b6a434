#!/usr/bin/env bash
# Create $root/.venv-llamacpp with llama-cpp-python (CPU only) for scripts/llamacpp_bench.py,
# the llama.cpp baseline of the Rust benchmark. Benchmarking only, never CI.
# pip compiles llama.cpp from source (several minutes on a 2-core machine).
# Idempotent: if the venv already imports llama_cpp, nothing is done.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=$root/.venv-llamacpp
version=0.3.36
py=$venv/bin/python

if [ -x "$py" ] && "$py" -c 'import llama_cpp' 2>/dev/null; then
  echo "llama-cpp-python present: $("$py" -c 'import llama_cpp; print(llama_cpp.__version__)')" >&2
  echo "$py"
  exit 0
fi

[ -x "$py" ] || python3 -m venv "$venv"
"$py" -m pip install --quiet --upgrade pip
# CPU only: the default build has no GPU backend enabled; keep any caller-provided CMAKE_ARGS.
"$py" -m pip install --no-cache-dir "llama-cpp-python==$version"
"$py" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)' >&2
echo "$py"
