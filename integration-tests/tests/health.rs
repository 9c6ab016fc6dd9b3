//! Passive and active health end to end: real backends on loopback, the built agent.
use std::time::Duration;

use integration_tests::{eventually, spread, write_services, Agent, Backend, Behaviour};

fn endpoint<'a>(up: &'a serde_json::Value, id: &str, addr: &str) -> &'a serde_json::Value {
    up["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["id"] == id)
        .and_then(|u| {
            u["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["address"] == addr)
        })
        .unwrap_or_else(|| panic!("{id}/{addr} not in /upstreams: {up}"))
}

fn failing() -> Behaviour {
    Behaviour {
        status: 500,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_backend_returning_500s_is_ejected_with_no_client_visible_error() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let bad = Backend::start_with("bad", failing()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("services.toml");
    write_services(
        &path,
        &[("svc", &[(a.addr, 1), (b.addr, 1), (bad.addr, 1)])],
    );
    let url = format!("file://{}", path.display());
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", &url)]).await;

    let s = spread(&agent, "svc", 300).await; // asserts every answer is 200
    assert!(!s.contains_key("bad"), "{s:?}");
    let hits_at_ejection = bad.hits();
    assert!(
        hits_at_ejection <= 6,
        "the bad backend saw {hits_at_ejection} requests: ejected after 5 consecutive failures"
    );
    let up = agent.upstreams().await;
    let e = endpoint(&up, "svc", &bad.addr.to_string());
    assert_eq!(e["ejected"], true, "{e}");
    assert_eq!(e["available"], false, "{e}");
    assert!(e["ejected_for_ms"].as_u64().unwrap() > 0, "{e}");
    let m = agent.metrics().await;
    assert!(
        m.contains("edge_agent_ejections_total{upstream=\"svc\"} 1"),
        "{m}"
    );
    // Traffic continues on the others, evenly.
    let (na, nb) = (s["a"], s["b"]);
    assert!(na.abs_diff(nb) <= 10, "{s:?}");
}

#[tokio::test]
async fn active_http_check_marks_down_and_up_again() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("services.toml");
    write_services(&path, &[("svc", &[(a.addr, 1), (b.addr, 1)])]);
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "[[upstream]]\nid = \"svc\"\n[upstream.checks.passive]\nenabled = false\n\
         [upstream.checks.active]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"500ms\"\n\
         healthy_threshold = 2\nunhealthy_threshold = 2\n",
    )
    .unwrap();
    let url = format!("file://{}", path.display());
    let agent = Agent::start(&[
        ("EDGE_AGENT_REGISTRY", &url),
        ("EDGE_AGENT_CONFIG", cfg.to_str().unwrap()),
    ])
    .await;
    let b_addr = b.addr.to_string();
    eventually(Duration::from_secs(5), "probes to reach b", || async {
        (b.hits() >= 2).then_some(())
    })
    .await;
    b.set(Behaviour {
        status: 503,
        ..Default::default()
    });
    eventually(Duration::from_secs(10), "b marked down", || async {
        let up = agent.upstreams().await;
        (endpoint(&up, "svc", &b_addr)["active_check_up"] == false).then_some(())
    })
    .await;
    let s = spread(&agent, "svc", 20).await;
    assert_eq!(s.get("a"), Some(&20), "{s:?}");
    b.set(Behaviour::default());
    eventually(Duration::from_secs(10), "b back up", || async {
        let up = agent.upstreams().await;
        (endpoint(&up, "svc", &b_addr)["active_check_up"] == true).then_some(())
    })
    .await;
    let s = spread(&agent, "svc", 20).await;
    assert_eq!(s.get("b"), Some(&10), "{s:?}");
}

#[tokio::test]
async fn panic_mode_balances_over_all_when_too_few_are_healthy() {
    let a = Backend::start_with(
        "a",
        Behaviour {
            status: 503,
            ..Default::default()
        },
    )
    .await;
    let b = Backend::start_with(
        "b",
        Behaviour {
            status: 503,
            ..Default::default()
        },
    )
    .await;
    let c = Backend::start("c").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("services.toml");
    write_services(&path, &[("svc", &[(a.addr, 1), (b.addr, 1), (c.addr, 1)])]);
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "[[upstream]]\nid = \"svc\"\nretries = 0\n[upstream.checks.passive]\nenabled = false\n\
         panic_threshold = 50\n\
         [upstream.checks.active]\npath = \"/\"\ninterval = \"100ms\"\nunhealthy_threshold = 1\n",
    )
    .unwrap();
    let url = format!("file://{}", path.display());
    let agent = Agent::start(&[
        ("EDGE_AGENT_REGISTRY", &url),
        ("EDGE_AGENT_CONFIG", cfg.to_str().unwrap()),
    ])
    .await;
    eventually(Duration::from_secs(10), "panic mode", || async {
        let up = agent.upstreams().await;
        (up["upstreams"][0]["panic"] == true).then_some(())
    })
    .await;
    assert!(agent
        .metrics()
        .await
        .contains("edge_agent_upstream_panic{upstream=\"svc\"} 1"));
    // 1 of 3 healthy < 50%: traffic goes to all three, not only c.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..30 {
        seen.insert(agent.get("svc", "/").await.1);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(agent.log_text().contains("panic mode"), "logged");
}

/// #17: a 429 with `Retry-After: 2` is not a health failure but keeps new requests off the
/// endpoint for the time asked; then it gets traffic again, and it was never ejected.
#[tokio::test]
async fn a_429_with_retry_after_backs_the_endpoint_off_without_ejecting_it() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let limited = Backend::start_with(
        "limited",
        Behaviour {
            status: 429,
            headers: vec![("retry-after".into(), "2".into())],
            ..Default::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("services.toml");
    write_services(
        &path,
        &[("svc", &[(a.addr, 1), (b.addr, 1), (limited.addr, 1)])],
    );
    let url = format!("file://{}", path.display());
    let agent = Agent::start(&[("EDGE_AGENT_REGISTRY", &url)]).await;

    // Round robin reaches `limited` within three requests; its 429 goes to the client (a 429
    // is not retried).
    let mut first_429 = None;
    for _ in 0..3 {
        let (status, backend, _) = agent.get("svc", "/").await;
        if status == 429 {
            assert_eq!(backend, "limited");
            first_429 = Some(std::time::Instant::now());
            break;
        }
        assert_eq!(status, 200);
    }
    let t0 = first_429.expect("a 429 from the limited backend within 3 requests");
    assert_eq!(limited.hits(), 1);
    let e = endpoint(&agent.upstreams().await, "svc", &limited.addr.to_string()).clone();
    assert_eq!(e["ejected"], false, "{e}");
    assert!(e["backoff_ms"].as_u64().unwrap() > 1_000, "{e}");

    // For the next 1.5 s every request goes to a or b.
    let mut during = 0;
    while t0.elapsed() < Duration::from_millis(1_500) {
        let (status, backend, _) = agent.get("svc", "/").await;
        assert_eq!(status, 200, "from {backend}");
        during += 1;
    }
    assert!(
        during >= 10,
        "only {during} requests in the back-off window"
    );
    assert_eq!(
        limited.hits(),
        1,
        "the limited backend got traffic while backing off"
    );

    // Then it is picked again; by then the back-off is over.
    limited.set(Behaviour::default());
    eventually(Duration::from_secs(5), "limited picked again", || async {
        agent.get("svc", "/").await;
        (limited.hits() > 1).then_some(())
    })
    .await;
    let waited = t0.elapsed();
    eprintln!("429 Retry-After: 2 → picked again after {waited:?}, {during} requests between");
    assert!(waited >= Duration::from_millis(1_900), "{waited:?}");
    assert!(
        waited < Duration::from_millis(3_500),
        "{waited:?}: the back-off outlived its Retry-After"
    );
    let m = agent.metrics().await;
    assert!(
        !m.contains("edge_agent_ejections_total{upstream=\"svc\"} 1"),
        "{m}"
    );
}
