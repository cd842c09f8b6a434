"""Cross-object checks on one rendered overlay, beyond what the JSON schemas can see.

Usage: check_manifests.py RENDERED.yaml [NAME]
Prints one line per problem and exits 1 if there is any. What it checks:
- every object carries the recommended labels (part-of=lazyserve, managed-by=kustomize,
  name, instance; component and version on the workloads and their satellites too);
- selectors (Deployment, StatefulSet, Service, PodDisruptionBudget, NetworkPolicy,
  ServiceMonitor) select something, and each workload's selector its own pod template;
- Service target ports, probe ports and NetworkPolicy ports exist on the selected pods;
- the router's public ports (gRPC `grpc` 50051, OpenAI HTTP `http` 8000) are container
  ports, on a Service that selects it, and open to any client where NetworkPolicies
  select it;
- HPAs and PDBs point at existing workloads, minReplicas <= maxReplicas;
- ConfigMaps, ServiceAccounts and volumes that pods name exist; volume mounts name volumes;
- terminationGracePeriodSeconds leaves room for the preStop hook and --grace-period-secs;
- image names are plain (no registry host: overlays retarget them with `images:`);
- TLS (overlays/tls): all lazyserve containers or none have LAZYSERVE_TLS_CERT, _KEY and
  _CA, in a mounted Secret volume; callers (router, prefill) have LAZYSERVE_TLS_SERVER_NAME;
  the gRPC probes (no TLS in the kubelet) go to the plaintext LAZYSERVE_HEALTH_LISTEN port;
- cert-manager (overlays/cert-manager): Issuers that Certificates name exist, a CA Issuer's
  Secret is a CA Certificate's, and the Certificate behind the mounted Secret has server and
  client auth and names every LAZYSERVE_TLS_SERVER_NAME and the router's Service.
"""

import re
import sys

import yaml

RECOMMENDED = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/part-of",
               "app.kubernetes.io/managed-by")
COMPONENTS = {"router", "prefill", "decode", "etcd"}
WITH_COMPONENT = {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
WORKLOADS = {"Deployment", "StatefulSet"}
# Ports clients reach, by component: container port name -> number.
PUBLIC_PORTS = {"router": {"grpc": 50051, "http": 8000}}
# The lazyserve processes, and those that dial workers (their TLS clients check a name).
SERVING = {"router", "prefill", "decode"}
CALLERS = {"router", "prefill"}
TLS_FILES = ("LAZYSERVE_TLS_CERT", "LAZYSERVE_TLS_KEY", "LAZYSERVE_TLS_CA")

problems = []


def problem(obj, message):
    problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {message}")


def selects(selector, labels):
    """matchLabels / matchExpressions semantics, or a plain map (Service)."""
    if selector is None:
        return False
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        return all(labels.get(k) == v for k, v in selector.items())
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        have = labels.get(e["key"])
        op = e["operator"]
        if op == "In" and have not in e["values"]:
            return False
        if op == "NotIn" and have in e["values"]:
            return False
        if op == "Exists" and e["key"] not in labels:
            return False
        if op == "DoesNotExist" and e["key"] in labels:
            return False
    return True


def container_ports(pod_spec):
    ports = {}
    for c in pod_spec.get("containers", []):
        for p in c.get("ports", []):
            ports[p["containerPort"]] = p
            if "name" in p:
                ports[p["name"]] = p
    return ports


def container_env(container, config):
    """A container's environment: envFrom ConfigMaps, then env (which wins); None for valueFrom."""
    env = {}
    for ef in container.get("envFrom", []):
        env.update(config.get((ef.get("configMapRef") or {}).get("name"), {}))
    for e in container.get("env", []):
        env[e["name"]] = e.get("value")
    return env


def grace_period_flag(container, config):
    """The --grace-period-secs a container runs with (flag, env, envFrom, or the default 30)."""
    for a in container.get("args", []) + container.get("command", []):
        m = re.fullmatch(r"--grace-period-secs=(\d+)", a)
        if m:
            return int(m.group(1))
    value = container_env(container, config).get("LAZYSERVE_GRACE_PERIOD_SECS")
    return int(value) if value is not None else 30


def pre_stop_seconds(container):
    handler = (container.get("lifecycle") or {}).get("preStop") or {}
    cmd = (handler.get("exec") or {}).get("command") or []
    if len(cmd) == 2 and cmd[0] == "sleep":
        return int(cmd[1])
    if "sleep" in handler:
        return int(handler["sleep"]["seconds"])
    return 0


def lazyserve_containers(workloads):
    """(workload, component, container) of every router, prefill and decode process."""
    for w in workloads:
        comp = (w["spec"]["template"]["metadata"].get("labels") or {}).get("app.kubernetes.io/component")
        if comp in SERVING:
            for c in w["spec"]["template"]["spec"].get("containers", []):
                yield w, comp, c


def port_of(address):
    m = re.fullmatch(r".*:(\d+)", address or "")
    return int(m.group(1)) if m else None


def check_tls(workloads, config):
    """All or none on TLS; TLS files in a mounted Secret; probes on the plaintext health port.

    Returns the server names callers check and the Secrets the TLS files come from."""
    server_names, secrets = set(), set()
    procs = list(lazyserve_containers(workloads))
    on = [(w, comp, c) for w, comp, c in procs if "LAZYSERVE_TLS_CERT" in container_env(c, config)]
    if on and len(on) != len(procs):
        off = sorted({f"{w['metadata']['name']}/{c['name']}" for w, _, c in procs if (w, _, c) not in on})
        for w, _, _ in on[:1]:
            problem(w, f"TLS on here but not in {off}: TLS callers cannot reach plaintext workers")
    for w, comp, c in on:
        where = f"container {c['name']}"
        env = container_env(c, config)
        pod = w["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for var in TLS_FILES:
            path = env.get(var)
            if not path:
                problem(w, f"{where}: TLS on without {var}")
                continue
            mounts = [m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
            secret = [volumes[m["name"]]["secret"]["secretName"] for m in mounts
                      if "secret" in volumes.get(m["name"], {}) and "subPath" not in m]
            if not secret:
                problem(w, f"{where}: {var}={path} is in no Secret volume mounted as a directory (subPath never updates)")
            secrets.update(secret)
        if comp in CALLERS:
            if not env.get("LAZYSERVE_TLS_SERVER_NAME"):
                problem(w, f"{where}: no LAZYSERVE_TLS_SERVER_NAME: workers register pod IPs, which no certificate names")
            else:
                server_names.add(env["LAZYSERVE_TLS_SERVER_NAME"])
        health = port_of(env.get("LAZYSERVE_HEALTH_LISTEN"))
        if health is None:
            problem(w, f"{where}: TLS on without LAZYSERVE_HEALTH_LISTEN: the kubelet's gRPC probe cannot speak TLS")
        elif health not in container_ports(pod):
            problem(w, f"{where}: health port {health} is not a container port")
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = (c.get(kind) or {}).get("grpc")
            if probe and probe["port"] != health:
                problem(w, f"{where}: {kind} gRPC port {probe['port']} is not the plaintext health port {health}")
    return server_names, secrets


def check_cert_manager(by_kind, names, server_names, secrets):
    """Certificates name existing Issuers; the mounted Secret's Certificate fits mutual TLS."""
    certs = by_kind.get("Certificate", [])
    ca_secrets = {c["spec"]["secretName"] for c in certs if c["spec"].get("isCA")}
    for issuer in by_kind.get("Issuer", []):
        ca = (issuer["spec"].get("ca") or {}).get("secretName")
        if ca and ca not in ca_secrets and ("Secret", ca) not in names:
            problem(issuer, f"CA Secret {ca} is neither a CA Certificate's nor in the manifests")
    for cert in certs:
        ref = cert["spec"]["issuerRef"]
        if ref.get("kind", "Issuer") == "Issuer" and ("Issuer", ref["name"]) not in names:
            problem(cert, f"issuerRef Issuer/{ref['name']} does not exist")
    if not certs:
        return
    services = [s["metadata"]["name"] for s in by_kind.get("Service", [])
                if (s["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "router"]
    for secret in secrets:
        issued = [c for c in certs if c["spec"]["secretName"] == secret]
        if not issued:
            if ("Secret", secret) not in names:
                problems.append(f"Secret/{secret}: mounted for TLS, but no Certificate issues it")
            continue
        for cert in issued:
            usages = set(cert["spec"].get("usages") or [])
            for want in ("server auth", "client auth"):
                if want not in usages:
                    problem(cert, f"usages lack {want!r}: every pod is a TLS server and a TLS client")
            dns = set(cert["spec"].get("dnsNames") or [])
            for n in sorted(server_names - dns):
                problem(cert, f"dnsNames lack {n}, the LAZYSERVE_TLS_SERVER_NAME callers check")
            for n in services:
                if n not in dns:
                    problem(cert, f"dnsNames lack the router Service {n}")


def main(path, name=None):
    name = name or path
    with open(path) as f:
        objs = [o for o in yaml.safe_load_all(f) if o]
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    config = {o["metadata"]["name"]: o.get("data") or {} for o in by_kind.get("ConfigMap", [])}
    workloads = [o for o in objs if o["kind"] in WORKLOADS]
    pod_labels = [(w, w["spec"]["template"]["metadata"].get("labels") or {}) for w in workloads]

    for o in objs:
        labels = o["metadata"].get("labels") or {}
        missing = [k for k in RECOMMENDED if k not in labels]
        if o["kind"] in WITH_COMPONENT or o["kind"] == "NetworkPolicy" and "app.kubernetes.io/component" in labels:
            missing += [k for k in ("app.kubernetes.io/component", "app.kubernetes.io/version") if k not in labels]
        if missing:
            problem(o, f"labels missing: {', '.join(missing)}")
        if labels.get("app.kubernetes.io/part-of", "lazyserve") != "lazyserve":
            problem(o, "app.kubernetes.io/part-of is not lazyserve")
        if labels.get("app.kubernetes.io/managed-by", "kustomize") != "kustomize":
            problem(o, "app.kubernetes.io/managed-by is not kustomize")
        comp = labels.get("app.kubernetes.io/component")
        if comp is not None and comp not in COMPONENTS:
            problem(o, f"component {comp!r} is not one of {sorted(COMPONENTS)}")

    for w in workloads:
        spec = w["spec"]
        tmpl = spec["template"]
        tlabels = tmpl["metadata"].get("labels") or {}
        if not selects(spec["selector"], tlabels):
            problem(w, "selector does not select its own pod template")
        for k in RECOMMENDED + ("app.kubernetes.io/component", "app.kubernetes.io/version"):
            if k not in tlabels:
                problem(w, f"pod template lacks label {k}")
        if "app.kubernetes.io/version" in (spec["selector"].get("matchLabels") or {}):
            problem(w, "selector holds the version label (selectors are immutable)")
        others = [x for x, lab in pod_labels if x is not w and selects(spec["selector"], lab)]
        if others:
            problem(w, f"selector also selects {[x['metadata']['name'] for x in others]}")
        pod = tmpl["spec"]
        sa = pod.get("serviceAccountName")
        if sa and ("ServiceAccount", sa) not in names:
            problem(w, f"ServiceAccount {sa} does not exist")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in names:
                problem(w, f"volume {v['name']}: ConfigMap {v['configMap']['name']} does not exist")
        claim_templates = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
        ports = container_ports(pod)
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            where = f"container {c['name']}"
            image = c.get("image", "")
            first = image.split("/")[0]
            if "/" in image and ("." in first or ":" in first or first == "localhost"):
                problem(w, f"{where}: image {image} names a registry host")
            for ef in c.get("envFrom", []):
                ref = ef.get("configMapRef")
                if ref and ("ConfigMap", ref["name"]) not in names:
                    problem(w, f"{where}: envFrom ConfigMap {ref['name']} does not exist")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes and m["name"] not in claim_templates:
                    problem(w, f"{where}: volumeMount {m['name']} names no volume")
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if not probe:
                    continue
                for handler in ("grpc", "httpGet", "tcpSocket"):
                    if handler in probe and probe[handler]["port"] not in ports:
                        problem(w, f"{where}: {kind} port {probe[handler]['port']} is not a container port")
            if w["kind"] == "Deployment" and c in pod.get("containers", []):
                for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                    if kind not in c:
                        problem(w, f"{where}: no {kind}")
                if "resources" not in c or "limits" not in c["resources"] or "requests" not in c["resources"]:
                    problem(w, f"{where}: no resource requests and limits")
                need = pre_stop_seconds(c) + grace_period_flag(c, config)
                tgps = pod.get("terminationGracePeriodSeconds", 30)
                if tgps < need + 5:
                    problem(w, f"terminationGracePeriodSeconds {tgps} < preStop + --grace-period-secs ({need}) + 5")

    for svc in by_kind.get("Service", []):
        sel = svc["spec"].get("selector")
        matched = [w for w, lab in pod_labels if selects(sel, lab)]
        if not matched:
            problem(svc, "selects no pods")
        for p in svc["spec"].get("ports", []):
            target = p.get("targetPort", p["port"])
            for w in matched:
                if target not in container_ports(w["spec"]["template"]["spec"]):
                    problem(svc, f"port {p.get('name', p['port'])}: targetPort {target} not on {w['metadata']['name']}")
    headless = {s["metadata"]["name"] for s in by_kind.get("Service", []) if s["spec"].get("clusterIP") == "None"}
    for s in by_kind.get("StatefulSet", []):
        if s["spec"]["serviceName"] not in headless:
            problem(s, f"serviceName {s['spec']['serviceName']} is not a headless Service")

    for pdb in by_kind.get("PodDisruptionBudget", []):
        matched = [w for w, lab in pod_labels if selects(pdb["spec"]["selector"], lab)]
        if len(matched) != 1:
            problem(pdb, f"selects {len(matched)} workloads, want 1")

    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) not in names:
            problem(hpa, f"scaleTargetRef {ref['kind']}/{ref['name']} does not exist")
        if hpa["spec"].get("minReplicas", 1) > hpa["spec"]["maxReplicas"]:
            problem(hpa, "minReplicas > maxReplicas")

    for np in by_kind.get("NetworkPolicy", []):
        sel = np["spec"]["podSelector"]
        if sel and not any(selects(sel, lab) for _, lab in pod_labels):
            problem(np, "podSelector selects no pods")
        for direction, peers_key in (("ingress", "from"), ("egress", "to")):
            for rule in np["spec"].get(direction, []):
                for peer in rule.get(peers_key, []):
                    ps = peer.get("podSelector")
                    if ps and "namespaceSelector" not in peer and not any(selects(ps, lab) for _, lab in pod_labels):
                        problem(np, f"{direction} peer {ps} selects no pods")
                if direction == "ingress":
                    targets = [w for w, lab in pod_labels if selects(sel, lab)]
                    for p in rule.get("ports", []):
                        if not any(p["port"] in container_ports(w["spec"]["template"]["spec"]) for w in targets):
                            problem(np, f"ingress port {p['port']} is on none of the selected pods")

    for w, lab in pod_labels:
        for port_name, number in PUBLIC_PORTS.get(lab.get("app.kubernetes.io/component"), {}).items():
            declared = container_ports(w["spec"]["template"]["spec"]).get(port_name)
            if not declared or declared["containerPort"] != number:
                problem(w, f"public port {port_name} {number} is not a container port")
                continue
            services = [s for s in by_kind.get("Service", []) if selects(s["spec"].get("selector"), lab)]
            if not any(p.get("targetPort", p["port"]) in (port_name, number) for s in services for p in s["spec"].get("ports", [])):
                problem(w, f"public port {port_name} {number} is on no Service")
            policies = [np for np in by_kind.get("NetworkPolicy", [])
                        if "Ingress" in np["spec"].get("policyTypes", ["Ingress"]) and selects(np["spec"]["podSelector"], lab)]
            open_to_all = any("from" not in rule and (not rule.get("ports")
                                                      or any(p.get("port") in (port_name, number) for p in rule["ports"]))
                              for np in policies for rule in np["spec"].get("ingress", []))
            if policies and not open_to_all:
                problem(w, f"public port {port_name} {number}: no NetworkPolicy lets clients in")

    for sm in by_kind.get("ServiceMonitor", []):
        matched = [s for s in by_kind.get("Service", []) if selects(sm["spec"]["selector"], s["metadata"].get("labels") or {})]
        if not matched:
            problem(sm, "selects no Service")
        for ep in sm["spec"]["endpoints"]:
            for s in matched:
                if ep["port"] not in [p.get("name") for p in s["spec"]["ports"]]:
                    problem(sm, f"Service {s['metadata']['name']} has no port named {ep['port']}")

    server_names, secrets = check_tls(workloads, config)
    check_cert_manager(by_kind, names, server_names, secrets)

    for p in problems:
        print(f"ERROR {name}: {p}")
    print(f"{name}: {len(objs)} objects, cross-checks {'failed' if problems else 'passed'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
