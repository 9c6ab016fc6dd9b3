//! The admin status page in a real browser: headless Chromium (Debian's, installed by
//! `servers/chromium/install.sh`) loads `GET /` from a running agent with an ejected endpoint,
//! an upstream in panic mode and a registry-unhealthy endpoint, runs the page's script, and
//! the test reads the DOM it built (`--dump-dom`) and takes a screenshot
//! (`$CARGO_TARGET_TMPDIR/chromium/status-page.png`; the README's is `docs/status-page.png`).
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use integration_tests::{client, eventually, write_services, Agent, Backend, Behaviour};

/// The longest a Chromium run may take before the test fails.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(90);

fn chromium() -> PathBuf {
    for c in ["chromium", "chromium-browser"] {
        if let Ok(o) = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {c}"))
            .output()
        {
            let p = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if o.status.success() && !p.is_empty() {
                return PathBuf::from(p);
            }
        }
    }
    panic!("chromium is not installed: run integration-tests/servers/chromium/install.sh");
}

/// Runs headless Chromium on `url` with `args`; returns stdout.
async fn run_chromium(profile: &Path, url: &str, args: &[&str]) -> String {
    let mut cmd = tokio::process::Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-proxy-server",
        "--hide-scrollbars",
        // Virtual time: the page's fetch and render finish before the DOM is read.
        "--virtual-time-budget=4000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let out = tokio::time::timeout(CHROMIUM_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("chromium did not finish within {CHROMIUM_TIMEOUT:?}"))
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn failing(status: u16) -> Behaviour {
    Behaviour {
        status,
        ..Default::default()
    }
}

#[tokio::test]
async fn the_status_page_shows_ejected_panic_and_unhealthy_endpoints() {
    let ok1 = Backend::start("ok1").await;
    let ok2 = Backend::start("ok2").await;
    let bad = Backend::start_with("bad", failing(500)).await;
    let down1 = Backend::start_with("down1", failing(503)).await;
    let down2 = Backend::start_with("down2", failing(503)).await;
    let up = Backend::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let services = dir.path().join("services.toml");
    write_services(
        &services,
        &[
            ("checkout", &[(ok1.addr, 1), (ok2.addr, 1), (bad.addr, 1)]),
            (
                "payments",
                &[(down1.addr, 1), (down2.addr, 1), (up.addr, 1)],
            ),
            ("search", &[(ok1.addr, 2), (ok2.addr, 1)]),
        ],
    );
    // `users`: one instance the registry calls unhealthy.
    let mut text = std::fs::read_to_string(&services).unwrap();
    text.push_str(&format!(
        "[[service]]\nname = \"users\"\ninstances = [ {{ addr = \"{}\", zone = \"a\" }}, \
         {{ addr = \"127.0.0.1:9\", healthy = false, zone = \"b\" }} ]\n",
        ok2.addr
    ));
    std::fs::write(&services, text).unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "[[upstream]]\nid = \"payments\"\nretries = 0\n[upstream.checks.passive]\nenabled = false\n\
         panic_threshold = 50\n\
         [upstream.checks.active]\npath = \"/\"\ninterval = \"100ms\"\nunhealthy_threshold = 1\n",
    )
    .unwrap();
    let registry = format!("file://{}", services.display());
    let agent = Agent::start(&[
        ("EDGE_AGENT_REGISTRY", &registry),
        ("EDGE_AGENT_CONFIG", cfg.to_str().unwrap()),
    ])
    .await;

    // Traffic for the rates and the sparkline, bounded (stops when the test is done or after
    // 300 s).
    let done = Arc::new(AtomicBool::new(false));
    let load = {
        let (done, url) = (done.clone(), agent.url("/"));
        tokio::spawn(async move {
            let c = client();
            let started = std::time::Instant::now();
            let mut i = 0u64;
            while !done.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(300) {
                let host = ["checkout", "search", "users", "payments"][(i % 4) as usize];
                let _ = c.get(&url).header("host", host).send().await;
                i += 1;
                // A rate that swings over a minute, so the sparkline has a shape.
                let phase = started.elapsed().as_secs() % 60;
                tokio::time::sleep(Duration::from_millis(2 + phase / 4)).await;
            }
        })
    };
    let bad_addr = bad.addr.to_string();
    let doc = eventually(
        Duration::from_secs(30),
        "an ejected endpoint, panic mode and a 10 s sparkline",
        || async {
            let u = agent.upstreams().await;
            let ups = u["upstreams"].as_array()?;
            let find = |id: &str| ups.iter().find(|x| x["id"] == id).cloned();
            let ejected = find("checkout")?["endpoints"]
                .as_array()?
                .iter()
                .any(|e| e["address"] == bad_addr.as_str() && e["ejected"] == true);
            let panic = find("payments")?["panic"] == true;
            let series = find("search")?["stats"]["rps_series"].as_array()?.len() >= 2;
            (ejected && panic && series).then_some(u)
        },
    )
    .await;
    assert!(doc["upstreams"][0]["stats"]["rps_1m"].as_f64().is_some());
    // STATUS_PAGE_DEMO_SECONDS=N (at most 240): N more seconds of traffic before the
    // screenshot, for a longer sparkline (how docs/status-page.png was made).
    if let Some(n) = std::env::var("STATUS_PAGE_DEMO_SECONDS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_secs(n.min(240))).await;
    }

    let url = agent.admin_url("/");
    let profile = tempfile::tempdir().unwrap();
    let dom = run_chromium(profile.path(), &url, &["--dump-dom"]).await;
    // The page's script ran and rendered what /upstreams says.
    assert!(dom.contains("data-ready=\"true\""), "{dom}");
    assert!(
        dom.contains("data-upstream=\"payments\" data-panic=\"true\""),
        "payments not shown in panic:\n{dom}"
    );
    assert!(dom.contains("PANIC: all endpoints used"), "{dom}");
    assert!(
        dom.contains("data-upstream=\"checkout\" data-panic=\"false\""),
        "{dom}"
    );
    assert!(
        dom.contains(&format!(
            "data-endpoint=\"{bad_addr}\" data-state=\"ejected\""
        )),
        "{bad_addr} not shown ejected:\n{dom}"
    );
    assert!(
        dom.contains("data-endpoint=\"127.0.0.1:9\" data-state=\"registry-unhealthy\""),
        "{dom}"
    );
    assert!(
        dom.contains(&format!(
            "data-endpoint=\"{}\" data-state=\"available\"",
            ok1.addr
        )),
        "{dom}"
    );
    // Endpoints of payments failing their checks, the source row, the sparkline.
    assert!(
        dom.contains(&format!(
            "data-endpoint=\"{}\" data-state=\"check-failing\"",
            down1.addr
        )),
        "{dom}"
    );
    assert!(dom.contains("data-source=\"file\""), "{dom}");
    assert!(dom.contains("<polyline"), "no sparkline:\n{dom}");

    // The screenshot, for people (and the README).
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chromium");
    std::fs::create_dir_all(&out_dir).unwrap();
    let png = out_dir.join("status-page.png");
    let _ = std::fs::remove_file(&png);
    run_chromium(
        profile.path(),
        &url,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1400,1000",
        ],
    )
    .await;
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(bytes.len() > 20_000, "a {} byte screenshot", bytes.len());
    eprintln!("status page screenshot: {}", png.display());
    done.store(true, Ordering::Relaxed);
    load.await.unwrap();
}

/// With `EDGE_AGENT_ADMIN_TOKEN` the page needs it like the rest of the admin API: a browser
/// given the token as the Basic password (here in the URL) renders the page, whose own
/// requests to `/upstreams` then carry it; without it there is no page.
#[tokio::test]
async fn the_status_page_takes_the_admin_token_as_a_basic_password() {
    let ok = Backend::start("ok").await;
    let dir = tempfile::tempdir().unwrap();
    let services = dir.path().join("services.toml");
    write_services(&services, &[("svc", &[(ok.addr, 1)])]);
    let registry = format!("file://{}", services.display());
    let agent = Agent::spawn(&[
        ("EDGE_AGENT_REGISTRY", &registry),
        ("EDGE_AGENT_ADMIN_TOKEN", "t0ken"),
    ]);
    let ready = agent.admin_url("/ready");
    eventually(Duration::from_secs(30), "the agent ready", || async {
        let r = client()
            .get(&ready)
            .bearer_auth("t0ken")
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let profile = tempfile::tempdir().unwrap();
    let anonymous = run_chromium(profile.path(), &agent.admin_url("/"), &["--dump-dom"]).await;
    assert!(!anonymous.contains("data-upstream"), "{anonymous}");
    let with_token = format!("http://ops:t0ken@{}/", agent.admin);
    let profile = tempfile::tempdir().unwrap();
    let dom = run_chromium(profile.path(), &with_token, &["--dump-dom"]).await;
    assert!(
        dom.contains("data-upstream=\"svc\""),
        "the page did not render /upstreams with the token:\n{dom}"
    );
    assert!(dom.contains("data-ready=\"true\""), "{dom}");
}
