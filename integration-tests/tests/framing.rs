//! HTTP/1.1 framing at the edge (issue 12, items 16–20): exact bytes on a raw socket to the
//! agent, and a raw backend that logs every byte it receives and answers with fixed bytes, so
//! each test sees both what the client got and what reached the upstream.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::{write_services, Agent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound for every read in these tests.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP backend that records every byte it receives and answers each request with `answer`.
/// A request is complete at the end of its head, or, when the head says chunked, at the last
/// chunk (`0\r\n\r\n`), or after `Content-Length` bytes; a request whose body never completes
/// is never answered.
struct RawBackend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
    conns: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RawBackend {
    async fn start(answer: &'static [u8]) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(AtomicUsize::new(0));
        let (s, c) = (seen.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        s.lock().unwrap().extend_from_slice(&buf[..n]);
                        pending.extend_from_slice(&buf[..n]);
                        if let Some(end) = request_end(&pending) {
                            pending.drain(..end);
                            if stream.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        RawBackend {
            addr,
            seen,
            conns,
            task,
        }
    }

    fn seen(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    fn untouched(&self) -> bool {
        self.conns.load(Ordering::SeqCst) == 0 && self.seen.lock().unwrap().is_empty()
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Where the first complete request in `buf` ends, if it is complete.
fn request_end(buf: &[u8]) -> Option<usize> {
    let head_end = find(buf, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if head.contains("\r\ntransfer-encoding:") {
        return find(&buf[head_end - 2..], b"\r\n0\r\n\r\n").map(|i| head_end - 2 + i + 7);
    }
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (buf.len() >= head_end + len).then_some(head_end + len)
}

/// One response as the client read it.
#[derive(Debug)]
struct Answer {
    status_line: String,
    /// Names lower-cased, in order.
    headers: Vec<(String, String)>,
    /// The body bytes, de-chunked when the response was chunked.
    body: Vec<u8>,
}

impl Answer {
    fn status(&self) -> u16 {
        self.status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn body(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Decodes a complete chunked body at the start of `buf` (no trailers), if it is all there.
fn dechunk(mut buf: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line = find(buf, b"\r\n")?;
        let size = std::str::from_utf8(&buf[..line]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        buf = &buf[line + 2..];
        if size == 0 {
            return buf.starts_with(b"\r\n").then_some(out);
        }
        if buf.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&buf[..size]);
        buf = &buf[size + 2..];
    }
}

/// Reads one response from `s` (bounded by [`READ_TIMEOUT`]).
async fn read_answer(s: &mut TcpStream) -> Answer {
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut eof = false;
    loop {
        if let Some(head_end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or("").to_string();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let rest = &buf[head_end + 4..];
            let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v);
            let body = if let Some(len) = get("content-length") {
                let len: usize = len.parse().expect("a numeric content-length");
                (rest.len() >= len).then(|| rest[..len].to_vec())
            } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
                dechunk(rest)
            } else {
                eof.then(|| rest.to_vec())
            };
            if let Some(body) = body {
                return Answer {
                    status_line,
                    headers,
                    body,
                };
            }
        }
        assert!(
            !eof,
            "connection closed before a whole response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => eof = true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!(
                "no whole response within {READ_TIMEOUT:?}; got {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
}

/// Sends `bytes` on a new connection to the agent and reads one response.
async fn send(agent: &Agent, bytes: &[u8]) -> (Answer, TcpStream) {
    let mut s = TcpStream::connect(agent.proxy).await.unwrap();
    s.write_all(bytes).await.unwrap();
    (read_answer(&mut s).await, s)
}

/// An agent serving `svc` from `backend` on the file registry.
async fn agent_for(backend: &RawBackend) -> (Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("services.toml");
    write_services(&path, &[("svc", &[(backend.addr, 1)])]);
    let url = format!("file://{}", path.display());
    (Agent::start(&[("EDGE_AGENT_REGISTRY", &url)]).await, dir)
}

#[tokio::test]
async fn an_upstream_content_length_beside_chunked_is_not_passed_on() {
    // Item 16.
    let b = RawBackend::start(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
          7\r\nchunked\r\n0\r\n\r\n",
    )
    .await;
    let (agent, _dir) = agent_for(&b).await;
    let (a, _s) = send(&agent, b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n").await;
    assert_eq!(a.status(), 200, "{a:?}");
    assert_eq!(a.header("content-length"), None, "{a:?}");
    assert_eq!(a.header("transfer-encoding"), Some("chunked"), "{a:?}");
    assert_eq!(a.body(), "chunked", "{a:?}");
    let seen = b.seen();
    assert!(seen.starts_with("GET /x HTTP/1.1\r\n"), "{seen:?}");
    assert!(seen.ends_with("\r\n\r\n"), "a body-less request: {seen:?}");
}
