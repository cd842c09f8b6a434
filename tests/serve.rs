//! The services as users run them: router, prefill worker and decode worker as three real
//! processes on loopback, called over gRPC.

use std::time::{Duration, Instant};

use anyhow::Result;
use lazyserve_proto::v1::generate_request::Input;
use lazyserve_proto::v1::generate_response::Event;
use lazyserve_proto::v1::generation_client::GenerationClient;
use lazyserve_proto::v1::{ChatMessage, ChatMessages, Completion, GenerateRequest as Req};
use lazyserve_tests::cluster::{free_port, Cluster, Proc};
use lazyserve_tests::tls::Certs;
use lazyserve_tests::{in_process, service_engine};
use tonic::transport::Channel;
use tonic::Code;

/// A prompt of about `words` words with a fact in the middle.
fn long_prompt(words: usize) -> String {
    let filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
    let half: String = filler.repeat(words / 40 + 1);
    format!("{half}The pass key is 71432. Remember it. {half}What is the pass key? The pass key is")
}

fn req(prompt: &str, max_tokens: u32) -> Req {
    Req { input: Some(Input::Prompt(prompt.into())), max_tokens, ..Default::default() }
}

/// Text, token ids and the completion of one streamed call.
struct Streamed {
    text: String,
    ids: Vec<u32>,
    complete: Completion,
}

async fn generate(client: &mut GenerationClient<Channel>, r: Req) -> Result<Streamed, tonic::Status> {
    let mut stream = client.generate(r).await?.into_inner();
    let (mut text, mut ids, mut complete) = (String::new(), Vec::new(), None);
    while let Some(msg) = stream.message().await? {
        match msg.event.expect("an event") {
            Event::Chunk(c) => {
                assert!(complete.is_none(), "chunk after the completion");
                text.push_str(&c.text);
                ids.extend(c.token_ids);
            }
            Event::Complete(c) => complete = Some(c),
            Event::Error(e) => panic!("stream error: {e:?}"),
        }
    }
    Ok(Streamed { text, ids, complete: complete.expect("a completion") })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_give_the_in_process_greedy_tokens() -> Result<()> {
    greedy_tokens_as_in_process(&Cluster::start(&[]).await).await
}

/// The same check with TLS on every listener and mutual TLS between the services: the
/// router's public port, the workers' internal calls and the state stream all encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_with_mutual_tls_give_the_same_tokens() -> Result<()> {
    greedy_tokens_as_in_process(&Cluster::start_with(Some(Certs::new()), &[]).await).await
}

async fn greedy_tokens_as_in_process(cluster: &Cluster) -> Result<()> {
    let f32_router = cluster.another_router(&["--state-encoding", "f32"]).await;
    let mut f16 = cluster.client().await;
    let mut f32 = GenerationClient::new(f32_router.channel().await?);
    let long = long_prompt(600);
    for (prompt, prune, max_tokens) in [("The capital of France is", "off", 12), (long.as_str(), "off", 8), (long.as_str(), "default", 8)] {
        let want = in_process(prompt, max_tokens, prune);
        for client in [&mut f16, &mut f32] {
            let mut r = req(prompt, max_tokens as u32);
            r.prune = Some(prune.into());
            let got = generate(client, r).await?;
            assert_eq!(got.ids, want, "prune {prune}, {} prompt tokens", got.complete.usage.unwrap().prompt_tokens);
            assert_eq!(got.text, service_engine().tokenizer.decode(&want)?);
            let usage = got.complete.usage.unwrap();
            assert_eq!(usage.completion_tokens as usize, want.len());
            let timings = got.complete.timings.unwrap();
            assert!(timings.ttft_ms > 0.0 && timings.ttft_ms <= timings.total_ms, "{timings:?}");
            // Short prompts are prefilled on the decode worker; long ones ship their state.
            let remote = usage.prompt_tokens >= 256;
            assert_eq!(timings.prefill_path, if remote { "remote" } else { "local" });
            assert_eq!(timings.state_bytes > 0, remote, "{timings:?}");
            if prune == "default" {
                assert!(usage.prompt_tokens_computed_percent < 95.0, "{usage:?}");
            } else {
                assert_eq!(usage.prompt_tokens_computed_percent, 100.0);
            }
        }
    }
    // Chat messages go through the model's template.
    let chat = Req {
        input: Some(Input::Chat(ChatMessages {
            messages: vec![ChatMessage { role: "user".into(), content: "What is the capital of France?".into() }],
        })),
        max_tokens: 16,
        ..Default::default()
    };
    let got = generate(&mut f16, chat).await?;
    assert!(got.text.contains("Paris"), "{}", got.text);
    assert_eq!(cluster.decode_drained(Duration::from_secs(5)).await, (0, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_streams_leave_no_state() -> Result<()> {
    let cluster = Cluster::start(&[]).await;
    let mut client = cluster.client().await;

    // A client that leaves mid-stream.
    let mut stream = client.generate(req("Once upon a time", 400)).await?.into_inner();
    for _ in 0..3 {
        assert!(matches!(stream.message().await?.and_then(|m| m.event), Some(Event::Chunk(_))));
    }
    assert_eq!(cluster.decode_held().await.0, 1, "the decode worker holds the sequence while it streams");
    drop(stream);
    assert_eq!(cluster.decode_drained(Duration::from_secs(5)).await, (0, 0));

    // A client that leaves before its first token.
    let stream = client.generate(req(&long_prompt(1500), 50)).await?.into_inner();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(stream);
    assert_eq!(cluster.decode_drained(Duration::from_secs(30)).await, (0, 0));

    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_workers_give_unavailable_within_the_deadline() -> Result<()> {
    let cluster = Cluster::start(&[]).await;
    let nobody = format!("127.0.0.1:{}", free_port());
    let cases = [
        (nobody.as_str(), cluster.decode.addr.as_str(), "0"),
        (cluster.prefill.addr.as_str(), nobody.as_str(), "0"),
        (cluster.prefill.addr.as_str(), nobody.as_str(), "256"),
    ];
    for (prefill, decode, local_below) in cases {
        let mut router = Cluster::router_for(prefill, decode, &["--local-prefill-tokens", local_below]);
        router.ready().await;
        let mut client = GenerationClient::connect(router.url()).await?;
        let start = Instant::now();
        let err = generate(&mut client, req("Hello there", 4)).await.err().expect("fails");
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
    }
    // A deadline shorter than the work ends the call with DEADLINE_EXCEEDED, not a hang.
    let mut client = cluster.client().await;
    let mut r = tonic::Request::new(req(&long_prompt(1500), 200));
    r.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let err = match client.generate(r).await {
        Err(e) => e,
        Ok(resp) => {
            let mut s = resp.into_inner();
            loop {
                match s.message().await {
                    Err(e) => break e,
                    Ok(None) => panic!("finished within 300 ms"),
                    Ok(Some(_)) => {}
                }
            }
        }
    };
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(cluster.decode_drained(Duration::from_secs(30)).await, (0, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_decode_worker_is_passed_over() -> Result<()> {
    let cluster = Cluster::start(&[]).await;
    let nobody = format!("127.0.0.1:{}", free_port());
    let decodes = format!("{nobody},{}", cluster.decode.addr);
    // Remote path: the prefill worker pushes to the next decode worker the router named.
    // Local path: the router retries on the other decode worker.
    for local_below in ["0", "256"] {
        let mut router = Cluster::router_for(&cluster.prefill.addr, &decodes, &["--local-prefill-tokens", local_below]);
        router.ready().await;
        let mut client = GenerationClient::connect(router.url()).await?;
        let want = in_process("The capital of France is", 4, "off");
        for _ in 0..4 {
            let got = generate(&mut client, req("The capital of France is", 4)).await?;
            assert_eq!(got.ids, want);
            assert_eq!(got.complete.timings.unwrap().decode_worker, cluster.decode.addr);
        }
    }
    assert_eq!(cluster.decode_drained(Duration::from_secs(5)).await, (0, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_clients_complete_and_overload_is_refused() -> Result<()> {
    let cluster = Cluster::start(&[]).await;
    let prompts: Vec<String> = (0..16).map(|i| format!("Count with me: {i}, {}, {},", i + 1, i + 2)).collect();
    let wants: Vec<Vec<u32>> = prompts.iter().map(|p| in_process(p, 12, "off")).collect();
    let calls = prompts.iter().map(|p| {
        let url = cluster.router.url();
        let p = p.clone();
        tokio::spawn(async move {
            let mut client = GenerationClient::connect(url).await.unwrap();
            generate(&mut client, req(&p, 12)).await
        })
    });
    let results: Vec<_> = futures_join(calls.collect()).await;
    for ((r, want), p) in results.into_iter().zip(&wants).zip(&prompts) {
        assert_eq!(&r?.ids, want, "{p}");
    }

    // One request in flight at most: a second one is refused at once, and served after.
    let mut narrow = Cluster::router_for(&cluster.prefill.addr, &cluster.decode.addr, &["--max-inflight", "1"]);
    narrow.ready().await;
    let mut client = GenerationClient::connect(narrow.url()).await?;
    let mut busy = client.generate(req("Once upon a time", 200)).await?.into_inner();
    busy.message().await?;
    let start = Instant::now();
    let err = generate(&mut client, req("Hello", 2)).await.err().expect("refused");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // At once: not queued behind the first request, which is still streaming.
    assert!(matches!(busy.message().await?.and_then(|m| m.event), Some(Event::Chunk(_))), "the first request still streams");
    drop(busy);
    // The slot comes back when the router sees the first stream end.
    loop {
        match generate(&mut client, req("Hello", 2)).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted && start.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!(cluster.decode_drained(Duration::from_secs(5)).await, (0, 0));
    Ok(())
}

async fn futures_join<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_request_in_flight_then_exits() -> Result<()> {
    let cluster = Cluster::start(&[]).await;
    let mut client = cluster.client().await;
    let mut stream = client.generate(req("Once upon a time", 40)).await?.into_inner();
    stream.message().await?;
    cluster.router.terminate();
    let mut complete = false;
    while let Some(m) = stream.message().await? {
        complete |= matches!(m.event, Some(Event::Complete(_)));
    }
    assert!(complete, "the request in flight completed");
    let mut router = cluster.router;
    let status = tokio::task::spawn_blocking(move || router.child.wait()).await??;
    assert!(status.success(), "router exit: {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazyserve_serve_answers_alone() -> Result<()> {
    let mut serve = Proc::spawn_sub("lazyserve", &["serve"], &[]);
    serve.ready().await;
    let mut client = GenerationClient::connect(serve.url()).await?;
    let got = generate(&mut client, req("The capital of France is", 6)).await?;
    assert_eq!(got.ids, in_process("The capital of France is", 6, "off"));
    assert!(got.text.contains("Paris"));
    // Its stderr is a file: plain lines, no colour escapes.
    let log = serve.log_text();
    assert!(log.contains("request done") && !log.contains('\x1b'), "{log}");
    Ok(())
}
