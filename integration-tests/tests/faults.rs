//! The fault suite (issue #5): what clients see while a registry misbehaves.
//!
//! Three real backends on loopback, the built agent pointed at a registry, a paced load of
//! [`RATE`] requests per second through the agent; a fault is switched on mid-load and every
//! client-visible error (transport error, non-200, or an answer from something other than the
//! three backends) is counted. Registry faults come from the hand-written fake in
//! `integration_tests::fake_registry` (Eureka- and Consul-shaped) and from the file registry
//! (garbage, truncated, deleted file). Expected: zero errors for every fault; for `Empty`, with
//! the removal guard on and a long confirm window, zero while the update is held. Also: one of
//! three backends killed mid-load (< 0.1 % errors, from GET retries and passive ejection), and an
//! agent restarted while its registry is down (it serves from the disk snapshot).
//!
//! Each fault must be *seen* by the agent during its phase (an error counted, an update held,
//! or the fake having served it), or the phase is extended; a phase that never sees its fault
//! fails instead of passing vacuously. Scenarios run one at a time (they share two cores with
//! the rest of CI); each prints its rows of the table. Run with
//! `cargo test -p integration-tests --test faults -- --nocapture`.
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use integration_tests::fake_registry::{FakeRegistry, Fault};
use integration_tests::{eventually, write_services, Agent};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

/// Requests per second of the steady load.
const RATE: u64 = 200;
/// Load per phase.
const PHASE: Duration = Duration::from_secs(3);
/// Extra load, in chunks, while a phase has not yet seen its fault.
const EXTEND: Duration = Duration::from_secs(1);
const MAX_EXTENDS: u32 = 6;
/// Time after the load starts at which the fault is switched on.
const SWITCH_AFTER: Duration = Duration::from_millis(300);
/// Deadline for the agent to be back on a healthy registry after a fault.
const RECOVERY: Duration = Duration::from_secs(20);
/// Per-request client timeout (a healthy request takes milliseconds).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The service every scenario routes to.
const SVC: &str = "svc";
/// Guard settings for the registry scenarios: on, and nothing confirms a held update within
/// the test (so `Empty` is held for its whole phase).
const GUARD_TOML: &str = "[guard]\nconfirm_window = \"10m\"\nconfirm_answers = 100000\n";

/// One scenario at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// A backend that can be killed outright: its listener and every open connection go at once
/// (the harness's `Backend::stop` leaves pooled connections serving).
struct Killable {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Killable {
    async fn start(name: &'static str) -> Killable {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("x-backend", name)
                                .body(Full::new(Bytes::from(format!("{name} {}", req.uri()))))
                                .unwrap(),
                        )
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Killable { addr, task }
    }

    /// Closes the listener and every connection (dropping the task drops its `JoinSet`).
    fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const NAMES: [&str; 3] = ["b1", "b2", "b3"];

async fn three_backends() -> Vec<Killable> {
    let mut v = Vec::new();
    for n in NAMES {
        v.push(Killable::start(n).await);
    }
    v
}

#[derive(Debug, Default, Clone)]
struct Tally {
    requests: u64,
    errors: u64,
    /// First few errors, for the failure message.
    samples: Vec<String>,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.requests += o.requests;
        self.errors += o.errors;
        for s in &o.samples {
            if self.samples.len() < 5 {
                self.samples.push(s.clone());
            }
        }
    }
}

/// A paced load of `RATE` GETs per second for `dur` (bounded: `dur * RATE` requests), each
/// checked to come back 200 from one of the three backends.
async fn load(proxy: SocketAddr, dur: Duration) -> Tally {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .unwrap();
    let n = dur.as_millis() as u64 * RATE / 1000;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut handles = Vec::with_capacity(n as usize);
    for i in 0..n {
        tick.tick().await;
        let c = client.clone();
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
                    if status == 200 && NAMES.contains(&backend.as_str()) {
                        None
                    } else {
                        Some(format!("{status} {backend:?}: {body:.120}"))
                    }
                }
                Err(e) => Some(format!("transport: {e}")),
            }
        }));
    }
    let mut t = Tally::default();
    for h in handles {
        t.requests += 1;
        if let Some(e) = h.await.unwrap() {
            t.errors += 1;
            if t.samples.len() < 5 {
                t.samples.push(e);
            }
        }
    }
    t
}

/// Sum of a Prometheus counter over its labels.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn counters(agent: &Agent) -> (f64, f64) {
    let m = agent.metrics().await;
    (
        metric_sum(&m, "edge_agent_discovery_errors_total"),
        metric_sum(&m, "edge_agent_discovery_held_total"),
    )
}

/// Runs one phase: load starts, `switch` turns the fault on after [`SWITCH_AFTER`], load runs
/// [`PHASE`] and is extended until `seen` reports the agent met the fault.
async fn phase<S, F, Fut>(agent: &Agent, switch: S, mut seen: F) -> Tally
where
    S: FnOnce(),
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let proxy = agent.proxy;
    let first = tokio::spawn(load(proxy, PHASE));
    tokio::time::sleep(SWITCH_AFTER).await;
    switch();
    let mut t = first.await.unwrap();
    let mut extends = 0;
    while !seen().await {
        extends += 1;
        assert!(
            extends <= MAX_EXTENDS,
            "the agent never met the fault within {:?}",
            PHASE + EXTEND * MAX_EXTENDS
        );
        t.add(&load(proxy, EXTEND).await);
    }
    t
}

/// A change that breaks the file registry's file.
type FileFault = Box<dyn Fn() + Send>;

/// Rows of the printed table: (registry, fault, tally, expectation).
type Rows = Vec<(String, String, Tally)>;

fn print_rows(rows: &Rows) {
    eprintln!("\n| registry | fault | client errors / requests |\n|---|---|---|");
    for (reg, fault, t) in rows {
        eprintln!("| {reg} | {fault} | {} / {} |", t.errors, t.requests);
    }
}

fn assert_rows(rows: &Rows) {
    print_rows(rows);
    for (reg, fault, t) in rows {
        assert!(t.requests > 0, "{reg} {fault}: no load");
        assert_eq!(
            t.errors, 0,
            "{reg} {fault}: {} errors of {}: {:?}",
            t.errors, t.requests, t.samples
        );
    }
}

async fn all_three_serve(agent: &Agent) {
    eventually(Duration::from_secs(15), "svc to serve", || async {
        let c = reqwest::Client::builder().no_proxy().build().unwrap();
        let r = c
            .get(agent.url("/"))
            .header("host", SVC)
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(15),
        "three healthy endpoints",
        || async { (agent.healthy_endpoints(SVC).await.len() == 3).then_some(()) },
    )
    .await;
}

/// The fault phases one registry kind goes through, in order (`Empty` last: it leaves an update
/// held).
async fn registry_faults(kind: &'static str, faults: &[Fault]) -> Rows {
    let backends = three_backends().await;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let fake = Arc::new(FakeRegistry::start(&[(SVC, &addrs)]).await);
    let url = match kind {
        "eureka" => fake.eureka_url("interval=200ms&timeout=500ms"),
        _ => fake.consul_url("wait=1s"),
    };
    // Healthy answers, by the endpoint the agent polls for instances.
    let (inst_kind, full_kind) = match kind {
        "eureka" => ("eureka-delta", "eureka-apps"),
        _ => ("consul-health", "consul-health"),
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, GUARD_TOML).unwrap();
    let agent = Agent::start(&[
        ("EDGE_AGENT_REGISTRY", &url),
        ("EDGE_AGENT_CONFIG", cfg.to_str().unwrap()),
        ("EDGE_AGENT_REMOVAL_GUARD", "on"),
    ])
    .await;
    all_three_serve(&agent).await;

    let mut rows = Rows::new();
    for &fault in faults {
        let (errs0, held0) = counters(&agent).await;
        let f2 = fake.clone();
        let t = phase(
            &agent,
            || f2.set_fault(fault),
            || {
                let (agent, fake) = (&agent, &fake);
                async move {
                    let (errs, held) = counters(agent).await;
                    let served = fake.served();
                    match fault {
                        Fault::Healthy => served.get(inst_kind, Fault::Healthy) > 0,
                        Fault::Empty => held > held0,
                        Fault::Hang => served.get(full_kind, Fault::Hang) > 0,
                        Fault::IndexBackwards => served.get(inst_kind, fault) >= 2,
                        _ => errs > errs0,
                    }
                }
            },
        )
        .await;
        let (_, held1) = counters(&agent).await;
        if fault != Fault::Empty {
            // A fault must not even look like a mass removal.
            assert_eq!(held1, held0, "{kind} {}: an update was held", fault.name());
            let ep = agent.healthy_endpoints(SVC).await;
            assert_eq!(ep.len(), 3, "{kind} {}: endpoints {ep:?}", fault.name());
        }
        rows.push((kind.to_string(), fault.name().to_string(), t));
        // Back to healthy; the agent must come back to the registry (so the next fault is met
        // by an adapter that is polling, not one deep in back-off).
        if fault != Fault::Healthy && fault != Fault::Empty {
            let before = fake.served().get(full_kind, Fault::Healthy);
            fake.set_fault(Fault::Healthy);
            eventually(RECOVERY, "the agent to fetch again", || async {
                (fake.served().get(full_kind, Fault::Healthy) > before).then_some(())
            })
            .await;
        }
    }
    drop(agent);
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eureka_shaped_registry_faults_cost_no_requests() {
    let _g = SERIAL.lock().await;
    let rows = registry_faults(
        "eureka",
        &[
            Fault::Healthy,
            Fault::Garbage,
            Fault::Truncated,
            Fault::Status500,
            Fault::Hang,
            Fault::Empty,
        ],
    )
    .await;
    assert_rows(&rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_shaped_registry_faults_cost_no_requests() {
    let _g = SERIAL.lock().await;
    let rows = registry_faults(
        "consul",
        &[
            Fault::Healthy,
            Fault::Garbage,
            Fault::Truncated,
            Fault::Status500,
            Fault::Hang,
            Fault::IndexBackwards,
            Fault::Empty,
        ],
    )
    .await;
    assert_rows(&rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_registry_faults_cost_no_requests() {
    let _g = SERIAL.lock().await;
    let backends = three_backends().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("services.toml");
    let good: Vec<(SocketAddr, u32)> = backends.iter().map(|b| (b.addr, 1)).collect();
    write_services(&path, &[(SVC, &good)]);
    let text = std::fs::read_to_string(&path).unwrap();
    let truncated = text[..text.len() / 2].to_string();
    assert!(
        discovery::file::parse(&truncated).is_err(),
        "the truncated file must not parse:\n{truncated}"
    );
    let url = format!("file://{}", path.display());
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", &url)]).await;
    all_three_serve(&agent).await;

    let mut rows = Rows::new();
    let cases: [(&str, FileFault); 3] = [
        (
            "garbage file",
            Box::new({
                let p = path.clone();
                move || std::fs::write(&p, "[[service]\nname = = \u{1}\u{2} <html>").unwrap()
            }),
        ),
        (
            "truncated file",
            Box::new({
                let p = path.clone();
                move || std::fs::write(&p, &truncated).unwrap()
            }),
        ),
        (
            "deleted file",
            Box::new({
                let p = path.clone();
                move || std::fs::remove_file(&p).unwrap()
            }),
        ),
    ];
    for (name, fault) in cases {
        let (errs0, _) = counters(&agent).await;
        let t = phase(&agent, fault, || async { counters(&agent).await.0 > errs0 }).await;
        assert_eq!(agent.healthy_endpoints(SVC).await.len(), 3, "{name}");
        rows.push(("file".to_string(), name.to_string(), t));
        write_services(&path, &[(SVC, &good)]);
    }
    assert_rows(&rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_backends_mid_load_costs_under_a_thousandth() {
    let _g = SERIAL.lock().await;
    let backends = three_backends().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("services.toml");
    let good: Vec<(SocketAddr, u32)> = backends.iter().map(|b| (b.addr, 1)).collect();
    write_services(&path, &[(SVC, &good)]);
    let url = format!("file://{}", path.display());
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", &url)]).await;
    all_three_serve(&agent).await;
    let proxy = agent.proxy;
    let run = tokio::spawn(load(proxy, Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = Instant::now();
    backends[1].kill();
    let t = run.await.unwrap();
    eprintln!(
        "\n| file | one of three backends killed (at {:?} into 5 s) | {} / {} |",
        Duration::from_millis(1500),
        t.errors,
        t.requests
    );
    // The dead one is out of rotation (ejected) well before the load ended.
    let ep = agent.healthy_endpoints(SVC).await;
    assert!(
        !ep.contains(&backends[1].addr.to_string()),
        "{ep:?} after {:?}",
        killed_at.elapsed()
    );
    assert!(t.requests >= 900, "{t:?}");
    assert!(
        t.errors * 1000 < t.requests,
        "{} errors of {}: {:?}",
        t.errors,
        t.requests,
        t.samples
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_serves_from_its_snapshot_while_the_registry_is_down() {
    let _g = SERIAL.lock().await;
    let backends = three_backends().await;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let fake = FakeRegistry::start(&[(SVC, &addrs)]).await;
    let url = fake.eureka_url("interval=200ms&timeout=500ms");
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().display().to_string();
    let env = [
        ("EDGE_AGENT_REGISTRY", url.as_str()),
        ("EDGE_AGENT_STATE_DIR", state_dir.as_str()),
    ];
    let first = Agent::start(&env).await;
    all_three_serve(&first).await;
    // The snapshot is on disk.
    eventually(Duration::from_secs(10), "a snapshot file", || async {
        let n = std::fs::read_dir(state.path()).ok()?.count();
        (n > 0).then_some(())
    })
    .await;
    drop(first); // SIGKILL
    fake.stop();
    // Aborting the server's task drops its listener at the task's next poll.
    eventually(
        Duration::from_secs(5),
        "the registry to be down",
        || async {
            tokio::net::TcpStream::connect(fake.addr)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    let second = Agent::spawn(&env);
    let started = Instant::now();
    eventually(
        Duration::from_secs(15),
        "svc served after restart",
        || async {
            let c = reqwest::Client::builder().no_proxy().build().unwrap();
            let r = c
                .get(second.url("/"))
                .header("host", SVC)
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        },
    )
    .await;
    let up_after = started.elapsed();
    let t = load(second.proxy, Duration::from_secs(2)).await;
    let (errs, _) = counters(&second).await;
    eprintln!(
        "\n| eureka (down) | agent restarted, registry down: serving after {up_after:?}, {errs} registry errors | {} / {} |",
        t.errors, t.requests
    );
    assert!(errs > 0.0, "the registry really was down for the new agent");
    assert_eq!(t.errors, 0, "{:?}", t.samples);
}
