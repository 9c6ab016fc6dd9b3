//! WebSocket / HTTP/1.1 Upgrade through the agent (#13), with a real WebSocket library
//! (tokio-tungstenite) as client and as server.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use integration_tests::tls::{acceptor, Ca};
use integration_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket echo server on 127.0.0.1 (over TLS with `tls`) that prefixes each echo with its
/// name and counts the sockets it accepted and those open now.
struct EchoServer {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    open: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl EchoServer {
    async fn start(name: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, open) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (a, o, name) = (accepted.clone(), open.clone(), name.to_string());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (a, o, name, tls) = (a.clone(), o.clone(), name.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(acc) => {
                            if let Ok(s) = acc.accept(tcp).await {
                                echo(s, &name, &a, &o).await
                            }
                        }
                        None => echo(tcp, &name, &a, &o).await,
                    }
                });
            }
        });
        EchoServer {
            addr,
            accepted,
            open,
            task,
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo<S>(stream: S, name: &str, accepted: &AtomicU64, open: &AtomicU64)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    accepted.fetch_add(1, Ordering::SeqCst);
    open.fetch_add(1, Ordering::SeqCst);
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(t) => Message::text(format!("{name}: {t}")),
            Message::Binary(b) => Message::Binary(b),
            Message::Close(_) => break,
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
    open.fetch_sub(1, Ordering::SeqCst);
}

/// Opens a WebSocket through the agent to service `host`.
async fn connect(
    agent: &Agent,
    host: &str,
) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{}/socket", agent.proxy)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("host", host.parse().unwrap());
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

async fn roundtrip(ws: &mut Client, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
        other => panic!("no echo for {text:?}: {other:?}"),
    }
}

/// A file registry with `services` and an agent on it, `toml` as its config, `env` besides.
async fn agent(
    dir: &tempfile::TempDir,
    services: &[(&str, &[(SocketAddr, u32)])],
    toml: &str,
    env: &[(&str, &str)],
) -> Agent {
    let reg = dir.path().join("services.toml");
    write_services(&reg, services);
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, toml).unwrap();
    let url = format!("file://{}", reg.display());
    let mut all = vec![
        ("EDGE_AGENT_REGISTRY", url.as_str()),
        ("EDGE_AGENT_CONFIG", cfg.to_str().unwrap()),
    ];
    all.extend_from_slice(env);
    Agent::start(&all).await
}

fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .next()
}

#[tokio::test]
async fn websocket_echo_through_the_agent_counts_and_ends() {
    let server = EchoServer::start("ws-1", None).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(&dir, &[("chat", &[(server.addr, 1)])], "", &[]).await;
    let mut ws = connect(&agent, "chat")
        .await
        .expect("handshake through the agent");
    assert_eq!(roundtrip(&mut ws, "hello").await, "ws-1: hello");
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    match ws.next().await {
        Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], &[0u8, 1, 2, 255]),
        other => panic!("{other:?}"),
    }
    for i in 0..50 {
        assert_eq!(
            roundtrip(&mut ws, &format!("m{i}")).await,
            format!("ws-1: m{i}")
        );
    }
    let m = agent.metrics().await;
    assert_eq!(
        metric(&m, "edge_agent_upgrades_active", &["upstream=\"chat\""]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "edge_agent_requests_total",
            &[
                "upstream=\"chat\"",
                "protocol=\"websocket\"",
                "status=\"101\""
            ]
        ),
        Some(1.0),
        "{m}"
    );
    let up = agent.upstreams().await;
    assert_eq!(up["upstreams"][0]["endpoints"][0]["in_flight"], 1, "{up}");
    ws.close(None).await.unwrap();
    eventually(Duration::from_secs(5), "the tunnel to end", || async {
        let m = agent.metrics().await;
        let up = agent.upstreams().await;
        (metric(&m, "edge_agent_upgrades_active", &["upstream=\"chat\""]) == Some(0.0)
            && up["upstreams"][0]["endpoints"][0]["in_flight"] == 0)
            .then_some(())
    })
    .await;
    assert_eq!(
        server.open.load(Ordering::SeqCst),
        0,
        "the backend saw the close"
    );
    // The backend's WebSocket handshake succeeded once: it got the upgrade, not a plain GET.
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn websocket_to_a_tls_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "chat");
    let leaf = ca.leaf("chat", &["chat"]);
    let server = EchoServer::start("wss-1", Some(acceptor(&leaf, None, &[b"http/1.1"]))).await;
    let toml = format!(
        "[[upstream]]\nid = \"chat\"\ntls = true\ntls_ca_file = \"{}\"\n",
        ca.pem_path.display()
    );
    let agent = agent(&dir, &[("chat", &[(server.addr, 1)])], &toml, &[]).await;
    let mut ws = connect(&agent, "chat")
        .await
        .expect("handshake through the agent");
    assert_eq!(roundtrip(&mut ws, "over tls").await, "wss-1: over tls");
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn a_hundred_sockets_held_ten_seconds_spread_by_least_conn() {
    let a = EchoServer::start("a", None).await;
    let b = EchoServer::start("b", None).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(
        &dir,
        &[("chat", &[(a.addr, 1), (b.addr, 1)])],
        "[[upstream]]\nid = \"chat\"\nbalancer = \"least_conn\"\n",
        &[],
    )
    .await;
    let mut sockets = Vec::with_capacity(100);
    for i in 0..100 {
        let mut ws = connect(&agent, "chat")
            .await
            .unwrap_or_else(|e| panic!("socket {i}: {e}"));
        let echo = roundtrip(&mut ws, "hi").await;
        sockets.push((ws, echo));
    }
    let on_a = sockets.iter().filter(|(_, e)| e.starts_with("a:")).count();
    assert!(
        (45..=55).contains(&on_a),
        "least_conn spreads long-lived sockets: {on_a} of 100 on a"
    );
    let in_flight = |up: &serde_json::Value| -> Vec<u64> {
        up["upstreams"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["in_flight"].as_u64().unwrap())
            .collect()
    };
    let held_since = Instant::now();
    while held_since.elapsed() < Duration::from_secs(10) {
        let up = agent.upstreams().await;
        let f = in_flight(&up);
        assert_eq!(
            f.iter().sum::<u64>(),
            100,
            "every tunnel holds its count: {up}"
        );
        assert!(f.iter().all(|n| (45..=55).contains(n)), "{f:?}");
        assert_eq!(
            a.open.load(Ordering::SeqCst) + b.open.load(Ordering::SeqCst),
            100,
            "all 100 sockets stay open at the backends"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Still alive after 10 s.
    for (ws, _) in sockets.iter_mut().step_by(10) {
        assert!(roundtrip(ws, "still").await.ends_with(": still"));
    }
    for (mut ws, _) in sockets {
        ws.close(None).await.unwrap();
    }
    eventually(Duration::from_secs(10), "every tunnel to end", || async {
        let f = in_flight(&agent.upstreams().await);
        (f.iter().sum::<u64>() == 0
            && a.open.load(Ordering::SeqCst) + b.open.load(Ordering::SeqCst) == 0)
            .then_some(())
    })
    .await;
    assert_eq!(
        (a.accepted.load(Ordering::SeqCst) + b.accepted.load(Ordering::SeqCst)),
        100
    );
}

#[tokio::test]
async fn sigterm_drain_closes_tunnels_after_the_grace_period_not_before() {
    let server = EchoServer::start("ws-1", None).await;
    let dir = tempfile::tempdir().unwrap();
    let grace = Duration::from_secs(3);
    let mut agent = agent(
        &dir,
        &[("chat", &[(server.addr, 1)])],
        "",
        &[("EDGE_AGENT_SHUTDOWN_GRACE", "3s")],
    )
    .await;
    let mut ws = connect(&agent, "chat").await.unwrap();
    assert_eq!(roundtrip(&mut ws, "before").await, "ws-1: before");
    let sent = Instant::now();
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    // Within the grace period the tunnel still carries messages.
    eventually(Duration::from_secs(5), "the drain to start", || async {
        agent
            .log_text()
            .contains("waiting for open tunnels")
            .then_some(())
    })
    .await;
    assert_eq!(roundtrip(&mut ws, "during").await, "ws-1: during");
    // Then it is closed: the next read ends.
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    let took = sent.elapsed();
    assert!(ended.is_ok(), "the tunnel was never closed");
    assert!(
        took >= grace,
        "closed after {took:?}, before the grace of {grace:?}"
    );
    assert!(
        took < grace + Duration::from_secs(5),
        "closed only after {took:?}"
    );
    let status = agent.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    assert!(agent
        .log_text()
        .contains("grace period over: closing open tunnels"));
}

#[tokio::test]
async fn a_backend_that_never_answers_the_upgrade_is_a_504_by_read_timeout() {
    // Accepts and reads, never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = silent.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            held.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(
        &dir,
        &[("chat", &[(addr, 1)])],
        "[[upstream]]\nid = \"chat\"\nread_timeout = \"700ms\"\nretries = 0\n",
        &[],
    )
    .await;
    let start = Instant::now();
    let Err(err) = connect(&agent, "chat").await else {
        panic!("a handshake with a backend that never answers");
    };
    let took = start.elapsed();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 504),
        other => panic!("expected an HTTP 504, got {other}"),
    }
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(5),
        "{took:?}"
    );
    hold.abort();
}

#[tokio::test]
async fn connect_stays_refused() {
    let server = EchoServer::start("ws-1", None).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(&dir, &[("chat", &[(server.addr, 1)])], "", &[]).await;
    let mut s = TcpStream::connect(agent.proxy).await.unwrap();
    s.write_all(format!("CONNECT {} HTTP/1.1\r\nHost: chat\r\n\r\n", server.addr).as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed without an answer");
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got);
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        0,
        "nothing reached the backend"
    );
}

/// The access log's line for a WebSocket: written when the tunnel closes, status 101, the
/// tunnel's bytes each way and its whole life as the duration (#16).
#[tokio::test]
async fn a_websocket_has_one_access_log_line_written_at_its_close() {
    let server = EchoServer::start("ws-log", None).await;
    let web = Backend::start("web").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let agent = agent(
        &dir,
        &[("chat", &[(server.addr, 1)]), ("web", &[(web.addr, 1)])],
        "",
        &[("EDGE_AGENT_ACCESS_LOG", log.to_str().unwrap())],
    )
    .await;
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let mut ws = connect(&agent, "chat").await.expect("handshake");
    let opened = Instant::now();
    for i in 0..10 {
        assert_eq!(
            roundtrip(&mut ws, &format!("m{i}")).await,
            format!("ws-log: m{i}")
        );
    }
    // A plain request after the handshake is logged while the tunnel is still open: the
    // tunnel's own line is not written yet.
    assert_eq!(agent.get("web", "/plain").await.0, 200);
    eventually(
        Duration::from_secs(10),
        "the plain request's line",
        || async { (lines().len() == 1).then_some(()) },
    )
    .await;
    assert_eq!(lines()[0]["path"], "/plain");
    let open_for = opened.elapsed();
    ws.close(None).await.unwrap();
    let l = eventually(Duration::from_secs(10), "the tunnel's line", || async {
        let l = lines();
        (l.len() == 2).then_some(l)
    })
    .await;
    let e = &l[1];
    assert_eq!(e["status"], 101, "{e}");
    assert_eq!(e["method"], "GET", "{e}");
    assert_eq!(e["path"], "/socket", "{e}");
    assert_eq!(e["proto"], "HTTP/1.1", "{e}");
    assert_eq!(e["host"], "chat", "{e}");
    assert_eq!(e["upstream"], "chat", "{e}");
    assert_eq!(e["endpoint"], server.addr.to_string(), "{e}");
    assert_eq!(e["tries"], 1, "{e}");
    // Ten masked client frames of 2 bytes each ("m0".."m9": 2 + 4-byte mask + 2) plus the close
    // frame up; ten "ws-log: mN" echoes (2 + 10) plus the close down.
    let (bin, bout) = (
        e["bytes_in"].as_u64().unwrap(),
        e["bytes_out"].as_u64().unwrap(),
    );
    assert!((80..=100).contains(&bin), "bytes_in {bin}: {e}");
    assert!((120..=140).contains(&bout), "bytes_out {bout}: {e}");
    let d = e["duration_ms"].as_f64().unwrap();
    let u = e["upstream_ms"].as_f64().unwrap();
    assert!(u <= d, "{e}");
    // The whole life of the tunnel, not the handshake: at least the time it was open.
    assert!(
        d >= open_for.as_secs_f64() * 1000.0,
        "duration {d} ms for a tunnel open {open_for:?}: {e}"
    );
}
