//! The `ewma`, `least_conn` and `chash` balancers end to end: real backends on loopback, the
//! file registry, the built binary driven from outside. Bounds leave room for a loaded 2-core
//! machine; the expected figures are in each test's comments.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use integration_tests::{
    client, eventually, in_flight, setup, wait_endpoints, write_services, Agent, Backend, Behaviour,
};

/// `GET /` with `Host: svc` and, if given, `x-user`; returns the `x-backend` that answered.
async fn get_as(agent: &Agent, user: Option<&str>) -> String {
    let mut req = client().get(agent.url("/")).header("host", "svc");
    if let Some(u) = user {
        req = req.header("x-user", u);
    }
    let r = req.send().await.expect("request through the agent");
    assert_eq!(r.status().as_u16(), 200, "user {user:?}");
    r.headers()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn share(counts: &HashMap<String, usize>, name: &str, total: usize) -> f64 {
    *counts.get(name).unwrap_or(&0) as f64 / total as f64
}

#[tokio::test]
async fn ewma_sends_little_to_a_slow_backend() {
    let fast = Backend::start("fast").await;
    let slow = Backend::start_with(
        "slow",
        Behaviour {
            delay: Duration::from_millis(50),
            ..Default::default()
        },
    )
    .await;
    let s = setup(
        "[[upstream]]\nid = \"svc\"\nbalancer = \"ewma\"\n",
        &[("svc", &[(fast.addr, 1), (slow.addr, 1)])],
    )
    .await;
    // Warm-up: until both have answered once, the unobserved one is compared by load alone
    // (a coin flip here), so both get measured.
    eventually(
        Duration::from_secs(10),
        "both backends to be tried",
        || async {
            get_as(&s.agent, None).await;
            (fast.hits() > 0 && slow.hits() > 0).then_some(())
        },
    )
    .await;
    for _ in 0..20 {
        get_as(&s.agent, None).await;
    }
    let mut counts = HashMap::new();
    for _ in 0..200 {
        *counts.entry(get_as(&s.agent, None).await).or_insert(0) += 1;
    }
    // The slow backend's estimate (≥ 50 ms) only sinks below the fast one's (< 1 ms idle
    // on loopback, a few ms under load) after some 40 s of idle decay: expected ~0%.
    let slow_share = share(&counts, "slow", 200);
    eprintln!("ewma: slow backend share after warm-up {slow_share:.3} ({counts:?})");
    assert!(slow_share < 0.2, "{counts:?}");
}

#[tokio::test]
async fn least_conn_favours_the_backend_with_fewer_requests_in_flight() {
    // `busy` holds 4 long requests; `idle` answers at once.
    let busy = Backend::start_with(
        "busy",
        Behaviour {
            delay: Duration::from_secs(20),
            ..Default::default()
        },
    )
    .await;
    let idle = Backend::start("idle").await;
    let s = setup(
        "[[upstream]]\nid = \"svc\"\nbalancer = \"least_conn\"\n",
        &[("svc", &[(busy.addr, 1)])],
    )
    .await;
    let url = s.agent.url("/");
    let held: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { client().get(url).header("host", "svc").send().await })
        })
        .collect();
    eventually(
        Duration::from_secs(10),
        "4 requests in flight on busy",
        || async { (busy.hits() == 4).then_some(()) },
    )
    .await;
    // Add `idle`; busy's in-flight count is carried into the new snapshot.
    write_services(&s.registry, &[("svc", &[(busy.addr, 1), (idle.addr, 1)])]);
    wait_endpoints(&s.agent, 2).await;
    eventually(
        Duration::from_secs(5),
        "busy's in-flight count of 4 in /upstreams",
        || async { (in_flight(&s.agent, busy.addr).await == 4).then_some(()) },
    )
    .await;
    // Cost (4 + 1) / 1 against (0 + 1) / 1: every request goes to idle, whatever the timing.
    let mut counts = HashMap::new();
    for _ in 0..40 {
        *counts.entry(get_as(&s.agent, None).await).or_insert(0) += 1;
    }
    eprintln!("least_conn: {counts:?} with 4 in flight on busy");
    assert_eq!(counts.get("idle"), Some(&40), "{counts:?}");
    assert_eq!(busy.hits(), 4);
    for h in held {
        h.abort();
    }
}

#[tokio::test]
async fn chash_keeps_users_on_their_backend_across_a_registry_change() {
    let backends = [
        Backend::start("b0").await,
        Backend::start("b1").await,
        Backend::start("b2").await,
        Backend::start("b3").await,
    ];
    let set = |n: usize| -> Vec<(SocketAddr, u32)> {
        backends[..n].iter().map(|b| (b.addr, 1)).collect()
    };
    let s = setup(
        "[[upstream]]\nid = \"svc\"\nbalancer = \"chash\"\nhash_on = \"header:x-user\"\n",
        &[("svc", &set(3))],
    )
    .await;
    let users: Vec<String> = (0..50).map(|i| format!("user-{i}")).collect();
    async fn assign(agent: &Agent, users: &[String]) -> Vec<String> {
        let mut out = Vec::with_capacity(users.len());
        for u in users {
            out.push(get_as(agent, Some(u)).await);
        }
        out
    }
    let first = assign(&s.agent, &users).await;
    let again = assign(&s.agent, &users).await;
    assert_eq!(first, again, "a user always lands on the same backend");
    for b in &backends[..3] {
        assert!(first.contains(&b.name), "{} got no user: {first:?}", b.name);
    }
    // Requests without the key are balanced round robin.
    let mut keyless = HashMap::new();
    for _ in 0..30 {
        *keyless.entry(get_as(&s.agent, None).await).or_insert(0) += 1;
    }
    eprintln!("chash keyless: {keyless:?}");
    let m = s.agent.metrics().await;
    assert!(
        m.contains("edge_agent_chash_fallback_total{upstream=\"svc\"} 30"),
        "keyless requests counted: {}",
        m.lines()
            .filter(|l| l.contains("chash"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for b in &backends[..3] {
        let n = keyless.get(&b.name).copied().unwrap_or(0);
        assert!((5..=15).contains(&n), "{keyless:?}");
    }

    write_services(&s.registry, &[("svc", &set(4))]);
    wait_endpoints(&s.agent, 4).await;
    let after = assign(&s.agent, &users).await;
    let after_again = assign(&s.agent, &users).await;
    assert_eq!(after, after_again, "stable between changes");
    let stayed = first.iter().zip(&after).filter(|(a, b)| a == b).count();
    let moved_elsewhere = first
        .iter()
        .zip(&after)
        .filter(|(a, b)| a != b && b.as_str() != "b3")
        .count();
    eprintln!(
        "chash 3 -> 4 endpoints: {stayed}/50 users stayed (expected ~75%), {moved_elsewhere} \
         moved to an old backend"
    );
    // Expected 37.5 of 50 (the newcomer takes a quarter); binomial sd ≈ 3.
    assert!(stayed >= 28, "only {stayed}/50 stayed");
    assert!(
        after.iter().any(|b| b == "b3"),
        "the new backend got no user"
    );
    // Moves go to the new backend, but for Maglev's small churn.
    assert!(
        moved_elsewhere <= 2,
        "{moved_elsewhere} users moved between old backends"
    );
}
