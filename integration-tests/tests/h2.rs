//! HTTP/2 on the proxy port (#13): real clients (`curl --http2-prior-knowledge`, `curl --http2`
//! and `nghttp -u` for `Upgrade: h2c`, `h2load`; nghttp and h2load from Debian's
//! nghttp2-client, installed by `servers/h2/install.sh`), and the `h2` crate or raw bytes as a
//! client to inject what a hostile one sends (rapid reset, a SETTINGS flood, oversized headers,
//! upgrade requests the agent must not take).
use std::io::Write as _;
use std::time::{Duration, Instant};

use integration_tests::{servers, write_services, Agent, Backend, Behaviour};
use tokio::net::TcpStream;
use tokio::process::Command;

fn registry(dir: &tempfile::TempDir) -> (std::path::PathBuf, String) {
    let path = dir.path().join("services.toml");
    let url = format!("file://{}", path.display());
    (path, url)
}

/// `curl` with `args`, returning (exit code, stdout). Run as a child the runtime waits for
/// without blocking, since the test's backends run on the same (one-thread) runtime.
async fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .await
        .expect("curl runs");
    let code = out.status.code().unwrap_or(-1);
    if code != 0 {
        eprintln!("curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    (code, String::from_utf8_lossy(&out.stdout).to_string())
}

async fn h2_request(agent: &Agent, host: &str) -> Result<u16, String> {
    let tcp = TcpStream::connect(agent.proxy)
        .await
        .map_err(|e| e.to_string())?;
    let (mut client, conn) = h2::client::handshake(tcp)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{host}/"))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .map_err(|_| "no answer in 10 s".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

#[tokio::test]
async fn curl_h2_prior_knowledge_and_http1_share_the_port() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let (path, url) = registry(&dir);
    write_services(&path, &[("web", &[(a.addr, 1)])]);
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", &url)]).await;
    let port = agent.proxy.port().to_string();
    let connect_to = format!("web:80:127.0.0.1:{port}");
    // :authority names the service (zero-config routing), as a gRPC client's -authority would.
    let (code, out) = curl(&[
        "--http2-prior-knowledge",
        "-w",
        "\n%{http_version} %{http_code}",
        "--connect-to",
        &connect_to,
        "http://web/x?y=1",
    ])
    .await;
    assert_eq!(code, 0, "curl failed: {out}\n{}", agent.log_text());
    assert!(out.ends_with("\n2 200"), "{out}");
    assert!(out.starts_with("a /x?y=1"), "{out}");
    // The HTTP/1 backend gets the authority as its Host.
    assert_eq!(a.last_headers()["host"], "web");
    // HTTP/1.1 on the same port.
    let (code, out) = curl(&[
        "-w",
        "\n%{http_version} %{http_code}",
        "-H",
        "Host: web",
        &format!("http://127.0.0.1:{port}/"),
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with("\n1.1 200"), "{out}");
    let m = agent.metrics().await;
    for needle in [
        "edge_agent_requests_total{upstream=\"web\",status=\"200\",protocol=\"h2\"} 1",
        "edge_agent_requests_total{upstream=\"web\",status=\"200\",protocol=\"http1\"} 1",
    ] {
        assert!(m.contains(needle), "missing {needle:?} in:\n{m}");
    }
}

/// `Upgrade: h2c` (RFC 7540 §3.2) from curl: `101`, then HTTP/2, the upgrade request answered
/// on stream 1 and the next one on the same connection; a long header survives the HPACK
/// literals the agent injects. A request with a body asking for the upgrade is served as
/// HTTP/1.1, body and all.
#[tokio::test]
async fn curl_upgrades_to_h2c_and_a_request_with_a_body_stays_http1() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let (path, url) = registry(&dir);
    write_services(&path, &[("web", &[(a.addr, 1)])]);
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", &url)]).await;
    let port = agent.proxy.port().to_string();
    let connect_to = format!("web:80:127.0.0.1:{port}");
    let long = format!("x-long: {}", "v".repeat(300));
    // Two URLs: the second goes over the upgraded connection (no new connect).
    let (code, out) = curl(&[
        "--http2",
        "-H",
        &long,
        "-w",
        "\n%{http_version} %{http_code} %{num_connects}\n",
        "--connect-to",
        &connect_to,
        "http://web/x?y=1",
        "http://web/second",
    ])
    .await;
    assert_eq!(code, 0, "curl failed: {out}\n{}", agent.log_text());
    assert_eq!(
        out,
        "a /x?y=1\n2 200 1\na /second\n2 200 0\n",
        "{}",
        agent.log_text()
    );
    let seen = a.last_headers();
    assert_eq!(seen["host"], "web", "the authority is the Host: {seen:?}");
    assert_eq!(seen["x-long"], "v".repeat(300));
    for hop in ["upgrade", "http2-settings", "connection"] {
        assert!(
            !seen.contains_key(hop),
            "{hop} reached the backend: {seen:?}"
        );
    }
    // A body: no upgrade, HTTP/1.1 end to end.
    let (code, out) = curl(&[
        "--http2",
        "--data-binary",
        "hello",
        "-w",
        "\n%{http_version} %{http_code}",
        "--connect-to",
        &connect_to,
        "http://web/post",
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, "a /post\n1.1 200");
    assert_eq!(a.last_headers()["content-length"], "5");
    let m = agent.metrics().await;
    for needle in [
        "edge_agent_requests_total{upstream=\"web\",status=\"200\",protocol=\"h2\"} 2",
        "edge_agent_requests_total{upstream=\"web\",status=\"200\",protocol=\"http1\"} 1",
    ] {
        assert!(m.contains(needle), "missing {needle:?} in:\n{m}");
    }
}

/// `nghttp -u` (nghttp2's client, which also sends PRIORITY frames right after its SETTINGS):
/// the upgrade request on stream 1 and two more requests, all answered over one connection.
#[tokio::test]
async fn nghttp_upgrades_to_h2c() {
    let h2load = servers::install("h2");
    let nghttp = h2load.with_file_name("nghttp");
    assert!(
        nghttp.exists(),
        "{} missing: nghttp2-client installs it beside h2load",
        nghttp.display()
    );
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let (path, url) = registry(&dir);
    write_services(&path, &[("web", &[(a.addr, 1)])]);
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", &url)]).await;
    let out = Command::new(&nghttp)
        .args(["-u", "-v", "-t", "10", "-H", "host: web"])
        .arg(agent.url("/one"))
        .arg(agent.url("/two"))
        .arg(agent.url("/three"))
        .output()
        .await
        .expect("nghttp runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "nghttp failed: {text}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log_text()
    );
    assert!(text.contains("HTTP Upgrade success"), "{text}");
    assert_eq!(text.matches(":status: 200").count(), 3, "{text}");
    // Stream 1 is the upgrade request's; the others are the client's own (odd, from 3).
    assert!(
        text.lines()
            .any(|l| l.contains("recv HEADERS frame") && l.contains("stream_id=1>")),
        "{text}"
    );
    for body in ["a /one", "a /two", "a /three"] {
        assert!(text.contains(body), "{body} in {text}");
    }
    assert_eq!(a.hits(), 3);
}

/// Upgrade requests the agent does not take are served as plain HTTP/1.1 (the RFC lets a
/// server ignore `Upgrade`): a malformed `HTTP2-Settings`, a missing `Connection` option, a
/// body, a pipelined second request; and the HTTP/1.1 refusals still apply to them.
#[tokio::test]
async fn upgrades_not_taken_are_plain_http1() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let (path, url) = registry(&dir);
    write_services(&path, &[("web", &[(a.addr, 1)])]);
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", &url)]).await;
    let ok_settings = "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n";
    // `close` so each answer ends with the connection.
    let upgrade = "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings, close\r\n";
    let cases = [
        // Not base64url; not whole settings; ENABLE_PUSH = 2.
        format!("GET /bad HTTP/1.1\r\nHost: web\r\n{upgrade}HTTP2-Settings: !!!\r\n\r\n"),
        format!("GET /bad HTTP/1.1\r\nHost: web\r\n{upgrade}HTTP2-Settings: AAMAAA\r\n\r\n"),
        format!("GET /bad HTTP/1.1\r\nHost: web\r\n{upgrade}HTTP2-Settings: AAIAAAAC\r\n\r\n"),
        // Connection does not name HTTP2-Settings.
        format!("GET /bad HTTP/1.1\r\nHost: web\r\nUpgrade: h2c\r\nConnection: Upgrade, close\r\n{ok_settings}\r\n"),
        // A body.
        format!("POST /bad HTTP/1.1\r\nHost: web\r\n{upgrade}{ok_settings}Content-Length: 2\r\n\r\nhi"),
        // Two settings headers.
        format!("GET /bad HTTP/1.1\r\nHost: web\r\n{upgrade}{ok_settings}{ok_settings}\r\n"),
    ];
    for (i, req) in cases.iter().enumerate() {
        let answer = raw(&agent, req.as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "case {i}: {req:?} got {answer:?}"
        );
        assert!(answer.contains("a /bad"), "case {i}: {answer}");
    }
    // Pipelined after an upgrade request: both answered in HTTP/1.1, in order.
    let two = format!(
        "GET /one HTTP/1.1\r\nHost: web\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n{ok_settings}\r\nGET /two HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
    );
    let answer = raw(&agent, two.as_bytes()).await;
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
    assert!(answer.find("a /one") < answer.find("a /two"), "{answer}");
    // The HTTP/1.1 rules hold for an upgrade request: two Host headers are a 400.
    let twice = format!("GET / HTTP/1.1\r\nHost: web\r\nHost: other\r\n{upgrade}{ok_settings}\r\n");
    let answer = raw(&agent, twice.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(a.hits(), cases.len() as u64 + 2);
}

/// Writes `req` to the proxy port on a new connection and reads until the agent closes it
/// (at most 10 s).
async fn raw(agent: &Agent, req: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(agent.proxy).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&got).to_string()
}

#[tokio::test]
async fn h2load_through_the_agent() {
    let h2load = servers::install("h2");
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let (path, url) = registry(&dir);
    write_services(&path, &[("web", &[(a.addr, 1), (b.addr, 1)])]);
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", &url)]).await;
    let out = Command::new(&h2load)
        .args(["-n", "2000", "-c", "4", "-m", "25", "-H", "Host: web"])
        .arg(agent.url("/"))
        .output()
        .await
        .expect("h2load runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "h2load failed: {text}");
    assert!(
        text.contains("requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed"),
        "{text}\n{}",
        agent.log_text()
    );
    assert!(text.contains("status codes: 2000 2xx"), "{text}");
    // The h2 streams went over few connections to the agent but were balanced per request.
    assert_eq!(a.hits() + b.hits(), 2000);
    assert!(
        a.hits() > 500 && b.hits() > 500,
        "{} / {}",
        a.hits(),
        b.hits()
    );
}

/// CVE-2023-44487: a client opening streams and resetting them at once is cut off; a second
/// connection keeps being served throughout.
#[tokio::test]
async fn a_rapid_reset_client_is_cut_off_and_others_are_served() {
    let slow = Backend::start_with(
        "slow",
        Behaviour {
            delay: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await;
    let fast = Backend::start("fast").await;
    let dir = tempfile::tempdir().unwrap();
    let (path, url) = registry(&dir);
    write_services(
        &path,
        &[("slow", &[(slow.addr, 1)]), ("fast", &[(fast.addr, 1)])],
    );
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", &url)]).await;

    let tcp = TcpStream::connect(agent.proxy).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let started = Instant::now();
    let mut sent = 0u32;
    let mut cut = None;
    while sent < 100_000 && started.elapsed() < Duration::from_secs(20) {
        let ready = tokio::time::timeout(Duration::from_secs(5), client.clone().ready()).await;
        match ready {
            Ok(Ok(c)) => client = c,
            Ok(Err(e)) => {
                cut = Some(e.to_string());
                break;
            }
            Err(_) => {
                cut = Some("stalled".into());
                break;
            }
        }
        let req = http::Request::get("http://slow/").body(()).unwrap();
        match client.send_request(req, true) {
            Ok((_, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(e) => {
                cut = Some(e.to_string());
                break;
            }
        }
        sent += 1;
        if sent.is_multiple_of(50) {
            // Meanwhile, another connection is served.
            assert_eq!(h2_request(&agent, "fast").await, Ok(200));
        }
    }
    let why = cut.unwrap_or_else(|| panic!("{sent} streams opened and reset, never cut off"));
    // The connection task ends with the cut.
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "connection still open after: {why}");
    assert!(sent < 5_000, "cut off only after {sent} resets ({why})");
    assert_eq!(h2_request(&agent, "fast").await, Ok(200));
}

/// A client sending SETTINGS frames without reading the ACKs: the agent stops reading from it
/// (its writes stall, nothing is queued without bound) and other connections are served.
#[tokio::test]
async fn a_settings_flood_is_held_back_and_others_are_served() {
    let fast = Backend::start("fast").await;
    let dir = tempfile::tempdir().unwrap();
    let (path, url) = registry(&dir);
    write_services(&path, &[("fast", &[(fast.addr, 1)])]);
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", &url)]).await;
    let addr = agent.proxy;
    let flood = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
        let frame = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
        let batch: Vec<u8> = frame.iter().copied().cycle().take(9 * 10_000).collect();
        let mut written = 0usize;
        // At most 100 MB; a write that blocks for 3 s means the agent stopped reading.
        while written < 100_000_000 {
            match s.write(&batch) {
                Ok(n) => written += n,
                Err(_) => return (written, true),
            }
        }
        (written, false)
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !flood.is_finished() {
        assert!(Instant::now() < deadline, "the flood never stalled");
        assert_eq!(h2_request(&agent, "fast").await, Ok(200));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (written, stalled) = flood.join().unwrap();
    assert!(
        stalled,
        "the agent read all {written} bytes of SETTINGS frames"
    );
    assert!(
        written < 50_000_000,
        "{written} bytes taken before stalling"
    );
    assert_eq!(h2_request(&agent, "fast").await, Ok(200));
}

/// Oversized header lists are refused on their stream, before any upstream sees them; a
/// preface that breaks off is an HTTP/1 error; the connection after either keeps working for
/// others.
#[tokio::test]
async fn oversized_headers_and_a_broken_preface_are_refused() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let (path, url) = registry(&dir);
    write_services(&path, &[("web", &[(a.addr, 1)])]);
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", &url)]).await;
    let big = "x".repeat(100 * 1024);
    let header = format!("x-big: {big}");
    let (_, out) = curl(&[
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: web",
        "-H",
        &header,
        &agent.url("/"),
    ])
    .await;
    assert!(
        out == "431" || out == "000",
        "an oversized header list got {out}"
    );
    assert_eq!(a.hits(), 0, "the upstream saw the oversized request");
    // A broken preface: "PRI * HTTP/2.0" and then not the rest of it.
    let mut s = std::net::TcpStream::connect(agent.proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut buf);
    let answer = String::from_utf8_lossy(&buf);
    assert!(
        buf.is_empty() || answer.starts_with("HTTP/1.1 4") || answer.starts_with("HTTP/1.1 5"),
        "{answer}"
    );
    // Garbage after a valid preface: a GOAWAY, the connection closed.
    let mut s = std::net::TcpStream::connect(agent.proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff")
        .unwrap();
    let mut buf = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut buf);
    assert!(frame_types(&buf).contains(&7), "no GOAWAY in {buf:?}");
    assert_eq!(h2_request(&agent, "web").await, Ok(200));
}

/// The types of the HTTP/2 frames in `buf`, in order.
fn frame_types(mut buf: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while buf.len() >= 9 {
        let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
        types.push(buf[3]);
        buf = &buf[(9 + len).min(buf.len())..];
    }
    types
}

/// `retry_buffer`: a POST body that fits is kept as it is sent, so after a connect error on the
/// first endpoint the request is retried on the other and the backend gets the body exactly
/// once, byte for byte. A body over the buffer is never replayed.
#[tokio::test]
async fn a_buffered_post_is_retried_after_a_connect_error_body_intact() {
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};
    let got: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let live = listener.local_addr().unwrap();
    let g = got.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let g = g.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let g = g.clone();
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            g.lock().unwrap().push(body.to_vec());
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"stored")),
                            ))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let dead: std::net::SocketAddr = ([127, 0, 0, 1], integration_tests::free_port()).into();
    let dead2: std::net::SocketAddr = ([127, 0, 0, 1], integration_tests::free_port()).into();
    let dir = tempfile::tempdir().unwrap();
    let (path, url) = registry(&dir);
    write_services(
        &path,
        &[
            ("store", &[(dead, 1), (live, 1)]),
            ("big", &[(dead2, 1), (live, 1)]),
        ],
    );
    // "big" keeps at most 1 KiB for a retry.
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "[[upstream]]\nid = \"big\"\nretry_buffer = 1024\n").unwrap();
    let agent = Agent::start(&[
        ("EDGE_AGENT_REGISTRY", &url),
        ("EDGE_AGENT_CONFIG", cfg.to_str().unwrap()),
    ])
    .await;
    let client = integration_tests::client();
    let mut sent = Vec::new();
    for i in 0..6u32 {
        // 40 KiB of a pattern that differs per request, under the 64 KiB default buffer.
        let body: Vec<u8> = (0..40 * 1024u32).map(|j| (j * 31 + i * 7) as u8).collect();
        let resp = client
            .post(agent.url("/put"))
            .header("host", "store")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", agent.log_text());
        sent.push(body);
    }
    let m = agent.metrics().await;
    assert!(
        m.contains("edge_agent_upstream_errors_total{upstream=\"store\",kind=\"connect\"}"),
        "no connect error happened:\n{m}"
    );
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), sent.len(), "each body exactly once");
    for (g, s) in got.iter().zip(&sent) {
        assert!(
            g == s,
            "a body changed on the way ({} vs {} bytes)",
            g.len(),
            s.len()
        );
    }
    // Over the buffer (2 KiB against 1 KiB): streamed once; a connect error is a 502, never
    // a retry.
    let retries = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("edge_agent_retries_total{upstream=\"big\"} "))
            .map_or(0, |n| n.trim().parse::<u64>().unwrap())
    };
    let before = retries(&agent.metrics().await);
    let mut failed = 0;
    for _ in 0..4 {
        let resp = client
            .post(agent.url("/put"))
            .header("host", "big")
            .body(vec![7u8; 2 * 1024])
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            200 => {}
            502 => failed += 1,
            other => panic!("{other}"),
        }
    }
    assert_eq!(
        failed, 2,
        "round robin: every other try meets the dead endpoint"
    );
    assert_eq!(
        retries(&agent.metrics().await),
        before,
        "a large body was replayed"
    );
}
