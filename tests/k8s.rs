//! The Kubernetes manifests under k8s/: every kustomization renders with `kubectl kustomize`,
//! validates against the Kubernetes 1.30 schemas and passes the cross-object checks of
//! tests/k8s/check_manifests.py (tests/k8s/validate.sh; in the TLS overlays every lazyserve
//! container reads its certificate from a mounted Secret and is probed on the plaintext
//! health port, and validate.sh checks that those checks catch broken set-ups), and the dev
//! overlay's pods, run as local processes with exactly the manifests' commands, args and
//! env, serve a Generate call and the same greedy completion on the router's OpenAI HTTP
//! port (tests/k8s/smoke.py). Needs kubectl (Debian: kubernetes-client), etcd (etcd-server)
//! and python3 with venv; the Python packages go in .venv-k8s, made from
//! tests/k8s/requirements.txt when missing.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Mutex;

use lazyserve_tests::{binary, model_path, repo_root};

/// `.venv-k8s/bin/python`, made once (both tests need it; they may run at once).
fn python_k8s() -> PathBuf {
    static MADE: Mutex<()> = Mutex::new(());
    let _made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    let root = repo_root();
    let python = root.join(".venv-k8s/bin/python");
    let ready = || {
        Command::new(&python)
            .args(["-c", "import kubernetes_validate, yaml, grpc, grpc_tools"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready() {
        let run = |cmd: &mut Command| assert!(cmd.status().expect("runs").success(), "{cmd:?} failed");
        run(Command::new("python3").args(["-m", "venv"]).arg(root.join(".venv-k8s")));
        run(Command::new(&python).args(["-m", "pip", "install", "-q", "-r"]).arg(root.join("tests/k8s/requirements.txt")));
    }
    python
}

fn assert_success(what: &str, out: Output) {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    println!("{text}");
}

#[test]
fn every_kustomization_renders_and_validates_against_kubernetes_1_30() {
    python_k8s();
    let out = Command::new("bash").arg(repo_root().join("tests/k8s/validate.sh")).output().expect("bash runs");
    assert_success("tests/k8s/validate.sh", out);
}

#[test]
fn dev_overlay_pods_run_the_binaries_and_serve_generate_and_http() {
    let python = python_k8s();
    let router = binary("lazyserve-router");
    binary("lazyserve-prefill-worker");
    binary("lazyserve-decode-worker");
    let model = model_path();
    let out = Command::new(python)
        .arg(repo_root().join("tests/k8s/smoke.py"))
        .env("LAZYSERVE_K8S_BIN_DIR", router.parent().expect("bin dir"))
        .env("LAZYSERVE_K8S_MODELS_DIR", model.parent().expect("models dir"))
        .output()
        .expect("python runs");
    assert_success("tests/k8s/smoke.py", out);
}
