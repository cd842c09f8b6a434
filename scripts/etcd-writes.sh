#!/usr/bin/env bash
# etcd writes per minute of a 2 prefill + 2 decode pool and its router, idle and then busy
# (a client sending short and 1k-token prompts back to back). Every write bumps etcd's
# revision, so the count is the revision's growth over the window. Needs etcd (apt-get
# install etcd-server) and the release binaries (cargo build --release --bins).
#   scripts/etcd-writes.sh [SECONDS]     (default 60 each)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
dir=$(mktemp -d)
base=$((20000 + RANDOM % 20000))
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
etcd --data-dir "$dir/etcd" --listen-client-urls "http://127.0.0.1:$base" \
  --advertise-client-urls "http://127.0.0.1:$base" --listen-peer-urls "http://127.0.0.1:$((base + 1))" \
  >"$dir/etcd.log" 2>&1 &
pids+=($!)
etcd_url="http://127.0.0.1:$base"
for i in 1 2; do
  target/release/lazyserve-prefill-worker --listen "127.0.0.1:$((base + 10 + i))" --etcd-endpoints "$etcd_url" >"$dir/p$i.log" 2>&1 &
  pids+=($!)
  target/release/lazyserve-decode-worker --listen "127.0.0.1:$((base + 20 + i))" --etcd-endpoints "$etcd_url" >"$dir/d$i.log" 2>&1 &
  pids+=($!)
done
http="127.0.0.1:$((base + 31))"
target/release/lazyserve-router --listen "127.0.0.1:$((base + 30))" --http-listen "$http" --etcd-endpoints "$etcd_url" >"$dir/r.log" 2>&1 &
pids+=($!)

python3 - "$etcd_url" "$http" "$secs" <<'PY'
import base64, json, sys, threading, time, urllib.request

etcd, http, secs = sys.argv[1], sys.argv[2], int(sys.argv[3])

def revision():
    body = json.dumps({"key": base64.b64encode(b"/").decode(), "keys_only": True}).encode()
    with urllib.request.urlopen(urllib.request.Request(etcd + "/v3/kv/range", data=body), timeout=5) as r:
        return int(json.load(r)["header"]["revision"])

def complete(prompt, max_tokens):
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://{http}/v1/completions", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)

# Wait until the pool serves (the workers load the model and register).
deadline = time.time() + 300
while True:
    try:
        complete("Hello", 2)
        break
    except Exception:
        if time.time() > deadline:
            sys.exit("the pool did not serve within 300 s")
        time.sleep(1)
time.sleep(3)

def window(busy):
    stop = threading.Event()
    served = [0]
    def client():
        long = "The grass is green and the sky is blue. " * 100
        while not stop.is_set():
            complete(long if served[0] % 4 == 3 else "Once upon a time", 8)
            served[0] += 1
    t = threading.Thread(target=client) if busy else None
    start = revision()
    if t:
        t.start()
    time.sleep(secs)
    stop.set()
    if t:
        t.join()
    return (revision() - start) * 60 / secs, served[0]

idle, _ = window(False)
busy, served = window(True)
print(f"etcd writes per minute, 2 prefill + 2 decode workers and a router ({secs} s windows)")
print(f"| pool | writes/min |")
print(f"|---|---:|")
print(f"| idle | {idle:.0f} |")
print(f"| busy ({served} requests) | {busy:.0f} |")
PY
