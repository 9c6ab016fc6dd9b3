//! TLS and mTLS to upstreams (#13): certificates made in the test with rcgen, real HTTPS
//! backends (tokio-rustls under hyper), the built agent in between.
use std::time::Duration;

use integration_tests::tls::{acceptor, Ca, TlsBackend};
use integration_tests::*;

const HTTP1: &[&[u8]] = &[b"http/1.1"];
const H2: &[&[u8]] = &[b"h2"];
const H2_AND_HTTP1: &[&[u8]] = &[b"h2", b"http/1.1"];

/// A file registry holding `services` (name → one address, with `metadata` TOML inline or ""),
/// and an agent on it with `toml` as its config file.
async fn agent(
    dir: &tempfile::TempDir,
    services: &[(&str, std::net::SocketAddr, &str)],
    toml: &str,
) -> Agent {
    let reg = dir.path().join("services.toml");
    let mut text = String::new();
    for (name, addr, meta) in services {
        let meta = if meta.is_empty() {
            String::new()
        } else {
            format!(", metadata = {{ {meta} }}")
        };
        text.push_str(&format!(
            "[[service]]\nname = \"{name}\"\ninstances = [{{ addr = \"{addr}\"{meta} }}]\n"
        ));
    }
    std::fs::write(&reg, text).unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, toml).unwrap();
    Agent::start(&[
        ("EDGE_AGENT_REGISTRY", &format!("file://{}", reg.display())),
        ("EDGE_AGENT_CONFIG", cfg.to_str().unwrap()),
    ])
    .await
}

/// `GET /x` with `Host: host`: (status, x-backend, x-sni, body).
async fn get(agent: &Agent, host: &str) -> (u16, String, String, String) {
    let r = client()
        .get(agent.url("/x"))
        .header("host", host)
        .send()
        .await
        .expect("request through the agent");
    let h = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (status, backend, sni) = (r.status().as_u16(), h("x-backend"), h("x-sni"));
    (status, backend, sni, r.text().await.unwrap_or_default())
}

/// `GET path` with `Host: host`: (status, the backend's `x-version`, body).
async fn get_version(agent: &Agent, host: &str, path: &str) -> (u16, String, String) {
    let r = client()
        .get(agent.url(path))
        .header("host", host)
        .send()
        .await
        .expect("request through the agent");
    let version = r
        .headers()
        .get("x-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (
        r.status().as_u16(),
        version,
        r.text().await.unwrap_or_default(),
    )
}

/// Upstream `id`'s first endpoint in `/upstreams`: (`connections`, `streams`).
async fn connections_and_streams(agent: &Agent, id: &str) -> (u64, u64) {
    let u = agent.upstreams().await;
    let ep = u["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["id"] == id)
        .map(|u| u["endpoints"][0].clone())
        .unwrap_or_else(|| panic!("upstream {id} in {u}"));
    match (ep["connections"].as_u64(), ep["streams"].as_u64()) {
        (Some(c), Some(s)) => (c, s),
        _ => panic!("connections and streams of {id} in {ep}"),
    }
}

/// The `requests`/`failures` counters of upstream `id`'s first endpoint in `/upstreams`.
async fn endpoint_failures(agent: &Agent, id: &str) -> u64 {
    let u = agent.upstreams().await;
    u["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["id"] == id)
        .and_then(|u| u["endpoints"][0]["failures"].as_u64())
        .unwrap_or_else(|| panic!("upstream {id} with failures in {u}"))
}

#[tokio::test]
async fn https_upstream_verified_against_the_ca_file_with_sni() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "pay");
    let pay = TlsBackend::start("pay-1", acceptor(&ca.leaf("pay", &["pay"]), None, HTTP1)).await;
    let billing = TlsBackend::start(
        "billing-1",
        acceptor(&ca.leaf("billing", &["billing.internal"]), None, HTTP1),
    )
    .await;
    let ca_file = ca.pem_path.display();
    let agent = agent(
        &dir,
        &[("pay", pay.addr, ""), ("billing", billing.addr, "")],
        &format!(
            "[[upstream]]\nid = \"pay\"\ntls = true\ntls_ca_file = \"{ca_file}\"\n\
             [[upstream]]\nid = \"billing\"\ntls = true\ntls_ca_file = \"{ca_file}\"\n\
             tls_server_name = \"billing.internal\"\n"
        ),
    )
    .await;
    for _ in 0..3 {
        let (status, backend, sni, body) = get(&agent, "pay").await;
        assert_eq!((status, backend.as_str()), (200, "pay-1"), "{body}");
        assert_eq!(sni, "pay", "SNI defaults to the service name");
        assert_eq!(body, "pay-1 /x");
    }
    assert_eq!(
        pay.handshakes(),
        1,
        "the TLS connection is pooled and reused"
    );
    let (status, backend, sni, body) = get(&agent, "billing").await;
    assert_eq!((status, backend.as_str()), (200, "billing-1"), "{body}");
    assert_eq!(sni, "billing.internal", "tls_server_name is the SNI");
}

/// `protocol = "h2"` with `tls = true`: the backend (ALPN `h2` only) sees HTTP/2, and requests
/// in flight together are streams of one connection, as `/upstreams` and the backend both say.
#[tokio::test]
async fn h2_over_tls_multiplexes_requests_on_one_connection() {
    const N: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "pay");
    let backend = TlsBackend::start("pay-1", acceptor(&ca.leaf("pay", &["pay"]), None, H2)).await;
    let agent = agent(
        &dir,
        &[("pay", backend.addr, "")],
        &format!(
            "[[upstream]]\nid = \"pay\"\nprotocol = \"h2\"\ntls = true\ntls_ca_file = \"{}\"\n",
            ca.pem_path.display()
        ),
    )
    .await;
    let (status, version, body) = get_version(&agent, "pay", "/x").await;
    assert_eq!((status, version.as_str()), (200, "HTTP/2.0"), "{body}");
    assert_eq!(body, "pay-1 /x");

    // N requests held open at the backend together.
    let held: Vec<_> = (0..N)
        .map(|_| {
            let url = agent.url("/hold");
            tokio::spawn(async move {
                let r = client().get(url).header("host", "pay").send().await;
                let r = r.expect("held request through the agent");
                let version = r.headers().get("x-version").cloned();
                (r.status().as_u16(), version)
            })
        })
        .collect();
    eventually(
        Duration::from_secs(10),
        "N streams open on one connection in /upstreams",
        || async { (connections_and_streams(&agent, "pay").await == (1, N as u64)).then_some(()) },
    )
    .await;
    assert_eq!(
        backend
            .peak_streams
            .load(std::sync::atomic::Ordering::SeqCst),
        N as u64,
        "the backend saw them all open at once on one connection"
    );
    backend.release(N);
    for h in held {
        let (status, version) = h.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(version.unwrap(), "HTTP/2.0");
    }
    assert_eq!(backend.handshakes(), 1, "one TLS connection for everything");
    eventually(Duration::from_secs(5), "the streams closed", || async {
        (connections_and_streams(&agent, "pay").await == (1, 0)).then_some(())
    })
    .await;
}

/// `protocol = "auto"` over TLS offers `h2` and `http/1.1`; the backend's ALPN choice decides,
/// per endpoint, and is remembered (no probe per request).
#[tokio::test]
async fn auto_over_tls_speaks_what_alpn_chose() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "pay");
    let both = TlsBackend::start(
        "both-1",
        acceptor(&ca.leaf("both", &["both"]), None, H2_AND_HTTP1),
    )
    .await;
    let old = TlsBackend::start("old-1", acceptor(&ca.leaf("old", &["old"]), None, HTTP1)).await;
    let ca_file = ca.pem_path.display();
    let agent = agent(
        &dir,
        &[("both", both.addr, ""), ("old", old.addr, "")],
        &format!(
            "[[upstream]]\nid = \"both\"\nprotocol = \"auto\"\ntls = true\ntls_ca_file = \"{ca_file}\"\n\
             [[upstream]]\nid = \"old\"\nprotocol = \"auto\"\ntls = true\ntls_ca_file = \"{ca_file}\"\n"
        ),
    )
    .await;
    for _ in 0..3 {
        let (status, version, body) = get_version(&agent, "both", "/x").await;
        assert_eq!((status, version.as_str()), (200, "HTTP/2.0"), "{body}");
        let (status, version, body) = get_version(&agent, "old", "/x").await;
        assert_eq!((status, version.as_str()), (200, "HTTP/1.1"), "{body}");
        assert_eq!(body, "old-1 /x");
    }
    assert_eq!(both.handshakes(), 1, "one HTTP/2 connection, reused");
    // The first request's handshake learnt `http/1.1`; later ones reuse the pooled connection.
    assert!(old.handshakes() <= 2, "handshakes: {}", old.handshakes());
    assert_eq!(connections_and_streams(&agent, "both").await, (1, 0));
    assert_eq!(
        connections_and_streams(&agent, "old").await,
        (1, 0),
        "one idle HTTP/1.1 connection, no HTTP/2 stream"
    );
    let ups = agent.upstreams().await;
    let protocols: Vec<_> = ups["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["protocol"].clone())
        .collect();
    assert!(protocols.iter().all(|p| p == "auto"), "{protocols:?}");
}

#[tokio::test]
async fn an_unknown_ca_is_a_502_with_the_reason_in_the_log_and_counts_against_the_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "private");
    let backend =
        TlsBackend::start("pay-1", acceptor(&ca.leaf("pay", &["pay"]), None, HTTP1)).await;
    // No tls_ca_file: the default roots, which do not hold the test's CA.
    let agent = agent(
        &dir,
        &[("pay", backend.addr, "")],
        "[[upstream]]\nid = \"pay\"\ntls = true\nretries = 0\n",
    )
    .await;
    let (status, _, _, body) = get(&agent, "pay").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("could not connect"), "{body}");
    eventually(Duration::from_secs(5), "the reason in the log", || async {
        let log = agent.log_text();
        (log.contains("TLS handshake with upstream failed") && log.contains("unknown CA"))
            .then_some(())
    })
    .await;
    assert_eq!(
        endpoint_failures(&agent, "pay").await,
        1,
        "passive health counts it"
    );
    let metrics = agent.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("edge_agent_upstream_errors_total")
                && l.contains("kind=\"connect\"")
                && l.contains("upstream=\"pay\"")),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_name_mismatch_and_an_expired_certificate_are_refused_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "pay");
    let wrong_name = TlsBackend::start(
        "other",
        acceptor(&ca.leaf("other", &["other.internal"]), None, HTTP1),
    )
    .await;
    let expired = TlsBackend::start(
        "old",
        acceptor(&ca.expired_leaf("old", &["old"]), None, HTTP1),
    )
    .await;
    let ca_file = ca.pem_path.display();
    let agent = agent(
        &dir,
        &[("pay", wrong_name.addr, ""), ("old", expired.addr, "")],
        &format!(
            "[[upstream]]\nid = \"pay\"\ntls = true\ntls_ca_file = \"{ca_file}\"\nretries = 0\n\
             [[upstream]]\nid = \"old\"\ntls = true\ntls_ca_file = \"{ca_file}\"\nretries = 0\n"
        ),
    )
    .await;
    assert_eq!(get(&agent, "pay").await.0, 502);
    assert_eq!(get(&agent, "old").await.0, 502);
    eventually(
        Duration::from_secs(5),
        "both reasons in the log",
        || async {
            let log = agent.log_text();
            let line = |what: &str| {
                log.lines()
                    .any(|l| l.contains("TLS handshake with upstream failed") && l.contains(what))
            };
            (line("name mismatch") && line("certificate expired")).then_some(())
        },
    )
    .await;
    assert!(wrong_name.failed_handshakes() >= 1 && expired.failed_handshakes() >= 1);
}

#[tokio::test]
async fn mtls_works_with_the_client_certificate_and_fails_without() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new(dir.path(), "server");
    let client_ca = Ca::new(dir.path(), "clients");
    let client = client_ca.leaf("agent-client", &["edge-agent"]);
    let backend = TlsBackend::start(
        "pay-1",
        acceptor(&server_ca.leaf("pay", &["pay"]), Some(&client_ca), HTTP1),
    )
    .await;
    let ca_file = server_ca.pem_path.display();
    let agent = agent(
        &dir,
        &[("pay", backend.addr, ""), ("nocert", backend.addr, "")],
        &format!(
            "[[upstream]]\nid = \"pay\"\ntls = true\ntls_ca_file = \"{ca_file}\"\n\
             tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n\
             [[upstream]]\nid = \"nocert\"\ntls = true\ntls_ca_file = \"{ca_file}\"\n\
             tls_server_name = \"pay\"\nretries = 0\n",
            client.cert_path.display(),
            client.key_path.display()
        ),
    )
    .await;
    let (status, backend_name, _, body) = get(&agent, "pay").await;
    assert_eq!((status, backend_name.as_str()), (200, "pay-1"), "{body}");
    let (status, _, _, body) = get(&agent, "nocert").await;
    assert_eq!(status, 502, "without a client certificate: {body}");
    assert!(backend.failed_handshakes() >= 1);
    assert_eq!(
        get(&agent, "pay").await.0,
        200,
        "the one with the cert still works"
    );
}

#[tokio::test]
async fn the_registry_says_tls_and_the_config_wins() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "pay");
    let backend = TlsBackend::start(
        "pay-1",
        acceptor(&ca.leaf("pay", &["pay", "plain"]), None, HTTP1),
    )
    .await;
    let ca_file = ca.pem_path.display();
    let agent = agent(
        &dir,
        &[
            ("pay", backend.addr, "secure = \"true\""),
            ("plain", backend.addr, "secure = \"true\""),
            ("zero", backend.addr, "https = \"1\""),
        ],
        &format!(
            // `pay` leaves `tls` unset: the registry's `secure` decides; `plain` says no.
            "[[upstream]]\nid = \"pay\"\ntls_ca_file = \"{ca_file}\"\n\
             [[upstream]]\nid = \"plain\"\ntls = false\nretries = 0\n\
             [[upstream]]\nid = \"zero\"\nretries = 0\n"
        ),
    )
    .await;
    let (status, backend_name, _, body) = get(&agent, "pay").await;
    assert_eq!((status, backend_name.as_str()), (200, "pay-1"), "{body}");
    let before = backend.failed_handshakes();
    // Clear text to a TLS server: the server sees no handshake, the exchange fails.
    let (status, _, _, body) = get(&agent, "plain").await;
    assert_eq!(status, 502, "tls = false wins over the registry: {body}");
    eventually(
        Duration::from_secs(5),
        "the plain request to be refused",
        || async { (backend.failed_handshakes() > before).then_some(()) },
    )
    .await;
    // An upstream configuring no TLS of its own gets the default roots: TLS is tried (and
    // fails on the test CA), never clear text.
    assert_eq!(get(&agent, "zero").await.0, 502);
    eventually(
        Duration::from_secs(5),
        "the default-roots handshake",
        || async { agent.log_text().contains("unknown CA").then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_bad_ca_file_is_refused_at_start_and_on_reload_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("not-a-ca.pem");
    std::fs::write(
        &bad,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let missing = dir.path().join("missing.pem");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[upstream]]\nid = \"pay\"\ntls = true\ntls_ca_file = \"{}\"\n\
             [[upstream]]\nid = \"other\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            bad.display(),
            missing.display(),
            missing.display()
        ),
    )
    .unwrap();
    let mut refused = Agent::spawn(&[("EDGE_AGENT_CONFIG", cfg.to_str().unwrap())]);
    let status = refused.wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success());
    let log = refused.log_text();
    assert!(
        log.contains("upstream[0].tls_ca_file") && log.contains(&bad.display().to_string()),
        "{log}"
    );
    assert!(log.contains("not a PEM certificate file"), "{log}");
    assert!(
        log.contains("upstream[1].tls_cert_file") && log.contains("No such file"),
        "{log}"
    );

    // On reload: the old configuration keeps serving.
    let ca = Ca::new(dir.path(), "pay");
    let backend =
        TlsBackend::start("pay-1", acceptor(&ca.leaf("pay", &["pay"]), None, HTTP1)).await;
    let good = format!(
        "[[upstream]]\nid = \"pay\"\ntls = true\ntls_ca_file = \"{}\"\n",
        ca.pem_path.display()
    );
    let agent = agent(&dir, &[("pay", backend.addr, "")], &good).await;
    assert_eq!(get(&agent, "pay").await.0, 200);
    std::fs::write(
        &cfg,
        format!(
            "[[upstream]]\nid = \"pay\"\ntls = true\ntls_ca_file = \"{}\"\n",
            bad.display()
        ),
    )
    .unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(Duration::from_secs(10), "the refused reload", || async {
        agent
            .metrics()
            .await
            .contains("edge_agent_config_reloads_total{result=\"error\"}")
            .then_some(())
    })
    .await;
    assert!(
        agent.log_text().contains("tls_ca_file"),
        "the log names the field"
    );
    assert_eq!(
        get(&agent, "pay").await.0,
        200,
        "the old config keeps serving"
    );
}
