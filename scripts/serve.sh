#!/usr/bin/env bash
# The embedded default in one command: sets up, builds, starts `lazyserve serve` (router,
# prefill and decode worker in one process, no etcd), answers one Generate call with the
# Python gRPC client and one chat completion with the openai package over the HTTP API,
# then keeps serving until Ctrl-C. Flags go to `lazyserve serve`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --bin lazyserve
listen=${LAZYSERVE_LISTEN:-127.0.0.1:50051}
http=${LAZYSERVE_HTTP_LISTEN:-127.0.0.1:8000}
target/release/lazyserve serve --listen "$listen" --http-listen "$http" "$@" &
server=$!
trap 'kill $server 2>/dev/null; wait $server' EXIT INT TERM
for _ in $(seq 1 600); do
  if .venv-grpc/bin/python -c "
import grpc, sys
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel('$listen') as c:
    s = health_pb2_grpc.HealthStub(c).Check(health_pb2.HealthCheckRequest(), timeout=1).status
sys.exit(s != health_pb2.HealthCheckResponse.SERVING)" 2>/dev/null; then
    break
  fi
  kill -0 $server 2>/dev/null || { echo "lazyserve serve exited" >&2; exit 1; }
  sleep 0.2
done
echo "gRPC Generate(prompt=\"The capital of France is\", max_tokens=8) on $listen:"
.venv-grpc/bin/python tests/python/generate_client.py "$listen" "The capital of France is" 8
echo "HTTP POST /v1/chat/completions on http://$http (the openai package):"
.venv-grpc/bin/python - "$http" <<'PY'
import sys, openai
client = openai.OpenAI(base_url=f"http://{sys.argv[1]}/v1", api_key="unused")
model = client.models.list().data[0].id
reply = client.chat.completions.create(model=model, max_tokens=24, temperature=0,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
print(reply.choices[0].message.content)
PY
echo "lazyserve is serving gRPC on $listen and HTTP on http://$http; Ctrl-C stops it."
wait $server
