#!/usr/bin/env bash
# Renders k8s/base and every overlay under k8s/overlays with `kubectl kustomize`, and
# validates each rendered object offline against the Kubernetes 1.30 JSON schemas
# (kubernetes-validate --strict: unknown fields are errors), then cross-checks the objects
# of each render (tests/k8s/check_manifests.py). Kinds that are CRDs, absent from the
# schemas, are skipped by name and said so; any other kind without a schema fails.
# Exits non-zero on any failure.
#
# Needs kubectl (Debian: apt-get install kubernetes-client) and .venv-k8s, made here from
# tests/k8s/requirements.txt when missing. KUBECTL picks another kubectl.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
kubectl=${KUBECTL:-kubectl}
venv=$root/.venv-k8s
k8s_version=1.30.0
# CRDs: no schema in kubernetes-validate; checked by check_manifests.py only.
skip_kinds=(ServiceMonitor Issuer Certificate)

if ! command -v "$kubectl" >/dev/null; then
  echo "FAIL: $kubectl not found (apt-get install kubernetes-client)" >&2
  exit 1
fi
if ! "$venv/bin/python" -c "import kubernetes_validate, yaml" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q -r "$root/tests/k8s/requirements.txt"
fi
echo "kubectl: $("$kubectl" version --client 2>/dev/null | head -n 1)"
echo "kubernetes-validate $("$venv/bin/kubernetes-validate" --version), schemas of Kubernetes $k8s_version"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
failed=()

# The validator itself must reject a bad object, or a pass below means nothing.
cat >"$out/bad.yaml" <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: bad}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers: [{name: c, image: i, notAField: 1}]
EOF
if "$venv/bin/kubernetes-validate" -k "$k8s_version" --strict --quiet "$out/bad.yaml" >/dev/null 2>&1; then
  echo "FAIL: kubernetes-validate accepted an object with an unknown field" >&2
  exit 1
fi

dirs=("$root/k8s/base")
for d in "$root"/k8s/overlays/*/; do
  dirs+=("${d%/}")
done
for want in dev gpu observability custom-metrics tls cert-manager gemma3; do
  [ -d "$root/k8s/overlays/$want" ] || failed+=("overlay $want is missing")
done

for dir in "${dirs[@]}"; do
  name=${dir#"$root"/}
  file=$out/$(echo "$name" | tr / _).yaml
  echo "== $name"
  if ! "$kubectl" kustomize "$dir" >"$file" 2>"$file.err"; then
    cat "$file.err" >&2
    failed+=("$name: kubectl kustomize failed")
    continue
  fi
  # Deprecation warnings of newer kustomize versions (bases, commonLabels,
  # patchesStrategicMerge: kept for kubectl 1.20's kustomize) are not failures.
  grep -v "^# Warning: '\(bases\|commonLabels\|patchesStrategicMerge\)' is deprecated" "$file.err" >&2 || true

  # Split off the skipped kinds, by name.
  "$venv/bin/python" - "$file" "$file.validate" "${skip_kinds[@]}" <<'PY'
import sys, yaml
src, dst, skip = sys.argv[1], sys.argv[2], set(sys.argv[3:])
docs = [d for d in yaml.safe_load_all(open(src)) if d]
keep = []
for d in docs:
    if d["kind"] in skip:
        print(f"SKIP {d['kind']}/{d['metadata']['name']} ({d['apiVersion']}): a CRD, not in the Kubernetes schemas")
    else:
        keep.append(d)
yaml.safe_dump_all(keep, open(dst, "w"), sort_keys=False)
print(f"{len(docs)} objects rendered, {len(keep)} to validate")
PY

  set +e
  result=$("$venv/bin/kubernetes-validate" -k "$k8s_version" --strict --quiet "$file.validate" 2>&1)
  rc=$?
  set -e
  [ -z "$result" ] || echo "$result"
  # A kind without a schema is only a WARN there (exit 0): a failure here.
  if [ $rc -ne 0 ] || grep -q '^\(WARN\|ERROR\|FATAL\)' <<<"$result"; then
    failed+=("$name: schema validation failed")
  else
    echo "schemas: every object valid against Kubernetes $k8s_version (strict)"
  fi

  if ! "$venv/bin/python" "$root/tests/k8s/check_manifests.py" "$file" "$name"; then
    failed+=("$name: cross-checks failed")
  fi
done

# The TLS cross-checks must catch a broken TLS set-up, or their pass above means nothing:
# each mutation of the cert-manager render must fail them.
if [ -f "$out/k8s_overlays_cert-manager.yaml" ] && ! "$venv/bin/python" - "$out/k8s_overlays_cert-manager.yaml" \
    "$root/tests/k8s/check_manifests.py" <<'PY'
import subprocess, sys, yaml
src, checker = sys.argv[1], sys.argv[2]

def container(docs, role):
    d = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"lazyserve-{role}")
    return d["spec"]["template"]["spec"]["containers"][0]

def plain_decode(docs):  # one pool without TLS: callers with TLS cannot reach it
    container(docs, "decode")["envFrom"] = []
def tls_probe(docs):  # the kubelet's gRPC probe on the TLS port
    container(docs, "prefill")["readinessProbe"]["grpc"]["port"] = 50052
def sub_path(docs):  # a mount that never sees a renewed certificate
    m = next(m for m in container(docs, "router")["volumeMounts"] if m["name"] == "tls")
    m["mountPath"], m["subPath"] = "/etc/lazyserve/tls/tls.crt", "tls.crt"
def no_client_auth(docs):
    cert = next(d for d in docs if d["kind"] == "Certificate" and d["metadata"]["name"] == "lazyserve-tls")
    cert["spec"]["usages"].remove("client auth")
def name_not_in_cert(docs):
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "LAZYSERVE_TLS_SERVER_NAME" in (d.get("data") or {}))
    cm["data"]["LAZYSERVE_TLS_SERVER_NAME"] = "somewhere-else"

mutations = (plain_decode, tls_probe, sub_path, no_client_auth, name_not_in_cert)
missed = []
for mutate in mutations:
    docs = [d for d in yaml.safe_load_all(open(src)) if d]
    mutate(docs)
    path = f"{src}.{mutate.__name__}"
    yaml.safe_dump_all(docs, open(path, "w"))
    if subprocess.run([sys.executable, checker, path, mutate.__name__], capture_output=True).returncode == 0:
        missed.append(mutate.__name__)
print(f"TLS cross-checks: {len(mutations) - len(missed)} of {len(mutations)} broken set-ups caught"
      + (f", missed {missed}" if missed else ""))
sys.exit(1 if missed else 0)
PY
then
  failed+=("the TLS cross-checks pass a broken TLS set-up")
fi

if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAIL: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "OK: ${#dirs[@]} kustomizations rendered and valid"
