//! A stream survives its decode worker: a router, a prefill worker and two decode workers on
//! loopback; the decode worker holding a stream is killed (SIGKILL) mid-stream, and the
//! stream goes on on the other one with exactly the tokens of an unbroken stream.

use anyhow::Result;
use lazyserve_proto::v1::decode_client::DecodeClient;
use lazyserve_proto::v1::generate_request::Input;
use lazyserve_proto::v1::generate_response::Event;
use lazyserve_proto::v1::generation_client::GenerationClient;
use lazyserve_proto::v1::{Completion, GenerateRequest as Req, StatsRequest, StreamError};
use lazyserve_tests::cluster::Proc;

/// Tokens the broken streams receive before their decode worker is killed.
const KILL_AFTER: usize = 6;

struct Pool {
    router: Proc,
    _prefill: Proc,
    decodes: Vec<Proc>,
}

impl Pool {
    async fn start(router_args: &[&str]) -> Self {
        Self::start_with(router_args, &[]).await
    }

    async fn start_with(router_args: &[&str], decode_args: &[&str]) -> Self {
        let mut decodes = vec![Proc::spawn("lazyserve-decode-worker", decode_args), Proc::spawn("lazyserve-decode-worker", decode_args)];
        let mut prefill = Proc::spawn("lazyserve-prefill-worker", &[]);
        let list = format!("{},{}", decodes[0].addr, decodes[1].addr);
        let mut args = vec!["--prefill-workers", &prefill.addr, "--decode-workers", &list];
        args.extend_from_slice(router_args);
        let mut router = Proc::spawn("lazyserve-router", &args);
        for p in decodes.iter_mut().chain([&mut prefill, &mut router]) {
            p.ready().await;
        }
        Self { router, _prefill: prefill, decodes }
    }

    /// Kills (SIGKILL) the decode worker that holds a sequence, or with `Fault::Terminate`
    /// sends it SIGTERM (it drains, then exits); returns its address.
    async fn fault_the_busy_decode_worker(&mut self, fault: Fault) -> Result<String> {
        let mut busy = None;
        for (i, d) in self.decodes.iter().enumerate() {
            let stats = DecodeClient::new(d.channel().await?).stats(StatsRequest {}).await?.into_inner();
            if stats.sequences > 0 {
                busy = Some(i);
            }
        }
        let i = busy.ok_or_else(|| anyhow::anyhow!("no decode worker holds the stream"))?;
        let addr = self.decodes[i].addr.clone();
        match fault {
            Fault::Kill => drop(self.decodes.swap_remove(i)),
            Fault::Terminate => self.decodes[i].terminate(),
            Fault::None => unreachable!("a fault"),
        }
        Ok(addr)
    }

    /// Starts a decode worker at `addr` again, and waits until it serves.
    async fn restart(&mut self, addr: &str) {
        let mut p = Proc::spawn_at("lazyserve-decode-worker", &[], addr, &[]);
        p.ready().await;
        self.decodes.push(p);
    }
}

/// What happens to the decode worker of a stream after [`KILL_AFTER`] tokens.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    Kill,
    Terminate,
}

/// A stream's token ids, and how it ended.
struct Streamed {
    ids: Vec<u32>,
    end: std::result::Result<Completion, StreamError>,
    killed: Option<String>,
    /// The whole stream, as the client saw it.
    took: std::time::Duration,
}

async fn stream(pool: &mut Pool, r: Req, fault: Fault) -> Result<Streamed> {
    let mut client = GenerationClient::new(pool.router.channel().await?);
    let mut stream = client.generate(r).await?.into_inner();
    let (mut ids, mut killed, start) = (Vec::new(), None, std::time::Instant::now());
    while let Some(msg) = stream.message().await? {
        let end = match msg.event.expect("an event") {
            Event::Chunk(c) => {
                ids.extend(c.token_ids);
                None
            }
            Event::Complete(c) => Some(Ok(c)),
            Event::Error(e) => Some(Err(e)),
        };
        if let Some(end) = end {
            return Ok(Streamed { ids, end, killed, took: start.elapsed() });
        }
        if fault != Fault::None && killed.is_none() && ids.len() >= KILL_AFTER {
            killed = Some(pool.fault_the_busy_decode_worker(fault).await?);
        }
    }
    anyhow::bail!("the stream ended without a completion or an error")
}

fn req(prompt: String, temperature: Option<f32>) -> Req {
    Req { input: Some(Input::Prompt(prompt)), max_tokens: 64, temperature, seed: 7, ..Default::default() }
}

/// About 400 tokens of filler (the remote path) before `ask`.
fn long_prompt(ask: &str) -> String {
    let filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ".repeat(20);
    format!("{filler}{ask}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_survives_its_decode_worker() -> Result<()> {
    let mut pool = Pool::start(&[]).await;
    // Greedy: a count, long and certain. Seeded: a story at temperature 1, where every draw
    // of the sampler matters.
    let count = "Count from 1 to 300, separated by commas: 1, 2, 3,";
    let story = "Here is a long story about a dragon who learns to bake bread: Once upon a time";
    let cases = [
        ("remote, greedy", long_prompt(count), None),
        ("local, greedy", count.to_string(), None),
        ("local, seeded", story.to_string(), Some(1.0)),
        ("remote, seeded", long_prompt(story), Some(1.0)),
    ];
    for (name, prompt, temperature) in cases {
        let whole = stream(&mut pool, req(prompt.clone(), temperature), Fault::None).await?;
        let done = whole.end.unwrap_or_else(|e| panic!("{name}: the unbroken stream failed: {e:?}"));
        assert!(whole.ids.len() > 2 * KILL_AFTER, "{name}: the unbroken stream is long enough to break ({} tokens)", whole.ids.len());
        let timings = done.timings.expect("timings");
        assert_eq!(timings.migrations, 0, "{name}");
        let local = timings.prefill_path == "local";

        let broken = stream(&mut pool, req(prompt, temperature), Fault::Kill).await?;
        let killed = broken.killed.unwrap_or_else(|| panic!("{name}: a decode worker was killed"));
        let done = broken.end.unwrap_or_else(|e| panic!("{name}: the broken stream failed: {e:?}"));
        let timings = done.timings.expect("timings");
        assert_eq!(timings.migrations, 1, "{name}");
        assert_ne!(timings.decode_worker, killed, "{name}: the stream ended on another decode worker");
        assert_eq!(timings.prefill_path == "local", local, "{name}: the path is the usual rule's");
        assert_eq!(broken.ids, whole.ids, "{name}: the broken stream's tokens against the unbroken one's");
        // What the migration cost the client (printed, not asserted: timings are noisy here).
        eprintln!("{name}: {} tokens in {:?} unbroken, {:?} with a kill after {KILL_AFTER}", whole.ids.len(), whole.took, broken.took);
        pool.restart(&killed).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_migration_the_stream_ends_with_the_count_delivered() -> Result<()> {
    let mut pool = Pool::start(&["--migration-limit", "0"]).await;
    let broken = stream(&mut pool, req(long_prompt("Count from 1 to 300, separated by commas: 1, 2, 3,"), None), Fault::Kill).await?;
    assert!(broken.killed.is_some(), "a decode worker was killed");
    let error = broken.end.err().expect("the stream fails");
    assert_eq!(error.code, "UNAVAILABLE", "{error:?}");
    assert_eq!(error.tokens_delivered as usize, broken.ids.len(), "{error:?}");
    Ok(())
}

/// A decode worker told to stop (SIGTERM) with a stream still running when its grace period
/// ends exits under it; the router moves the stream on, and it completes as an unbroken one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_decode_worker_hands_its_streams_over() -> Result<()> {
    let mut pool = Pool::start_with(&[], &["--grace-period-secs", "1"]).await;
    let mut r = req(long_prompt("Count from 1 to 300, separated by commas: 1, 2, 3,"), None);
    r.max_tokens = 160;
    let whole = stream(&mut pool, r.clone(), Fault::None).await?;
    assert!(whole.end.is_ok() && whole.ids.len() == 160, "the unbroken stream runs its 160 tokens ({})", whole.ids.len());
    let drained = stream(&mut pool, r, Fault::Terminate).await?;
    let done = drained.end.unwrap_or_else(|e| panic!("the stream of a draining worker failed: {e:?}"));
    let timings = done.timings.expect("timings");
    assert_eq!(timings.migrations, 1, "the stream outlived the grace period and moved");
    assert_ne!(Some(timings.decode_worker), drained.killed);
    assert_eq!(drained.ids, whole.ids);
    Ok(())
}
