//! Overload end to end (#17): circuit breakers answer at once instead of queueing, and the
//! interval outlier detectors. Real backends on loopback, the file registry, the built binary.
//! The tests take a lock so they never run at the same time: the refusal latencies measured
//! here are not the other tests' load.
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use integration_tests::{client, eventually, in_flight, setup, Backend, Behaviour};

/// Serialises the tests of this binary.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// `n` concurrent `GET url` with `Host: svc`: each one's status, `x-edge-agent-overflow` and
/// time taken.
fn concurrent(
    url: &str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<(u16, Option<String>, Duration)>> {
    (0..n)
        .map(|_| {
            let url = url.to_string();
            tokio::spawn(async move {
                let t = Instant::now();
                let r = client()
                    .get(url)
                    .header("host", "svc")
                    .send()
                    .await
                    .expect("request through the agent");
                let overflow = r
                    .headers()
                    .get("x-edge-agent-overflow")
                    .map(|v| v.to_str().unwrap().to_string());
                (r.status().as_u16(), overflow, t.elapsed())
            })
        })
        .collect()
}

/// `max_requests = 10` and 50 concurrent clients against a backend that holds every request:
/// exactly 10 reach it, the other 40 get the overflow 503 at once, the metric counts 40, and
/// every place is given back when the held requests finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_answers_the_overflow_at_once_and_leaks_nothing() {
    let _serial = SERIAL.lock().await;
    let slow = Backend::start_with(
        "slow",
        Behaviour {
            delay: Duration::from_secs(3),
            ..Default::default()
        },
    )
    .await;
    let s = setup(
        "[[upstream]]\nid = \"svc\"\nmax_requests = 10\nread_timeout = \"10s\"\n",
        &[("svc", &[(slow.addr, 1)])],
    )
    .await;
    let url = s.agent.url("/");
    let started = Instant::now();
    let tasks = concurrent(&url, 50);
    let mut ok = 0;
    let mut refused = Vec::new();
    for t in tasks {
        let (status, overflow, took) = t.await.unwrap();
        match status {
            200 => ok += 1,
            503 => {
                assert_eq!(overflow.as_deref(), Some("requests"));
                refused.push(took);
            }
            other => panic!("unexpected status {other}"),
        }
    }
    refused.sort();
    let slowest = refused.last().copied().unwrap_or_default();
    eprintln!(
        "max_requests=10, 50 clients: {ok} answered, {} refused (slowest refusal {slowest:?}), all done in {:?}",
        refused.len(),
        started.elapsed()
    );
    assert_eq!(ok, 10);
    assert_eq!(refused.len(), 40);
    assert!(
        slowest < Duration::from_millis(100),
        "refusals waited: {refused:?}"
    );
    assert_eq!(slow.hits(), 10, "only 10 requests may reach the backend");
    let m = s.agent.metrics().await;
    assert!(
        m.contains("edge_agent_overflow_total{upstream=\"svc\",limit=\"requests\"} 40"),
        "{m}"
    );
    // Every place is back: the next request goes through, in-flight is 0.
    assert_eq!(in_flight(&s.agent, slow.addr).await, 0);
    slow.set(Behaviour::default());
    let (status, _, _) = s.agent.get("svc", "/").await;
    assert_eq!(status, 200);
    eventually(Duration::from_secs(5), "in-flight back to 0", || async {
        let u = s.agent.upstreams().await;
        let up = u["upstreams"]
            .as_array()?
            .iter()
            .find(|x| x["id"] == "svc")?
            .clone();
        (in_flight(&s.agent, slow.addr).await == 0 && up["in_flight"] == 0).then_some(())
    })
    .await;
}

/// `max_connections = 2` per endpoint, `max_pending = 3`: with 2 requests held, 3 more wait for
/// a connection (and get one when the held ones finish, within `connect_timeout`), the rest are
/// refused at once with `pending`; the backend never sees more than 2 connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_queues_up_to_max_pending_then_refuses() {
    let _serial = SERIAL.lock().await;
    let slow = Backend::start_with(
        "slow",
        Behaviour {
            delay: Duration::from_millis(700),
            ..Default::default()
        },
    )
    .await;
    let s = setup(
        "[[upstream]]\nid = \"svc\"\nmax_connections = 2\nmax_pending = 3\nconnect_timeout = \"5s\"\nretries = 0\n",
        &[("svc", &[(slow.addr, 1)])],
    )
    .await;
    let url = s.agent.url("/");
    let tasks = concurrent(&url, 8);
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for t in tasks {
        let (status, overflow, took) = t.await.unwrap();
        match (status, overflow.as_deref()) {
            (200, None) => ok.push(took),
            (503, Some("pending")) => refused.push(took),
            other => panic!("unexpected answer {other:?}"),
        }
    }
    ok.sort();
    eprintln!("max_connections=2 max_pending=3, 8 clients: answered after {ok:?}, refused after {refused:?}, backend saw {} connections", slow.connections());
    assert_eq!(ok.len(), 5, "2 on connections + 3 that waited");
    assert_eq!(refused.len(), 3);
    assert!(
        refused.iter().all(|d| *d < Duration::from_millis(300)),
        "{refused:?}"
    );
    // The waiters were served on the connections the first two gave back.
    assert!(ok[4] >= Duration::from_millis(1_300), "{ok:?}");
    assert_eq!(slow.connections(), 2, "never more than max_connections");
    let m = s.agent.metrics().await;
    assert!(
        m.contains("edge_agent_overflow_total{upstream=\"svc\",limit=\"pending\"} 3"),
        "{m}"
    );
}

/// Five backends, one failing 30 % of its requests (never more than 3 in a row): ejected by the
/// detector under test, not by consecutive failures; clients see no error (retries).
async fn an_outlier_is_ejected_by(passive: &str, detector: &str) {
    let _serial = SERIAL.lock().await;
    let mut backends = Vec::new();
    for i in 0..4 {
        backends.push(Backend::start(&format!("ok{i}")).await);
    }
    let bad = Backend::start_with(
        "bad",
        Behaviour {
            fail_pattern: Some((3, 10)),
            ..Default::default()
        },
    )
    .await;
    let mut set: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    set.push((bad.addr, 1));
    let s = setup(
        &format!("[[upstream]]\nid = \"svc\"\nretries = 2\n[upstream.checks.passive]\ninterval = \"1s\"\n{passive}"),
        &[("svc", &set)],
    )
    .await;
    let started = Instant::now();
    let mut sent = 0;
    let ejected = loop {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not ejected after {sent} requests; bad saw {}",
            bad.hits()
        );
        for _ in 0..50 {
            let (status, _, _) = s.agent.get("svc", "/").await;
            assert_eq!(status, 200);
            sent += 1;
        }
        let u = s.agent.upstreams().await;
        let e = u["upstreams"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == bad.addr.to_string().as_str())
            .cloned()
            .unwrap();
        if e["ejected"] == true {
            break e;
        }
    };
    eprintln!(
        "{detector}: bad ejected after {sent} requests ({} to it) in {:?}",
        bad.hits(),
        started.elapsed()
    );
    assert_eq!(ejected["consecutive_failures"], 0, "{ejected}");
    let log = s.agent.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("endpoint ejected"))
        .unwrap_or_else(|| panic!("no ejection logged:\n{log}"));
    assert!(
        line.contains(&format!("detector=\"{detector}\""))
            || line.contains(&format!("detector={detector}")),
        "{line}"
    );
    assert!(
        !log.contains("detector=\"consecutive_failures\"")
            && !log.contains("detector=consecutive_failures"),
        "{log}"
    );
    // Only the bad one.
    let u = s.agent.upstreams().await;
    let out = u["upstreams"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ejected"] == true)
        .count();
    assert_eq!(out, 1, "{u}");
}

#[tokio::test]
async fn success_rate_ejects_an_endpoint_failing_30_percent() {
    an_outlier_is_ejected_by(
        "[upstream.checks.passive.success_rate]\nrequest_volume = 20\n",
        "success_rate",
    )
    .await;
}

#[tokio::test]
async fn failure_percentage_ejects_an_endpoint_failing_30_percent() {
    an_outlier_is_ejected_by(
        "[upstream.checks.passive.success_rate]\nenabled = false\n[upstream.checks.passive.failure_percentage]\nthreshold = 20\nrequest_volume = 20\n",
        "failure_percentage",
    )
    .await;
}

/// Drain (#17): an endpoint removed from the file registry while a 3 s request is on it. The
/// request finishes with 200; no new request reaches it; its idle pooled connections close at
/// once (counted at the backend), and the busy one once its exchange is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_endpoint_drains_requests_finish_idle_connections_close() {
    let _serial = SERIAL.lock().await;
    let old = Backend::start("old").await;
    let new = Backend::start("new").await;
    let s = setup(
        "[[upstream]]\nid = \"svc\"\nservice = \"svc\"\nread_timeout = \"10s\"\n\n[guard]\nopt_out = [\"svc\"]\n",
        &[("svc", &[(old.addr, 1)])],
    )
    .await;
    // Four idle keep-alive connections to `old`.
    for t in concurrent(&s.agent.url("/"), 4) {
        assert_eq!(t.await.unwrap().0, 200);
    }
    let pooled = old.open_connections();
    assert!(pooled >= 2, "{pooled} connections pooled");
    old.set(Behaviour {
        delay: Duration::from_secs(3),
        ..Default::default()
    });
    let url = s.agent.url("/slow");
    let started = Instant::now();
    let slow = tokio::spawn(async move {
        let r = client()
            .get(url)
            .header("host", "svc")
            .send()
            .await
            .unwrap();
        let from = r.headers()["x-backend"].to_str().unwrap().to_string();
        (r.status().as_u16(), from, started.elapsed())
    });
    eventually(
        Duration::from_secs(5),
        "the slow request to reach old",
        || async { (in_flight(&s.agent, old.addr).await == 1).then_some(()) },
    )
    .await;
    // The registry replaces `old` by `new`.
    integration_tests::write_services(&s.registry, &[("svc", &[(new.addr, 1)])]);
    eventually(
        Duration::from_secs(5),
        "the idle connections to old to close",
        || async { (old.open_connections() == 1).then_some(()) },
    )
    .await;
    let closed_after = started.elapsed();
    let hits = old.hits();
    for _ in 0..10 {
        let (status, from, _) = s.agent.get("svc", "/").await;
        assert_eq!((status, from.as_str()), (200, "new"));
    }
    assert_eq!(
        old.hits(),
        hits,
        "no new request reaches the removed endpoint"
    );
    let (status, from, took) = slow.await.unwrap();
    assert_eq!(
        (status, from.as_str()),
        (200, "old"),
        "the in-flight request finishes"
    );
    assert!(took >= Duration::from_secs(3), "{took:?}");
    eventually(
        Duration::from_secs(5),
        "the busy connection to close after its exchange",
        || async { (old.open_connections() == 0).then_some(()) },
    )
    .await;
    eprintln!(
        "drain: {pooled} pooled connections, idle ones closed {closed_after:?} after the slow request started; it finished with 200 in {took:?}"
    );
}

/// `drain_timeout`: what is still in flight to a removed endpoint when it runs out is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_closes_what_is_left() {
    let _serial = SERIAL.lock().await;
    let old = Backend::start_with(
        "old",
        Behaviour {
            delay: Duration::from_secs(20),
            ..Default::default()
        },
    )
    .await;
    let new = Backend::start("new").await;
    let s = setup(
        "[[upstream]]\nid = \"svc\"\nservice = \"svc\"\nread_timeout = \"30s\"\nretries = 0\ndrain_timeout = \"1s\"\n\n[guard]\nopt_out = [\"svc\"]\n",
        &[("svc", &[(old.addr, 1)])],
    )
    .await;
    let url = s.agent.url("/");
    let slow = tokio::spawn(async move {
        let r = client()
            .get(url)
            .header("host", "svc")
            .send()
            .await
            .unwrap();
        r.status().as_u16()
    });
    eventually(
        Duration::from_secs(5),
        "the request to reach old",
        || async { (in_flight(&s.agent, old.addr).await == 1).then_some(()) },
    )
    .await;
    let removed = Instant::now();
    integration_tests::write_services(&s.registry, &[("svc", &[(new.addr, 1)])]);
    let status = slow.await.unwrap();
    let took = removed.elapsed();
    eprintln!(
        "drain_timeout=1s: the request left on the removed endpoint got {status} after {took:?}"
    );
    assert_eq!(status, 502, "the connection was closed under it");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "closed {took:?} after the removal, drain_timeout is 1 s"
    );
    eventually(
        Duration::from_secs(5),
        "old's connection to close",
        || async { (old.open_connections() == 0).then_some(()) },
    )
    .await;
}
