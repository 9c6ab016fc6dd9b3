//! gRPC through the agent (#13), with real peers nobody here wrote: Python `grpcio` servers and
//! clients, and `grpcurl`, all installed by `servers/grpc/install.sh` (a venv with grpcio and
//! the stubs grpcio-tools generates from `servers/grpc/echo.proto`; grpcurl built from its Go
//! module). The servers register in the file registry and in Consul, with `protocol = "grpc"`
//! metadata (so the agent speaks h2c to them); clients dial the agent with the service name as
//! their authority.
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as StdCommand, Stdio};
use std::time::{Duration, Instant};

use integration_tests::servers::{install, server_dir, ServerProcess};
use integration_tests::{client, eventually, free_port, Agent};
use serde_json::{json, Value};
use tokio::process::Command;
use tokio::sync::Mutex;

/// Serialises the tests: each starts Python servers and clients (2 cores).
static SERIAL: Mutex<()> = Mutex::const_new(());

/// The install cache: `venv/`, `gen/` (stubs), `bin/grpcurl`.
fn cache() -> PathBuf {
    install("grpc")
}

fn python(cache: &Path) -> PathBuf {
    cache.join("venv/bin/python")
}

/// A grpcio server (`servers/grpc/server.py`) on 127.0.0.1, killed when dropped.
struct GrpcServer {
    child: Child,
    addr: SocketAddr,
    /// One line per unary call the server has started handling.
    calls: PathBuf,
    _dir: tempfile::TempDir,
}

impl GrpcServer {
    fn start(cache: &Path, name: &str) -> GrpcServer {
        Self::start_with(cache, name, &[])
    }

    /// A server with `env` set (`ECHO_STREAM_ABORT=<code>`: streams end with that status).
    fn start_with(cache: &Path, name: &str, env: &[(&str, &str)]) -> GrpcServer {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let calls = dir.path().join("calls.log");
        let mut child = StdCommand::new(python(cache))
            .arg(server_dir("grpc").join("server.py"))
            .arg(cache.join("gen"))
            .arg(name)
            .arg(port.to_string())
            .arg(&calls)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the grpcio server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "grpcio server {name} did not start");
        GrpcServer {
            child,
            addr: ([127, 0, 0, 1], port).into(),
            calls,
            _dir: dir,
        }
    }

    /// Unary calls the server has started handling.
    fn handled(&self) -> usize {
        std::fs::read_to_string(&self.calls).map_or(0, |t| t.lines().count())
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the grpcio client (`servers/grpc/client.py`) against the agent; one JSON value per
/// call.
async fn call(cache: &Path, agent: &Agent, authority: &str, args: &[&str]) -> Vec<Value> {
    let out = Command::new(python(cache))
        .arg(server_dir("grpc").join("client.py"))
        .arg(cache.join("gen"))
        .arg(agent.proxy.to_string())
        .arg(authority)
        .args(args)
        .output()
        .await
        .expect("run the grpcio client");
    assert!(
        out.status.success(),
        "client {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log_text()
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn one(cache: &Path, agent: &Agent, authority: &str, args: &[&str]) -> Value {
    call(cache, agent, authority, args).await.remove(0)
}

/// `grpcurl -plaintext -authority <authority> -proto echo.proto -d <data>` through the agent:
/// (success, stdout, stderr).
async fn grpcurl(
    cache: &Path,
    agent: &Agent,
    authority: &str,
    method: &str,
    data: &str,
) -> (bool, String, String) {
    let out = Command::new(cache.join("bin/grpcurl"))
        .args(["-plaintext", "-authority", authority, "-import-path"])
        .arg(server_dir("grpc"))
        .args(["-proto", "echo.proto", "-d", data])
        .arg(agent.proxy.to_string())
        .arg(method)
        .output()
        .await
        .expect("run grpcurl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn registry_file(dir: &tempfile::TempDir, services: &[(&str, &[SocketAddr])]) -> String {
    let path = dir.path().join("services.toml");
    let mut text = String::new();
    for (name, addrs) in services {
        text.push_str(&format!("[[service]]\nname = \"{name}\"\ninstances = [\n"));
        for a in *addrs {
            text.push_str(&format!(
                "  {{ addr = \"{a}\", metadata = {{ protocol = \"grpc\" }} }},\n"
            ));
        }
        text.push_str("]\n");
    }
    std::fs::write(&path, text).unwrap();
    format!("file://{}", path.display())
}

fn server_of(v: &Value) -> &str {
    v["server"].as_str().unwrap_or("")
}

#[tokio::test]
async fn unary_streaming_trailers_and_errors_via_grpcio_and_grpcurl() {
    let _serial = SERIAL.lock().await;
    let cache = cache();
    let a = GrpcServer::start(&cache, "a");
    let dead: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let dir = tempfile::tempdir().unwrap();
    let url = registry_file(&dir, &[("pay", &[a.addr]), ("gone", &[dead])]);
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", &url)]).await;

    let ok = one(&cache, &agent, "pay", &["unary", "hello", "0"]).await;
    assert_eq!(ok["code"], 0, "{ok}\n{}", agent.log_text());
    assert_eq!(server_of(&ok), "a");
    assert_eq!(ok["trailers"]["x-server"], "a", "trailers lost: {ok}");
    // An error status, its message and trailers, as the server sent them.
    let failed = one(&cache, &agent, "pay", &["unary", "x", "7"]).await;
    assert_eq!(failed["code"], 7, "{failed}");
    assert_eq!(failed["message"], "a: failing as asked");
    assert_eq!(failed["trailers"]["x-server"], "a", "{failed}");
    // Server streaming: every reply, in order, then OK and the trailers.
    let stream = one(&cache, &agent, "pay", &["stream", "s", "50"]).await;
    assert_eq!(stream["code"], 0, "{stream}");
    assert_eq!(stream["replies"], 50, "{stream}");
    assert_eq!(stream["trailers"]["x-server"], "a", "{stream}");

    // grpcurl, -authority naming the service.
    let (ok, out, err) = grpcurl(
        &cache,
        &agent,
        "pay",
        "edge.test.Echo/Unary",
        r#"{"text":"curl"}"#,
    )
    .await;
    assert!(ok, "grpcurl failed: {out}\n{err}\n{}", agent.log_text());
    let reply: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply, json!({"text": "curl", "server": "a"}));
    let (ok, out, err) = grpcurl(
        &cache,
        &agent,
        "pay",
        "edge.test.Echo/Stream",
        r#"{"text":"s","count":3}"#,
    )
    .await;
    assert!(ok, "{out}\n{err}");
    assert_eq!(out.matches("\"server\": \"a\"").count(), 3, "{out}");
    let (ok, out, err) = grpcurl(
        &cache,
        &agent,
        "pay",
        "edge.test.Echo/Unary",
        r#"{"code":5}"#,
    )
    .await;
    assert!(!ok, "{out}");
    assert!(
        err.contains("Code: NotFound") && err.contains("a: failing as asked"),
        "{err}"
    );

    // The agent's own errors are gRPC-shaped: connect failure → UNAVAILABLE, unknown service
    // → UNIMPLEMENTED.
    let unavailable = one(&cache, &agent, "gone", &["unary", "x", "0"]).await;
    assert_eq!(unavailable["code"], 14, "{unavailable}");
    assert!(
        unavailable["message"]
            .as_str()
            .unwrap()
            .contains("could not connect to upstream"),
        "{unavailable}"
    );
    let unknown = one(&cache, &agent, "nosuch", &["unary", "x", "0"]).await;
    assert_eq!(unknown["code"], 12, "{unknown}");
    let m = agent.metrics().await;
    assert!(
        m.contains("edge_agent_requests_total{upstream=\"pay\",status=\"200\",protocol=\"grpc\"}"),
        "{m}"
    );
    // /upstreams: the endpoint's protocol, one HTTP/2 connection, no stream left open.
    let ups = agent.upstreams().await;
    let pay = ups["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["id"] == "pay")
        .unwrap()
        .clone();
    let ep = &pay["endpoints"][0];
    assert_eq!(ep["protocol"], "h2c", "{pay}");
    assert_eq!(ep["connections"], 1, "{pay}");
    assert_eq!(ep["streams"], 0, "{pay}");
}

#[tokio::test]
async fn read_timeout_and_grpc_timeout_are_deadline_exceeded() {
    let _serial = SERIAL.lock().await;
    let cache = cache();
    let a = GrpcServer::start(&cache, "a");
    let dir = tempfile::tempdir().unwrap();
    let url = registry_file(&dir, &[("pay", &[a.addr])]);
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "[[upstream]]\nid = \"pay\"\nprotocol = \"h2c\"\nread_timeout = \"500ms\"\n\
         [[upstream]]\nid = \"slowpay\"\nservice = \"pay\"\nread_timeout = \"60s\"\n\
         [[route]]\nhost = \"pay\"\nupstream = \"pay\"\n\
         [[route]]\nhost = \"slowpay\"\nupstream = \"slowpay\"\n",
    )
    .unwrap();
    let agent = Agent::start(&[
        ("EDGE_AGENT_REGISTRY", &url),
        ("EDGE_AGENT_CONFIG", cfg.to_str().unwrap()),
    ])
    .await;
    // The server takes 3 s; the upstream's read_timeout is 500 ms: the agent answers
    // DEADLINE_EXCEEDED (the client's own deadline is 30 s).
    let started = Instant::now();
    let late = one(&cache, &agent, "pay", &["many", "1", "3000", "30"]).await;
    assert_eq!(late["code"], 4, "{late}\n{}", agent.log_text());
    assert!(
        started.elapsed() < Duration::from_millis(2900),
        "{:?}",
        started.elapsed()
    );
    // read_timeout 60 s, grpc-timeout 400 ms: the try's deadline is the call's. curl sends the
    // call (a hand-framed EchoRequest{delay_ms: 3000}) so the client itself does not give up
    // first, as a gRPC client with the same deadline would.
    let frame = dir.path().join("call.bin");
    std::fs::write(&frame, [0u8, 0, 0, 0, 3, 0x20, 0xB8, 0x17]).unwrap();
    let before = timeouts(&agent, "slowpay").await;
    let started = Instant::now();
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--http2-prior-knowledge",
            "-D",
            "-",
            "-o",
            "/dev/null",
        ])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args(["-H", "grpc-timeout: 400m", "--data-binary"])
        .arg(format!("@{}", frame.display()))
        .arg(format!(
            "http://127.0.0.1:{}/edge.test.Echo/Unary",
            agent.proxy.port()
        ))
        .args(["-H", "host: slowpay"])
        .output()
        .await
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        head.contains("grpc-status: 4"),
        "{head}\n{}",
        agent.log_text()
    );
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(timeouts(&agent, "slowpay").await, before + 1);
}

async fn timeouts(agent: &Agent, upstream: &str) -> u64 {
    let needle =
        format!("edge_agent_upstream_errors_total{{upstream=\"{upstream}\",kind=\"timeout\"}} ");
    agent
        .metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// One of two servers killed mid-run: the calls it was serving fail UNAVAILABLE, the others
/// succeed on the other server, and later calls all go there.
#[tokio::test]
async fn a_killed_server_fails_only_its_calls() {
    let _serial = SERIAL.lock().await;
    let cache = cache();
    let a = GrpcServer::start(&cache, "a");
    let b = GrpcServer::start(&cache, "b");
    let dir = tempfile::tempdir().unwrap();
    let url = registry_file(&dir, &[("pay", &[a.addr, b.addr])]);
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", &url)]).await;
    let calls = call(&cache, &agent, "pay", &["many", "40", "2000", "30"]);
    let killer = async {
        // Kill a once its calls are in flight (its streams show in /upstreams).
        eventually(Duration::from_secs(10), "calls in flight on a", || async {
            (streams(&agent, a.addr).await >= 5).then_some(())
        })
        .await;
        a.signal(nix::sys::signal::Signal::SIGKILL);
    };
    let (results, ()) = tokio::join!(calls, killer);
    let on_b = results
        .iter()
        .filter(|r| r["code"] == 0 && server_of(r) == "b")
        .count();
    let unavailable = results.iter().filter(|r| r["code"] == 14).count();
    assert_eq!(on_b + unavailable, 40, "{results:?}");
    assert!(unavailable >= 5, "{results:?}");
    assert!(on_b >= 5, "{results:?}");
    // Afterwards every call succeeds on b (the dead endpoint refuses connections; the call is
    // retried: its body is small and was never sent).
    for r in call(&cache, &agent, "pay", &["many", "20", "0", "30"]).await {
        assert_eq!(r["code"], 0, "{r}\n{}", agent.log_text());
        assert_eq!(server_of(&r), "b");
    }
}

/// A server stopping gracefully (grpcio: GOAWAY, then lets its calls finish) loses no call:
/// those it had finish, later ones go to the other server.
#[tokio::test]
async fn goaway_on_graceful_stop_loses_no_call() {
    let _serial = SERIAL.lock().await;
    let cache = cache();
    let a = GrpcServer::start(&cache, "a");
    let b = GrpcServer::start(&cache, "b");
    let dir = tempfile::tempdir().unwrap();
    let url = registry_file(&dir, &[("pay", &[a.addr, b.addr])]);
    // 40 calls at once: when a is gone, those sent its way are retried together, past the
    // default max_retries circuit breaker (3 at once).
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "[[upstream]]\nid = \"pay\"\nmax_retries = 100\n").unwrap();
    let agent = Agent::start(&[
        ("EDGE_AGENT_REGISTRY", &url),
        ("EDGE_AGENT_CONFIG", cfg.to_str().unwrap()),
    ])
    .await;
    let first = call(&cache, &agent, "pay", &["many", "40", "1500", "30"]);
    let more = async {
        // Stop a once its calls are in its handlers: grpcio cancels calls it has not yet
        // handed to one when it stops, with or without a proxy. All 40 must be open first (a
        // call opened on a after the check, and cancelled by it, failed CI once).
        eventually(
            Duration::from_secs(10),
            "all 40 calls open, a's handled",
            || async {
                let open = streams(&agent, a.addr).await;
                let all = open + streams(&agent, b.addr).await;
                (all >= 40 && open >= 5 && a.handled() as u64 >= open).then_some(())
            },
        )
        .await;
        a.signal(nix::sys::signal::Signal::SIGTERM);
        // Calls made while a drains and after it is gone.
        call(&cache, &agent, "pay", &["many", "40", "100", "30"]).await
    };
    let (first, second) = tokio::join!(first, more);
    let lost: Vec<_> = first
        .iter()
        .map(|r| ("first", r))
        .chain(second.iter().map(|r| ("second", r)))
        .filter(|(_, r)| r["code"] != 0)
        .collect();
    assert!(
        lost.is_empty(),
        "calls lost: {lost:?}\n{}",
        agent.log_text()
    );
    assert!(first.iter().any(|r| server_of(r) == "a"), "{first:?}");
}

/// A status in the trailers after messages (UNAVAILABLE once a stream has sent a reply) counts
/// against the endpoint as a trailers-only one does: after `consecutive_failures` such calls it
/// is ejected and calls go to the other server. An upstream whose `failure_grpc_statuses` does
/// not name 14 lets the same calls pass as answers.
#[tokio::test]
async fn unavailable_in_trailers_after_messages_ejects_the_endpoint() {
    let _serial = SERIAL.lock().await;
    let cache = cache();
    let a = GrpcServer::start_with(&cache, "a", &[("ECHO_STREAM_ABORT", "14")]);
    let b = GrpcServer::start(&cache, "b");
    let dir = tempfile::tempdir().unwrap();
    let url = registry_file(&dir, &[("pay", &[a.addr, b.addr])]);
    let passive = "consecutive_failures = 3\nmax_ejection_percent = 100\npanic_threshold = 0\n";
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[upstream]]\nid = \"lenient\"\nservice = \"pay\"\nbalancer = \"roundrobin\"\n\
             [upstream.checks.passive]\n{passive}failure_grpc_statuses = [13]\n\
             [[upstream]]\nid = \"pay\"\nbalancer = \"roundrobin\"\n\
             [upstream.checks.passive]\n{passive}\
             [[route]]\nhost = \"lenient\"\nupstream = \"lenient\"\n\
             [[route]]\nhost = \"pay\"\nupstream = \"pay\"\n"
        ),
    )
    .unwrap();
    let agent = Agent::start(&[
        ("EDGE_AGENT_REGISTRY", &url),
        ("EDGE_AGENT_CONFIG", cfg.to_str().unwrap()),
    ])
    .await;
    let stream = |authority: &'static str| {
        let (cache, agent) = (&cache, &agent);
        async move { one(cache, agent, authority, &["stream", "s", "1"]).await }
    };
    // failure_grpc_statuses = [13]: a's UNAVAILABLE streams are answers, a stays in.
    let mut from_a = 0;
    for _ in 0..8 {
        let r = stream("lenient").await;
        assert_eq!(r["replies"], 1, "the reply before the status: {r}");
        match server_of(&r) {
            "a" => {
                assert_eq!(r["code"], 14, "{r}");
                assert_eq!(r["message"], "a: stream aborted as asked", "{r}");
                from_a += 1;
            }
            "b" => assert_eq!(r["code"], 0, "{r}"),
            other => panic!("served by {other:?}: {r}"),
        }
    }
    assert_eq!(from_a, 4, "round robin over both");
    let ep_a = endpoint(&agent, "pay", a.addr).await;
    assert_eq!(ep_a["failures"], 0, "{ep_a}");
    assert_eq!(ep_a["ejected"], false, "{ep_a}");

    // The default (14 is a failure): three such calls on a eject it; then b serves them all.
    let mut results = Vec::new();
    for _ in 0..12 {
        results.push(stream("pay").await);
    }
    let failed: Vec<_> = results.iter().filter(|r| r["code"] != 0).collect();
    assert_eq!(failed.len(), 3, "{results:?}\n{}", agent.log_text());
    assert!(failed
        .iter()
        .all(|r| server_of(r) == "a" && r["code"] == 14));
    assert!(
        results[6..]
            .iter()
            .all(|r| r["code"] == 0 && server_of(r) == "b"),
        "after the ejection b serves every call: {results:?}"
    );
    let ep_a = endpoint(&agent, "pay", a.addr).await;
    assert_eq!(ep_a["ejected"], true, "{ep_a}");
    assert_eq!(ep_a["failures"], 3, "{ep_a}");
    assert_eq!(ep_a["streams"], 0, "no stream left counted: {ep_a}");
    assert!(
        agent.log_text().contains("endpoint ejected"),
        "{}",
        agent.log_text()
    );
}

/// The endpoint at `addr` of upstream `id`, from `/upstreams`.
async fn endpoint(agent: &Agent, id: &str, addr: SocketAddr) -> Value {
    let ups = agent.upstreams().await;
    ups["upstreams"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|u| u["id"] == id)
        .flat_map(|u| u["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["address"] == addr.to_string())
        .unwrap_or_else(|| panic!("endpoint {addr} of {id} in {ups}"))
}

/// Open streams on the endpoint at `addr`, from `/upstreams`.
async fn streams(agent: &Agent, addr: SocketAddr) -> u64 {
    let ups = agent.upstreams().await;
    ups["upstreams"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|u| u["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["address"] == addr.to_string())
        .and_then(|e| e["streams"].as_u64())
        .unwrap_or(0)
}

/// A grpcio server registered in Consul with `Meta.protocol = "grpc"`, called by name.
#[tokio::test]
async fn a_server_registered_in_consul() {
    let _serial = SERIAL.lock().await;
    let cache = cache();
    let a = GrpcServer::start(&cache, "c1");
    let port = free_port();
    let bin = install("consul");
    let mut consul = ServerProcess::start(
        "consul",
        &[
            ("CONSUL_BIN", bin.display().to_string()),
            ("CONSUL_HTTP_PORT", port.to_string()),
        ],
    );
    consul
        .wait_ready(
            &format!("http://127.0.0.1:{port}/v1/status/leader"),
            Duration::from_secs(30),
            |body| !body.trim().trim_matches('"').is_empty(),
        )
        .await;
    let body = json!({
        "ID": "pay-1", "Name": "pay", "Address": "127.0.0.1", "Port": a.addr.port(),
        "Meta": {"protocol": "grpc"},
        "Check": {"TTL": "30m", "Status": "passing"},
    });
    let r = client()
        .put(format!("http://127.0.0.1:{port}/v1/agent/service/register"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
    let url = format!("consul://127.0.0.1:{port}");
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", &url)]).await;
    let ok = one(&cache, &agent, "pay", &["unary", "consul", "0"]).await;
    assert_eq!(ok["code"], 0, "{ok}\n{}", agent.log_text());
    assert_eq!(server_of(&ok), "c1");
    let (ok, out, err) = grpcurl(
        &cache,
        &agent,
        "pay",
        "edge.test.Echo/Unary",
        r#"{"text":"c"}"#,
    )
    .await;
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("\"server\": \"c1\""), "{out}");
    consul.stop();
}
