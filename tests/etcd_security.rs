//! etcd with mutual TLS and with user/password auth, each a real etcd: workers register and
//! the router finds them through it and serves; a worker without the credentials says why in
//! its log and never joins. The password reaches no log.

use std::time::{Duration, Instant};

use anyhow::Result;
use lazyserve_proto::v1::admin_client::AdminClient;
use lazyserve_proto::v1::generate_request::Input;
use lazyserve_proto::v1::generate_response::Event;
use lazyserve_proto::v1::generation_client::GenerationClient;
use lazyserve_proto::v1::{GenerateRequest, ListWorkersRequest};
use lazyserve_tests::cluster::Proc;
use lazyserve_tests::etcd::{DevCerts, Etcd};
use lazyserve_tests::in_process;

const PROMPT: &str = "The capital of France is";
const USER: &str = "lazyserve-worker";
const PASSWORD: &str = "pw-Zq7xK2mV9tR4";
const WRONG_PASSWORD: &str = "pw-Wrong-5hN8cL1";

/// A router and a prefill and a decode worker, all with the etcd flags `etcd`, serving.
async fn cluster(etcd: &[String]) -> Result<[Proc; 3]> {
    let flags: Vec<&str> = etcd.iter().map(String::as_str).collect();
    let mut procs = [worker("prefill", &flags), worker("decode", &flags), Proc::spawn("lazyserve-router", &flags)];
    for p in &mut procs {
        p.ready().await;
    }
    let [prefill, decode, router] = &procs;
    let want = [prefill.addr.clone(), decode.addr.clone()];
    until_workers(router, |set| want.iter().all(|a| set.contains(a))).await?;
    Ok(procs)
}

fn worker(role: &str, etcd: &[&str]) -> Proc {
    let mut args = vec!["--lease-ttl-secs", "3"];
    args.extend_from_slice(etcd);
    Proc::spawn(&format!("lazyserve-{role}-worker"), &args)
}

/// The addresses of the workers in the router's set.
async fn workers(router: &Proc) -> Result<Vec<String>> {
    let resp = AdminClient::connect(router.url()).await?.list_workers(ListWorkersRequest {}).await?.into_inner();
    Ok(resp.workers.into_iter().map(|w| w.address).collect())
}

async fn until_workers(router: &Proc, cond: impl Fn(&[String]) -> bool) -> Result<()> {
    let start = Instant::now();
    loop {
        let set = workers(router).await?;
        if cond(&set) {
            return Ok(());
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "router set {set:?} after 10 s:\n{}", router.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The greedy ids the router streams for [`PROMPT`]; they must be the in-process ones.
async fn check_generate(router: &Proc) -> Result<()> {
    let req = GenerateRequest { input: Some(Input::Prompt(PROMPT.into())), max_tokens: 6, ..Default::default() };
    let mut stream = GenerationClient::connect(router.url()).await?.generate(req).await?.into_inner();
    let mut ids = Vec::new();
    while let Some(m) = stream.message().await? {
        match m.event {
            Some(Event::Chunk(c)) => ids.extend(c.token_ids),
            Some(Event::Complete(_)) => break,
            Some(Event::Error(e)) => anyhow::bail!("stream error {e:?}"),
            None => {}
        }
    }
    assert_eq!(ids, in_process(PROMPT, 6, "off"), "greedy ids through the router");
    Ok(())
}

/// Waits for a worker to log its failed registration; asserts the error names one of
/// `reasons` and that the worker is not in the router's set.
async fn refused(bad: &Proc, router: &Proc, reasons: &[&str]) -> Result<()> {
    const FAILED: &str = "etcd registration failed";
    let start = Instant::now();
    while !bad.log_text().contains(FAILED) {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "no failed registration:\n{}", bad.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = bad.log_text();
    let line = log.lines().find(|l| l.contains(FAILED)).unwrap_or_default();
    assert!(reasons.iter().any(|r| line.contains(r)), "the error says none of {reasons:?}: {line}");
    assert!(!log.contains("registered in etcd"), "{}", bad.log_text());
    let set = workers(router).await?;
    assert!(!set.contains(&bad.addr), "{} is in the router's set {set:?}", bad.addr);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_etcd_serves_and_turns_away_workers_without_the_certificates() -> Result<()> {
    let (certs, other) = (DevCerts::new(), DevCerts::new());
    let etcd = Etcd::start_tls(&certs.dir);
    let tls = |c: &DevCerts| -> Vec<String> {
        let mut flags = vec!["--etcd-endpoints".into(), etcd.endpoint(), "--etcd-ca".into(), c.file("ca.crt")];
        flags.extend(["--etcd-cert".into(), c.file("tls.crt"), "--etcd-key".into(), c.file("tls.key")]);
        flags
    };
    let [_prefill, _decode, router] = cluster(&tls(&certs)).await?;
    check_generate(&router).await?;

    // The right CA but no client certificate: etcd ends the handshake. Under TLS 1.3 the
    // client may finish its side first and see only the connection close (or, writing its
    // first request into the closed stream, a broken pipe), not etcd's alert.
    let no_cert = worker("decode", &["--etcd-endpoints", &etcd.endpoint(), "--etcd-ca", &certs.file("ca.crt")]);
    // Another CA's certificates: the worker does not trust etcd's certificate.
    let other_flags = tls(&other);
    let other_ca = worker("decode", &other_flags.iter().map(String::as_str).collect::<Vec<_>>());
    refused(&no_cert, &router, &["BadCertificate", "CertificateRequired", "connection closed", "broken pipe"]).await?;
    refused(&other_ca, &router, &["invalid peer certificate"]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_auth_serves_turns_away_a_wrong_password_and_logs_no_password() -> Result<()> {
    let etcd = Etcd::start();
    etcd.enable_auth(USER, PASSWORD, "/lazyserve/").await?;
    let flags = |password: &str| -> Vec<String> {
        ["--etcd-endpoints", &etcd.endpoint(), "--etcd-user", USER, "--etcd-password", password].map(String::from).to_vec()
    };
    let [prefill, decode, router] = cluster(&flags(PASSWORD)).await?;
    check_generate(&router).await?;

    let wrong = worker("decode", &flags(WRONG_PASSWORD).iter().map(String::as_str).collect::<Vec<_>>());
    refused(&wrong, &router, &["authentication failed"]).await?;
    // The password from the environment, as Kubernetes passes a Secret.
    let env = [("LAZYSERVE_ETCD_PASSWORD", PASSWORD.to_string())];
    let from_env = Proc::spawn_env("lazyserve-router", &["--etcd-endpoints", &etcd.endpoint(), "--etcd-user", USER], &env);
    until_workers(&from_env, |set| set.contains(&decode.addr)).await?;

    for p in [&prefill, &decode, &router, &wrong, &from_env] {
        let log = p.log_text();
        // The start-up line logs the configuration, user and password field included.
        assert!(log.contains(&format!("etcd_user: Some(\"{USER}\")")) && log.contains("etcd_password: Some("), "{log}");
        assert!(!log.contains(PASSWORD) && !log.contains(WRONG_PASSWORD), "a password in the log:\n{log}");
    }
    Ok(())
}
