#!/usr/bin/env bash
# Builds the binaries with candle's CUDA backend (feature lazyserve-model/cuda) into
# target/cuda/release on a machine with no GPU and no CUDA install: nvcc, headers and
# libraries come from NVIDIA's CUDA 13 wheels in .venv-cuda, and the kernels are compiled for
# CUDA_COMPUTE_CAP (default 90: H100/H200), as there is no GPU to ask. deploy/Dockerfile.cuda
# runs it too. Idempotent; prints how long it took. Arguments go to `cargo build`; a first
# argument --test runs `cargo test` with them instead (the CUDA libraries on the loader's
# path), --setup-only installs the toolkit only, --print-cuda-home prints where it is.
set -euo pipefail
cd "$(dirname "$0")/.."

# The toolkit version, major.minor. cudarc 0.19 (under candle 0.11) knows CUDA 13.0 to 13.4,
# not pip's newest (13.5); and the driver JIT-compiles candle's PTX kernels, so the GPU
# nodes' driver must support this version or a later one: 13.0 runs on every CUDA 13 driver
# (R580 and up).
cuda=${LAZYSERVE_CUDA_VERSION:-13.0}
[[ $cuda =~ ^[0-9]+\.[0-9]+$ ]] || { echo "LAZYSERVE_CUDA_VERSION=$cuda: want major.minor" >&2; exit 1; }
# The GPUs' compute capability: 90 compiles for sm_90a, which only H100/H200 run; 80 for
# A100, 89 for L4/L40S, and so on.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
major=${cuda%%.*}
next=$major.$((${cuda#*.} + 1))
# nvcc, crt and nvvm (nvcc's parts), the runtime and nvrtc carry the toolkit version; CCCL
# (headers) no newer than it; cuBLAS and cuRAND have their own numbering, any for CUDA 13.
wheels=(
  "nvidia-cuda-nvcc>=$cuda,<$next" "nvidia-cuda-crt>=$cuda,<$next" "nvidia-nvvm>=$cuda,<$next"
  "nvidia-cuda-runtime>=$cuda,<$next" "nvidia-cuda-nvrtc>=$cuda,<$next" "nvidia-cuda-cccl<$next"
  nvidia-cublas nvidia-curand
)

# nvcc compiles the host side of the kernels with g++.
command -v g++ >/dev/null || { echo "nvcc needs g++ (apt-get install g++)" >&2; exit 1; }

venv=$PWD/.venv-cuda
if [ "$(cat "$venv/installed" 2>/dev/null)" != "${wheels[*]}" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q -U "${wheels[@]}"
  echo "${wheels[*]}" > "$venv/installed"
  rm -rf "$venv/link"
  # Another toolkit: cargo would not see it (same paths), so the crates built with it go.
  [ ! -d target/cuda ] || CARGO_TARGET_DIR=target/cuda cargo clean -q --release -p cudarc -p candle-kernels
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
export CUDA_HOME=$site/nvidia/cu$major
"$CUDA_HOME/bin/nvcc" --version | grep -q "release $cuda," \
  || { echo "nvcc in $CUDA_HOME is not CUDA $cuda" >&2; exit 1; }

# The wheels ship only the versioned libraries (libcudart.so.13, ...) that programs load,
# not the unversioned names that `-lcudart` links against, and no libcuda at all: that is
# the driver's, which the GPU node provides. link/ has the unversioned names, and a
# link-only libcuda.so that exports the driver API's names (from cuda.h) as empty functions,
# built for the same purpose as the stubs/libcuda.so in NVIDIA's toolkit: its soname is
# libcuda.so.1, so the binaries load the real driver at run time, and nothing loads it.
link=$venv/link
if [ ! -f "$link/libcuda.so" ]; then
  mkdir -p "$link"
  for lib in cudart cublas cublasLt curand nvrtc; do
    versioned=$(cd "$CUDA_HOME/lib" && ls "lib$lib.so."* | grep -E "^lib$lib\.so\.[0-9]+$")
    ln -sfn "$CUDA_HOME/lib/$versioned" "$link/lib$lib.so"
  done
  # Every name cuda.h maps the API to (current, legacy and per-thread-stream variants), and
  # the profiler's three, whose cudaProfiler.h the wheels lack.
  { for defs in "" -D__CUDA_API_VERSION_INTERNAL -D__CUDA_API_PER_THREAD_DEFAULT_STREAM; do
      echo '#include <cuda.h>' | gcc -E -P $defs -I"$CUDA_HOME/include" -
    done | grep -oE '\bcu[A-Za-z0-9_]+ *\(' | tr -d ' ('
    printf '%s\n' cuProfilerInitialize cuProfilerStart cuProfilerStop
  } | sort -u | sed 's/.*/void &(void) {}/' > "$link/libcuda-stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/libcuda-stub.c"
fi
export LIBRARY_PATH=$link${LIBRARY_PATH:+:$LIBRARY_PATH}
export PATH=$CUDA_HOME/bin:$PATH
case ${1:-} in
  --setup-only) echo "CUDA $cuda in $CUDA_HOME"; exit 0 ;;
  --print-cuda-home) echo "$CUDA_HOME"; exit 0 ;;
esac

# Absolute: the tests find the binaries they start through it, from their own directory.
export CARGO_TARGET_DIR=$PWD/target/cuda
echo "CUDA $cuda from $CUDA_HOME, kernels for compute capability $CUDA_COMPUTE_CAP" >&2
if [ "${1:-}" = --test ]; then
  shift
  export LD_LIBRARY_PATH=$CUDA_HOME/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  cargo test --release --features lazyserve-model/cuda "$@"
  echo "tested in ${SECONDS}s ($((SECONDS / 60))m$((SECONDS % 60))s)" >&2
  exit 0
fi
cargo build --release --bins --features lazyserve-model/cuda "$@"
echo "built target/cuda/release in ${SECONDS}s ($((SECONDS / 60))m$((SECONDS % 60))s)"
echo "to run them here: LD_LIBRARY_PATH=$CUDA_HOME/lib (and a GPU with its driver)"
