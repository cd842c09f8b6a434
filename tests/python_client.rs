//! A real non-Rust client: Python grpcio, with stubs generated from proto/ by grpcio-tools,
//! calls Generate on the router of three service processes and reads the stream; it also
//! sees the health check and server reflection.

use anyhow::Result;
use lazyserve_tests::cluster::Cluster;
use lazyserve_tests::{in_process, python_grpc, repo_root, service_engine};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_streams_generate() -> Result<()> {
    let python = python_grpc();
    let cluster = Cluster::start(&[]).await;
    let prompt = "The capital of France is";
    let out = tokio::process::Command::new(python)
        .arg(repo_root().join("tests/python/generate_client.py"))
        .args([cluster.router.addr.as_str(), prompt, "8"])
        .output()
        .await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;

    let want = in_process(prompt, 8, "off");
    let text = service_engine().tokenizer.decode(&want)?;
    assert_eq!(v["text"], text.as_str(), "{v}");
    assert_eq!(v["token_ids"], serde_json::json!(want));
    assert_eq!(v["complete"]["finishReason"], "length");
    assert_eq!(v["complete"]["usage"]["completionTokens"], 8);
    assert_eq!(v["health"], "SERVING");
    let services = v["services"].to_string();
    assert!(services.contains("lazyserve.v1.Generation") && services.contains("grpc.health.v1.Health"), "{services}");
    Ok(())
}
