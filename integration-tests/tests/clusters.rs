//! #17, registry clusters that lose a node: real clusters on loopback, the built agent pointed at
//! them, a bounded paced load through the agent while one registry node is killed (SIGKILL).
//! Each scenario counts the client-visible failures of that load (target 0: the agent serves
//! from its last good view while the registry fails over) and measures the time from a change
//! registered after the fault to the agent routing by it. Figures are printed as
//! `cluster-figures: …` lines (`-- --nocapture`) and collected in RELIABILITY.md.
//!
//! - Consul 1.14: three servers (`-bootstrap-expect=3`) and a client agent, each with its own
//!   ports and data dir, `-retry-join`ed on 127.0.0.1 (`servers/consul/start.sh`,
//!   `CONSUL_ROLE`). The agent pointed at the client agent, the leader killed; and the agent
//!   given the three servers (`consul://a?server=b&server=c`), the first one killed.
//! - Eureka (Spring Cloud Netflix): two peers replicating to each other (`servers/eureka/start.sh`,
//!   `EUREKA_PEER_URLS`), the agent given both (`eureka://a?server=b`), the first one killed and
//!   a change registered on the survivor.
//! - rnacos 0.8.8 in raft cluster mode: node 1 initialises the group, nodes 2 and 3 join it
//!   (`servers/nacos/start.sh`, `NACOS_CLUSTER_NODE_ID`, `NACOS_CLUSTER_JOIN`); the agent given
//!   all three, the node its gRPC stream is on (read from /proc) killed, a change registered on a
//!   survivor.
//!
//! Scenarios run one at a time (two cores; each one's figures are not the other's load).
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::servers::{install, ServerProcess};
use integration_tests::{client, eventually, free_port, metric_value, Agent, Backend};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use tokio::sync::Mutex;

/// Requests per second of the load through the agent.
const RATE: u64 = 100;
/// Upper bound of one load's length (it is stopped sooner; the count is bounded either way).
const LOAD_MAX: Duration = Duration::from_secs(40);
/// Per-request client timeout (a healthy request takes milliseconds).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for a cluster to form and elect a leader.
const CLUSTER_START: Duration = Duration::from_secs(60);
/// Deadline for a change made after the fault to reach the agent.
const PROPAGATION: Duration = Duration::from_secs(30);
/// The service every scenario routes to.
const SVC: &str = "web";

/// Serialises the scenarios of this binary.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// Client-visible outcome of a load.
#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    failed: u64,
    /// The first few failures, for the assertion message.
    samples: Vec<String>,
}

/// A paced load of [`RATE`] GETs per second for `Host: SVC` through the agent, until stopped
/// (at most [`LOAD_MAX`]). A request fails unless it comes back 200 from one of `names`.
struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Tally>,
}

impl Load {
    fn start(proxy: SocketAddr, names: &[&str]) -> Load {
        let names: Arc<Vec<String>> = Arc::new(names.iter().map(|s| s.to_string()).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let c = reqwest::Client::builder()
                .no_proxy()
                .timeout(REQUEST_TIMEOUT)
                .build()
                .unwrap();
            let max = LOAD_MAX.as_secs() * RATE;
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut handles = Vec::new();
            for i in 0..max {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                tick.tick().await;
                let (c, names) = (c.clone(), names.clone());
                let url = format!("http://{proxy}/r{i}");
                handles.push(tokio::spawn(async move {
                    match c.get(&url).header("host", SVC).send().await {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let backend = r
                                .headers()
                                .get("x-backend")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let body = r.text().await.unwrap_or_default();
                            (status == 200 && names.contains(&backend))
                                .then_some(())
                                .ok_or_else(|| format!("{status} {backend:?}: {body:.120}"))
                        }
                        Err(e) => Err(format!("transport: {e}")),
                    }
                }));
            }
            let mut t = Tally::default();
            for h in handles {
                t.requests += 1;
                if let Err(e) = h.await.unwrap() {
                    t.failed += 1;
                    if t.samples.len() < 5 {
                        t.samples.push(e);
                    }
                }
            }
            t
        });
        Load { stop, task }
    }

    async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// Polls `/upstreams` until `addr` is an available endpoint of [`SVC`]; the time it took.
async fn until_routed(agent: &Agent, addr: SocketAddr, what: &str) -> Duration {
    let t = Instant::now();
    let addr = addr.to_string();
    eventually(PROPAGATION, what, || async {
        agent
            .healthy_endpoints(SVC)
            .await
            .contains(&addr)
            .then_some(())
    })
    .await;
    t.elapsed()
}

/// SIGKILLs a registry node (no goodbye to its peers), then reaps it.
fn kill_hard(proc: &mut ServerProcess) {
    let pid = proc.pid().expect("a running server");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("SIGKILL the registry node");
    proc.stop();
}

async fn start_agent(registry: &str) -> Agent {
    Agent::start(&[
        ("EDGE_AGENT_REGISTRY", registry),
        ("RUST_LOG", "info,edge_agent=debug,discovery=debug"),
        ("NO_COLOR", "1"),
    ])
    .await
}

/// One member of a Consul cluster.
struct ConsulNode {
    name: String,
    proc: ServerProcess,
    http: u16,
    /// Server RPC port: what `/v1/status/leader` names.
    rpc: u16,
}

/// Three Consul servers and one client agent on loopback.
struct ConsulCluster {
    servers: Vec<ConsulNode>,
    client: ConsulNode,
    _data: tempfile::TempDir,
}

impl ConsulCluster {
    async fn start() -> ConsulCluster {
        let bin = install("consul");
        let data = tempfile::tempdir().unwrap();
        // http, serf lan, serf wan, rpc for each of the four.
        let ports: Vec<[u16; 4]> = (0..4)
            .map(|_| [free_port(), free_port(), free_port(), free_port()])
            .collect();
        let mut nodes = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            let role = if i < 3 { "server" } else { "client" };
            let join: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i && *j < 3)
                .map(|(_, q)| format!("127.0.0.1:{}", q[1]))
                .collect();
            let name = format!("consul-{role}-{i}");
            let env = vec![
                ("CONSUL_BIN", bin.display().to_string()),
                ("CONSUL_ROLE", role.to_string()),
                ("CONSUL_NODE_NAME", name.clone()),
                ("CONSUL_HTTP_PORT", p[0].to_string()),
                ("CONSUL_SERF_LAN_PORT", p[1].to_string()),
                ("CONSUL_SERF_WAN_PORT", p[2].to_string()),
                ("CONSUL_SERVER_PORT", p[3].to_string()),
                ("CONSUL_RETRY_JOIN", join.join(" ")),
                (
                    "CONSUL_DATA_DIR",
                    data.path().join(&name).display().to_string(),
                ),
            ];
            nodes.push(ConsulNode {
                proc: ServerProcess::start("consul", &env),
                name,
                http: p[0],
                rpc: p[3],
            });
        }
        let mut client_node = nodes.pop().unwrap();
        let started = Instant::now();
        // Every member knows the leader, and the client agent has joined the catalog.
        for n in nodes.iter_mut().chain(std::iter::once(&mut client_node)) {
            n.proc
                .wait_ready(
                    &format!("http://127.0.0.1:{}/v1/status/leader", n.http),
                    CLUSTER_START,
                    |body| !body.trim().trim_matches('"').is_empty(),
                )
                .await;
        }
        let cluster = ConsulCluster {
            servers: nodes,
            client: client_node,
            _data: data,
        };
        let catalog = format!("http://127.0.0.1:{}/v1/catalog/nodes", cluster.client.http);
        eventually(CLUSTER_START, "four nodes in the catalog", || async {
            let r = client().get(&catalog).send().await.ok()?;
            let nodes: serde_json::Value = r.json().await.ok()?;
            (nodes.as_array()?.len() == 4).then_some(())
        })
        .await;
        println!(
            "cluster-figures: consul 3 servers + client formed in {:?}",
            started.elapsed()
        );
        cluster
    }

    /// Index in `servers` of the leader, as the client agent sees it (`None` while there is
    /// none, or it names a server not in this cluster).
    async fn leader(&self) -> Option<usize> {
        let url = format!("http://127.0.0.1:{}/v1/status/leader", self.client.http);
        let r = client()
            .get(url)
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .ok()?;
        let body: String = r.json().await.ok()?;
        let port: u16 = body.rsplit_once(':')?.1.parse().ok()?;
        self.servers.iter().position(|s| s.rpc == port)
    }

    /// Registers `id` of [`SVC`] at `addr` on the client agent, with a passing TTL check.
    async fn register(&self, id: &str, addr: SocketAddr) {
        let url = format!(
            "http://127.0.0.1:{}/v1/agent/service/register",
            self.client.http
        );
        let body = json!({
            "ID": id, "Name": SVC, "Address": addr.ip().to_string(), "Port": addr.port(),
            "Check": {"TTL": "30m", "Status": "passing"},
        });
        let r = client().put(url).json(&body).send().await.unwrap();
        assert!(r.status().is_success(), "register {id}: {}", r.status());
    }

    /// Polls the catalog (through the client agent) until `id` is listed as passing: the
    /// registration reached the servers.
    async fn until_in_catalog(&self, id: &str) {
        let url = format!(
            "http://127.0.0.1:{}/v1/health/service/{SVC}?passing=true",
            self.client.http
        );
        eventually(PROPAGATION, &format!("{id} in the catalog"), || async {
            let r = client().get(&url).send().await.ok()?;
            let v: serde_json::Value = r.json().await.ok()?;
            v.as_array()?
                .iter()
                .any(|e| e["Service"]["ID"] == id)
                .then_some(())
        })
        .await
    }
}

/// The agent on the client agent; the leader SIGKILLed under load: no request fails, a new
/// leader is elected, and an instance registered after that election is routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_leader_killed_under_load_costs_no_requests() {
    let _serial = SERIAL.lock().await;
    let mut cluster = ConsulCluster::start().await;
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    cluster.register("web-a", a.addr).await;
    cluster.register("web-b", b.addr).await;
    let agent = start_agent(&format!("consul://127.0.0.1:{}", cluster.client.http)).await;
    // Consul's watches start on demand: the first request starts this one.
    let (status, _, body) = agent.get(SVC, "/").await;
    assert_eq!(status, 200, "{body}");
    until_routed(&agent, a.addr, "a routed").await;
    until_routed(&agent, b.addr, "b routed").await;

    let load = Load::start(agent.proxy, &["a", "b", "c"]);
    tokio::time::sleep(Duration::from_secs(1)).await; // load before the fault (a window)
    let old = eventually(CLUSTER_START, "a leader", || cluster.leader()).await;
    let old_name = cluster.servers[old].name.clone();
    kill_hard(&mut cluster.servers[old].proc);
    let killed = Instant::now();
    let new = eventually(CLUSTER_START, "a new leader", || async {
        cluster.leader().await.filter(|l| *l != old)
    })
    .await;
    let election = killed.elapsed();
    cluster.register("web-c", c.addr).await;
    let registered = Instant::now();
    cluster.until_in_catalog("web-c").await;
    let in_catalog = registered.elapsed();
    let routed = until_routed(&agent, c.addr, "c, registered after the election, routed").await;
    tokio::time::sleep(Duration::from_secs(1)).await; // load after the change (a window)
    let t = load.finish().await;
    let errors = metric_value(
        &agent,
        "edge_agent_discovery_errors_total{source=\"consul\"",
    )
    .await
    .unwrap_or(0.0);
    println!(
        "cluster-figures: consul leader {old_name} killed (agent -> client agent): {} requests, \
         {} failed; new leader {} after {election:?}; change registered after the election \
         in the catalog after {in_catalog:?}, routed by the agent after {routed:?} \
         ({:?} after the kill); discovery errors counted {errors}",
        t.requests,
        t.failed,
        cluster.servers[new].name,
        killed.elapsed() - Duration::from_secs(1)
    );
    assert_eq!(t.failed, 0, "failed requests: {:?}", t.samples);
    assert!(t.requests >= RATE * 2, "the load ran: {t:?}");
}

/// The agent given the three servers (`consul://s1?server=s2&server=s3`, s1 a follower);
/// s1 SIGKILLed under load: no request fails, the source moves to s2, stays up, and an instance
/// registered right after the kill is routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_server_list_fails_over_when_the_first_dies() {
    let _serial = SERIAL.lock().await;
    let mut cluster = ConsulCluster::start().await;
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    cluster.register("web-a", a.addr).await;
    cluster.register("web-b", b.addr).await;
    cluster.until_in_catalog("web-b").await;
    // Followers first, the leader last: the first server's death is a failover, not an
    // election.
    let leader = eventually(CLUSTER_START, "a leader", || cluster.leader()).await;
    let mut order: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    order.push(leader);
    let ports: Vec<u16> = cluster.servers.iter().map(|s| s.http).collect();
    let http = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let url = format!(
        "consul://{}?server={}&server={}",
        http(order[0]),
        http(order[1]),
        http(order[2])
    );
    let agent = start_agent(&url).await;
    // Consul's watches start on demand: the first request starts this one.
    let (status, _, body) = agent.get(SVC, "/").await;
    assert_eq!(status, 200, "{body}");
    until_routed(&agent, a.addr, "a routed").await;
    until_routed(&agent, b.addr, "b routed").await;
    let up = "edge_agent_discovery_source_up{source=\"consul\"}";

    let load = Load::start(agent.proxy, &["a", "b", "c"]);
    tokio::time::sleep(Duration::from_secs(1)).await; // load before the fault (a window)
    let first = cluster.servers[order[0]].name.clone();
    kill_hard(&mut cluster.servers[order[0]].proc);
    let killed = Instant::now();
    cluster.register("web-c", c.addr).await;
    let routed = until_routed(&agent, c.addr, "c, registered after the kill, routed").await;
    let since_kill = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await; // load after the change (a window)
    let t = load.finish().await;
    let next = format!("trying {} next", http(order[1]));
    let log = agent.log_text();
    assert!(
        log.contains(&next),
        "the agent's log says it moved to the next server ({next})"
    );
    assert_eq!(
        metric_value(&agent, up).await,
        Some(1.0),
        "the source stays up while another server answers"
    );
    println!(
        "cluster-figures: consul first of 3 listed servers ({first}) killed: {} requests, {} \
         failed; change registered right after the kill routed after {routed:?} \
         ({since_kill:?} after the kill); source_up stayed 1",
        t.requests, t.failed
    );
    assert_eq!(t.failed, 0, "failed requests: {:?}", t.samples);
    assert!(t.requests >= RATE * 2, "the load ran: {t:?}");
}

/// Deadline for a Eureka server to answer (25–40 s alone here; two start side by side).
const EUREKA_START: Duration = Duration::from_secs(240);

/// A Eureka peer: its process and port.
struct EurekaPeer {
    proc: ServerProcess,
    port: u16,
}

impl EurekaPeer {
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}/eureka", self.port)
    }

    /// Registers `id` of app `WEB` at `addr`, `UP`, on this peer.
    async fn register(&self, id: &str, addr: SocketAddr) {
        let body = json!({"instance": {
            "instanceId": id,
            "hostName": addr.ip().to_string(),
            "app": "WEB",
            "ipAddr": addr.ip().to_string(),
            "vipAddress": SVC,
            "status": "UP",
            "port": {"$": addr.port(), "@enabled": "true"},
            "securePort": {"$": 443, "@enabled": "false"},
            "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"},
            "leaseInfo": {"renewalIntervalInSecs": 30, "durationInSecs": 900},
        }});
        let r = client()
            .post(format!("{}/apps/WEB", self.base()))
            .json(&body)
            .send()
            .await
            .expect("register");
        assert_eq!(r.status().as_u16(), 204, "register {id} on {}", self.base());
    }

    /// Polls this peer until it lists `id` under `WEB` (registered here or replicated).
    async fn until_listed(&self, id: &str) -> Duration {
        let t = Instant::now();
        let url = format!("{}/apps/WEB", self.base());
        eventually(PROPAGATION, &format!("{id} on {}", self.base()), || async {
            let r = client()
                .get(&url)
                .header("accept", "application/json")
                .send()
                .await
                .ok()?;
            r.text().await.ok()?.contains(id).then_some(())
        })
        .await;
        t.elapsed()
    }
}

/// Two Eureka servers replicating to each other.
async fn eureka_peers() -> (EurekaPeer, EurekaPeer) {
    let jar = install("eureka");
    let ports = [free_port(), free_port()];
    let started = Instant::now();
    let mut peers: Vec<EurekaPeer> = (0..2)
        .map(|i| {
            let other = format!("http://127.0.0.1:{}/eureka/", ports[1 - i]);
            let proc = ServerProcess::start(
                "eureka",
                &[
                    ("EUREKA_PORT", ports[i].to_string()),
                    ("EUREKA_JAR", jar.display().to_string()),
                    ("EUREKA_PEER_URLS", other),
                    ("EUREKA_PARENT_PID", std::process::id().to_string()),
                ],
            );
            EurekaPeer {
                proc,
                port: ports[i],
            }
        })
        .collect();
    for p in peers.iter_mut() {
        let url = format!("{}/apps", p.base());
        p.proc
            .wait_ready(&url, EUREKA_START, |body| body.contains("applications"))
            .await;
    }
    println!(
        "cluster-figures: eureka 2 peers up in {:?}",
        started.elapsed()
    );
    let b = peers.pop().unwrap();
    (peers.pop().unwrap(), b)
}

/// The agent given both peers (`eureka://a?server=b`); a SIGKILLed under load: no request
/// fails, the agent fails over to b, and an instance registered on b after the kill is routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eureka_peer_killed_under_load_fails_over_to_the_other() {
    let _serial = SERIAL.lock().await;
    let (mut first, second) = eureka_peers().await;
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    first.register("web-a", a.addr).await;
    first.register("web-b", b.addr).await;
    // The peers replicate: what the first holds reaches the second.
    let replicated = second.until_listed("web-b").await;
    let url = format!(
        "eureka://127.0.0.1:{}/eureka?server=127.0.0.1:{}/eureka&interval=500ms",
        first.port, second.port
    );
    let agent = start_agent(&url).await;
    until_routed(&agent, a.addr, "a routed").await;
    until_routed(&agent, b.addr, "b routed").await;
    let up = "edge_agent_discovery_source_up{source=\"eureka\"}";

    let load = Load::start(agent.proxy, &["a", "b", "c"]);
    tokio::time::sleep(Duration::from_secs(1)).await; // load before the fault (a window)
    kill_hard(&mut first.proc);
    let killed = Instant::now();
    second.register("web-c", c.addr).await;
    let routed = until_routed(&agent, c.addr, "c, registered on the survivor, routed").await;
    let since_kill = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await; // load after the change (a window)
    let t = load.finish().await;
    let next = format!("trying 127.0.0.1:{}", second.port);
    assert!(
        agent.log_text().contains(&next),
        "the agent's log says it moved to the second peer ({next})"
    );
    assert_eq!(
        metric_value(&agent, up).await,
        Some(1.0),
        "the source stays up while a peer answers"
    );
    println!(
        "cluster-figures: eureka first of 2 peers killed: {} requests, {} failed; replication \
         between the peers took {replicated:?}; change registered on the survivor right after \
         the kill routed after {routed:?} ({since_kill:?} after the kill); source_up stayed 1",
        t.requests, t.failed
    );
    assert_eq!(t.failed, 0, "failed requests: {:?}", t.samples);
    assert!(t.requests >= RATE * 2, "the load ran: {t:?}");
}

/// Deadline for an rnacos node to answer `/health`.
const NACOS_START: Duration = Duration::from_secs(60);

/// One rnacos node of a cluster: HTTP port (gRPC is HTTP + 1000, as the SDK derives it).
struct NacosNode {
    id: u32,
    proc: ServerProcess,
    port: u16,
    _data: tempfile::TempDir,
}

impl NacosNode {
    async fn spawn(id: u32, port: u16, join: Option<u16>) -> NacosNode {
        let bin = install("nacos");
        let data = tempfile::tempdir().unwrap();
        let mut env = vec![
            ("RNACOS_BIN", bin.display().to_string()),
            ("NACOS_HTTP_PORT", port.to_string()),
            ("NACOS_GRPC_PORT", (port + 1000).to_string()),
            ("NACOS_DATA_DIR", data.path().display().to_string()),
            ("NACOS_CLUSTER_NODE_ID", id.to_string()),
            ("RUST_LOG", "warn".to_string()),
        ];
        if let Some(j) = join {
            env.push(("NACOS_CLUSTER_JOIN", format!("127.0.0.1:{}", j + 1000)));
        }
        let mut proc = ServerProcess::start("nacos", &env);
        proc.wait_ready(
            &format!("http://127.0.0.1:{port}/health"),
            NACOS_START,
            |_| true,
        )
        .await;
        NacosNode {
            id,
            proc,
            port,
            _data: data,
        }
    }

    /// Registers a persistent instance of [`SVC`] at `addr` on this node, retried until the node
    /// accepts it ("ok").
    async fn register(&self, addr: SocketAddr) {
        let url = format!("http://127.0.0.1:{}/nacos/v1/ns/instance", self.port);
        let q = [
            ("serviceName", SVC.to_string()),
            ("ip", addr.ip().to_string()),
            ("port", addr.port().to_string()),
            ("ephemeral", "false".to_string()),
        ];
        eventually(
            NACOS_START,
            &format!("register {addr} on node {}", self.id),
            || async {
                let r = client().post(&url).query(&q).send().await.ok()?;
                let ok = r.status().is_success();
                (ok && r.text().await.ok()?.contains("ok")).then_some(())
            },
        )
        .await;
    }

    /// Polls this node's instance list until it holds `addr`; the time it took.
    async fn until_listed(&self, addr: SocketAddr) -> Duration {
        let t = Instant::now();
        let url = format!(
            "http://127.0.0.1:{}/nacos/v1/ns/instance/list?serviceName={SVC}",
            self.port
        );
        let what = format!("{addr} listed on node {}", self.id);
        eventually(PROPAGATION, &what, || async {
            let v: serde_json::Value = client().get(&url).send().await.ok()?.json().await.ok()?;
            v["hosts"]
                .as_array()?
                .iter()
                .any(|h| h["ip"] == addr.ip().to_string() && h["port"] == addr.port())
                .then_some(())
        })
        .await;
        t.elapsed()
    }
}

/// An HTTP port whose +1000 (gRPC) is free as well.
fn nacos_port() -> u16 {
    for _ in 0..50 {
        let p = free_port();
        if p <= 64535 && std::net::TcpListener::bind(("127.0.0.1", p + 1000)).is_ok() {
            return p;
        }
    }
    panic!("no free HTTP port with a free +1000 gRPC port after 50 tries");
}

/// Remote ports of the established TCP connections process `pid` holds (from /proc).
fn connected_ports(pid: i32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().to_string();
                    l.strip_prefix("socket:[")?
                        .strip_suffix(']')
                        .map(String::from)
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // remote address, state (01 = established), inode
            (f.len() > 9 && f[3] == "01" && inodes.iter().any(|i| i == f[9]))
                .then(|| u16::from_str_radix(f[2].rsplit(':').next()?, 16).ok())
                .flatten()
        })
        .collect()
}

/// Three rnacos nodes in raft cluster mode; the agent given all three
/// (`nacos://?server=a&server=b&server=c`); the node its gRPC stream is on SIGKILLed under
/// load: no request fails, and an instance registered on a surviving node is pushed to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacos_node_killed_under_load_pushes_continue_from_the_others() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let first_port = nacos_port();
    let mut nodes = vec![NacosNode::spawn(1, first_port, None).await];
    for id in 2..=3 {
        nodes.push(NacosNode::spawn(id, nacos_port(), Some(first_port)).await);
    }
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    nodes[0].register(a.addr).await;
    nodes[0].register(b.addr).await;
    // The three form one cluster: what node 1 holds reaches the others.
    let mut replicated = Duration::ZERO;
    for n in &nodes[1..] {
        replicated = replicated.max(n.until_listed(b.addr).await);
    }
    println!(
        "cluster-figures: rnacos 3 nodes up and replicating in {:?} (replication {replicated:?})",
        started.elapsed()
    );
    let servers: Vec<String> = nodes
        .iter()
        .map(|n| format!("server=127.0.0.1:{}", n.port))
        .collect();
    let cache = tempfile::tempdir().unwrap();
    let url = format!(
        "nacos://?{}&list_interval=1s&cache_dir={}",
        servers.join("&"),
        cache.path().display()
    );
    let agent = start_agent(&url).await;
    let (status, _, body) = agent.get(SVC, "/").await;
    assert_eq!(status, 200, "{body}");
    until_routed(&agent, a.addr, "a routed").await;
    until_routed(&agent, b.addr, "b routed").await;
    // The node the SDK's gRPC stream is on.
    let grpc: Vec<u16> = nodes.iter().map(|n| n.port + 1000).collect();
    let on = eventually(PROPAGATION, "the agent's gRPC connection", || async {
        connected_ports(agent.pid())
            .into_iter()
            .find_map(|p| grpc.iter().position(|g| *g == p))
    })
    .await;

    let load = Load::start(agent.proxy, &["a", "b", "c"]);
    tokio::time::sleep(Duration::from_secs(1)).await; // load before the fault (a window)
    let killed_id = nodes[on].id;
    kill_hard(&mut nodes[on].proc);
    let killed = Instant::now();
    let survivor = nodes.iter().find(|n| n.id != killed_id).unwrap();
    survivor.register(c.addr).await;
    let routed = until_routed(&agent, c.addr, "c, registered on a survivor, pushed").await;
    let since_kill = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await; // load after the change (a window)
    let t = load.finish().await;
    println!(
        "cluster-figures: rnacos node {killed_id} of 3 (the one the agent's gRPC stream was on) \
         killed: {} requests, {} failed; change registered on node {} right after the kill \
         routed after {routed:?} ({since_kill:?} after the kill)",
        t.requests, t.failed, survivor.id
    );
    assert_eq!(t.failed, 0, "failed requests: {:?}", t.samples);
    assert!(t.requests >= RATE * 2, "the load ran: {t:?}");
}
