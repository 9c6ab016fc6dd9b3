//! Test harness: real HTTP backends on loopback, the built `edge-agent` binary driven from
//! outside, and polling helpers with deadlines (no fixed sleeps).
//!
//! Registry servers (Consul, Eureka, rnacos) are installed and started by the scripts in
//! `integration-tests/servers/`; see `servers.rs`.
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub mod fake_registry;
pub mod servers;
pub mod subsets;
pub mod tls;

/// Path of the built agent binary (`EDGE_AGENT_BIN`, else next to this test's target dir).
pub fn agent_bin() -> PathBuf {
    if let Ok(p) = std::env::var("EDGE_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/edge-agent
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("edge-agent"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} does not exist: build it first (`cargo build --bins`, or run `make test`)",
        bin.display()
    );
    bin
}

/// The workspace root (where `config/` lives).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `f` every 20 ms until it returns `Some`, or panics naming `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How a test backend answers.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub status: u16,
    pub delay: Duration,
    /// Extra response headers.
    pub headers: Vec<(String, String)>,
    /// `(k, n)`: answer 500 to the first `k` of every `n` requests (a failure share, never
    /// more than `k` in a row), else `status`.
    pub fail_pattern: Option<(u64, u64)>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            status: 200,
            delay: Duration::ZERO,
            headers: Vec::new(),
            fail_pattern: None,
        }
    }
}

/// A real HTTP/1 backend on loopback (127.0.0.1 unless told) that names itself in every answer (`x-backend` header and
/// body) and counts its requests.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    hits: Arc<AtomicU64>,
    conns: Arc<AtomicU64>,
    open: Arc<AtomicU64>,
    behaviour: Arc<Mutex<Behaviour>>,
    last_headers: Arc<Mutex<HashMap<String, String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Self::start_with(name, Behaviour::default()).await
    }

    pub async fn start_with(name: &str, behaviour: Behaviour) -> Backend {
        Self::start_at_with(name, ([127, 0, 0, 1], 0).into(), behaviour).await
    }

    /// On `addr` (another loopback address, or a given port).
    pub async fn start_at(name: &str, addr: SocketAddr) -> Backend {
        Self::start_at_with(name, addr, Behaviour::default()).await
    }

    async fn start_at_with(name: &str, addr: SocketAddr, behaviour: Behaviour) -> Backend {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind backend on {addr}: {e}"));
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let conns = Arc::new(AtomicU64::new(0));
        let behaviour = Arc::new(Mutex::new(behaviour));
        let last_headers = Arc::new(Mutex::new(HashMap::new()));
        let (h, b, lh, n) = (
            hits.clone(),
            behaviour.clone(),
            last_headers.clone(),
            name.to_string(),
        );
        let accepted = conns.clone();
        let open = Arc::new(AtomicU64::new(0));
        let open_now = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                open_now.fetch_add(1, Ordering::SeqCst);
                let (h, b, lh, n) = (h.clone(), b.clone(), lh.clone(), n.clone());
                let open_now = open_now.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (h, b, lh, n) = (h.clone(), b.clone(), lh.clone(), n.clone());
                        async move {
                            let nth = h.fetch_add(1, Ordering::SeqCst);
                            let beh = b.lock().unwrap().clone();
                            let status = match beh.fail_pattern {
                                Some((k, n)) if n > 0 && nth % n < k => 500,
                                _ => beh.status,
                            };
                            *lh.lock().unwrap() = req
                                .headers()
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                                .collect();
                            if !beh.delay.is_zero() {
                                tokio::time::sleep(beh.delay).await;
                            }
                            let body = format!("{n} {}", req.uri());
                            let mut resp = Response::builder()
                                .status(status)
                                .header("x-backend", n.as_str());
                            for (k, v) in &beh.headers {
                                resp = resp.header(k.as_str(), v.as_str());
                            }
                            let resp = resp.body(Full::new(Bytes::from(body))).unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    open_now.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Backend {
            name: name.to_string(),
            addr,
            hits,
            conns,
            open,
            behaviour,
            last_headers,
            task,
        }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.conns.load(Ordering::SeqCst)
    }

    /// Connections open now (accepted and not yet closed by either side).
    pub fn open_connections(&self) -> u64 {
        self.open.load(Ordering::SeqCst)
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    /// Headers of the last request received, lower-case names.
    pub fn last_headers(&self) -> HashMap<String, String> {
        self.last_headers.lock().unwrap().clone()
    }

    /// Stops accepting (already-open connections may linger until dropped).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running `edge-agent` process, killed when dropped; its output goes to a log file that a
/// failing test prints.
pub struct Agent {
    child: Option<Child>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
    /// The agent's stdout, when started with [`Agent::spawn_piped`] (nobody reads it unless
    /// the test does).
    pub stdout: Option<std::process::ChildStdout>,
    _dir: tempfile::TempDir,
}

static AGENTS: AtomicUsize = AtomicUsize::new(0);

impl Agent {
    /// Starts the agent with `env` (listen addresses are filled in with free ports unless
    /// given) and waits for `/ready`.
    ///
    /// A listen port is picked free ([`free_port`]) and bound by the agent a moment later, so
    /// another server of the same run can take it in between; an agent that exits saying so,
    /// for an address the test did not give, is started again on new ports (twice at most).
    pub async fn start(env: &[(&str, &str)]) -> Agent {
        let given = |k: &str| env.iter().any(|(key, _)| *key == k);
        for _ in 0..2 {
            let agent = Self::spawn(env);
            if agent.ready_or_exited().await {
                return agent;
            }
            let log = agent.log_text();
            let taken = |k: &str| {
                !given(k)
                    && log.lines().any(|l| {
                        l.contains(&format!("{k}="))
                            && l.contains("cannot listen")
                            && l.contains("Address already in use")
                    })
            };
            if !taken("EDGE_AGENT_LISTEN") && !taken("EDGE_AGENT_ADMIN_LISTEN") {
                agent.wait_ready().await; // panics with the log
            }
        }
        let agent = Self::spawn(env);
        agent.wait_ready().await;
        agent
    }

    /// Starts the agent without waiting for anything.
    pub fn spawn(env: &[(&str, &str)]) -> Agent {
        Self::spawn_with(env, None)
    }

    /// As [`Agent::spawn`], with stdout a pipe held in [`Agent::stdout`] (stderr still goes
    /// to the log file).
    pub fn spawn_piped(env: &[(&str, &str)]) -> Agent {
        Self::spawn_inner(env, None, true)
    }

    /// As [`Agent::spawn`], with at most `max_fds` open file descriptors (`ulimit -n`).
    pub fn spawn_with_fd_limit(env: &[(&str, &str)], max_fds: u32) -> Agent {
        Self::spawn_with(env, Some(max_fds))
    }

    fn spawn_with(env: &[(&str, &str)], max_fds: Option<u32>) -> Agent {
        Self::spawn_inner(env, max_fds, false)
    }

    fn spawn_inner(env: &[(&str, &str)], max_fds: Option<u32>, piped: bool) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let n = AGENTS.fetch_add(1, Ordering::SeqCst);
        let log = dir.path().join(format!("agent-{n}.log"));
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.to_string())
        };
        let proxy =
            get("EDGE_AGENT_LISTEN").unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        let admin =
            get("EDGE_AGENT_ADMIN_LISTEN").unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        let state = get("EDGE_AGENT_STATE_DIR")
            .unwrap_or_else(|| dir.path().join("state").display().to_string());
        let mut cmd = match max_fds {
            None => Command::new(agent_bin()),
            Some(n) => {
                // The shell sets the limit and execs the agent: same process, same pid.
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\""))
                    .arg(agent_bin());
                c
            }
        };
        cmd.current_dir(workspace_root())
            .env("EDGE_AGENT_STATE_DIR", &state)
            // The mass-deregistration guard delays removals by design; tests of propagation
            // turn it off, and the guard's own tests turn it on.
            .env("EDGE_AGENT_REMOVAL_GUARD", "off")
            .env("NO_COLOR", "1")
            .env_remove("EDGE_AGENT_REGISTRY")
            .env_remove("EDGE_AGENT_CONFIG")
            .env("RUST_LOG", "info,edge_agent=debug")
            .env("EDGE_AGENT_LISTEN", &proxy)
            .env("EDGE_AGENT_ADMIN_LISTEN", &admin)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        if piped {
            cmd.stdout(Stdio::piped());
        }
        let mut child = cmd.spawn().expect("spawn edge-agent");
        Agent {
            stdout: child.stdout.take(),
            child: Some(child),
            // A test may pass an invalid address on purpose (to see it refused).
            proxy: proxy.parse().unwrap_or_else(|_| ([127, 0, 0, 1], 0).into()),
            admin: admin.parse().unwrap_or_else(|_| ([127, 0, 0, 1], 0).into()),
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// CPU time (user + system) the agent process has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .expect("the agent's /proc stat");
        // Fields after the command name (which may hold spaces) start at the state, field 3;
        // utime and stime are fields 14 and 15, in clock ticks.
        let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        let per_second: u64 = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100);
        Duration::from_millis(ticks * 1000 / per_second)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn wait_ready(&self) {
        if !self.ready_or_exited().await {
            panic!(
                "edge-agent exited before it was ready; log:\n{}",
                self.log_text()
            );
        }
    }

    /// Waits for `/ready`: true once it answers, false if the process exited first; panics
    /// after 30 s.
    async fn ready_or_exited(&self) -> bool {
        let url = format!("http://{}/ready", self.admin);
        let c = client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = c.get(&url).send().await {
                if r.status() == StatusCode::OK {
                    return true;
                }
            }
            if self.has_exited() {
                return false;
            }
            if Instant::now() > deadline {
                panic!(
                    "edge-agent not ready within 30 s; log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the agent's process has exited: a zombie not yet reaped (`wait_exit` still
    /// gets its status), or gone.
    fn has_exited(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid())) {
            // The state is the field after the command name, which may hold spaces.
            Ok(stat) => stat
                .rfind(')')
                .and_then(|i| stat.get(i + 2..i + 3))
                .is_some_and(|state| state == "Z" || state == "X"),
            Err(_) => true,
        }
    }

    /// Sends a signal to the agent.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("kill");
    }

    /// Waits for the agent to exit, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                panic!("edge-agent did not exit within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// `GET path` with `Host: host` through the proxy: (status, `x-backend`, body).
    pub async fn get(&self, host: &str, path: &str) -> (u16, String, String) {
        let r = client()
            .get(self.url(path))
            .header("host", host)
            .send()
            .await
            .expect("request through the agent");
        let status = r.status().as_u16();
        let backend = r
            .headers()
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        (status, backend, r.text().await.unwrap_or_default())
    }

    pub async fn upstreams(&self) -> serde_json::Value {
        client()
            .get(self.admin_url("/upstreams"))
            .send()
            .await
            .expect("/upstreams")
            .json()
            .await
            .expect("/upstreams JSON")
    }

    pub async fn metrics(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("/metrics")
            .text()
            .await
            .unwrap()
    }

    /// Endpoints (addresses) of upstream `id` that are healthy, from `/upstreams`.
    pub async fn healthy_endpoints(&self, id: &str) -> Vec<String> {
        let u = self.upstreams().await;
        let mut out: Vec<String> = u["upstreams"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| x["id"] == id)
            .flat_map(|x| x["endpoints"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["available"] == true)
            .filter_map(|e| e["address"].as_str().map(String::from))
            .collect();
        out.sort();
        out
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- edge-agent log ({}) ----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// An HTTP client that never uses a proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Writes a file-registry TOML for `services` (name → [(addr, weight)]).
pub fn write_services(path: &Path, services: &[(&str, &[(SocketAddr, u32)])]) {
    let mut text = String::new();
    for (name, instances) in services {
        text.push_str(&format!("[[service]]\nname = \"{name}\"\ninstances = [\n"));
        for (addr, w) in *instances {
            text.push_str(&format!("  {{ addr = \"{addr}\", weight = {w} }},\n"));
        }
        text.push_str("]\n");
    }
    // Write then rename, as editors and config managers do.
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Counts of `x-backend` over `n` requests with `Host: host`.
pub async fn spread(agent: &Agent, host: &str, n: usize) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for _ in 0..n {
        let (status, backend, body) = agent.get(host, "/").await;
        assert_eq!(status, 200, "status {status}: {body}");
        *out.entry(backend).or_insert(0) += 1;
    }
    out
}

/// A file registry with `services` and a config file with `upstream` (TOML) in a temp dir; the
/// agent started on both, and upstream `svc` (if listed) holding its endpoints.
pub struct Setup {
    pub registry: PathBuf,
    _dir: tempfile::TempDir,
    pub agent: Agent,
}

pub async fn setup(upstream: &str, services: &[(&str, &[(SocketAddr, u32)])]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("services.toml");
    write_services(&registry, services);
    let cfg = dir.path().join("edge-agent.toml");
    std::fs::write(&cfg, upstream).unwrap();
    let url = format!("file://{}", registry.display());
    let agent = Agent::start(&[
        ("EDGE_AGENT_REGISTRY", &url),
        ("EDGE_AGENT_CONFIG", cfg.to_str().unwrap()),
    ])
    .await;
    // `/ready` can come before the configured upstream has its endpoints: wait for them.
    let n = services
        .iter()
        .find(|(name, _)| *name == "svc")
        .map_or(0, |(_, i)| i.len());
    wait_endpoints(&agent, n).await;
    Setup {
        registry,
        _dir: dir,
        agent,
    }
}

/// Waits until upstream `svc` lists `n` endpoints in `/upstreams`.
pub async fn wait_endpoints(agent: &Agent, n: usize) {
    eventually(
        Duration::from_secs(10),
        &format!("svc to have {n} endpoints"),
        || async {
            let u = agent.upstreams().await;
            let count = u["upstreams"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["id"] == "svc")
                .and_then(|x| x["endpoints"].as_array().map(Vec::len));
            (count == Some(n)).then_some(())
        },
    )
    .await;
}

/// `in_flight` of the endpoint at `addr` in upstream `svc`.
pub async fn in_flight(agent: &Agent, addr: SocketAddr) -> u64 {
    let u = agent.upstreams().await;
    u["upstreams"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["id"] == "svc")
        .flat_map(|x| x["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["address"] == addr.to_string().as_str())
        .and_then(|e| e["in_flight"].as_u64())
        .unwrap_or(0)
}

/// A series' value from the agent's `/metrics` (the first line starting with `series`).
pub async fn metric_value(agent: &Agent, series: &str) -> Option<f64> {
    agent
        .metrics()
        .await
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// #17, a hung registry: SIGSTOPs the registry process `pid` for 15 s; within 10 s
/// `edge_agent_discovery_source_up{source=kind}` must read 0 and a `timeout` discovery error be
/// counted, while `host` is still served from the last good view; after SIGCONT the gauge must
/// read 1 again within 10 s. Returns (time to 0, time back to 1 after SIGCONT).
pub async fn a_hung_registry_is_seen(
    agent: &Agent,
    pid: u32,
    kind: &str,
    host: &str,
) -> (Duration, Duration) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let up = format!("edge_agent_discovery_source_up{{source=\"{kind}\"}}");
    let errors = format!("edge_agent_discovery_errors_total{{source=\"{kind}\",kind=\"timeout\"}}");
    eventually(
        Duration::from_secs(15),
        "the source reads up first",
        || async { (metric_value(agent, &up).await == Some(1.0)).then_some(()) },
    )
    .await;
    let before = metric_value(agent, &errors).await.unwrap_or(0.0);
    let pid = Pid::from_raw(pid as i32);
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP the registry");
    let stopped = Instant::now();
    // Resumed whatever happens below, so a failing assertion cannot leave it stopped.
    struct Resume(Pid);
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = kill(self.0, Signal::SIGCONT);
        }
    }
    let resume = Resume(pid);
    eventually(
        Duration::from_secs(10),
        "source_up 0 and a timeout counted",
        || async {
            let down = metric_value(agent, &up).await == Some(0.0);
            let counted = metric_value(agent, &errors).await.unwrap_or(0.0) > before;
            (down && counted).then_some(())
        },
    )
    .await;
    let to_down = stopped.elapsed();
    let (status, _, _) = agent.get(host, "/").await;
    assert_eq!(
        status, 200,
        "the last good view serves while the registry hangs"
    );
    // The fault lasts 15 s in all (a window, not a wait for something).
    tokio::time::sleep(Duration::from_secs(15).saturating_sub(stopped.elapsed())).await;
    drop(resume);
    let resumed = Instant::now();
    eventually(Duration::from_secs(10), "source_up back to 1", || async {
        (metric_value(agent, &up).await == Some(1.0)).then_some(())
    })
    .await;
    (to_down, resumed.elapsed())
}
