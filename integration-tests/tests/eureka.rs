//! The Eureka adapter against a real Eureka server (Spring Cloud Netflix, see
//! `integration-tests/servers/eureka/README.md`), driving the built agent from outside.
//!
//! Eureka takes 25–40 s to start here, so one server is shared by the tests of this binary (kept
//! in a static; its start script's `EUREKA_PARENT_PID` watchdog stops it when this process
//! exits), and a second one is started only for the outage and failover scenario. The tests take
//! a lock so they never run at the same time: the propagation figures are not skewed by the other
//! test's load, and a change made by one cannot explain (or hide) a hash mismatch in the other.
//! Each scenario uses its own app names. Every wait is a poll with a deadline.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration_tests::servers::{install, ServerProcess};
use integration_tests::{client, eventually, free_port, spread, Agent, Backend};
use serde_json::json;
use tokio::sync::{Mutex, OnceCell};

/// How long a change stays in the shared server's `/apps/delta`: long enough that a 500 ms
/// fetch loop on a loaded machine sees every change in a delta, short enough that the forced
/// mismatch scenario waits only a few seconds.
const DELTA_RETENTION_MS: u64 = 5000;
/// The agent's fetch interval in these tests.
const INTERVAL: &str = "500ms";
const INTERVAL_D: Duration = Duration::from_millis(500);
/// Deadline for the server to answer `/eureka/apps` (it takes 25–40 s on this machine).
const SERVER_START: Duration = Duration::from_secs(180);
/// Deadline for a registry change to show in the agent.
const PROPAGATION: Duration = Duration::from_secs(15);

/// Serialises the tests of this binary.
static SERIAL: Mutex<()> = Mutex::const_new(());
/// The shared server: (process, port). Never dropped; the start script's watchdog stops it.
static SHARED: OnceCell<(ServerProcess, u16)> = OnceCell::const_new();

/// Starts a Eureka server (not waiting for it).
fn spawn_server(retention_ms: u64) -> (ServerProcess, u16) {
    let jar = install("eureka");
    let port = free_port();
    let proc = ServerProcess::start(
        "eureka",
        &[
            ("EUREKA_PORT", port.to_string()),
            ("EUREKA_JAR", jar.display().to_string()),
            ("EUREKA_DELTA_RETENTION_MS", retention_ms.to_string()),
            ("EUREKA_PARENT_PID", std::process::id().to_string()),
        ],
    );
    (proc, port)
}

async fn wait_server(proc: &mut ServerProcess, port: u16) {
    let url = format!("http://127.0.0.1:{port}/eureka/apps");
    proc.wait_ready(&url, SERVER_START, |body| body.contains("applications"))
        .await;
}

/// The shared server's port, starting it on first use.
async fn shared_port() -> u16 {
    SHARED
        .get_or_init(|| async {
            let (mut proc, port) = spawn_server(DELTA_RETENTION_MS);
            wait_server(&mut proc, port).await;
            (proc, port)
        })
        .await
        .1
}

/// Eureka's REST API on one server.
struct Eureka {
    base: String,
}

impl Eureka {
    fn new(port: u16) -> Self {
        Eureka {
            base: format!("http://127.0.0.1:{port}/eureka"),
        }
    }

    async fn register_with(
        &self,
        app: &str,
        id: &str,
        addr: SocketAddr,
        status: &str,
        meta: &[(&str, &str)],
    ) {
        let metadata: serde_json::Map<String, serde_json::Value> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let body = json!({"instance": {
            "instanceId": id,
            "hostName": addr.ip().to_string(),
            "app": app,
            "ipAddr": addr.ip().to_string(),
            "vipAddress": app.to_lowercase(),
            "status": status,
            "port": {"$": addr.port(), "@enabled": "true"},
            "securePort": {"$": 443, "@enabled": "false"},
            "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"},
            "leaseInfo": {"renewalIntervalInSecs": 30, "durationInSecs": 900},
            "metadata": metadata,
        }});
        let r = client()
            .post(format!("{}/apps/{app}", self.base))
            .json(&body)
            .send()
            .await
            .expect("register");
        assert_eq!(
            r.status().as_u16(),
            204,
            "register {app}/{id}: {:?}",
            r.text().await
        );
    }

    async fn register(&self, app: &str, id: &str, addr: SocketAddr, meta: &[(&str, &str)]) {
        self.register_with(app, id, addr, "UP", meta).await
    }

    async fn set_status(&self, app: &str, id: &str, status: &str) {
        let r = client()
            .put(format!(
                "{}/apps/{app}/{id}/status?value={status}",
                self.base
            ))
            .send()
            .await
            .expect("status override");
        assert_eq!(r.status().as_u16(), 200, "override {app}/{id} {status}");
    }

    /// Removes a status override, back to UP (without `value=UP` Eureka sets UNKNOWN).
    async fn clear_status(&self, app: &str, id: &str) {
        let r = client()
            .delete(format!("{}/apps/{app}/{id}/status?value=UP", self.base))
            .send()
            .await
            .expect("remove override");
        assert_eq!(r.status().as_u16(), 200, "remove override {app}/{id}");
    }

    async fn cancel(&self, app: &str, id: &str) {
        let r = client()
            .delete(format!("{}/apps/{app}/{id}", self.base))
            .send()
            .await
            .expect("cancel");
        assert_eq!(r.status().as_u16(), 200, "cancel {app}/{id}");
    }

    /// `GET path` as JSON: (body text, size in bytes).
    async fn get(&self, path: &str) -> String {
        client()
            .get(format!("{}{path}", self.base))
            .header("accept", "application/json")
            .send()
            .await
            .expect("eureka GET")
            .text()
            .await
            .unwrap()
    }
}

fn agent_env(registry: &str) -> Vec<(&'static str, String)> {
    vec![
        ("EDGE_AGENT_REGISTRY", registry.to_string()),
        (
            "RUST_LOG",
            "info,edge_agent=debug,discovery=debug".to_string(),
        ),
        // Plain text, so the log can be searched by field (`log` strips colours anyway).
        ("NO_COLOR", "1".to_string()),
    ]
}

/// The agent's log without ANSI colour sequences.
fn agent_log(agent: &Agent) -> String {
    let raw = agent.log_text();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

async fn start_agent(registry: &str) -> Agent {
    let env = agent_env(registry);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Agent::start(&env).await
}

fn lines_with(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// Waits until `host` is served by exactly the backends named in `want` (sorted), checked over
/// enough requests to see every endpoint of a round-robin several times.
async fn wait_served_by(agent: &Agent, host: &str, want: &[&str], what: &str) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    eventually(PROPAGATION, what, || {
        let want = want.clone();
        async move {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..(want.len() * 8).max(8) {
                let (status, backend, _) = agent.get(host, "/").await;
                if status != 200 {
                    return None;
                }
                seen.insert(backend);
            }
            (seen.into_iter().collect::<Vec<_>>() == want).then_some(())
        }
    })
    .await;
}

/// `n` requests to `host` all answered 200 by `backend`.
async fn assert_all_served_by(agent: &Agent, host: &str, backend: &str, n: usize, what: &str) {
    for i in 0..n {
        let (status, b, body) = agent.get(host, "/").await;
        assert_eq!(
            (status, b.as_str()),
            (200, backend),
            "{what}: request #{i}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eureka_routing_deltas_and_failover() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    // The failover server starts now, in the background, while the shared one is used.
    let (mut second, second_port) = spawn_server(30_000);
    let port = shared_port().await;
    let eu = Eureka::new(port);
    let registry = format!("eureka://127.0.0.1:{port}/eureka?interval={INTERVAL}");

    // --- UP gets traffic; OUT_OF_SERVICE stops it; override removal restores; cancel stops.
    let r1 = Backend::start("r1").await;
    let r2 = Backend::start("r2").await;
    eu.register("EU-ROUTE", "eu-route-r1", r1.addr, &[]).await;
    eu.register("EU-ROUTE", "eu-route-r2", r2.addr, &[]).await;
    let agent = start_agent(&registry).await;
    wait_served_by(
        &agent,
        "eu-route",
        &["r1", "r2"],
        "both UP instances of EU-ROUTE carry traffic",
    )
    .await;

    eu.set_status("EU-ROUTE", "eu-route-r1", "OUT_OF_SERVICE")
        .await;
    let r2_only = vec![r2.addr.to_string()];
    eventually(
        PROPAGATION,
        "r1 OUT_OF_SERVICE leaves the healthy set",
        || async { (agent.healthy_endpoints("eu-route").await == r2_only).then_some(()) },
    )
    .await;
    assert_all_served_by(&agent, "eu-route", "r2", 40, "r1 is OUT_OF_SERVICE").await;

    eu.clear_status("EU-ROUTE", "eu-route-r1").await;
    wait_served_by(
        &agent,
        "eu-route",
        &["r1", "r2"],
        "r1 back UP after the override is removed",
    )
    .await;

    eu.cancel("EU-ROUTE", "eu-route-r1").await;
    eventually(PROPAGATION, "cancelled r1 leaves the set", || async {
        let u = agent.upstreams().await;
        let eps = u["upstreams"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| x["id"] == "eu-route")
            .flat_map(|x| x["endpoints"].as_array().cloned().unwrap_or_default())
            .count();
        (eps == 1).then_some(())
    })
    .await;
    assert_all_served_by(&agent, "eu-route", "r2", 40, "r1 is cancelled").await;

    // Those changes came through deltas, not full fetches.
    let log = agent_log(&agent);
    let deltas_with_changes = log
        .lines()
        .filter(|l| l.contains("eureka delta applied") && !l.contains("changes=0"))
        .count();
    assert!(
        deltas_with_changes >= 3,
        "expected the override, its removal and the cancel to arrive as deltas; log:\n{log}"
    );
    let full_fetches = lines_with(&log, "eureka full fetch");
    assert_eq!(
        full_fetches, 1,
        "only the start should need a full fetch; log:\n{log}"
    );

    // --- Metadata weight: 3:1 over 400 requests within ±10 %.
    let w3 = Backend::start("w3").await;
    let w1 = Backend::start("w1").await;
    eu.register("EU-WEIGHT", "eu-weight-3", w3.addr, &[("weight", "3")])
        .await;
    eu.register("EU-WEIGHT", "eu-weight-1", w1.addr, &[("weight", "1")])
        .await;
    wait_served_by(
        &agent,
        "eu-weight",
        &["w1", "w3"],
        "both weighted instances routable",
    )
    .await;
    let counts = spread(&agent, "eu-weight", 400).await;
    let heavy = counts.get("w3").copied().unwrap_or(0);
    assert!(
        (270..=330).contains(&heavy) && heavy + counts.get("w1").copied().unwrap_or(0) == 400,
        "weight 3:1 should give w3 300±30 of 400: {counts:?}"
    );

    // --- A change the delta cannot explain: the agent is frozen until the registration has left
    // the delta window, so the next delta omits it while its hash counts it.
    let r3 = Backend::start("r3").await;
    let mismatches_before = lines_with(&agent_log(&agent), "eureka delta hash mismatch");
    agent.signal(nix::sys::signal::Signal::SIGSTOP);
    eu.register("EU-ROUTE", "eu-route-r3", r3.addr, &[]).await;
    // Seen in the delta first (so the wait below is for it to leave), then gone from it.
    let stopped = Instant::now();
    eventually(PROPAGATION, "r3 in the server's delta", || async {
        eu.get("/apps/delta")
            .await
            .contains("eu-route-r3")
            .then_some(())
    })
    .await;
    eventually(
        Duration::from_millis(DELTA_RETENTION_MS) + PROPAGATION,
        "r3 to leave the server's delta window",
        || async { (!eu.get("/apps/delta").await.contains("eu-route-r3")).then_some(()) },
    )
    .await;
    agent.signal(nix::sys::signal::Signal::SIGCONT);
    eprintln!("agent frozen for {:?}", stopped.elapsed());
    wait_served_by(
        &agent,
        "eu-route",
        &["r2", "r3"],
        "r3, missing from every delta, arrives by a full fetch",
    )
    .await;
    let log = agent_log(&agent);
    assert!(
        lines_with(&log, "eureka delta hash mismatch") > mismatches_before
            && log
                .lines()
                .any(|l| l.contains("eureka full fetch") && l.contains("hash mismatch")),
        "expected a hash mismatch followed by a full fetch; log:\n{log}"
    );
    drop(agent);

    // --- Outage and failover. The second server is the primary of both agents (so it can be
    // stopped); `p` has only it, `q` falls back to the shared one.
    wait_server(&mut second, second_port).await;
    let eu2 = Eureka::new(second_port);
    let f1 = Backend::start("f1").await;
    let f2 = Backend::start("f2").await;
    eu2.register("EU-FAIL", "eu-fail-1", f1.addr, &[]).await;
    eu.register("EU-FAIL", "eu-fail-2", f2.addr, &[]).await;
    let p = start_agent(&format!(
        "eureka://127.0.0.1:{second_port}/eureka?interval={INTERVAL}"
    ))
    .await;
    let q = start_agent(&format!(
        "eureka://127.0.0.1:{second_port}/eureka?server=127.0.0.1:{port}/eureka&interval={INTERVAL}&timeout=2s"
    ))
    .await;
    wait_served_by(&p, "eu-fail", &["f1"], "agent p on the second server").await;
    wait_served_by(&q, "eu-fail", &["f1"], "agent q on the second server").await;
    second.stop();
    eventually(
        PROPAGATION,
        "agent p reports the outage as a connect error",
        || async {
            let m = p.metrics().await;
            m.lines()
                .any(|l| {
                    l.starts_with("edge_agent_discovery_errors_total")
                        && l.contains("kind=\"connect\"")
                        && !l.ends_with(" 0")
                })
                .then_some(())
        },
    )
    .await;
    // Several intervals later the last good set still serves.
    let outage = Instant::now();
    while outage.elapsed() < INTERVAL_D * 4 {
        assert_all_served_by(&p, "eu-fail", "f1", 5, "registry down: last good set").await;
    }
    wait_served_by(
        &q,
        "eu-fail",
        &["f2"],
        "agent q fails over to the shared server",
    )
    .await;
    let qlog = agent_log(&q);
    assert!(
        qlog.lines()
            .any(|l| l.contains("eureka full fetch")
                && l.contains(&format!("127.0.0.1:{port}/eureka"))),
        "q should have done a full fetch from the failover server; log:\n{qlog}"
    );
    for (app, id) in [
        ("EU-ROUTE", "eu-route-r2"),
        ("EU-ROUTE", "eu-route-r3"),
        ("EU-WEIGHT", "eu-weight-3"),
        ("EU-WEIGHT", "eu-weight-1"),
        ("EU-FAIL", "eu-fail-2"),
    ] {
        eu.cancel(app, id).await;
    }
    eprintln!(
        "eureka_routing_deltas_and_failover: {:?} (server start included)",
        started.elapsed()
    );
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// A delay spreading change `i` over the fetch interval (a fixed sequence, so runs compare).
fn phase(i: usize, salt: usize) -> Duration {
    INTERVAL_D.mul_f64(((i * 7 + salt * 3) % 10) as f64 / 10.0)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eureka_propagation_lag() {
    const CHANGES: usize = 30;
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let port = shared_port().await;
    let eu = Eureka::new(port);
    let base = Backend::start("base").await;
    let new = Backend::start("new").await;
    eu.register("EU-LAG", "eu-lag-base", base.addr, &[]).await;
    let agent = start_agent(&format!(
        "eureka://127.0.0.1:{port}/eureka?interval={INTERVAL}"
    ))
    .await;
    wait_served_by(&agent, "eu-lag", &["base"], "EU-LAG base instance routable").await;
    let new_addr = new.addr.to_string();

    let mut up = Vec::with_capacity(CHANGES);
    let mut down = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES {
        let id = format!("eu-lag-new-{i}");
        // Each change lands at a different phase of the agent's fetch interval (otherwise the
        // loop locks onto "just after a fetch" and measures only the worst case).
        tokio::time::sleep(phase(i, 0)).await;
        // Register → first request served by the new instance.
        let t0 = Instant::now();
        eu.register("EU-LAG", &id, new.addr, &[]).await;
        loop {
            let (status, b, body) = agent.get("eu-lag", "/").await;
            assert_eq!(status, 200, "{body}");
            if b == "new" {
                up.push(t0.elapsed());
                break;
            }
            assert!(
                t0.elapsed() < PROPAGATION,
                "change {i}: the new instance never got traffic"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Cancel → last request served by it (requests after the agent dropped it from its
        // table cannot reach it, so the loop stops there).
        tokio::time::sleep(phase(i, 1)).await;
        let t0 = Instant::now();
        eu.cancel("EU-LAG", &id).await;
        let mut last = Duration::ZERO;
        // Ask the admin API every fourth request (it costs more than a request).
        let mut until_check = 4u32;
        loop {
            let (status, b, body) = agent.get("eu-lag", "/").await;
            assert_eq!(status, 200, "{body}");
            if b == "new" {
                last = t0.elapsed();
            }
            until_check -= 1;
            if until_check == 0 {
                until_check = 4;
            }
            if until_check == 4 && !agent.healthy_endpoints("eu-lag").await.contains(&new_addr) {
                let (_, b, _) = agent.get("eu-lag", "/").await;
                assert_eq!(
                    b, "base",
                    "change {i}: the cancelled instance still served after it left the table"
                );
                break;
            }
            assert!(
                t0.elapsed() < PROPAGATION,
                "change {i}: the cancelled instance kept traffic"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        down.push(last);
    }
    up.sort();
    down.sort();

    // Bytes per interval with nothing changing: 20 more instances, then wait for the delta
    // window to empty, then fetch what the agent fetches.
    let filler = Backend::start("filler").await;
    for i in 0..20 {
        eu.register(
            "EU-BYTES",
            &format!("eu-bytes-{i}"),
            filler.addr,
            &[("weight", "1"), ("zone", "z1")],
        )
        .await;
    }
    let empty_delta = eventually(
        Duration::from_millis(DELTA_RETENTION_MS) + PROPAGATION,
        "an empty delta (no change within the retention window)",
        || async {
            let d = eu.get("/apps/delta").await;
            d.contains("\"application\":[]").then_some(d)
        },
    )
    .await;
    let full = eu.get("/apps").await;
    // The agent's own count for an unchanged delta, from its log.
    let unchanged = |log: &str| -> Vec<usize> {
        log.lines()
            .filter(|l| l.contains("eureka delta applied") && l.contains("changes=0"))
            .filter_map(|l| l.split("bytes=").nth(1)?.split(' ').next()?.parse().ok())
            .collect()
    };
    let before = unchanged(&agent_log(&agent)).len();
    let agent_delta_bytes = eventually(
        PROPAGATION,
        "the agent to fetch an unchanged delta",
        || async {
            let seen = unchanged(&agent_log(&agent));
            (seen.len() > before).then(|| *seen.last().unwrap())
        },
    )
    .await;
    let instances = full.matches("\"instanceId\"").count();

    let interval = INTERVAL_D;
    println!(
        "eureka propagation (interval {INTERVAL}, {CHANGES} changes): register→first request p50 {} p99 {} max {}; cancel→last request p50 {} p99 {} max {}",
        ms(percentile(&up, 50)),
        ms(percentile(&up, 99)),
        ms(*up.last().unwrap()),
        ms(percentile(&down, 50)),
        ms(percentile(&down, 99)),
        ms(*down.last().unwrap()),
    );
    println!(
        "eureka bytes per interval with no change ({instances} instances registered): delta {} B (agent logged {} B), full {} B",
        empty_delta.len(),
        agent_delta_bytes,
        full.len()
    );
    let bound = interval + Duration::from_secs(1);
    assert!(
        percentile(&up, 99) < bound,
        "register p99 {:?} ≥ {bound:?}: {up:?}",
        percentile(&up, 99)
    );
    assert!(
        percentile(&down, 99) < bound,
        "cancel p99 {:?} ≥ {bound:?}: {down:?}",
        percentile(&down, 99)
    );
    assert!(
        empty_delta.len() * 5 < full.len(),
        "an empty delta should be far smaller than the full registry"
    );
    eu.cancel("EU-LAG", "eu-lag-base").await;
    for i in 0..20 {
        eu.cancel("EU-BYTES", &format!("eu-bytes-{i}")).await;
    }
    eprintln!("eureka_propagation_lag: {:?}", started.elapsed());
}

/// #17: a SIGSTOPped Eureka (a fetch loop would only see its own timeouts, at its interval)
/// is seen within seconds by the liveness call, and traffic keeps flowing from the last good
/// view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_eureka_is_seen_within_seconds() {
    let _serial = SERIAL.lock().await;
    let port = shared_port().await;
    let eu = Eureka::new(port);
    let a = Backend::start("hung-a").await;
    eu.register("EU-HUNG", "eu-hung-a", a.addr, &[]).await;
    let agent = start_agent(&format!(
        "eureka://127.0.0.1:{port}/eureka?interval={INTERVAL}"
    ))
    .await;
    wait_served_by(&agent, "eu-hung", &["hung-a"], "the UP instance").await;
    let pid = SHARED
        .get()
        .expect("the shared server")
        .0
        .pid()
        .expect("eureka runs");
    let (down, up) =
        integration_tests::a_hung_registry_is_seen(&agent, pid, "eureka", "eu-hung").await;
    eprintln!("eureka SIGSTOP: source_up 0 after {down:?}; 1 again {up:?} after SIGCONT");
    eu.cancel("EU-HUNG", "eu-hung-a").await;
}

/// #17, the first request for a name registered a moment ago: with a long poll interval (30 s,
/// the Java client's), the agent asks Eureka for that app at once instead of answering 404
/// until the next poll; a name nobody registers is still a quick 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_request_for_a_just_registered_name_asks_eureka() {
    let _serial = SERIAL.lock().await;
    let port = shared_port().await;
    let eu = Eureka::new(port);
    let agent = start_agent(&format!("eureka://127.0.0.1:{port}/eureka?interval=30s")).await;
    // The first poll has answered (the agent is ready); now a new app registers.
    let a = Backend::start("first-a").await;
    eu.register("EU-FIRST", "eu-first-a", a.addr, &[]).await;
    let t = Instant::now();
    let (status, backend, body) = agent.get("eu-first", "/").await;
    let took = t.elapsed();
    assert_eq!((status, backend.as_str()), (200, "first-a"), "{body}");
    // Unknown: a 404, soon (one lookup, not the 5 s on-demand wait).
    let t = Instant::now();
    let (status, _, _) = agent.get("eu-nobody", "/").await;
    let not_found = t.elapsed();
    assert_eq!(status, 404);
    // Asked again at once: rate-limited per name, still 404 without another lookup.
    let t = Instant::now();
    assert_eq!(agent.get("eu-nobody", "/").await.0, 404);
    let again = t.elapsed();
    eprintln!(
        "eureka first request (interval 30 s): 200 after {took:?}; unknown name 404 after {not_found:?}, again after {again:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(not_found < Duration::from_secs(3), "{not_found:?}");
    assert!(again < Duration::from_millis(500), "{again:?}");
    eu.cancel("EU-FIRST", "eu-first-a").await;
}

/// #14 on Eureka: instances with metadata `version` and `zone`. A route's `subset_from_header`
/// sends `x-version: v2` to the v2 instance (the canary), requests without the header to the
/// upstream's subset (v1), and an unknown value follows `fallback` (`none`: 503 naming it); a
/// zone-aware upstream reads the zone from metadata. Taking the canary out of service leaves
/// its subset empty: 503, while the default traffic goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_by_header_and_zones_from_metadata() {
    use integration_tests::subsets::{
        answered_by, config_file, endpoint, until_only, until_status,
    };
    let _serial = SERIAL.lock().await;
    let port = shared_port().await;
    let eu = Eureka::new(port);
    let v1a = Backend::start("v1-a").await;
    let v1b = Backend::start("v1-b").await;
    let v2a = Backend::start("v2-a").await;
    let app = "EU-CANARY";
    eu.register(
        app,
        "eu-canary-v1a",
        v1a.addr,
        &[("version", "v1"), ("zone", "a")],
    )
    .await;
    eu.register(
        app,
        "eu-canary-v1b",
        v1b.addr,
        &[("version", "v1"), ("zone", "b")],
    )
    .await;
    eu.register(
        app,
        "eu-canary-v2a",
        v2a.addr,
        &[("version", "v2"), ("zone", "a")],
    )
    .await;
    let (_dir, cfg) = config_file(
        r#"
[[upstream]]
id = "canary"
service = "eu-canary"
subset = { version = "v1" }

[[upstream]]
id = "canary-near"
service = "eu-canary"
zone_aware = "prefer"

[[route]]
host = "canary"
upstream = "canary"
subset_from_header = { header = "x-version", key = "version" }

[[route]]
host = "canary-near"
upstream = "canary-near"
"#,
    );
    let mut env = agent_env(&format!(
        "eureka://127.0.0.1:{port}/eureka?interval={INTERVAL}"
    ));
    env.push(("EDGE_AGENT_CONFIG", cfg.display().to_string()));
    env.push(("EDGE_AGENT_ZONE", "a".to_string()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let agent = Agent::start(&env).await;

    let v2 = [("x-version", "v2")];
    until_only(&agent, "canary", &[], &["v1-a", "v1-b"], PROPAGATION).await;
    until_only(&agent, "canary", &v2, &["v2-a"], PROPAGATION).await;
    let c = answered_by(&agent, "canary", &v2, 30).await;
    assert_eq!(c.get("v2-a"), Some(&30), "{c:?}");
    let c = answered_by(&agent, "canary", &[("x-version", "v1")], 30).await;
    assert_eq!(c.get("v2-a"), None, "{c:?}");
    let (status, _, body) =
        integration_tests::subsets::get_with(&agent, "canary", &[("x-version", "v9")]).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("subset version=v9"), "{body}");

    // Zones from metadata: the local zone a (v1-a, v2-a) takes everything.
    until_only(&agent, "canary-near", &[], &["v1-a", "v2-a"], PROPAGATION).await;
    let u = agent.upstreams().await;
    for (b, zone) in [(&v1a, "a"), (&v1b, "b"), (&v2a, "a")] {
        let e = endpoint(&u, "canary-near", &b.addr.to_string()).expect("listed");
        assert_eq!(e["zone"], zone, "{e}");
    }

    // The canary out of service: its subset is empty, and `fallback = "none"` says so.
    eu.set_status(app, "eu-canary-v2a", "OUT_OF_SERVICE").await;
    let body = until_status(&agent, "canary", &v2, 503, PROPAGATION).await;
    assert!(body.contains("subset version=v2"), "{body}");
    let c = answered_by(&agent, "canary", &[], 20).await;
    assert_eq!(c.values().sum::<usize>(), 20, "{c:?}");
    assert_eq!(c.get("v2-a"), None, "{c:?}");
    for id in ["eu-canary-v1a", "eu-canary-v1b", "eu-canary-v2a"] {
        eu.cancel(app, id).await;
    }
}

/// #17, the resync reads Eureka the way its poll does: in steady state the direct reads agree
/// with the fetched view, so three resync rounds correct nothing (a mapping that differed would
/// "correct", and flap, every round).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resync_agrees_with_the_poll_in_steady_state() {
    let _serial = SERIAL.lock().await;
    let port = shared_port().await;
    let eu = Eureka::new(port);
    let a = Backend::start("resync-a").await;
    eu.register(
        "EU-RESYNC",
        "eu-resync-a",
        a.addr,
        &[("zone", "z1"), ("weight", "3")],
    )
    .await;
    let mut env = agent_env(&format!(
        "eureka://127.0.0.1:{port}/eureka?interval={INTERVAL}"
    ));
    env.push(("EDGE_AGENT_RESYNC_INTERVAL", "1s".to_string()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let agent = Agent::start(&env).await;
    wait_served_by(&agent, "eu-resync", &["resync-a"], "the UP instance").await;
    let rounds = eventually(Duration::from_secs(15), "three resync rounds", || async {
        // Each round read the one service Eureka has (not zero: a read the source lacks).
        let n = agent_log(&agent)
            .lines()
            .filter(|l| {
                l.contains("resync: reading every watched service again")
                    && l.contains("services=1")
            })
            .count();
        (n >= 3).then_some(n)
    })
    .await;
    let m = agent.metrics().await;
    assert!(
        !m.contains("edge_agent_discovery_resync_corrections_total{source=\"eureka\"}"),
        "{rounds} resync rounds corrected a view the poll had right:\n{m}"
    );
    eu.cancel("EU-RESYNC", "eu-resync-a").await;
}
