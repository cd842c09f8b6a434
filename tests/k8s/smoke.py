"""Manifest smoke test: the manifests' pods, run as local processes, do what they should.

First the base's etcd StatefulSet: its 3 members, each with the manifest's own flags,
form one cluster. Then the dev overlay: one pod of each workload (the 1-member etcd, the
router, prefill and decode Deployments), run the way a kubelet and a container runtime
would, with only what a single machine cannot have swapped:
- command and args exactly as in the manifest, env from envFrom ConfigMaps, env values with
  $(VAR) references expanded in the Kubernetes way, downward API fields (status.podIP ->
  127.0.0.1, metadata.name -> the pod's name, limits.cpu from the container's resources);
- image paths: /usr/local/bin/lazyserve* -> the repo's target/release, other
  /usr/local/bin/X -> X on PATH (Debian's etcd); volumes: emptyDir and volume claims ->
  temporary folders, configMap volumes -> their files, the models emptyDir seeded with
  the repo's models/ (as if the init container had downloaded it);
- addresses, like a port mapping: in the listen / advertise / metrics / etcd flags and
  variables, every container port becomes a free loopback port of its own, and Service and
  StatefulSet pod DNS names (etcd:2379, etcd-0.etcd-headless:2380) become the loopback port
  of the pod they resolve to. An address that resolves to nothing is a failure.
Then: init containers run to completion; every probe of the manifest (gRPC health,
HTTP, TCP) passes on its port; the router lists the prefill and decode workers under
their pod names and advertised addresses; Generate streams a completion with text, once
on the decode worker alone (short prompt) and once through the prefill worker (a prompt
longer than --local-prefill-tokens); the router's `http` port answers POST /v1/completions
(temperature 0) with the same text as the greedy Generate of that prompt; each pod's metrics port serves /metrics with the
gauges that the HPAs of the custom-metrics overlay read; each process stays under its
memory limit, and every kustomization's decode limit holds the model plus
LAZYSERVE_MAX_STATE_MIB; preStop then SIGTERM ends each lazyserve process with exit code
0 within terminationGracePeriodSeconds. Everything started is killed and removed at the
end, failure or not.

Run with .venv-k8s/bin/python (PyYAML, grpcio, grpcio-tools). Environment: KUBECTL,
LAZYSERVE_K8S_BIN_DIR (default $CARGO_TARGET_DIR/release or target/release),
LAZYSERVE_K8S_MODELS_DIR (default models/), LAZYSERVE_K8S_SMOKE_DOWNLOAD=1 (leave the
models volume empty: the init containers download the model for real).
"""

import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "k8s/overlays/dev"
CUSTOM_METRICS = ROOT / "k8s/overlays/custom-metrics"
KUBECTL = os.environ.get("KUBECTL", "kubectl")
BIN_DIR = Path(os.environ.get("LAZYSERVE_K8S_BIN_DIR")
               or Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target") / "release")
MODELS_DIR = Path(os.environ.get("LAZYSERVE_K8S_MODELS_DIR") or ROOT / "models")
DOWNLOAD = os.environ.get("LAZYSERVE_K8S_SMOKE_DOWNLOAD") == "1"
POD_IP = "127.0.0.1"
NO_PROXY = [("grpc.enable_http_proxy", 0)]  # loopback only, whatever http_proxy says

# Where addresses live: these flags and variables get the port mapping, nothing else.
ADDRESS_FLAGS = {
    "--listen", "--http-listen", "--advertise-address", "--metrics-listen", "--etcd-endpoints", "--prefill-workers",
    "--decode-workers", "--otlp-endpoint",
    # etcd
    "--listen-client-urls", "--advertise-client-urls", "--listen-peer-urls",
    "--initial-advertise-peer-urls", "--initial-cluster", "--listen-metrics-urls",
}
ADDRESS_ENV = {"LAZYSERVE_" + f[2:].upper().replace("-", "_") for f in ADDRESS_FLAGS} | {
    "ETCD_" + f[2:].upper().replace("-", "_") for f in ADDRESS_FLAGS} | {"OTEL_EXPORTER_OTLP_ENDPOINT"}
LOCAL_HOSTS = {"0.0.0.0", "127.0.0.1", "localhost", "[::]", "[::1]", "::"}
ADDRESS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)?(?P<host>\[[0-9a-fA-F:]*\]|[A-Za-z0-9_.-]+):(?P<port>\d+)")


class SmokeError(Exception):
    pass


LOG_LOCK = threading.Lock()


def log(msg):
    with LOG_LOCK:
        print(f"[smoke {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(overlay):
    out = subprocess.run([KUBECTL, "kustomize", str(overlay)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SmokeError(f"kubectl kustomize {overlay} failed:\n{out.stderr}")
    return [o for o in yaml.safe_load_all(out.stdout) if o]


def quantity(q):
    """A Kubernetes quantity as a float (cpu in cores, memory in bytes)."""
    q = str(q)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix in sorted(units, key=len, reverse=True):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * units[suffix]
    return float(q)


def expand(s, env):
    """Kubernetes $(VAR) expansion: defined names are replaced, $$ is a literal $, the rest stays."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "$" and i + 1 < len(s):
            if s[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            if s[i + 1] == "(":
                j = s.find(")", i + 2)
                if j != -1:
                    name = s[i + 2: j]
                    out.append(env[name] if name in env else s[i: j + 1])
                    i = j + 1
                    continue
        out.append(s[i])
        i += 1
    return "".join(out)


def selects(selector, labels):
    match = selector.get("matchLabels", selector) if isinstance(selector, dict) else {}
    return all(labels.get(k) == v for k, v in match.items())


class Cluster:
    """The rendered objects, and the pods started from them."""

    def __init__(self, objs):
        self.objs = objs
        self.namespace = next((o["metadata"]["namespace"] for o in objs if o["metadata"].get("namespace")), "default")
        self.configmaps = {o["metadata"]["name"]: o.get("data") or {} for o in objs if o["kind"] == "ConfigMap"}
        self.services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
        self.pods = []
        self.tmp = Path(tempfile.mkdtemp(prefix="lazyserve-k8s-smoke-"))
        self.procs = []

    def workload(self, kind, component):
        found = [o for o in self.objs if o["kind"] == kind
                 and o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component]
        if len(found) != 1:
            raise SmokeError(f"want one {kind} with component {component}, found {len(found)}")
        return found[0]

    def add_pod(self, workload, ordinal=0):
        pod = Pod(self, workload, ordinal)
        self.pods.append(pod)
        return pod

    def resolve(self, host, port, pod):
        """(host, port) as the pod dials or binds it -> the loopback port it maps to."""
        if host in LOCAL_HOSTS:
            return pod.host_port(port)
        parts = host.split(".")
        for suffix in (["svc", "cluster", "local"], ["svc"]):
            if parts[-len(suffix):] == suffix:
                parts = parts[: -len(suffix)]
                break
        if len(parts) > 1 and parts[-1] == self.namespace:
            parts = parts[:-1]
        if len(parts) == 1 and parts[0] in self.services:
            svc = self.services[parts[0]]
            sp = next((p for p in svc["spec"]["ports"] if p["port"] == port), None)
            if sp is None:
                raise SmokeError(f"{host}:{port}: Service {parts[0]} has no port {port}")
            targets = [p for p in self.pods if selects(svc["spec"]["selector"], p.labels)]
            if not targets:
                raise SmokeError(f"{host}:{port}: Service {parts[0]} selects no running pod")
            return targets[0].host_port(sp.get("targetPort", port))
        if len(parts) == 2 and parts[1] in self.services:
            svc = self.services[parts[1]]
            for p in self.pods:
                if (p.name == parts[0] and p.workload["kind"] == "StatefulSet"
                        and p.workload["spec"]["serviceName"] == parts[1]
                        and svc["spec"].get("clusterIP") == "None"):
                    return p.host_port(port)
        raise SmokeError(f"{host}:{port} (in {pod.name}) resolves to no pod of the manifests")

    def rewrite(self, value, pod, what):
        def sub(m):
            to = f"{m.group('scheme') or ''}127.0.0.1:{self.resolve(m.group('host'), int(m.group('port')), pod)}"
            return to

        new = ADDRESS.sub(sub, value)
        if new != value:
            log(f"  {pod.name}: {what}: {value} -> {new}")
        return new

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


class Pod:
    def __init__(self, cluster, workload, ordinal=0):
        self.cluster = cluster
        self.workload = workload
        meta = workload["metadata"]
        if workload["kind"] == "StatefulSet":
            self.name = f"{meta['name']}-{ordinal}"
        else:
            self.name = f"{meta['name']}-7d9c5b6f4-{os.urandom(3).hex()[:5]}"
        self.spec = workload["spec"]["template"]["spec"]
        self.labels = workload["spec"]["template"]["metadata"].get("labels") or {}
        self.dir = cluster.tmp / self.name
        self.dir.mkdir()
        self.ports = {}
        for c in self.spec.get("initContainers", []) + self.spec["containers"]:
            for p in c.get("ports", []):
                self.ports[p["containerPort"]] = free_port()
        self.volumes = {}
        for v in self.spec.get("volumes", []):
            d = self.dir / "volumes" / v["name"]
            d.mkdir(parents=True)
            if "configMap" in v:
                data = cluster.configmaps.get(v["configMap"]["name"])
                if data is None:
                    raise SmokeError(f"{self.name}: volume {v['name']}: no ConfigMap {v['configMap']['name']}")
                for item in v["configMap"].get("items") or [{"key": k, "path": k} for k in data]:
                    (d / item["path"]).write_text(data[item["key"]])
            elif "emptyDir" not in v:
                raise SmokeError(f"{self.name}: volume {v['name']}: only emptyDir and configMap volumes are emulated")
            self.volumes[v["name"]] = d
        for claim in workload["spec"].get("volumeClaimTemplates", []):
            d = self.dir / "volumes" / claim["metadata"]["name"]
            d.mkdir(parents=True)
            self.volumes[claim["metadata"]["name"]] = d
        self.main = {}

    def host_port(self, port):
        if isinstance(port, str):
            named = [p["containerPort"] for c in self.spec["containers"] for p in c.get("ports", []) if p.get("name") == port]
            if not named:
                raise SmokeError(f"{self.name}: no container port named {port}")
            port = named[0]
        if port not in self.ports:
            raise SmokeError(f"{self.name}: port {port} is not declared as a containerPort")
        return self.ports[port]

    def container(self, name):
        return next(c for c in self.spec["containers"] if c["name"] == name)

    def mounts(self, c):
        return sorted(((m["mountPath"].rstrip("/") or "/", self.volumes[m["name"]]) for m in c.get("volumeMounts", [])),
                      key=lambda m: -len(m[0]))

    def map_path(self, value, c):
        for mount, host in self.mounts(c):
            if value == mount or value.startswith(mount + "/"):
                return str(host) + value[len(mount):]
        return value

    def field(self, path):
        fields = {"metadata.name": self.name, "metadata.namespace": self.cluster.namespace,
                  "status.podIP": POD_IP, "status.hostIP": POD_IP, "spec.nodeName": "smoke-node",
                  "spec.serviceAccountName": self.spec.get("serviceAccountName", "default")}
        m = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
        if m:
            return self.labels.get(m.group(1), "")
        if path not in fields:
            raise SmokeError(f"{self.name}: downward API field {path} is not emulated")
        return fields[path]

    def resource(self, ref, c):
        target = next(x for x in self.spec.get("initContainers", []) + self.spec["containers"]
                      if x["name"] == ref.get("containerName", c["name"]))
        kind, res = ref["resource"].split(".", 1)
        value = (target.get("resources", {}).get(kind) or {}).get(res)
        if value is None:
            value = os.cpu_count() if res == "cpu" else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return str(math.ceil(quantity(value) / quantity(ref.get("divisor", "1"))))

    def env(self, c):
        """The container's environment: service links, envFrom, then env, in order."""
        env = {}
        if self.spec.get("enableServiceLinks", True):
            for i, (name, svc) in enumerate(sorted(self.cluster.services.items())):
                if svc["spec"].get("clusterIP") == "None":
                    continue
                prefix = name.upper().replace("-", "_")
                ip = f"10.96.0.{10 + i}"
                env[f"{prefix}_SERVICE_HOST"] = ip
                env[f"{prefix}_SERVICE_PORT"] = str(svc["spec"]["ports"][0]["port"])
                env[f"{prefix}_PORT"] = f"tcp://{ip}:{svc['spec']['ports'][0]['port']}"
        for ef in c.get("envFrom", []):
            ref = ef.get("configMapRef")
            if not ref:
                raise SmokeError(f"{self.name}/{c['name']}: only configMapRef envFrom is emulated")
            data = self.cluster.configmaps.get(ref["name"])
            if data is None:
                raise SmokeError(f"{self.name}/{c['name']}: envFrom ConfigMap {ref['name']} does not exist")
            env.update({ef.get("prefix", "") + k: v for k, v in data.items()})
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(str(e["value"]), env)
            elif "valueFrom" in e:
                vf = e["valueFrom"]
                if "fieldRef" in vf:
                    env[e["name"]] = self.field(vf["fieldRef"]["fieldPath"])
                elif "resourceFieldRef" in vf:
                    env[e["name"]] = self.resource(vf["resourceFieldRef"], c)
                elif "configMapKeyRef" in vf:
                    ref = vf["configMapKeyRef"]
                    env[e["name"]] = self.cluster.configmaps[ref["name"]][ref["key"]]
                else:
                    raise SmokeError(f"{self.name}/{c['name']}: env {e['name']}: {list(vf)} is not emulated")
            else:
                env[e["name"]] = ""
        return env

    def process(self, c):
        """(argv, env) for a container: the manifest's, with image paths, volumes and ports mapped."""
        env = self.env(c)
        if "command" not in c:
            raise SmokeError(f"{self.name}/{c['name']}: no command (the image's entrypoint is not known here)")
        argv = [expand(a, env) for a in c["command"] + c.get("args", [])]
        unresolved = [a for a in argv + list(env.values()) if re.search(r"\$\([A-Za-z_][A-Za-z0-9_]*\)", a)]
        if unresolved:
            raise SmokeError(f"{self.name}/{c['name']}: unresolved $(VAR) references: {unresolved}")
        for k, v in list(env.items()):
            if k in ADDRESS_ENV and v:
                v = self.cluster.rewrite(v, self, k)
            env[k] = self.map_path(v, c)
        out, i = [], 0
        while i < len(argv):
            a = argv[i]
            flag, eq, val = a.partition("=")
            if eq and flag in ADDRESS_FLAGS:
                a = f"{flag}={self.cluster.rewrite(val, self, flag)}"
            elif eq:
                a = f"{flag}={self.map_path(val, c)}"
            elif a in ADDRESS_FLAGS and i + 1 < len(argv):
                out.append(a)
                i += 1
                a = self.cluster.rewrite(argv[i], self, argv[i - 1])
            else:
                a = self.map_path(a, c)
            out.append(a)
            i += 1
        exe = out[0]
        if exe.startswith("/usr/local/bin/"):
            name = exe[len("/usr/local/bin/"):]
            local = BIN_DIR / name if name.startswith("lazyserve") else shutil.which(name)
            if not local or not Path(local).exists():
                raise SmokeError(f"{exe}: no local {name} ({BIN_DIR} for lazyserve binaries, PATH for others)")
            out[0] = str(local)
        elif "/" not in exe:
            out[0] = shutil.which(exe) or exe
        home = self.dir / "home"
        home.mkdir(exist_ok=True)
        full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "HOSTNAME": self.name}
        full.update(env)
        return out, full

    def start(self, c):
        argv, env = self.process(c)
        log(f"{self.name}/{c['name']}: {' '.join(argv)}")
        logf = open(self.dir / f"{c['name']}.log", "wb")
        proc = subprocess.Popen(argv, env=env, cwd=self.dir, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.cluster.procs.append(proc)
        return proc

    def run_init(self, timeout):
        for c in self.spec.get("initContainers", []):
            proc = self.start(c)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise SmokeError(f"{self.name}: init container {c['name']} still running after {timeout} s")
            if rc != 0:
                raise SmokeError(f"{self.name}: init container {c['name']} exited {rc}")
            log(f"{self.name}/{c['name']}: exited 0: {self.log_tail(c['name'], 3).strip()}")

    def log_tail(self, container, lines=40):
        path = self.dir / f"{container}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self):
        for name, proc in self.main.items():
            if proc.poll() is not None:
                raise SmokeError(f"{self.name}/{name} exited {proc.returncode}")


def health_check(port, service, timeout):
    """grpc.health.v1.Health/Check, as the kubelet's grpc probe calls it: True if SERVING."""
    request = b"" if not service else b"\x0a" + bytes([len(service)]) + service.encode()
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=NO_PROXY) as ch:
        check = ch.unary_unary("/grpc.health.v1.Health/Check")
        try:
            reply = check(request, timeout=timeout)
        except grpc.RpcError:
            return False
    return reply == b"\x08\x01"


def probe_once(pod, c, probe):
    timeout = probe.get("timeoutSeconds", 1)
    if "grpc" in probe:
        return health_check(pod.host_port(probe["grpc"]["port"]), probe["grpc"].get("service", ""), timeout)
    if "httpGet" in probe:
        h = probe["httpGet"]
        conn = http.client.HTTPConnection("127.0.0.1", pod.host_port(h["port"]), timeout=timeout)
        try:
            conn.request("GET", h.get("path", "/"))
            return 200 <= conn.getresponse().status < 400
        except OSError:
            return False
        finally:
            conn.close()
    if "tcpSocket" in probe:
        try:
            socket.create_connection(("127.0.0.1", pod.host_port(probe["tcpSocket"]["port"])), timeout=timeout).close()
            return True
        except OSError:
            return False
    raise SmokeError(f"{pod.name}/{c['name']}: probe handler {list(probe)} is not emulated")


def wait_probes(pod, limit=180):
    """startupProbe within its budget, then readinessProbe, then one livenessProbe, per container."""
    for c in pod.spec["containers"]:
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if not probe:
                continue
            budget = probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
            deadline = time.monotonic() + min(budget if kind == "startupProbe" else limit, limit)
            while not probe_once(pod, c, probe):
                pod.check_alive()
                if time.monotonic() > deadline:
                    raise SmokeError(f"{pod.name}/{c['name']}: {kind} did not pass")
                time.sleep(0.5)
            log(f"{pod.name}/{c['name']}: {kind} passed")


def stubs(tmp):
    from grpc_tools import protoc

    proto = ROOT / "proto"
    files = [str(p) for p in sorted((proto / "lazyserve/v1").glob("*.proto"))]
    out = tmp / "stubs"
    out.mkdir()
    if protoc.main(["protoc", f"-I{proto}", f"--python_out={out}", f"--grpc_python_out={out}", *files]) != 0:
        raise SmokeError("protoc failed")
    sys.path.insert(0, str(out))
    from lazyserve.v1 import generate_pb2, generate_pb2_grpc

    return generate_pb2, generate_pb2_grpc


def generate(pb, rpc, port, prompt, max_tokens):
    """Generate through the router: (text, completion dict). grpcurl when on PATH, else grpcio."""
    if shutil.which("grpcurl"):
        body = json.dumps({"prompt": prompt, "max_tokens": max_tokens})
        out = subprocess.run(["grpcurl", "-plaintext", "-max-time", "120", "-import-path", str(ROOT / "proto"),
                              "-proto", "lazyserve/v1/generate.proto", "-d", body, f"127.0.0.1:{port}",
                              "lazyserve.v1.Generation/Generate"], capture_output=True, text=True)
        if out.returncode != 0:
            raise SmokeError(f"grpcurl Generate failed: {out.stderr}")
        text, complete, rest = "", None, out.stdout.strip()
        decoder = json.JSONDecoder()
        while rest:
            msg, end = decoder.raw_decode(rest)
            rest = rest[end:].lstrip()
            text += msg.get("chunk", {}).get("text", "")
            if "complete" in msg:
                complete = msg["complete"]
            if "error" in msg:
                raise SmokeError(f"stream error: {msg['error']}")
        return text, complete
    from google.protobuf import json_format

    text, complete = "", None
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=NO_PROXY) as ch:
        for r in rpc.GenerationStub(ch).Generate(pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens), timeout=120):
            kind = r.WhichOneof("event")
            if kind == "chunk":
                text += r.chunk.text
            elif kind == "complete":
                complete = json_format.MessageToDict(r.complete)
            else:
                raise SmokeError(f"stream error: {r.error}")
    return text, complete


def complete_http(port, prompt, max_tokens):
    """POST /v1/completions (greedy, not streamed) on the router's HTTP port: the reply's text."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": False}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"content-type": "application/json"}, method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, whatever http_proxy says
    try:
        with opener.open(req, timeout=120) as r:
            status, reply = r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise SmokeError(f"POST /v1/completions: HTTP {e.code}: {e.read().decode(errors='replace')}")
    if status != 200 or reply.get("object") != "text_completion" or not reply.get("choices"):
        raise SmokeError(f"POST /v1/completions: HTTP {status}: {reply}")
    return reply["choices"][0]["text"]


def list_workers(pb, rpc, port):
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=NO_PROXY) as ch:
        return rpc.AdminStub(ch).ListWorkers(pb.ListWorkersRequest(), timeout=10)


def metrics(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        body = r.read().decode()
        if r.status != 200:
            raise SmokeError(f"GET /metrics on {port}: HTTP {r.status}")
        return body
    finally:
        conn.close()


def peak_rss(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run(cluster, tmp):
    objs = cluster.objs
    etcd_set = cluster.workload("StatefulSet", "etcd")
    deploys = {r: cluster.workload("Deployment", r) for r in ("router", "prefill", "decode")}
    for name, w in [("etcd", etcd_set)] + list(deploys.items()):
        if w["spec"].get("replicas", 1) != 1:
            raise SmokeError(f"dev overlay: {name} has {w['spec']['replicas']} replicas, want 1")

    # etcd, from the StatefulSet's own flags.
    etcd = cluster.add_pod(etcd_set)
    pods = {r: cluster.add_pod(w) for r, w in deploys.items()}
    c = etcd.spec["containers"][0]
    etcd.main[c["name"]] = etcd.start(c)
    wait_probes(etcd)

    for role, pod in pods.items():
        if not DOWNLOAD:
            # As if the init container had fetched the model: the repo's models/ in the volume.
            model = pod.env(pod.container(role)).get("LAZYSERVE_MODEL", "")
            target = Path(pod.map_path(model, pod.container(role)))
            if target == Path(model):
                raise SmokeError(f"{pod.name}: LAZYSERVE_MODEL {model} is on no volume")
            src = MODELS_DIR / Path(model).name
            if not src.exists():
                raise SmokeError(f"{src} is missing: run scripts/fetch-model.sh")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(src)
    inits = [threading.Thread(target=lambda p=p: errors_of(p.run_init, 600)) for p in pods.values()]
    for t in inits:
        t.start()
    for t in inits:
        t.join()
    if thread_errors:
        raise thread_errors[0]
    for role, pod in pods.items():
        pod.main[role] = pod.start(pod.container(role))
    for pod in pods.values():
        wait_probes(pod)

    pb, rpc = stubs(tmp)
    router_port = pods["router"].host_port("grpc")
    want = {"prefill": (pods["prefill"].name, f"127.0.0.1:{pods['prefill'].host_port('grpc')}"),
            "decode": (pods["decode"].name, f"127.0.0.1:{pods['decode'].host_port('grpc')}")}
    deadline = time.monotonic() + 60
    while True:
        listed = list_workers(pb, rpc, router_port)
        seen = {w.role: (w.id, w.address) for w in listed.workers}
        if seen == want and listed.fresh:
            break
        if time.monotonic() > deadline:
            raise SmokeError(f"router lists {seen} (fresh: {listed.fresh}), want {want}")
        time.sleep(0.5)
    log(f"router lists the workers under their pod names and advertised addresses: {seen}")

    short_prompt, short_max = "The capital of France is", 8
    text, complete = generate(pb, rpc, router_port, short_prompt, short_max)
    log(f"Generate (short prompt): {text!r}, {json.dumps(complete)}")
    if not text.strip() or not complete or complete.get("finishReason") not in ("length", "eos", "stop"):
        raise SmokeError(f"no completion with text: {text!r} {complete}")
    # The same prompt through the OpenAI-compatible HTTP API on the router's `http` port.
    http_text = complete_http(pods["router"].host_port("http"), short_prompt, short_max)
    log(f"POST /v1/completions on the router's http port: {http_text!r}")
    if http_text != text:
        raise SmokeError(f"/v1/completions text {http_text!r} != Generate text {text!r} (both greedy)")
    local_below = int(pods["router"].env(pods["router"].container("router")).get("LAZYSERVE_LOCAL_PREFILL_TOKENS", "256"))
    long_prompt = "Here is a list of the planets of the solar system and what they are made of. " * (local_below // 12 + 4)
    text, complete = generate(pb, rpc, router_port, long_prompt, 4)
    timings = (complete or {}).get("timings", {})
    log(f"Generate (long prompt): {text!r}, prefill_path {timings.get('prefillPath')}, "
        f"prompt tokens {complete['usage'].get('promptTokens')}, workers {timings.get('prefillWorker')} -> {timings.get('decodeWorker')}")
    if not text.strip() or timings.get("prefillPath") != "remote" or timings.get("prefillWorker") != want["prefill"][1] \
            or timings.get("decodeWorker") != want["decode"][1]:
        raise SmokeError(f"long prompt did not go through the prefill worker: {text!r} {complete}")

    # The metrics port of each pod, and the gauges that the custom-metrics HPAs read.
    hpa_metrics = {}
    for o in render(CUSTOM_METRICS):
        if o["kind"] == "HorizontalPodAutoscaler":
            target = next(x for x in objs if x["kind"] == o["spec"]["scaleTargetRef"]["kind"]
                          and x["metadata"]["name"] == o["spec"]["scaleTargetRef"]["name"])
            role = target["metadata"]["labels"]["app.kubernetes.io/component"]
            for m in o["spec"]["metrics"]:
                if m["type"] == "Pods":
                    hpa_metrics.setdefault(role, []).append(m["pods"]["metric"]["name"])
    if set(hpa_metrics) != {"prefill", "decode"}:
        raise SmokeError(f"custom-metrics overlay: Pods metrics for {sorted(hpa_metrics)}, want prefill and decode")
    expect = {"router": ["lazyserve_requests_total", "lazyserve_time_to_first_token_seconds"]}
    for role, names in hpa_metrics.items():
        expect.setdefault(role, []).extend(names)
    for role, names in expect.items():
        body = metrics(pods[role].host_port("metrics"))
        missing = [n for n in names if not re.search(rf"^{n}(_bucket|_count|_sum)?[{{ ]", body, re.M)]
        if missing:
            raise SmokeError(f"{role} /metrics lacks {missing}")
        log(f"{role} /metrics serves {', '.join(names)}")

    for role, pod in list(pods.items()) + [("etcd", etcd)]:
        c = pod.spec["containers"][0]
        limit = quantity(c["resources"]["limits"]["memory"])
        rss = peak_rss(pod.main[c["name"]].pid)
        log(f"{pod.name}: peak RSS {rss / 2**20:.0f} MiB, memory limit {limit / 2**20:.0f} MiB")
        if rss >= limit:
            raise SmokeError(f"{pod.name}: peak RSS {rss} over its memory limit {limit}")

    # Every kustomization's decode workers: the model's resident size (measured above) plus
    # LAZYSERVE_MAX_STATE_MIB of sequence state fit in the memory limit.
    model_rss = peak_rss(pods["decode"].main["decode"].pid)
    for d in [ROOT / "k8s/base"] + sorted(p for p in (ROOT / "k8s/overlays").iterdir() if p.is_dir()):
        objs_d = render(d)
        w = next(o for o in objs_d if o["kind"] == "Deployment"
                 and o["metadata"]["labels"].get("app.kubernetes.io/component") == "decode")
        c = next(x for x in w["spec"]["template"]["spec"]["containers"] if x["name"] == "decode")
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        for ef in c.get("envFrom", []):
            cm = next(o for o in objs_d if o["kind"] == "ConfigMap" and o["metadata"]["name"] == ef["configMapRef"]["name"])
            env = {**(cm.get("data") or {}), **env}
        state = int(env.get("LAZYSERVE_MAX_STATE_MIB") or 8192) * 2**20
        limit = quantity(c["resources"]["limits"]["memory"])
        log(f"{d.relative_to(ROOT)}: decode model {model_rss / 2**20:.0f} MiB + max state {state / 2**20:.0f} MiB"
            f" <= limit {limit / 2**20:.0f} MiB")
        if model_rss + state > limit:
            raise SmokeError(f"{d.relative_to(ROOT)}: decode memory limit {limit} < model {model_rss} + max state {state}")

    # Termination as the kubelet does it: preStop, then SIGTERM, within the grace period.
    def terminate(pod, role):
        c = pod.container(role)
        start = time.monotonic()
        grace = pod.spec.get("terminationGracePeriodSeconds", 30)
        hook = ((c.get("lifecycle") or {}).get("preStop") or {}).get("exec")
        if hook:
            cmd = hook["command"]
            subprocess.run([shutil.which(cmd[0]) or cmd[0], *cmd[1:]], timeout=grace, check=True)
        proc = pod.main[role]
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=max(1, grace - (time.monotonic() - start)))
        if rc != 0:
            raise SmokeError(f"{pod.name}: exit code {rc} after SIGTERM")
        log(f"{pod.name}: preStop + SIGTERM: exit 0 after {time.monotonic() - start:.1f} s (grace {grace} s)")

    stops = [threading.Thread(target=lambda p=p, r=r: errors_of(terminate, p, r)) for r, p in pods.items()]
    for t in stops:
        t.start()
    for t in stops:
        t.join()
    if thread_errors:
        raise thread_errors[0]


thread_errors = []


def errors_of(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - re-raised by the caller
        thread_errors.append(e)


def run_etcd_members(cluster, tmp):
    """The base's etcd StatefulSet, every member with its own flags: they form one cluster."""
    sts = cluster.workload("StatefulSet", "etcd")
    n = sts["spec"].get("replicas", 1)
    if n < 3:
        raise SmokeError(f"base: etcd has {n} members, want at least 3")
    members = [cluster.add_pod(sts, i) for i in range(n)]
    for pod in members:
        c = pod.spec["containers"][0]
        pod.main[c["name"]] = pod.start(c)
    for pod in members:
        wait_probes(pod, limit=60)
    log(f"base: {n} etcd members from the StatefulSet's flags formed a cluster (/health true on each)")


def attempt(overlay, what, fn):
    """Renders the overlay, runs fn on its pods; prints the pods' logs on failure; cleans up always."""
    try:
        objs = render(overlay)
    except SmokeError as e:
        print(f"FAIL: {e}", flush=True)
        return False
    cluster = Cluster(objs)
    log(f"rendered {overlay}: {len(objs)} objects, namespace {cluster.namespace}; pods in {cluster.tmp}")
    try:
        fn(cluster, cluster.tmp)
    except Exception as e:  # noqa: BLE001 - any failure: say it, show the logs, clean up
        print(f"FAIL ({what}): {type(e).__name__}: {e}", flush=True)
        for pod in cluster.pods:
            for c in pod.spec.get("initContainers", []) + pod.spec["containers"]:
                tail = pod.log_tail(c["name"])
                if tail:
                    print(f"--- {pod.name}/{c['name']} (last lines)\n{tail}", flush=True)
        return False
    finally:
        cluster.cleanup()
    return True


def main():
    global OVERLAY
    if len(sys.argv) > 1:  # another overlay to run (it must keep the dev overlay's shape)
        OVERLAY = Path(sys.argv[1]).resolve()
    if not attempt(ROOT / "k8s/base", "3-member etcd", run_etcd_members):
        return 1
    if not attempt(OVERLAY, "dev pods", run):
        return 1
    print("OK: the base's etcd members formed a cluster, and the dev overlay's etcd, router, prefill and decode"
          " pods ran as the manifests say and served Generate and /v1/completions", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
