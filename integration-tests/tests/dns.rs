//! The DNS adapter (`dns://`) against real DNS servers on loopback, driving the built agent from
//! outside:
//! - Consul's own DNS interface (the Consul `servers/consul/install.sh` builds, with
//!   `CONSUL_DNS_PORT` set): `<svc>.service.consul` SRV, instances registered, failed and
//!   deregistered through the HTTP API, zero-config through `name_template`.
//! - dnsmasq from Debian (`servers/dns/install.sh`): `srv-host=` lines (priority, weight,
//!   weight 0), targets' addresses in an `addn-hosts=` file edited + SIGHUP, `srv-host=` edits
//!   (SIGHUP does not re-read the config file, so dnsmasq is restarted on the same port), A
//!   records with the port from the URL, and a real SERVFAIL (dnsmasq forwarding the domain to a
//!   Consul whose recursor is dead) and a stopped server: the last good set stays.
//!
//! The tests take a lock so they never run at the same time; every wait is a poll with a
//! deadline. Propagation lags are printed (`--nocapture`) for the closing note.
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration_tests::servers::{install, ServerProcess};
use integration_tests::{client, eventually, free_port, spread, Agent, Backend};
use serde_json::json;
use tokio::sync::Mutex;

/// Deadline for a server to start answering.
const SERVER_START: Duration = Duration::from_secs(30);
/// Deadline for a DNS change to show in the agent: the adapter re-resolves every `min_ttl`
/// (1 s; Consul's and dnsmasq's TTLs are 0), so this is generous for a loaded machine.
const PROPAGATION: Duration = Duration::from_secs(15);

/// Serialises the tests of this binary.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// A port on 127.0.0.1 free for both UDP and TCP (DNS uses both).
fn free_dns_port() -> u16 {
    loop {
        let t = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = t.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// One dnsmasq on loopback, its config file and hosts file in a scratch directory.
struct Dnsmasq {
    proc: Option<ServerProcess>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// Starts dnsmasq on a free port with `conf` (an `addn-hosts=` line for [`Dnsmasq::hosts`]
    /// is added) and `hosts` as the hosts file.
    async fn start(conf: &str, hosts: &str) -> Dnsmasq {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Dnsmasq {
            proc: None,
            port: free_dns_port(),
            dir,
        };
        d.write_hosts(hosts);
        d.write_conf(conf);
        d.launch().await;
        d
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("dnsmasq.conf")
    }

    fn hosts(&self) -> PathBuf {
        self.dir.path().join("hosts")
    }

    fn write_conf(&self, conf: &str) {
        let text = format!("{conf}\naddn-hosts={}\n", self.hosts().display());
        write_atomic(&self.conf(), &text);
    }

    fn write_hosts(&self, hosts: &str) {
        write_atomic(&self.hosts(), hosts);
    }

    async fn launch(&mut self) {
        let bin = install("dns");
        let env = [
            ("DNSMASQ_BIN", bin.display().to_string()),
            ("DNSMASQ_PORT", self.port.to_string()),
            ("DNSMASQ_CONF", self.conf().display().to_string()),
        ];
        let proc = ServerProcess::start("dns", &env);
        let started = Instant::now();
        while !proc.log_text().contains("started, version") {
            assert!(
                started.elapsed() < SERVER_START,
                "dnsmasq did not start within {SERVER_START:?}; log:\n{}",
                proc.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.proc = Some(proc);
    }

    /// Re-reads the hosts file (SIGHUP), and waits until dnsmasq says it did.
    async fn sighup(&self) {
        let proc = self.proc.as_ref().expect("running");
        let before = proc.log_text().matches("read ").count();
        let pid = nix::unistd::Pid::from_raw(proc.pid().unwrap() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
        eventually(SERVER_START, "dnsmasq re-read its hosts file", || async {
            (proc.log_text().matches("read ").count() > before).then_some(())
        })
        .await;
    }

    /// Stops dnsmasq and starts it again, on the same port, with `conf`.
    async fn restart(&mut self, conf: &str) {
        self.stop();
        self.write_conf(conf);
        self.launch().await;
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    fn log_text(&self) -> String {
        self.proc.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A Consul dev server with its DNS interface on a free port, `hcl` added to its config.
struct Consul {
    _proc: ServerProcess,
    http: u16,
    dns: u16,
}

impl Consul {
    async fn start(hcl: Option<&str>) -> Consul {
        let bin = install("consul");
        let (http, dns) = (free_port(), free_dns_port());
        let mut env = vec![
            ("CONSUL_BIN", bin.display().to_string()),
            ("CONSUL_HTTP_PORT", http.to_string()),
            ("CONSUL_DNS_PORT", dns.to_string()),
        ];
        if let Some(h) = hcl {
            env.push(("CONSUL_EXTRA_HCL", h.to_string()));
        }
        let mut proc = ServerProcess::start("consul", &env);
        proc.wait_ready(
            &format!("http://127.0.0.1:{http}/v1/status/leader"),
            SERVER_START,
            |body| !body.trim().trim_matches('"').is_empty(),
        )
        .await;
        Consul {
            _proc: proc,
            http,
            dns,
        }
    }

    async fn put(&self, path: &str, body: Option<serde_json::Value>) {
        let mut r = client().put(format!("http://127.0.0.1:{}{path}", self.http));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap_or_else(|e| panic!("PUT {path}: {e}"));
        let status = resp.status();
        assert!(
            status.is_success(),
            "PUT {path}: {status} {:?}",
            resp.text().await
        );
    }

    async fn register(&self, name: &str, id: &str, addr: SocketAddr, weight: u32) {
        let body = json!({
            "ID": id, "Name": name, "Address": addr.ip().to_string(), "Port": addr.port(),
            "Weights": {"Passing": weight, "Warning": 1},
            "Check": {"TTL": "30m", "Status": "passing"},
        });
        self.put("/v1/agent/service/register", Some(body)).await;
    }

    async fn deregister(&self, id: &str) {
        self.put(&format!("/v1/agent/service/deregister/{id}"), None)
            .await;
    }

    async fn check(&self, id: &str, verdict: &str) {
        self.put(&format!("/v1/agent/check/{verdict}/service:{id}"), None)
            .await;
    }
}

async fn start_agent(registry: &str) -> Agent {
    Agent::start(&[
        ("EDGE_AGENT_REGISTRY", registry),
        ("RUST_LOG", "info,edge_agent=debug,discovery=debug"),
    ])
    .await
}

/// Polls until `n` requests for `host` are all answered 200 by backends in `want`, each of
/// `want` at least once; returns how long that took.
async fn until_served_by(agent: &Agent, host: &str, want: &[&str], what: &str) -> Duration {
    let started = Instant::now();
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    eventually(PROPAGATION, what, || async {
        let mut seen = Vec::new();
        for _ in 0..16 {
            let (status, backend, _) = agent.get(host, "/").await;
            if status != 200 {
                return None;
            }
            seen.push(backend);
        }
        seen.sort();
        seen.dedup();
        (seen == want).then_some(())
    })
    .await;
    let lag = started.elapsed();
    eprintln!("lag [{what}]: {} ms", lag.as_millis());
    lag
}

/// The sum of a counter's series whose line starts with `prefix`, from `/metrics`.
async fn counter(agent: &Agent, prefix: &str) -> f64 {
    agent
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The DNS source's entry in `/upstreams`.
async fn dns_source(agent: &Agent) -> serde_json::Value {
    agent.upstreams().await["sources"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["kind"] == "dns").cloned())
        .expect("a dns source in /upstreams")
}

/// Endpoints of the upstream for `service` in `/upstreams`: (address, weight).
async fn endpoints(agent: &Agent, service: &str) -> Vec<(String, u64)> {
    let u = agent.upstreams().await;
    let mut out: Vec<(String, u64)> = u["upstreams"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["service"] == service)
        .flat_map(|x| x["endpoints"].as_array().cloned().unwrap_or_default())
        .map(|e| {
            (
                e["address"].as_str().unwrap_or("").to_string(),
                e["weight"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_dns_srv_follows_registrations_checks_and_deregistrations() {
    let _serial = SERIAL.lock().await;
    let consul = Consul::start(None).await;
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    consul.register("web", "web-a", a.addr, 3).await;
    let url = format!(
        "dns://127.0.0.1:{}?name_template={{service}}.service.consul&idle_ttl=10s",
        consul.dns
    );
    let agent = start_agent(&url).await;

    // Zero-config: the first request for `web` resolves web.service.consul on demand.
    let (status, backend, body) = agent.get("web", "/").await;
    assert_eq!((status, backend.as_str()), (200, "a"), "{body}");
    // Consul's SRV weight is the instance's Weights.Passing; the target's address comes from
    // the answer's additional section.
    assert_eq!(
        endpoints(&agent, "web").await,
        vec![(a.addr.to_string(), 3)]
    );

    // NXDOMAIN for a service Consul does not know: 404 as soon as the first answer says so
    // (not at the end of the agent's 5 s wait for an on-demand answer); then at once.
    let t = Instant::now();
    let (status, _, _) = agent.get("nope", "/").await;
    assert_eq!(status, 404);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let t = Instant::now();
    let (status, _, _) = agent.get("nope", "/").await;
    assert_eq!(status, 404);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    let t = Instant::now();
    consul.register("web", "web-b", b.addr, 1).await;
    until_served_by(&agent, "web", &["a", "b"], "consul dns: registration").await;
    assert!(t.elapsed() < PROPAGATION);

    // A failing check: Consul's DNS leaves the instance out.
    consul.check("web-a", "fail").await;
    until_served_by(&agent, "web", &["b"], "consul dns: check failed").await;
    consul.check("web-a", "pass").await;
    until_served_by(
        &agent,
        "web",
        &["a", "b"],
        "consul dns: check passing again",
    )
    .await;

    consul.deregister("web-a").await;
    until_served_by(&agent, "web", &["b"], "consul dns: deregistration").await;

    // The last instance goes: NXDOMAIN, the service is gone (404, not a stale 200 or a 503).
    consul.deregister("web-b").await;
    let t = Instant::now();
    eventually(
        PROPAGATION,
        "web gone after its last deregistration",
        || async { (agent.get("web", "/").await.0 == 404).then_some(()) },
    )
    .await;
    eprintln!(
        "lag [consul dns: last instance gone → 404]: {} ms",
        t.elapsed().as_millis()
    );

    // Re-resolved on the TTL (Consul's is 0: every min_ttl), never per request: the source
    // answers about once a second, whatever the request rate.
    const UPDATES: &str = "edge_agent_discovery_updates_total{source=\"dns\"}";
    consul.register("web", "web-a", a.addr, 1).await;
    until_served_by(&agent, "web", &["a"], "consul dns: re-registered").await;
    let (u0, t0) = (counter(&agent, UPDATES).await, Instant::now());
    let n = spread(&agent, "web", 200).await;
    assert_eq!(n.get("a"), Some(&200), "{n:?}");
    let per_second = (counter(&agent, UPDATES).await - u0) / t0.elapsed().as_secs_f64().max(1.0);
    assert!(per_second <= 3.0, "{per_second} answers/s for 200 requests");

    // Not asked for again: the on-demand watch idles out (idle_ttl=10s) and stops.
    eventually(
        Duration::from_secs(30),
        "the web watch idled out",
        || async {
            agent
                .log_text()
                .contains("dns: watch idle, stopped")
                .then_some(())
        },
    )
    .await;
    assert_eq!(dns_source(&agent).await["kind"], "dns");
}

/// SRV records from dnsmasq: lowest priority, weights, weight 0; targets' addresses from a
/// hosts file (SIGHUP), `srv-host=` edits (restart); NXDOMAIN for unknown names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnsmasq_srv_priority_weight_sighup_and_restart() {
    let _serial = SERIAL.lock().await;
    let a = Backend::start("a").await;
    // a2 answers on a's port on a second loopback address: one target, two addresses.
    let _a2 = Backend::start_at("a2", SocketAddr::from(([127, 0, 0, 2], a.addr.port()))).await;
    let (b, c) = (Backend::start("b").await, Backend::start("c").await);
    let srv = |b_weight: u16| {
        format!(
            "local=/svc.test/\n\
             srv-host=_web._tcp.svc.test,a.svc.test,{pa},1,10\n\
             srv-host=_web._tcp.svc.test,b.svc.test,{pb},1,{b_weight}\n\
             srv-host=_web._tcp.svc.test,c.svc.test,{pc},2,50\n",
            pa = a.addr.port(),
            pb = b.addr.port(),
            pc = c.addr.port(),
        )
    };
    let hosts = "127.0.0.1 a.svc.test\n127.0.0.1 b.svc.test\n127.0.0.1 c.svc.test\n";
    let mut dns = Dnsmasq::start(&srv(0), hosts).await;
    let url = format!(
        "dns://127.0.0.1:{}?name_template=_{{service}}._tcp.svc.test",
        dns.port
    );
    let agent = start_agent(&url).await;

    // Priority 1 only (c, priority 2, is a fallback the agent does not use); b has weight 0:
    // known, but takes no traffic while a takes it.
    let (status, backend, body) = agent.get("web", "/").await;
    assert_eq!((status, backend.as_str()), (200, "a"), "{body}");
    let mut want = vec![(a.addr.to_string(), 10), (b.addr.to_string(), 0)];
    want.sort();
    assert_eq!(
        endpoints(&agent, "web").await,
        want,
        "c (priority 2) left out"
    );
    let n = spread(&agent, "web", 40).await;
    assert_eq!(n.get("a"), Some(&40), "weight 0 takes no traffic: {n:?}");

    // NXDOMAIN (local=/svc.test/): 404.
    assert_eq!(agent.get("nope", "/").await.0, 404);

    // A second address for target a in the hosts file + SIGHUP: a second endpoint.
    dns.write_hosts(&format!("{hosts}127.0.0.2 a.svc.test\n"));
    dns.sighup().await;
    until_served_by(
        &agent,
        "web",
        &["a", "a2"],
        "dnsmasq: hosts edit + SIGHUP adds an address",
    )
    .await;
    // And the first address removed.
    dns.write_hosts("127.0.0.2 a.svc.test\n127.0.0.1 b.svc.test\n127.0.0.1 c.svc.test\n");
    dns.sighup().await;
    until_served_by(
        &agent,
        "web",
        &["a2"],
        "dnsmasq: hosts edit + SIGHUP removes an address",
    )
    .await;

    // srv-host= edits: b's weight 0 → 10. SIGHUP does not re-read the config file (dnsmasq(8)),
    // so dnsmasq restarts on the same port; the agent keeps its last good set meanwhile.
    let t = Instant::now();
    dns.restart(&srv(10)).await;
    until_served_by(
        &agent,
        "web",
        &["a2", "b"],
        "dnsmasq: srv-host edit + restart",
    )
    .await;
    eprintln!("dnsmasq restart + follow: {} ms", t.elapsed().as_millis());
    let n = spread(&agent, "web", 40).await;
    assert!(
        n.get("a2").is_some_and(|&x| (12..=28).contains(&x)),
        "equal weights share: {n:?}"
    );
    assert!(dns.log_text().contains("query[SRV] _web._tcp.svc.test"));
}

/// A records from dnsmasq with the port from the URL, for a service named in the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnsmasq_a_records_take_the_port_from_the_url() {
    let _serial = SERIAL.lock().await;
    let d1 = Backend::start("d1").await;
    let port = d1.addr.port();
    let d2 = Backend::start_at("d2", SocketAddr::from(([127, 0, 0, 3], port))).await;
    let mut dns = Dnsmasq::start("local=/svc.test/\n", "127.0.0.1 db.svc.test\n").await;
    let url = format!(
        "dns://127.0.0.1:{}?name=db.svc.test&type=a&port={port}&service=db",
        dns.port
    );
    let agent = start_agent(&url).await;
    until_served_by(&agent, "db", &["d1"], "dnsmasq A: first answer").await;
    dns.write_hosts("127.0.0.1 db.svc.test\n127.0.0.3 db.svc.test\n");
    dns.sighup().await;
    until_served_by(
        &agent,
        "db",
        &["d1", "d2"],
        "dnsmasq A: hosts edit + SIGHUP",
    )
    .await;
    let mut want = vec![(d1.addr.to_string(), 1), (d2.addr.to_string(), 1)];
    want.sort();
    assert_eq!(endpoints(&agent, "db").await, want);
    // The name removed from the hosts file: NXDOMAIN for both A and AAAA, the service goes.
    dns.write_hosts("");
    dns.sighup().await;
    eventually(PROPAGATION, "db gone once its name is", || async {
        (agent.get("db", "/").await.0 == 404).then_some(())
    })
    .await;
    dns.stop();
}

/// A real SERVFAIL (dnsmasq forwards the domain to a Consul whose only recursor is dead, and
/// relays Consul's SERVFAIL), then a stopped server (timeouts): the last good set keeps
/// serving, and each failed resolution is counted under `source="dns"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servfail_and_timeouts_keep_the_last_good_set() {
    let _serial = SERIAL.lock().await;
    // Nothing listens on the recursor's port: Consul's recursion fails at once → SERVFAIL.
    let dead = free_dns_port();
    let consul = Consul::start(Some(&format!(
        "recursors = [\"127.0.0.1:{dead}\"]\ndns_config {{ recursor_timeout = \"200ms\" }}"
    )))
    .await;
    let p = Backend::start("p").await;
    let good = format!(
        "local=/svc.test/\nsrv-host=_pay._tcp.svc.test,p.svc.test,{},1,1\n",
        p.addr.port()
    );
    let mut dns = Dnsmasq::start(&good, "127.0.0.1 p.svc.test\n").await;
    let url = format!(
        "dns://127.0.0.1:{}?name=_pay._tcp.svc.test&timeout=300ms&max_ttl=2s",
        dns.port
    );
    let agent = start_agent(&url).await;
    until_served_by(&agent, "pay", &["p"], "dnsmasq: pay first answer").await;

    let errors = |kind: &'static str| {
        let agent = &agent;
        async move {
            counter(
                agent,
                &format!("edge_agent_discovery_errors_total{{source=\"dns\",kind=\"{kind}\"}}"),
            )
            .await
        }
    };
    let before = errors("status").await;
    dns.restart(&format!("server=/svc.test/127.0.0.1#{}\n", consul.dns))
        .await;
    eventually(
        PROPAGATION,
        "SERVFAIL counted as a dns status error",
        || async {
            let err = dns_source(&agent).await["last_error"]
                .as_str()
                .unwrap_or("")
                .to_string();
            (errors("status").await >= before + 2.0 && err.contains("SERVFAIL")).then_some(())
        },
    )
    .await;
    assert!(
        dns.log_text().contains("reply error is SERVFAIL"),
        "dnsmasq relayed a SERVFAIL:\n{}",
        dns.log_text()
    );
    // The last good set keeps serving through several re-resolve intervals.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let (status, backend, body) = agent.get("pay", "/").await;
        assert_eq!((status, backend.as_str()), (200, "p"), "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The server gone altogether: timeouts, counted, and still the last good set.
    dns.stop();
    let before = errors("timeout").await;
    eventually(
        PROPAGATION,
        "timeouts counted as dns timeout errors",
        || async { (errors("timeout").await >= before + 2.0).then_some(()) },
    )
    .await;
    let (status, backend, _) = agent.get("pay", "/").await;
    assert_eq!((status, backend.as_str()), (200, "p"));

    // Back: answers again.
    dns.restart(&good).await;
    let p2 = Backend::start("p2").await;
    let with_p2 = format!(
        "{good}srv-host=_pay._tcp.svc.test,p.svc.test,{},1,1\n",
        p2.addr.port()
    );
    dns.restart(&with_p2).await;
    until_served_by(
        &agent,
        "pay",
        &["p", "p2"],
        "dnsmasq: answering again after the outage",
    )
    .await;
}
