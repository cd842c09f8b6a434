//! Telemetry as operators see it: one trace per request across the three processes,
//! received by a real OTLP/gRPC collector endpoint in the test; metrics scraped by a real
//! Prometheus server; and serving unaffected when no collector listens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use lazyserve_proto::v1::generate_request::Input;
use lazyserve_proto::v1::generate_response::Event;
use lazyserve_proto::v1::generation_client::GenerationClient;
use lazyserve_proto::v1::GenerateRequest;
use lazyserve_tests::cluster::{free_port, Proc};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{MetricsService, MetricsServiceServer};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attrs: HashMap<String, Value>,
}

/// An OTLP/gRPC receiver for traces and metrics that keeps what it gets.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
    metrics: Arc<Mutex<Vec<String>>>,
}

fn attr_map(kvs: &[KeyValue]) -> HashMap<String, Value> {
    kvs.iter().filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?.value?))).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = match rs.resource.as_ref().map(|r| attr_map(&r.attributes)).and_then(|a| a.get("service.name").cloned()) {
                Some(Value::StringValue(s)) => s,
                _ => String::new(),
            };
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push(Span {
                        service: service.clone(),
                        name: s.name,
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent: s.parent_span_id,
                        attrs: attr_map(&s.attributes),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut names = self.metrics.lock().unwrap();
        for rm in request.into_inner().resource_metrics {
            for sm in rm.scope_metrics {
                names.extend(sm.metrics.into_iter().map(|m| m.name));
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

/// Starts decode, prefill and router processes with `env` set.
async fn three(env: &[(&str, String)], router_args: &[&str]) -> (Proc, Proc, Proc) {
    let spawn = |bin: &str, args: &[&str]| Proc::spawn_env(bin, args, env);
    let mut decode = spawn("lazyserve-decode-worker", &["--metrics-listen", "127.0.0.1:0"]);
    let mut prefill = spawn("lazyserve-prefill-worker", &["--metrics-listen", "127.0.0.1:0"]);
    let mut args = vec!["--prefill-workers", &prefill.addr, "--decode-workers", &decode.addr];
    args.extend_from_slice(&["--metrics-listen", "127.0.0.1:0"]);
    args.extend_from_slice(router_args);
    let mut router = spawn("lazyserve-router", &args);
    decode.ready().await;
    prefill.ready().await;
    router.ready().await;
    (decode, prefill, router)
}

/// Calls Generate; returns the client-side TTFT.
async fn generate(router: &Proc, prompt: &str, traceparent: Option<&str>) -> Result<Duration> {
    let mut client = GenerationClient::connect(router.url()).await?;
    let mut req = tonic::Request::new(GenerateRequest { input: Some(Input::Prompt(prompt.into())), max_tokens: 6, ..Default::default() });
    if let Some(tp) = traceparent {
        req.metadata_mut().insert("traceparent", tp.parse()?);
    }
    let start = Instant::now();
    let mut stream = client.generate(req).await?.into_inner();
    let mut ttft = None;
    while let Some(m) = stream.message().await? {
        match m.event {
            Some(Event::Chunk(_)) => {
                ttft.get_or_insert(start.elapsed());
            }
            Some(Event::Error(e)) => anyhow::bail!("stream error {e:?}"),
            _ => {}
        }
    }
    ttft.ok_or_else(|| anyhow::anyhow!("no token"))
}

fn long_prompt() -> String {
    "The grass is green. The sky is blue. The sun is yellow. ".repeat(30) + "What colour is the sky?"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_router_prefill_and_decode() -> Result<()> {
    let collector = Collector::default();
    // Bound here, on a port of the system's choosing: no other process can take it first.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .add_service(MetricsServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{port}")), ("OTEL_BSP_SCHEDULE_DELAY", "100".into())];
    let (_decode, _prefill, router) = three(&env, &[]).await;

    // The client starts the trace; every service joins it.
    let trace_hex = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let ttft = generate(&router, &long_prompt(), Some(&format!("00-{trace_hex}-{client_span}-01"))).await?;
    let trace_id: Vec<u8> = (0..16).map(|i| u8::from_str_radix(&trace_hex[2 * i..2 * i + 2], 16).unwrap()).collect();

    let want = |spans: &[Span]| {
        ["lazyserve-router", "lazyserve-prefill-worker", "lazyserve-decode-worker"]
            .iter()
            .all(|svc| spans.iter().any(|s| s.service == *svc && s.trace_id == trace_id))
            && spans.iter().any(|s| s.name == "receive_state")
            && spans.iter().any(|s| s.service == "lazyserve-decode-worker" && s.name == "decode")
    };
    let start = Instant::now();
    let spans = loop {
        let spans = collector.spans.lock().unwrap().clone();
        if want(&spans) {
            break spans;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "spans so far: {spans:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ours: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let find = |service: &str, name: &str| {
        *ours.iter().find(|s| s.service == service && s.name == name).unwrap_or_else(|| panic!("no {service} {name} in {ours:#?}"))
    };
    let root = ours.iter().find(|s| s.service == "lazyserve-router" && s.attrs.contains_key("gen_ai.operation.name")).expect("request span");
    assert_eq!(hex(&root.parent), client_span, "the router's span continues the client's");
    assert_eq!(root.name, "text_completion SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(matches!(root.attrs.get("gen_ai.request.max_tokens"), Some(Value::IntValue(6))), "{:?}", root.attrs);
    assert!(matches!(root.attrs.get("gen_ai.usage.output_tokens"), Some(Value::IntValue(6))), "{:?}", root.attrs);
    assert!(matches!(root.attrs.get("gen_ai.response.finish_reasons"), Some(Value::ArrayValue(_))));
    for key in ["gen_ai.request.model", "gen_ai.usage.input_tokens", "gen_ai.request.temperature", "gen_ai.request.top_p", "lazyserve.prune", "lazyserve.prompt_tokens_computed_percent"] {
        assert!(root.attrs.contains_key(key), "{key} missing: {:?}", root.attrs);
    }
    let Some(Value::DoubleValue(ttft_ms)) = root.attrs.get("lazyserve.ttft_ms") else { panic!("no TTFT attribute") };
    let client_ms = ttft.as_secs_f64() * 1e3;
    // The router measures from the request's arrival to the first token's send, inside the
    // client's own interval.
    assert!(*ttft_ms > 0.0 && *ttft_ms <= client_ms, "TTFT attribute {ttft_ms} ms, client saw {client_ms} ms");

    // Parent links: router -> prefill worker -> decode worker (state), router -> decode worker.
    let router_prefill = find("lazyserve-router", "prefill");
    let router_decode = find("lazyserve-router", "decode");
    let prefill_server = find("lazyserve-prefill-worker", "prefill");
    let transfer = find("lazyserve-prefill-worker", "state_transfer");
    let receive = find("lazyserve-decode-worker", "receive_state");
    let decode_server = find("lazyserve-decode-worker", "decode");
    assert_eq!(router_prefill.parent, root.span_id);
    assert_eq!(router_decode.parent, root.span_id);
    assert_eq!(find("lazyserve-router", "state_transfer").parent, root.span_id);
    assert_eq!(prefill_server.parent, router_prefill.span_id);
    assert_eq!(find("lazyserve-prefill-worker", "compute").parent, prefill_server.span_id);
    assert_eq!(transfer.parent, prefill_server.span_id);
    assert_eq!(receive.parent, transfer.span_id);
    assert_eq!(decode_server.parent, router_decode.span_id);
    assert!(matches!(transfer.attrs.get("lazyserve.bytes"), Some(Value::IntValue(b)) if *b > 0));

    // The latency histograms go out over OTLP too, TTFT under its GenAI name.
    router.terminate();
    let start = Instant::now();
    while !collector.metrics.lock().unwrap().iter().any(|m| m == "gen_ai.server.time_to_first_token") {
        assert!(start.elapsed() < Duration::from_secs(10), "metrics: {:?}", collector.metrics.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// GET on loopback, returning the body.
fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_service() -> Result<()> {
    let (decode, prefill, router) = three(&[], &[]).await;
    let targets: Vec<String> = [&decode, &prefill, &router].iter().map(|p| metrics_addr(p)).collect();
    let dir = std::env::temp_dir().join(format!("lazyserve-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: lazyserve\n    static_configs:\n      - targets: {targets:?}\n"),
    )?;
    let (prometheus, port) = start_prometheus(&config, &dir)?;

    let requests = 3;
    for i in 0..requests {
        let prompt = if i == 0 { long_prompt() } else { format!("Say {i}:") };
        generate(&router, &prompt, None).await?;
    }
    let query = |q: &str| http_get(port, &format!("/api/v1/query?query={q}"));
    let start = Instant::now();
    let result = loop {
        let body = query("sum(lazyserve_time_to_first_token_seconds_count)").unwrap_or_default();
        let up = query("sum(up)").unwrap_or_default();
        if body.contains(&format!("\"{requests}\"")) && up.contains("\"3\"") {
            break Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            break Err(anyhow::anyhow!("TTFT count: {body}; up: {up}"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let held = query("sum(lazyserve_decode_sequences_held)")?;
    let waiting = query("sum(lazyserve_decode_sequences_waiting)")?;
    let iterations = query("sum(lazyserve_decode_batch_size_count)")?;
    let stepped = query("sum(lazyserve_decode_batch_size_sum)")?;
    drop(prometheus);
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    assert!(held.contains("\"0\""), "{held}");
    assert!(waiting.contains("\"0\""), "{waiting}");
    // One request at a time: every decode iteration stepped exactly one sequence.
    let value = |body: &str| -> Result<f64> {
        let v: serde_json::Value = serde_json::from_str(body)?;
        Ok(v["data"]["result"][0]["value"][1].as_str().unwrap_or("0").parse()?)
    };
    assert!(value(&iterations)? > 0.0, "{iterations}");
    assert_eq!(value(&iterations)?, value(&stepped)?, "{iterations} {stepped}");
    Ok(())
}

/// Prometheus on a free port, ready; a new port when it exits first (Prometheus cannot
/// report a port it picked, and a free port can be taken before it binds it).
fn start_prometheus(config: &std::path::Path, dir: &std::path::Path) -> Result<(Killed, u16)> {
    for _ in 0..5 {
        let port = free_port();
        let mut prometheus = Killed(
            std::process::Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stderr(std::fs::File::create(dir.join("prometheus.log"))?)
                .spawn()
                .expect("prometheus starts (apt-get install prometheus; scripts/setup.sh does)"),
        );
        let start = Instant::now();
        while prometheus.0.try_wait()?.is_none() {
            if http_get(port, "/-/ready").is_ok_and(|b| b.contains("Ready")) {
                return Ok((prometheus, port));
            }
            anyhow::ensure!(start.elapsed() < Duration::from_secs(60), "prometheus not ready after 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    anyhow::bail!("prometheus exited before serving, 5 times: {}", std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default())
}

/// A child process killed and reaped when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The metrics address a ready process logged when it bound its `--metrics-listen` port.
fn metrics_addr(p: &Proc) -> String {
    let log = p.log_text();
    let line = log.lines().find(|l| l.contains("metrics on /metrics")).unwrap_or_else(|| panic!("{} logged no metrics address:\n{log}", p.addr));
    let at = line.find("addr=").expect("the line names its address") + "addr=".len();
    line[at..].split_whitespace().next().expect("an address").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_collector_does_not_break_serving() -> Result<()> {
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{}", free_port()))];
    let (_decode, _prefill, router) = three(&env, &[]).await;
    let (_d, _p, plain) = three(&[], &[]).await;
    // The same tokens as in-process, and no export timeout (3 s) in any request's way: the
    // requests take about as long as on services with no endpoint, called in turn.
    let (mut dead, mut none) = (Vec::new(), Vec::new());
    for round in 0..3 {
        for prompt in [long_prompt(), "Say hi:".to_string()] {
            let want = lazyserve_tests::in_process(&prompt, 6, "off");
            let (a, b) = if round % 2 == 0 {
                (tokens(&router, &prompt).await?, tokens(&plain, &prompt).await?)
            } else {
                let b = tokens(&plain, &prompt).await?;
                (tokens(&router, &prompt).await?, b)
            };
            assert_eq!(a.0, want, "{prompt}");
            assert_eq!(b.0, want, "{prompt}");
            dead.push(a.1.as_secs_f64());
            none.push(b.1.as_secs_f64());
        }
    }
    let (dead, none): (f64, f64) = (dead.iter().sum(), none.iter().sum());
    assert!(dead < 3.0 * none, "{dead:.2} s with a dead endpoint, {none:.2} s with none");
    Ok(())
}

/// Token ids and wall time of a greedy Generate call.
async fn tokens(router: &Proc, prompt: &str) -> Result<(Vec<u32>, Duration)> {
    let mut client = GenerationClient::connect(router.url()).await?;
    let start = Instant::now();
    let req = GenerateRequest { input: Some(Input::Prompt(prompt.into())), max_tokens: 6, ..Default::default() };
    let mut stream = client.generate(req).await?.into_inner();
    let mut ids = Vec::new();
    while let Some(m) = stream.message().await? {
        match m.event {
            Some(Event::Chunk(c)) => ids.extend(c.token_ids),
            Some(Event::Error(e)) => anyhow::bail!("stream error {e:?}"),
            _ => {}
        }
    }
    Ok((ids, start.elapsed()))
}
