#!/usr/bin/env bash
# What building and testing lazyserve needs on a fresh Debian machine with Rust: protoc
# (the proto crate and etcd-client compile .proto files with it), etcd and Prometheus
# (the discovery and telemetry tests start their own), kubectl (the manifest tests render
# k8s/ with it), openssl (scripts/dev-certs.sh makes the TLS tests' certificates), curl
# (the compose test calls the HTTPS front with it), Python with venv, the Python gRPC
# client in .venv-grpc, and the model files (SmolLM2, and Gemma 3 for tests/gemma3.rs).
# Idempotent: installs only what is missing. The container tests also need Docker with
# docker-compose, which this script does not install.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need_apt+=(libprotobuf-dev)
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v kubectl >/dev/null || need_apt+=(kubernetes-client)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v curl >/dev/null || need_apt+=(curl)
command -v python3 >/dev/null || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
python3 -c "import ensurepip, venv" >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

if ! .venv-grpc/bin/python -c "import grpc_tools, grpc_health, grpc_reflection, openai" >/dev/null 2>&1; then
  python3 -m venv .venv-grpc
  .venv-grpc/bin/python -m pip install -q -r tests/python/requirements.txt
fi

scripts/fetch-model.sh >/dev/null
# The second architecture's tests (tests/gemma3.rs) run on Gemma 3 270M.
scripts/fetch-model.sh gemma3-270m >/dev/null
