//! Discovery and failure handling with a real etcd server and real worker processes:
//! workers join and leave the router's set, load spreads over the pools, a worker killed
//! under load or an etcd outage never leaves a request hanging or state behind.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use lazyserve_proto::v1::admin_client::AdminClient;
use lazyserve_proto::v1::decode_client::DecodeClient;
use lazyserve_proto::v1::generate_request::Input;
use lazyserve_proto::v1::generate_response::Event;
use lazyserve_proto::v1::generation_client::GenerationClient;
use lazyserve_proto::v1::{Completion, GenerateRequest as Req, ListWorkersRequest, StatsRequest};
use lazyserve_tests::cluster::Proc;
use lazyserve_tests::etcd::Etcd;
use lazyserve_tests::in_process;
use tonic::Code;

/// Short leases so that a dead worker leaves quickly.
const TTL_SECS: u64 = 3;

fn worker(etcd: &Etcd, role: &str) -> Proc {
    let bin = format!("lazyserve-{role}-worker");
    Proc::spawn(&bin, &["--etcd-endpoints", &etcd.endpoint(), "--lease-ttl-secs", &TTL_SECS.to_string()])
}

fn router(etcd: &Etcd, extra: &[&str]) -> Proc {
    let mut args = vec!["--etcd-endpoints".to_string(), etcd.endpoint()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::spawn("lazyserve-router", &args)
}

/// The addresses in the router's set, by role.
async fn router_set(router: &Proc) -> Result<(Vec<String>, Vec<String>, bool)> {
    let mut admin = AdminClient::connect(router.url()).await?;
    let resp = admin.list_workers(ListWorkersRequest {}).await?.into_inner();
    let by = |role: &str| resp.workers.iter().filter(|w| w.role == role).map(|w| w.address.clone()).collect();
    Ok((by("prefill"), by("decode"), resp.fresh))
}

/// Waits up to `within` for `cond` on the router's set; returns how long it took.
async fn until_set(router: &Proc, within: Duration, cond: impl Fn(&[String], &[String]) -> bool) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let (p, d, _) = router_set(router).await?;
        if cond(&p, &d) {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(start.elapsed() < within, "router set still prefill {p:?} decode {d:?} after {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn req(prompt: &str, max_tokens: u32) -> tonic::Request<Req> {
    let mut r = tonic::Request::new(Req { input: Some(Input::Prompt(prompt.into())), max_tokens, ..Default::default() });
    r.set_timeout(Duration::from_secs(60));
    r
}

/// Ok(completion, ids) or the status code the request ended with (as a status or as a
/// stream error after some tokens).
async fn call(url: String, prompt: String, max_tokens: u32) -> std::result::Result<(Completion, Vec<u32>), Code> {
    let mut client = GenerationClient::connect(url).await.map_err(|_| Code::Unavailable)?;
    let mut stream = client.generate(req(&prompt, max_tokens)).await.map_err(|s| s.code())?.into_inner();
    let mut ids = Vec::new();
    loop {
        match stream.message().await.map_err(|s| s.code())? {
            Some(m) => match m.event {
                Some(Event::Chunk(c)) => ids.extend(c.token_ids),
                Some(Event::Complete(c)) => return Ok((c, ids)),
                Some(Event::Error(e)) => return Err(if e.code == "UNAVAILABLE" { Code::Unavailable } else { Code::Unknown }),
                None => {}
            },
            None => return Err(Code::Unknown),
        }
    }
}

/// (sequences, bytes) held by a decode worker.
async fn held(decode: &Proc) -> Result<(u32, u64)> {
    let s = DecodeClient::connect(decode.url()).await?.stats(StatsRequest {}).await?.into_inner();
    Ok((s.sequences + s.receiving, s.state_bytes))
}

async fn drained(decodes: &[&Proc], within: Duration) -> Result<()> {
    let start = Instant::now();
    for d in decodes {
        loop {
            let h = held(d).await?;
            if h == (0, 0) {
                break;
            }
            anyhow::ensure!(start.elapsed() < within, "decode worker {} still holds {h:?}", d.addr);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_join_and_leave_the_router_set() -> Result<()> {
    let etcd = Etcd::start();
    let mut router = router(&etcd, &[]);
    router.ready().await;
    let (mut prefill, mut decode) = (worker(&etcd, "prefill"), worker(&etcd, "decode"));
    prefill.ready().await;
    decode.ready().await;
    let (pa, da) = (prefill.addr.clone(), decode.addr.clone());
    let joined = until_set(&router, Duration::from_secs(2), |p, d| p.contains(&pa) && d.contains(&da)).await?;
    println!("routable {joined:?} after SERVING");
    let (c, _) = call(router.url(), "The capital of France is".into(), 4).await.expect("served");
    assert_eq!(c.timings.unwrap().decode_worker, da);

    // SIGKILL: the lease runs out.
    let killed = Instant::now();
    decode.child.kill()?;
    until_set(&router, Duration::from_secs(TTL_SECS + 2), |_, d| !d.contains(&da)).await?;
    println!("killed decode worker left after {:?}", killed.elapsed());

    // SIGTERM: the drain revokes the lease, so the worker leaves at once, and exits 0.
    prefill.terminate();
    until_set(&router, Duration::from_millis(1500), |p, _| !p.contains(&pa)).await?;
    let status = tokio::task::spawn_blocking(move || prefill.child.wait()).await??;
    assert!(status.success(), "drained worker exit: {status}");
    // No workers: a clear UNAVAILABLE at once, not DEADLINE_EXCEEDED after waiting for one.
    assert_eq!(call(router.url(), "Hello".into(), 2).await.err(), Some(Code::Unavailable));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_share_load_and_survive_a_killed_prefill_worker() -> Result<()> {
    let etcd = Etcd::start();
    // Every prompt takes the disaggregated path here.
    let mut router = router(&etcd, &["--local-prefill-tokens", "0"]);
    let mut workers: Vec<Proc> = ["prefill", "prefill", "decode", "decode"].iter().map(|r| worker(&etcd, r)).collect();
    router.ready().await;
    for w in &mut workers {
        w.ready().await;
    }
    until_set(&router, Duration::from_secs(5), |p, d| p.len() == 2 && d.len() == 2).await?;

    let prompts: Vec<String> = (0..32).map(|i| format!("Count with me: {i}, {}, {},", i + 1, i + 2)).collect();
    let wants: Vec<Vec<u32>> = prompts.iter().map(|p| in_process(p, 8, "off")).collect();
    let calls: Vec<_> = prompts.iter().map(|p| tokio::spawn(call(router.url(), p.clone(), 8))).collect();
    let mut served: HashMap<String, usize> = HashMap::new();
    for (h, want) in calls.into_iter().zip(&wants) {
        let (c, ids) = h.await?.expect("request succeeds");
        assert_eq!(&ids, want);
        let t = c.timings.unwrap();
        assert_eq!(t.prefill_path, "remote");
        *served.entry(t.prefill_worker).or_default() += 1;
        *served.entry(t.decode_worker).or_default() += 1;
    }
    for w in &workers {
        let n = served.get(&w.addr).copied().unwrap_or(0);
        assert!(n >= 8, "{} served {n} of 32: {served:?}", w.addr);
    }

    // Kill a prefill worker while 24 long requests are in flight.
    let long = "The grass is green. The sky is blue. ".repeat(60);
    let start = Instant::now();
    let calls: Vec<_> = (0..24).map(|i| tokio::spawn(call(router.url(), format!("{long} Item {i}:"), 8))).collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    workers[0].child.kill()?;
    let (mut ok, mut retried, mut unavailable) = (0, 0, 0);
    for h in calls {
        match h.await? {
            Ok((c, _)) => {
                ok += 1;
                retried += usize::from(c.timings.unwrap().prefill_attempts == 2);
            }
            Err(Code::Unavailable) => unavailable += 1,
            Err(code) => panic!("a request ended with {code:?}"),
        }
    }
    println!("{ok} completed ({retried} on a second prefill worker), {unavailable} UNAVAILABLE, in {:?}", start.elapsed());
    assert!(start.elapsed() < Duration::from_secs(60), "every request ended within its deadline");
    assert!(ok > 0);
    assert!(retried + unavailable > 0, "the kill hit requests in flight");
    drained(&[&workers[2], &workers[3]], Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_keeps_serving_and_workers_register_again() -> Result<()> {
    let mut etcd = Etcd::start();
    let mut router = router(&etcd, &[]);
    let (mut prefill, mut decode) = (worker(&etcd, "prefill"), worker(&etcd, "decode"));
    router.ready().await;
    prefill.ready().await;
    decode.ready().await;
    let (pa, da) = (prefill.addr.clone(), decode.addr.clone());
    until_set(&router, Duration::from_secs(5), |p, d| p.contains(&pa) && d.contains(&da)).await?;

    etcd.stop();
    // The router keeps its last known workers; requests, short and long, still complete.
    let long = "The grass is green. The sky is blue. ".repeat(40);
    for prompt in ["The capital of France is".to_string(), format!("{long} Then:")] {
        let want = in_process(&prompt, 6, "off");
        let (_, ids) = call(router.url(), prompt, 6).await.expect("served while etcd is down");
        assert_eq!(ids, want);
    }
    let (p, d, fresh) = router_set(&router).await?;
    assert!(p.contains(&pa) && d.contains(&da) && !fresh, "{p:?} {d:?} fresh={fresh}");

    // etcd comes back empty (every lease lost): the workers register again by themselves,
    // and a newly started worker is found.
    etcd.restart(true);
    let mut newcomer = worker(&etcd, "decode");
    newcomer.ready().await;
    let na = newcomer.addr.clone();
    until_set(&router, Duration::from_secs(15), |p, d| p.contains(&pa) && d.contains(&da) && d.contains(&na)).await?;
    assert!(router_set(&router).await?.2, "the router's set is fresh again");
    let (c, _) = call(router.url(), format!("{long} Finally:"), 4).await.expect("served after etcd restart");
    assert_eq!(c.timings.unwrap().prefill_worker, pa);

    // A worker restarted at the same address registers again too.
    drop(decode);
    until_set(&router, Duration::from_secs(TTL_SECS + 2), |_, d| !d.contains(&da)).await?;
    let mut again = Proc::spawn_at(
        "lazyserve-decode-worker",
        &[],
        &da,
        &["--etcd-endpoints", &etcd.endpoint(), "--lease-ttl-secs", &TTL_SECS.to_string()],
    );
    again.ready().await;
    until_set(&router, Duration::from_secs(2), |_, d| d.contains(&da)).await?;
    Ok(())
}
