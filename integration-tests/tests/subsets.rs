//! Subsets, header-driven subsets, header route matches, weighted splits and zone-aware
//! routing (#14) end to end on the file registry: real backends on loopback, the built binary
//! driven from outside. The registry-specific mappings (Consul tags, Nacos clusters, Eureka
//! metadata) are tested in `consul.rs`, `nacos.rs` and `eureka.rs`.
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::subsets::{answered_by as counts, counter, get_with as get, upstream};
use integration_tests::{eventually, Agent, Backend};

/// One instance in the file registry.
struct Inst<'a> {
    addr: SocketAddr,
    zone: Option<&'a str>,
    healthy: bool,
    meta: &'a [(&'a str, &'a str)],
}

fn inst<'a>(b: &Backend, zone: Option<&'a str>, meta: &'a [(&'a str, &'a str)]) -> Inst<'a> {
    Inst {
        addr: b.addr,
        zone,
        healthy: true,
        meta,
    }
}

fn write_registry(path: &Path, services: &[(&str, &[Inst])]) {
    let mut text = String::new();
    for (name, instances) in services {
        text.push_str(&format!("[[service]]\nname = \"{name}\"\ninstances = [\n"));
        for i in *instances {
            let meta: Vec<String> = i
                .meta
                .iter()
                .map(|(k, v)| format!("\"{k}\" = \"{v}\""))
                .collect();
            let zone = i
                .zone
                .map(|z| format!(", zone = \"{z}\""))
                .unwrap_or_default();
            text.push_str(&format!(
                "  {{ addr = \"{}\", healthy = {}{zone}, metadata = {{ {} }} }},\n",
                i.addr,
                i.healthy,
                meta.join(", ")
            ));
        }
        text.push_str("]\n");
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Setup {
    registry: PathBuf,
    config: PathBuf,
    agent: Agent,
    _dir: tempfile::TempDir,
}

async fn setup(config: &str, services: &[(&str, &[Inst<'_>])], env: &[(&str, &str)]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("services.toml");
    write_registry(&registry, services);
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, config).unwrap();
    let url = format!("file://{}", registry.display());
    let mut all = vec![
        ("EDGE_AGENT_REGISTRY", url.as_str()),
        ("EDGE_AGENT_CONFIG", cfg.to_str().unwrap()),
    ];
    all.extend_from_slice(env);
    let agent = Agent::start(&all).await;
    Setup {
        registry,
        config: cfg,
        agent,
        _dir: dir,
    }
}

/// Waits until upstream `id` lists `n` endpoints.
async fn wait_endpoints(agent: &Agent, id: &str, n: usize) {
    eventually(
        Duration::from_secs(10),
        &format!("{id} to have {n} endpoints"),
        || async {
            let u = agent.upstreams().await;
            let count = upstream(&u, id).and_then(|x| x["endpoints"].as_array().map(Vec::len));
            (count == Some(n)).then_some(())
        },
    )
    .await;
}

/// A subset gets only its endpoints; when they are all down, `fallback` decides (a subset
/// here); `none` answers 503 naming the subset. `/upstreams` shows the subset and which
/// endpoints are in it.
#[tokio::test]
async fn a_subset_gets_only_its_endpoints_and_fallback_decides() {
    let (v1, v2a, v2b) = (
        Backend::start("v1").await,
        Backend::start("v2a").await,
        Backend::start("v2b").await,
    );
    let instances = |v2_healthy: bool| {
        let mut set = vec![
            inst(&v1, None, &[("version", "v1")]),
            inst(&v2a, None, &[("version", "v2")]),
            inst(&v2b, None, &[("version", "v2")]),
        ];
        for i in &mut set[1..] {
            i.healthy = v2_healthy;
        }
        set
    };
    let config = r#"
[[upstream]]
id = "pay"
subset = { version = "v2" }
fallback = { version = "v1" }

[[upstream]]
id = "strict-pay"
service = "pay"
subset = { version = "v2" }
"#;
    let s = setup(config, &[("pay", &instances(true))], &[]).await;
    wait_endpoints(&s.agent, "pay", 3).await;
    let c = counts(&s.agent, "pay", &[], 40).await;
    assert_eq!(c.get("v1"), None, "{c:?}");
    assert_eq!(c.values().sum::<usize>(), 40);
    let u = s.agent.upstreams().await;
    let pay = upstream(&u, "pay").unwrap();
    assert_eq!(pay["subset"]["selector"]["version"], "v2", "{pay}");
    assert_eq!(pay["subset"]["fallback"], "version=v1");
    let in_subset: Vec<bool> = pay["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["in_subset"].as_bool().unwrap())
        .collect();
    assert_eq!(in_subset.iter().filter(|x| **x).count(), 2, "{pay}");

    // Every v2 instance down in the registry: the fallback subset (v1) serves, counted.
    write_registry(&s.registry, &[("pay", &instances(false))]);
    eventually(Duration::from_secs(10), "the fallback to serve", || async {
        (get(&s.agent, "pay", &[]).await.1 == "v1").then_some(())
    })
    .await;
    let c = counts(&s.agent, "pay", &[], 20).await;
    assert_eq!(c.get("v1"), Some(&20), "{c:?}");
    let m = s.agent.metrics().await;
    assert!(
        counter(&m, "edge_agent_subset_fallback_total", "pay") >= 20,
        "{m}"
    );
    // fallback = "none" (the default): 503 naming the subset.
    let (status, _, body) = get(&s.agent, "strict-pay", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("subset version=v2") && body.contains("\"strict-pay\""),
        "{body}"
    );
}

/// Canary by header: `x-version: v2` goes to v2, no header to the route's default (the
/// upstream's subset v1), an unknown value follows `fallback`. A header match chooses between
/// routes.
#[tokio::test]
async fn a_header_picks_the_subset_and_a_header_match_picks_the_route() {
    let (v1, v2, canary) = (
        Backend::start("v1").await,
        Backend::start("v2").await,
        Backend::start("canary").await,
    );
    let config = r#"
[[upstream]]
id = "shop"
subset = { version = "v1" }
fallback = "none"

[[upstream]]
id = "shop-canary"
service = "canary"

[[route]]
host = "shop"
headers = { "x-canary" = "true" }
upstream = "shop-canary"

[[route]]
host = "shop"
upstream = "shop"
subset_from_header = { header = "x-version", key = "version" }
"#;
    let s = setup(
        config,
        &[
            (
                "shop",
                &[
                    inst(&v1, None, &[("version", "v1")]),
                    inst(&v2, None, &[("version", "v2")]),
                ],
            ),
            ("canary", &[inst(&canary, None, &[])]),
        ],
        &[],
    )
    .await;
    wait_endpoints(&s.agent, "shop", 2).await;
    wait_endpoints(&s.agent, "shop-canary", 1).await;
    for _ in 0..10 {
        assert_eq!(get(&s.agent, "shop", &[]).await.1, "v1");
        assert_eq!(get(&s.agent, "shop", &[("x-version", "v2")]).await.1, "v2");
        assert_eq!(get(&s.agent, "shop", &[("x-version", "v1")]).await.1, "v1");
        assert_eq!(
            get(&s.agent, "shop", &[("x-canary", "true")]).await.1,
            "canary"
        );
        // A header match is exact.
        assert_eq!(get(&s.agent, "shop", &[("x-canary", "yes")]).await.1, "v1");
    }
    let (status, _, body) = get(&s.agent, "shop", &[("x-version", "v9")]).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("subset version=v9"), "{body}");
}

/// `split`: 90/10 within ±3 points over 2,000 requests; with `chash`, each of 100 users stays
/// on one side; a reload moves the weights without dropping the keep-alive connection.
#[tokio::test]
async fn a_weighted_split_divides_by_weight_and_chash_keeps_users_on_one_side() {
    let (a1, a2, b1) = (
        Backend::start("v1-a").await,
        Backend::start("v1-b").await,
        Backend::start("v2-a").await,
    );
    let services = [(
        "pay",
        &[
            inst(&a1, None, &[("version", "v1")]),
            inst(&a2, None, &[("version", "v1")]),
            inst(&b1, None, &[("version", "v2")]),
        ][..],
    )];
    let config = |w1: u32, w2: u32| {
        format!(
            r#"
[[upstream]]
id = "pay-v1"
service = "pay"
subset = {{ version = "v1" }}

[[upstream]]
id = "pay-v2"
service = "pay"
subset = {{ version = "v2" }}

[[upstream]]
id = "user-v1"
service = "pay"
subset = {{ version = "v1" }}
balancer = "chash"
hash_on = "header:x-user"

[[upstream]]
id = "user-v2"
service = "pay"
subset = {{ version = "v2" }}
balancer = "chash"
hash_on = "header:x-user"

[[route]]
host = "pay"
split = [{{ upstream = "pay-v1", weight = {w1} }}, {{ upstream = "pay-v2", weight = {w2} }}]

[[route]]
host = "user"
split = [{{ upstream = "user-v1", weight = {w1} }}, {{ upstream = "user-v2", weight = {w2} }}]
"#
        )
    };
    let s = setup(&config(90, 10), &services, &[]).await;
    for id in ["pay-v1", "pay-v2", "user-v1", "user-v2"] {
        wait_endpoints(&s.agent, id, 3).await;
    }
    let c = counts(&s.agent, "pay", &[], 2_000).await;
    let v2 = *c.get("v2-a").unwrap_or(&0) as f64 / 2_000.0;
    assert!((v2 - 0.10).abs() <= 0.03, "v2 share {v2}: {c:?}");

    let mut v2_users = 0;
    for u in 0..100 {
        let user = format!("user-{u}");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5 {
            let (status, backend, body) = get(&s.agent, "user", &[("x-user", &user)]).await;
            assert_eq!(status, 200, "{body}");
            seen.insert(backend);
        }
        assert_eq!(seen.len(), 1, "{user} was sent to {seen:?}");
        if seen.contains("v2-a") {
            v2_users += 1;
        }
    }
    assert!(
        (2..=25).contains(&v2_users),
        "{v2_users} of 100 users on v2"
    );

    // Reload to 50/50 on one keep-alive client: the same connection keeps serving.
    let one = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let send = || async {
        let r = one
            .get(s.agent.url("/"))
            .header("host", "pay")
            .send()
            .await
            .expect("request on the kept-alive connection");
        assert_eq!(r.status(), 200);
        r.headers()["x-backend"].to_str().unwrap().to_string()
    };
    for _ in 0..20 {
        send().await;
    }
    let conns = || a1.connections() + a2.connections() + b1.connections();
    let before = conns();
    std::fs::write(&s.config, config(50, 50)).unwrap();
    eventually(Duration::from_secs(10), "the reload to apply", || async {
        let mut v2 = 0;
        for _ in 0..200 {
            if send().await == "v2-a" {
                v2 += 1;
            }
        }
        (v2 > 70).then_some(())
    })
    .await;
    let m = s.agent.metrics().await;
    assert!(
        m.contains("edge_agent_config_reloads_total{result=\"ok\"}"),
        "{m}"
    );
    // The endpoints kept their pooled connections across the reload: no backend was dialled
    // again.
    assert_eq!(
        conns(),
        before,
        "connections to the backends before and after the reload"
    );
}

/// Zones, 3 × 3: a healthy local zone takes everything; 2 of 3 local endpoints down → the
/// spill follows the formula (local 3/7, each other zone 2/7); `strict` with the local zone
/// gone → 503 naming the zone.
#[tokio::test]
async fn zone_prefer_spills_by_the_formula_and_strict_never_leaves() {
    let mut backends = Vec::new();
    for z in ["a", "b", "c"] {
        for i in 1..=3 {
            backends.push((z, Backend::start(&format!("{z}{i}")).await));
        }
    }
    let instances = |down: usize| -> Vec<Inst> {
        backends
            .iter()
            .enumerate()
            .map(|(i, (z, b))| Inst {
                addr: b.addr,
                zone: Some(z),
                healthy: !(*z == "a" && i < down),
                meta: &[],
            })
            .collect()
    };
    let config = r#"
[[upstream]]
id = "svc"
zone_aware = "prefer"

[[upstream]]
id = "strict"
service = "svc"
zone_aware = "strict"
"#;
    let s = setup(
        config,
        &[("svc", &instances(0))],
        &[("EDGE_AGENT_ZONE", "a")],
    )
    .await;
    wait_endpoints(&s.agent, "svc", 9).await;
    let by_zone = |c: &BTreeMap<String, usize>| {
        let mut z = [0usize; 3];
        for (name, n) in c {
            z[(name.as_bytes()[0] - b'a') as usize] += n;
        }
        z
    };
    let c = counts(&s.agent, "svc", &[], 300).await;
    assert_eq!(by_zone(&c), [300, 0, 0], "{c:?}");
    let u = s.agent.upstreams().await;
    let svc = upstream(&u, "svc").unwrap();
    assert_eq!(svc["subset"]["zone_aware"], "prefer");
    assert_eq!(svc["subset"]["local_zone"], "a");
    assert_eq!(svc["subset"]["zone_shares"][0]["share"], 1.0, "{svc}");

    write_registry(&s.registry, &[("svc", &instances(2))]);
    eventually(
        Duration::from_secs(10),
        "two local endpoints out",
        || async {
            let u = s.agent.upstreams().await;
            let avail = upstream(&u, "svc")?["endpoints"]
                .as_array()?
                .iter()
                .filter(|e| e["available"] == true)
                .count();
            (avail == 7).then_some(())
        },
    )
    .await;
    let n = 2_100;
    let before = counter(
        &s.agent.metrics().await,
        "edge_agent_zone_spill_total",
        "svc",
    );
    let z = by_zone(&counts(&s.agent, "svc", &[], n).await);
    let share: Vec<f64> = z.iter().map(|x| *x as f64 / n as f64).collect();
    for (got, want) in share.iter().zip([3.0 / 7.0, 2.0 / 7.0, 2.0 / 7.0]) {
        assert!(
            (got - want).abs() < 0.04,
            "zone shares {share:?}, want 3/7, 2/7, 2/7"
        );
    }
    let spilled = counter(
        &s.agent.metrics().await,
        "edge_agent_zone_spill_total",
        "svc",
    ) - before;
    assert_eq!(
        spilled as usize,
        z[1] + z[2],
        "every request outside zone a is counted"
    );
    // Strict: only a3 left in zone a.
    let c = counts(&s.agent, "strict", &[], 30).await;
    assert_eq!(c.get("a3"), Some(&30), "{c:?}");
    write_registry(&s.registry, &[("svc", &instances(3))]);
    eventually(Duration::from_secs(10), "strict to answer 503", || async {
        let (status, _, body) = get(&s.agent, "strict", &[]).await;
        (status == 503 && body.contains("zone a")).then_some(())
    })
    .await;
    // Prefer with the local zone gone: all to b and c.
    let z = by_zone(&counts(&s.agent, "svc", &[], 100).await);
    assert_eq!(z[0], 0, "{z:?}");
}

/// Bad input: `zone_aware = "strict"` without a zone is refused at start-up, naming the field.
#[tokio::test]
async fn strict_without_a_zone_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "[[upstream]]\nid = \"svc\"\nzone_aware = \"strict\"\n",
    )
    .unwrap();
    let mut agent = Agent::spawn(&[
        ("EDGE_AGENT_REGISTRY", "file:///dev/null"),
        ("EDGE_AGENT_CONFIG", cfg.to_str().unwrap()),
    ]);
    let status = agent.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success());
    let log = agent.log_text();
    assert!(
        log.contains("upstream[0].zone_aware = \"strict\": this host has no zone"),
        "{log}"
    );
}
