//! The access log and tracing headers end to end: the built agent, real backends on loopback,
//! lines read back from the log file (or the agent's stdout).
use std::io::Read as _;
use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::{client, eventually, write_services, Agent, Backend, Behaviour};
use serde_json::Value;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Waits for the log at `path` to hold `n` lines, and returns them.
async fn wait_lines(path: &Path, n: usize) -> Vec<Value> {
    eventually(
        Duration::from_secs(10),
        &format!("{n} access-log lines"),
        || async {
            let l = lines(path);
            (l.len() >= n).then_some(l)
        },
    )
    .await
}

#[tokio::test]
async fn every_field_for_a_200_a_502_after_a_retry_a_404_and_a_traced_request() {
    let ok = Backend::start("ok").await;
    let bad1 = Backend::start_with(
        "bad1",
        Behaviour {
            status: 502,
            ..Default::default()
        },
    )
    .await;
    let bad2 = Backend::start_with(
        "bad2",
        Behaviour {
            status: 502,
            ..Default::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let services = dir.path().join("services.toml");
    write_services(
        &services,
        &[
            ("svc", &[(ok.addr, 1)]),
            ("flaky", &[(bad1.addr, 1), (bad2.addr, 1)]),
        ],
    );
    let log = dir.path().join("access.log");
    let registry = format!("file://{}", services.display());
    let agent = Agent::start(&[
        ("EDGE_AGENT_REGISTRY", &registry),
        ("EDGE_AGENT_ACCESS_LOG", log.to_str().unwrap()),
        ("EDGE_AGENT_REQUEST_ID", "on"),
    ])
    .await;
    let c = client();

    // 1. A 200, with a query that is not logged.
    let r = c
        .get(agent.url("/hello?token=secret"))
        .header("host", "svc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    let l = wait_lines(&log, 1).await;
    let e = &l[0];
    assert_eq!(e["client"], "127.0.0.1", "{e}");
    assert_eq!(e["method"], "GET", "{e}");
    assert_eq!(e["path"], "/hello", "{e}");
    assert_eq!(e["proto"], "HTTP/1.1", "{e}");
    assert_eq!(e["host"], "svc", "{e}");
    assert_eq!(e["upstream"], "svc", "{e}");
    assert_eq!(e["endpoint"], ok.addr.to_string(), "{e}");
    assert_eq!(e["tries"], 1, "{e}");
    assert_eq!(e["status"], 200, "{e}");
    assert_eq!(e["bytes_in"], 0, "{e}");
    assert_eq!(e["bytes_out"], body.len() as u64, "{e}");
    let (d, u) = (
        e["duration_ms"].as_f64().unwrap(),
        e["upstream_ms"].as_f64().unwrap(),
    );
    assert!(d >= u && u >= 0.0, "{e}");
    assert_eq!(e["trace_id"], Value::Null, "{e}");
    // EDGE_AGENT_REQUEST_ID=on: the agent made one, sent it upstream and logged it.
    let sent = ok.last_headers()["x-request-id"].clone();
    assert_eq!(sent.len(), 36, "{sent}");
    assert_eq!(e["request_id"], sent, "{e}");
    assert!(
        e["ts"].as_str().unwrap().starts_with("20") && e["ts"].as_str().unwrap().ends_with('Z'),
        "{e}"
    );

    // 2. A 502 after a retry: both endpoints answer 502, the second try's answer goes back.
    let r = c
        .get(agent.url("/x"))
        .header("host", "flaky")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let body = r.bytes().await.unwrap();
    let l = wait_lines(&log, 2).await;
    let e = &l[1];
    assert_eq!(e["status"], 502, "{e}");
    assert_eq!(e["upstream"], "flaky", "{e}");
    assert_eq!(e["tries"], 2, "{e}");
    let last = if body.starts_with(b"bad1") {
        bad1.addr
    } else {
        bad2.addr
    };
    assert_eq!(e["endpoint"], last.to_string(), "{e}");
    assert_eq!(e["bytes_out"], body.len() as u64, "{e}");
    assert!(e["upstream_ms"].as_f64().is_some(), "{e}");
    assert_eq!(bad1.hits() + bad2.hits(), 2);

    // 3. A 404: no upstream, no endpoint, no try.
    let r = c
        .post(agent.url("/nowhere"))
        .header("host", "nosuch")
        .body("12345")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body = r.bytes().await.unwrap();
    let l = wait_lines(&log, 3).await;
    let e = &l[2];
    assert_eq!(e["status"], 404, "{e}");
    assert_eq!(e["method"], "POST", "{e}");
    assert_eq!(e["host"], "nosuch", "{e}");
    assert_eq!(e["upstream"], Value::Null, "{e}");
    assert_eq!(e["endpoint"], Value::Null, "{e}");
    assert_eq!(e["tries"], 0, "{e}");
    assert_eq!(e["bytes_in"], 5, "{e}");
    assert_eq!(e["bytes_out"], body.len() as u64, "{e}");
    assert_eq!(e["upstream_ms"], Value::Null, "{e}");

    // 4. Tracing headers pass through untouched; the trace id and the client's request id
    // are logged.
    let r = c
        .get(agent.url("/traced"))
        .header("host", "svc")
        .header("traceparent", TRACEPARENT)
        .header("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        .header("x-request-id", "client-id-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let h = ok.last_headers();
    assert_eq!(h["traceparent"], TRACEPARENT);
    assert_eq!(h["tracestate"], "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7");
    assert_eq!(h["x-request-id"], "client-id-1");
    let l = wait_lines(&log, 4).await;
    let e = &l[3];
    assert_eq!(e["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "{e}");
    assert_eq!(e["request_id"], "client-id-1", "{e}");
    assert_eq!(e["path"], "/traced", "{e}");
}

#[tokio::test]
async fn text_format_keeps_the_query_when_asked() {
    let ok = Backend::start("ok").await;
    let dir = tempfile::tempdir().unwrap();
    let services = dir.path().join("services.toml");
    write_services(&services, &[("svc", &[(ok.addr, 1)])]);
    let log = dir.path().join("access.log");
    let registry = format!("file://{}", services.display());
    let agent = Agent::start(&[
        ("EDGE_AGENT_REGISTRY", &registry),
        ("EDGE_AGENT_ACCESS_LOG", log.to_str().unwrap()),
        ("EDGE_AGENT_ACCESS_LOG_FORMAT", "text"),
        ("EDGE_AGENT_ACCESS_LOG_QUERY", "on"),
    ])
    .await;
    assert_eq!(agent.get("svc", "/q?a=1").await.0, 200);
    let line = eventually(Duration::from_secs(10), "a text line", || async {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.ends_with('\n'))
    })
    .await;
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(line.contains("\"GET /q?a=1 HTTP/1.1\" 200 "), "{line}");
    assert!(
        line.contains(&format!(
            " host=svc upstream=svc endpoint={} tries=1 ",
            ok.addr
        )),
        "{line}"
    );
}

#[tokio::test]
async fn sigusr1_reopens_the_file_after_logrotate_moved_it() {
    let ok = Backend::start("ok").await;
    let dir = tempfile::tempdir().unwrap();
    let services = dir.path().join("services.toml");
    write_services(&services, &[("svc", &[(ok.addr, 1)])]);
    let log = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let registry = format!("file://{}", services.display());
    let agent = Agent::start(&[
        ("EDGE_AGENT_REGISTRY", &registry),
        ("EDGE_AGENT_ACCESS_LOG", log.to_str().unwrap()),
    ])
    .await;
    assert_eq!(agent.get("svc", "/before").await.0, 200);
    wait_lines(&log, 1).await;
    std::fs::rename(&log, &rotated).unwrap();
    // Until the signal, lines still go to the moved file (the agent holds it open).
    assert_eq!(agent.get("svc", "/moved").await.0, 200);
    wait_lines(&rotated, 2).await;
    assert!(!log.exists());
    agent.signal(nix::sys::signal::Signal::SIGUSR1);
    // The writer reopens on the signal; lines after it go to a new file at the old path.
    let l = eventually(
        Duration::from_secs(10),
        "a line in the reopened file",
        || async {
            assert_eq!(agent.get("svc", "/after").await.0, 200);
            let l = lines(&log);
            (!l.is_empty()).then_some(l)
        },
    )
    .await;
    assert_eq!(l[0]["path"], "/after", "{l:?}");
    let old = lines(&rotated);
    assert_eq!(old[0]["path"], "/before");
    assert_eq!(old[1]["path"], "/moved");
    assert!(agent.log_text().contains("access log reopened"));
}

/// stdout is a pipe nobody reads: the writer blocks once the pipe is full, its queue fills,
/// and lines are dropped and counted; every request is still answered, none waits.
#[tokio::test]
async fn a_blocked_writer_never_slows_or_fails_requests_and_drops_are_counted() {
    let ok = Backend::start("ok").await;
    let dir = tempfile::tempdir().unwrap();
    let services = dir.path().join("services.toml");
    write_services(&services, &[("svc", &[(ok.addr, 1)])]);
    let registry = format!("file://{}", services.display());
    let mut agent = Agent::spawn_piped(&[
        ("EDGE_AGENT_REGISTRY", &registry),
        ("EDGE_AGENT_ACCESS_LOG", "stdout"),
        ("RUST_LOG", "warn"),
    ]);
    agent.wait_ready().await;
    // Queue (4096) + pipe (64 KiB, ~200 lines) + one batch in the writer: 8,000 requests
    // overflow it by thousands.
    const TASKS: usize = 16;
    const PER_TASK: usize = 500;
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let url = agent.url("/");
        handles.push(tokio::spawn(async move {
            let c = client();
            let mut slowest = Duration::ZERO;
            for _ in 0..PER_TASK {
                let t = Instant::now();
                let r = c.get(&url).header("host", "svc").send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
                slowest = slowest.max(t.elapsed());
            }
            slowest
        }));
    }
    for h in handles {
        slowest = slowest.max(h.await.unwrap());
    }
    let took = started.elapsed();
    // A request that waited for the writer would wait forever (nobody reads the pipe).
    assert!(
        slowest < Duration::from_secs(5),
        "slowest request {slowest:?} (all {TASKS}x{PER_TASK} in {took:?})"
    );
    let m = agent.metrics().await;
    let dropped: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("edge_agent_access_log_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no edge_agent_access_log_dropped_total in:\n{m}"));
    let total = (TASKS * PER_TASK) as u64;
    assert!(
        dropped >= total - 4096 - 1000 && dropped < total,
        "dropped {dropped} of {total}"
    );
    // What did reach the pipe are access-log lines.
    let mut out = agent.stdout.take().unwrap();
    let mut buf = vec![0u8; 4096];
    let n = out.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["status"], 200, "{first}");
    assert_eq!(first["upstream"], "svc", "{first}");
}
