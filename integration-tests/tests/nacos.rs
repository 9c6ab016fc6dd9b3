//! The Nacos adapter against a real rnacos 0.8.8 (see `integration-tests/servers/nacos/`),
//! driving the built agent from outside in zero-config mode.
//!
//! Instances are registered through the open API (`/nacos/v1/ns/instance`) as persistent
//! (`ephemeral=false`) so they neither need beats nor expire, and survive a server restart (the
//! outage test restarts rnacos on the same ports and data dir). The SDK derives the gRPC port as
//! HTTP + 1000, so the HTTP port is picked with its +1000 free too. Tests take a lock so they
//! never run at the same time (2 cores). Every wait is a poll with a deadline.
use std::time::{Duration, Instant};

use integration_tests::servers::{install, ServerProcess};
use integration_tests::{client, eventually, free_port, spread, Agent, Backend};
use tokio::sync::Mutex;

/// Deadline for rnacos to start (and its raft to accept writes).
const SERVER_START: Duration = Duration::from_secs(30);
/// Deadline for a registry change to show in the agent.
const PROPAGATION: Duration = Duration::from_secs(15);
const USER: &str = "edge";
const PASS: &str = "edge-pw-1";

static SERIAL: Mutex<()> = Mutex::const_new(());

struct Nacos {
    proc: ServerProcess,
    port: u16,
    data: tempfile::TempDir,
    auth: bool,
    token: Option<String>,
}

/// An HTTP port whose +1000 (gRPC) is free as well.
fn port_pair() -> u16 {
    for _ in 0..50 {
        let p = free_port();
        if p <= 64535 && std::net::TcpListener::bind(("127.0.0.1", p + 1000)).is_ok() {
            return p;
        }
    }
    panic!("no free HTTP port with a free +1000 gRPC port after 50 tries");
}

impl Nacos {
    async fn start(auth: bool) -> Nacos {
        let data = tempfile::tempdir().unwrap();
        let port = port_pair();
        let proc = Self::spawn(port, data.path(), auth).await;
        let mut n = Nacos {
            proc,
            port,
            data,
            auth,
            token: None,
        };
        n.login().await;
        n
    }

    async fn spawn(port: u16, data: &std::path::Path, auth: bool) -> ServerProcess {
        let bin = install("nacos");
        let mut env = vec![
            ("RNACOS_BIN", bin.display().to_string()),
            ("NACOS_HTTP_PORT", port.to_string()),
            ("NACOS_GRPC_PORT", (port + 1000).to_string()),
            ("NACOS_DATA_DIR", data.display().to_string()),
            ("RUST_LOG", "warn".to_string()),
        ];
        if auth {
            env.push(("NACOS_AUTH", "1".into()));
            env.push(("NACOS_USERNAME", USER.into()));
            env.push(("NACOS_PASSWORD", PASS.into()));
        }
        let mut proc = ServerProcess::start("nacos", &env);
        proc.wait_ready(
            &format!("http://127.0.0.1:{port}/health"),
            SERVER_START,
            |_| true,
        )
        .await;
        proc
    }

    async fn login(&mut self) {
        if !self.auth {
            return;
        }
        let url = format!("http://127.0.0.1:{}/nacos/v1/auth/login", self.port);
        let token = eventually(SERVER_START, "rnacos login", || async {
            let r = client()
                .post(&url)
                .form(&[("username", USER), ("password", PASS)])
                .send()
                .await
                .ok()?;
            let v: serde_json::Value = r.json().await.ok()?;
            v["accessToken"].as_str().map(String::from)
        })
        .await;
        self.token = Some(token);
    }

    async fn restart(&mut self) {
        self.proc = Self::spawn(self.port, self.data.path(), self.auth).await;
        self.login().await;
    }

    fn url(&self, extra: &str) -> String {
        format!(
            "nacos://127.0.0.1:{}?list_interval=1s{extra}&cache_dir={}",
            self.port,
            self.data.path().join("sdk-cache").display()
        )
    }

    /// One open-API call on an instance, retried until rnacos accepts it ("ok").
    async fn instance(&self, method: reqwest::Method, params: &[(&str, String)]) {
        let url = format!("http://127.0.0.1:{}/nacos/v1/ns/instance", self.port);
        let mut q: Vec<(&str, String)> = params.to_vec();
        q.push(("ephemeral", "false".into()));
        if let Some(t) = &self.token {
            q.push(("accessToken", t.clone()));
        }
        eventually(
            SERVER_START,
            &format!("{method} instance {params:?}"),
            || {
                let (method, q, url) = (method.clone(), q.clone(), url.clone());
                async move {
                    let r = client().request(method, url).query(&q).send().await.ok()?;
                    let ok = r.status().is_success();
                    let body = r.text().await.unwrap_or_default();
                    (ok && body.contains("ok")).then_some(())
                }
            },
        )
        .await;
    }
}

/// Instance parameters: service, backend port, extra key/values.
fn inst(service: &str, b: &Backend, extra: &[(&str, &str)]) -> Vec<(&'static str, String)> {
    let mut v: Vec<(&'static str, String)> = vec![
        ("serviceName", service.to_string()),
        ("ip", "127.0.0.1".into()),
        ("port", b.addr.port().to_string()),
    ];
    for (k, val) in extra {
        let k: &'static str = match *k {
            "weight" => "weight",
            "healthy" => "healthy",
            "enabled" => "enabled",
            "groupName" => "groupName",
            "namespaceId" => "namespaceId",
            "clusterName" => "clusterName",
            other => panic!("unknown param {other}"),
        };
        v.push((k, val.to_string()));
    }
    v
}

async fn register(n: &Nacos, service: &str, b: &Backend, extra: &[(&str, &str)]) {
    n.instance(reqwest::Method::POST, &inst(service, b, extra))
        .await;
}

async fn update(n: &Nacos, service: &str, b: &Backend, extra: &[(&str, &str)]) {
    n.instance(reqwest::Method::PUT, &inst(service, b, extra))
        .await;
}

async fn deregister(n: &Nacos, service: &str, b: &Backend, extra: &[(&str, &str)]) {
    n.instance(reqwest::Method::DELETE, &inst(service, b, extra))
        .await;
}

/// Waits until every request to `host` over a window of 20 lands on exactly the `want` set.
async fn converges(agent: &Agent, host: &str, want: &[&str]) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    eventually(
        PROPAGATION,
        &format!("{host} served by {want:?}"),
        || async {
            let mut seen: Vec<String> = Vec::new();
            for _ in 0..20 {
                let (status, backend, _) = agent.get(host, "/").await;
                if status != 200 {
                    return None;
                }
                if !seen.contains(&backend) {
                    seen.push(backend);
                }
            }
            seen.sort();
            (seen == want).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn traffic_follows_registrations_health_enabled_and_weights() {
    let _g = SERIAL.lock().await;
    let t0 = Instant::now();
    let n = Nacos::start(false).await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let other_group = Backend::start("other-group").await;
    let other_ns = Backend::start("other-ns").await;
    register(&n, "web", &a, &[("weight", "1")]).await;
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", n.url("").as_str())]).await;
    converges(&agent, "web", &["a"]).await;

    // Same service name in another group and another namespace: never served.
    register(&n, "web", &other_group, &[("groupName", "OTHER")]).await;
    register(&n, "web", &other_ns, &[("namespaceId", "ns2")]).await;
    register(&n, "web", &b, &[("weight", "3")]).await;
    converges(&agent, "web", &["a", "b"]).await;

    // Weights 1:3 over 400 requests (±10 % of the total).
    let s = spread(&agent, "web", 400).await;
    let share_b = *s.get("b").unwrap_or(&0) as f64 / 400.0;
    assert!((0.65..=0.85).contains(&share_b), "1:3 weights: {s:?}");
    assert!(
        !s.contains_key("other-group") && !s.contains_key("other-ns"),
        "{s:?}"
    );

    // enabled=false stops traffic. (healthy=false is not driven here: rnacos 0.8.8 ignores
    // `healthy` on the open API — `InstanceWebParams::convert_to_instance` hard-codes
    // `healthy: true` — and only its own beat/probe checks mark an instance unhealthy. The
    // adapter maps healthy=false like enabled=false; see the unit test `instance_mapping`.)
    update(&n, "web", &b, &[("weight", "3"), ("enabled", "false")]).await;
    converges(&agent, "web", &["a"]).await;
    update(&n, "web", &b, &[("weight", "3"), ("enabled", "true")]).await;
    converges(&agent, "web", &["a", "b"]).await;

    // Deregistered: no more traffic.
    deregister(&n, "web", &b, &[]).await;
    converges(&agent, "web", &["a"]).await;
    assert_eq!(other_group.hits() + other_ns.hits(), 0);

    // A service registered after the agent started is found on demand.
    register(&n, "late", &b, &[]).await;
    converges(&agent, "late", &["b"]).await;
    eprintln!(
        "traffic_follows_registrations_health_enabled_and_weights: {:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn outage_keeps_last_good_set_and_reconnect_converges() {
    let _g = SERIAL.lock().await;
    let t0 = Instant::now();
    let mut n = Nacos::start(false).await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    register(&n, "web", &a, &[]).await;
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", n.url("").as_str())]).await;
    converges(&agent, "web", &["a"]).await;

    n.proc.stop();
    // Errors are reported while the last good set keeps serving.
    eventually(
        PROPAGATION,
        "discovery errors while rnacos is down",
        || async {
            let m = agent.metrics().await;
            m.lines()
                .any(|l| l.starts_with("edge_agent_discovery_errors_total") && l.contains("nacos"))
                .then_some(())
        },
    )
    .await;
    for _ in 0..50 {
        let (status, backend, _) = agent.get("web", "/").await;
        assert_eq!((status, backend.as_str()), (200, "a"));
    }

    // Back (same ports and data): a changed while the agent was cut off.
    n.restart().await;
    register(&n, "web", &b, &[]).await;
    deregister(&n, "web", &a, &[]).await;
    converges(&agent, "web", &["b"]).await;
    eprintln!(
        "outage_keeps_last_good_set_and_reconnect_converges: {:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn auth_works_with_credentials_and_fails_clearly_without() {
    let _g = SERIAL.lock().await;
    let t0 = Instant::now();
    let n = Nacos::start(true).await;
    let a = Backend::start("a").await;
    register(&n, "web", &a, &[]).await;
    let url = n.url("");
    let good = Agent::start(&[
        ("EDGE_AGENT_REGISTRY", url.as_str()),
        ("NACOS_USERNAME", USER),
        ("NACOS_PASSWORD", PASS),
    ])
    .await;
    converges(&good, "web", &["a"]).await;
    assert!(!good.log_text().contains(PASS), "password in the log");

    let bad = Agent::spawn(&[("EDGE_AGENT_REGISTRY", url.as_str())]);
    eventually(
        PROPAGATION,
        "an error naming nacos without credentials",
        || async {
            let log = bad.log_text();
            log.lines()
                .any(|l| l.contains("nacos") && (l.contains("WARN") || l.contains("ERROR")))
                .then_some(())
        },
    )
    .await;
    let r = client()
        .get(bad.url("/"))
        .header("host", "web")
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16());
    assert_ne!(r, Some(200), "served without credentials");
    assert!(a.hits() > 0);
    eprintln!(
        "auth_works_with_credentials_and_fails_clearly_without: {:?}",
        t0.elapsed()
    );
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Register → first request served, deregister → last request served, over 50 changes each.
#[tokio::test]
async fn propagation_lag_and_idle_traffic() {
    let _g = SERIAL.lock().await;
    let n = Nacos::start(false).await;
    let base = Backend::start("base").await;
    let extra = Backend::start("extra").await;
    register(&n, "lag", &base, &[]).await;
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", n.url("").as_str())]).await;
    converges(&agent, "lag", &["base"]).await;
    let mut up = Vec::new();
    let mut down = Vec::new();
    let hit = |agent: &Agent| {
        let agent_url = agent.url("/");
        async move {
            let r = client()
                .get(agent_url)
                .header("host", "lag")
                .send()
                .await
                .ok()?;
            r.headers()
                .get("x-backend")
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        }
    };
    for _ in 0..50 {
        let t = Instant::now();
        register(&n, "lag", &extra, &[]).await;
        let deadline = Instant::now() + PROPAGATION;
        loop {
            if hit(&agent).await.as_deref() == Some("extra") {
                break;
            }
            assert!(Instant::now() < deadline, "extra never served");
        }
        up.push(t.elapsed());
        let t = Instant::now();
        deregister(&n, "lag", &extra, &[]).await;
        let mut last = t.elapsed();
        let deadline = Instant::now() + PROPAGATION;
        let mut clean = 0;
        // Served by base only for 30 consecutive requests → gone; lag = last extra answer.
        while clean < 30 {
            match hit(&agent).await.as_deref() {
                Some("extra") => {
                    last = t.elapsed();
                    clean = 0;
                }
                _ => clean += 1,
            }
            assert!(Instant::now() < deadline, "extra never gone");
        }
        down.push(last);
    }
    let (u50, u99) = (pct(&mut up, 0.5), pct(&mut up, 0.99));
    let (d50, d99) = (pct(&mut down, 0.5), pct(&mut down, 0.99));
    eprintln!(
        "nacos propagation over {} registrations / deregistrations: register→first served p50 {u50:?} p99 {u99:?}; deregister→last served p50 {d50:?} p99 {d99:?}",
        up.len()
    );
    assert!(u99 < Duration::from_secs(2) && d99 < Duration::from_secs(2));
}

/// `healthy=false` end to end. rnacos ignores `healthy` on the open API, so an unhealthy
/// instance is made the way Nacos makes one: an ephemeral instance that stops beating, with
/// rnacos's health timeout shortened to 3 s.
#[tokio::test]
async fn an_instance_that_turns_unhealthy_stops_receiving_traffic() {
    let _g = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let port = port_pair();
    let mut proc = ServerProcess::start(
        "nacos",
        &[
            ("RNACOS_BIN", install("nacos").display().to_string()),
            ("NACOS_HTTP_PORT", port.to_string()),
            ("NACOS_GRPC_PORT", (port + 1000).to_string()),
            ("NACOS_DATA_DIR", data.path().display().to_string()),
            ("RNACOS_NAMING_HEALTH_TIMEOUT_SECOND", "3".to_string()),
            ("RNACOS_NAMING_INSTANCE_TIMEOUT_SECOND", "120".to_string()),
            ("RUST_LOG", "warn".to_string()),
        ],
    );
    proc.wait_ready(
        &format!("http://127.0.0.1:{port}/health"),
        SERVER_START,
        |_| true,
    )
    .await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let base = format!("http://127.0.0.1:{port}/nacos/v1/ns/instance");
    let params = |be: &Backend| {
        vec![
            ("serviceName", "beats".to_string()),
            ("ip", "127.0.0.1".to_string()),
            ("port", be.addr.port().to_string()),
            ("ephemeral", "true".to_string()),
        ]
    };
    for be in [&a, &b] {
        let q = params(be);
        eventually(SERVER_START, "register an ephemeral instance", || {
            let (q, base) = (q.clone(), base.clone());
            async move {
                let r = client().post(&base).query(&q).send().await.ok()?;
                (r.status().is_success()).then_some(())
            }
        })
        .await;
    }
    // Beat both every 500 ms; b's beats stop later. Bounded: at most 120 beats each.
    let beating_b = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let beat = {
        let (qa, qb, flag) = (params(&a), params(&b), beating_b.clone());
        let url = format!("{base}/beat");
        tokio::spawn(async move {
            for _ in 0..120 {
                let _ = client().put(&url).query(&qa).send().await;
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = client().put(&url).query(&qb).send().await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let url = format!(
        "nacos://127.0.0.1:{port}?list_interval=1s&cache_dir={}",
        data.path().join("sdk-cache").display()
    );
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", url.as_str())]).await;
    converges(&agent, "beats", &["a", "b"]).await;
    beating_b.store(false, std::sync::atomic::Ordering::Relaxed);
    let stopped = Instant::now();
    converges(&agent, "beats", &["a"]).await;
    eprintln!(
        "b unhealthy → out of rotation after {:?}",
        stopped.elapsed()
    );
    // Depending on what the push carries, b is gone from the set or listed as unhealthy;
    // either way it is never healthy in the agent's view.
    let up = agent.upstreams().await;
    let b_addr = b.addr.to_string();
    let listed: Vec<&serde_json::Value> = up["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|u| u["endpoints"].as_array().unwrap())
        .filter(|e| e["address"] == b_addr.as_str())
        .collect();
    assert!(listed.iter().all(|e| e["available"] == false), "{listed:?}");
    beat.abort();
}

/// #17: a SIGSTOPped rnacos (the SDK's gRPC stream just goes quiet) is seen within seconds by
/// the liveness call, and traffic keeps flowing from the last good view.
#[tokio::test]
async fn a_hung_nacos_is_seen_within_seconds() {
    let _g = SERIAL.lock().await;
    let n = Nacos::start(false).await;
    let a = Backend::start("a").await;
    register(&n, "web", &a, &[]).await;
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", n.url("").as_str())]).await;
    converges(&agent, "web", &["a"]).await;
    let pid = n.proc.pid().expect("rnacos runs");
    let (down, up) = integration_tests::a_hung_registry_is_seen(&agent, pid, "nacos", "web").await;
    eprintln!("nacos SIGSTOP: source_up 0 after {down:?}; 1 again {up:?} after SIGCONT");
}

/// One instance registered through nacos-sdk (ephemeral: it lives as long as the client's gRPC
/// connection), one client per instance, as each application would hold its own.
struct SdkInstance {
    naming: nacos_sdk::api::naming::NamingService,
    instance: nacos_sdk::api::naming::ServiceInstance,
    service: String,
}

impl SdkInstance {
    /// Registers `b` as an instance of `service` in cluster `cluster` with `metadata`.
    async fn register(
        n: &Nacos,
        service: &str,
        b: &Backend,
        cluster: &str,
        metadata: &[(&str, &str)],
    ) -> SdkInstance {
        use nacos_sdk::api::naming::{NamingServiceBuilder, ServiceInstance};
        use nacos_sdk::api::props::ClientProps;
        let props = ClientProps::new()
            .env_first(false)
            .server_addr(format!("127.0.0.1:{}", n.port))
            .namespace("")
            .app_name(format!("subset-test-{}", b.addr.port()))
            .naming_load_cache_at_start(false)
            .cache_dir(n.data.path().join(format!("app-{}", b.addr.port())));
        let naming = NamingServiceBuilder::new(props)
            .build()
            .await
            .expect("a nacos-sdk client");
        let instance = ServiceInstance {
            ip: "127.0.0.1".into(),
            port: i32::from(b.addr.port()),
            cluster_name: Some(cluster.into()),
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let one = SdkInstance {
            naming,
            instance,
            service: service.into(),
        };
        eventually(SERVER_START, "nacos-sdk registration", || async {
            one.naming
                .register_instance(one.service.clone(), None, one.instance.clone())
                .await
                .ok()
        })
        .await;
        one
    }

    async fn deregister(&self) {
        self.naming
            .deregister_instance(self.service.clone(), None, self.instance.clone())
            .await
            .expect("nacos-sdk deregistration");
    }
}

/// #14 on Nacos: four instances registered through nacos-sdk with metadata `version` in
/// clusters `a` and `b`. A subset by metadata (`version`) and by cluster (`cluster`) gets only
/// its instances; with `EDGE_AGENT_ZONE=a` and `zone_aware = "prefer"` the cluster is the zone:
/// everything stays in `a` while it has instances (a deregistered one leaves the zone's expected
/// share too), a subset with nothing left in `a` goes to `b`, and so does everything once `a` is
/// empty, each request counted as a spill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subsets_by_metadata_and_zones_by_cluster() {
    use integration_tests::subsets::{answered_by, config_file, counter, endpoint, until_only};
    let _g = SERIAL.lock().await;
    let n = Nacos::start(false).await;
    let mut backends = Vec::new();
    for name in ["a-v1", "a-v2", "b-v1", "b-v2"] {
        backends.push(Backend::start(name).await);
    }
    let mut apps = Vec::new();
    for (b, name) in backends.iter().zip(["a-v1", "a-v2", "b-v1", "b-v2"]) {
        let (cluster, version) = name.split_once('-').unwrap();
        apps.push(SdkInstance::register(&n, "shop", b, cluster, &[("version", version)]).await);
    }
    let (_dir, cfg) = config_file(
        r#"
[[upstream]]
id = "shop-v2"
service = "shop"
subset = { version = "v2" }

[[upstream]]
id = "shop-b"
service = "shop"
subset = { cluster = "b" }

[[upstream]]
id = "shop-near"
service = "shop"
zone_aware = "prefer"

[[upstream]]
id = "shop-near-v2"
service = "shop"
subset = { version = "v2" }
zone_aware = "prefer"
"#,
    );
    let agent = Agent::start(&[
        ("EDGE_AGENT_REGISTRY", n.url("").as_str()),
        ("EDGE_AGENT_CONFIG", cfg.to_str().unwrap()),
        ("EDGE_AGENT_ZONE", "a"),
    ])
    .await;
    until_only(&agent, "shop-v2", &[], &["a-v2", "b-v2"], PROPAGATION).await;
    until_only(&agent, "shop-b", &[], &["b-v1", "b-v2"], PROPAGATION).await;
    until_only(&agent, "shop-near", &[], &["a-v1", "a-v2"], PROPAGATION).await;
    until_only(&agent, "shop-near-v2", &[], &["a-v2"], PROPAGATION).await;
    let u = agent.upstreams().await;
    for (b, zone) in backends.iter().zip(["a", "a", "b", "b"]) {
        let e = endpoint(&u, "shop-near", &b.addr.to_string()).expect("listed");
        assert_eq!(e["zone"], zone, "{e}");
    }
    let c = answered_by(&agent, "shop-near", &[], 100).await;
    assert_eq!(
        c.get("a-v1").unwrap_or(&0) + c.get("a-v2").unwrap_or(&0),
        100,
        "a whole local zone takes everything: {c:?}"
    );

    // a-v2 deregistered: it leaves the set, so zone a's expected share shrinks with it (1 of
    // 3 endpoints, all available): a-v1 keeps all of shop-near, and shop-near-v2, with nothing
    // left in a, goes to b.
    apps[1].deregister().await;
    until_only(&agent, "shop-near-v2", &[], &["b-v2"], PROPAGATION).await;
    let c = answered_by(&agent, "shop-near", &[], 100).await;
    assert_eq!(c.get("a-v1"), Some(&100), "{c:?}");
    // a-v1 too: zone a is empty, everything spills to b, and each spill is counted.
    apps[0].deregister().await;
    until_only(&agent, "shop-near", &[], &["b-v1", "b-v2"], PROPAGATION).await;
    let before = counter(
        &agent.metrics().await,
        "edge_agent_zone_spill_total",
        "shop-near",
    );
    let c = answered_by(&agent, "shop-near", &[], 100).await;
    let spilled = counter(
        &agent.metrics().await,
        "edge_agent_zone_spill_total",
        "shop-near",
    );
    assert_eq!(
        c.get("b-v1").unwrap_or(&0) + c.get("b-v2").unwrap_or(&0),
        100,
        "{c:?}"
    );
    assert_eq!(
        spilled - before,
        100,
        "every request outside zone a counted"
    );
    drop(apps);
}

/// #17, the first request for a name registered a moment ago: with a long service-list
/// interval (30 s), a request for a name the last list did not have asks for a new list at
/// once and waits for it, instead of a 404 until the next list; a name nobody registers is a
/// quick 404, and asking again within the lookup gap costs no further list.
#[tokio::test]
async fn the_first_request_for_a_just_registered_name_asks_nacos() {
    let _g = SERIAL.lock().await;
    let n = Nacos::start(false).await;
    let seed = Backend::start("seed").await;
    register(&n, "seed", &seed, &[]).await;
    let url = format!(
        "nacos://127.0.0.1:{}?list_interval=30s&cache_dir={}",
        n.port,
        n.data.path().join("sdk-cache-first").display()
    );
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", url.as_str())]).await;
    converges(&agent, "seed", &["seed"]).await;
    let fresh = Backend::start("fresh").await;
    register(&n, "fresh", &fresh, &[]).await;
    let t = Instant::now();
    let (status, backend, body) = agent.get("fresh", "/").await;
    let took = t.elapsed();
    assert_eq!((status, backend.as_str()), (200, "fresh"), "{body}");
    let t = Instant::now();
    assert_eq!(agent.get("nobody", "/").await.0, 404);
    let not_found = t.elapsed();
    let t = Instant::now();
    assert_eq!(agent.get("nobody", "/").await.0, 404);
    let again = t.elapsed();
    eprintln!(
        "nacos first request (list_interval 30 s): 200 after {took:?}; unknown 404 after {not_found:?}, again after {again:?}"
    );
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(not_found < Duration::from_secs(4), "{not_found:?}");
    assert!(again < Duration::from_millis(500), "{again:?}");
}
