//! `edge-agent status` against a running agent: the table, `--json`, the exit codes, with and
//! without the admin token.
use std::process::{Command, Output};
use std::time::Duration;

use integration_tests::{agent_bin, eventually, free_port, write_services, Agent, Backend};

fn status(admin: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(agent_bin());
    c.arg("status")
        .args(args)
        .env_remove("EDGE_AGENT_REGISTRY")
        .env_remove("EDGE_AGENT_CONFIG")
        .env_remove("EDGE_AGENT_ADMIN_TOKEN")
        .env("EDGE_AGENT_ADMIN_LISTEN", admin)
        .env("EDGE_AGENT_REGISTRY", "file:///dev/null");
    if let Some(t) = token {
        c.env("EDGE_AGENT_ADMIN_TOKEN", t);
    }
    c.output().expect("run edge-agent status")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[tokio::test]
async fn table_json_and_exit_codes_with_and_without_the_token() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("services.toml");
    // `down` has one instance the registry calls unhealthy: no available endpoint.
    write_services(&path, &[("svc", &[(a.addr, 1)])]);
    let mut text_file = std::fs::read_to_string(&path).unwrap();
    text_file.push_str(
        "[[service]]\nname = \"down\"\ninstances = [ { addr = \"127.0.0.1:9\", healthy = false } ]\n",
    );
    std::fs::write(&path, &text_file).unwrap();
    let registry = format!("file://{}", path.display());
    // Not Agent::start: its readiness poll has no token.
    let agent = Agent::spawn(&[
        ("EDGE_AGENT_REGISTRY", &registry),
        ("EDGE_AGENT_ADMIN_TOKEN", "s3cret"),
    ]);
    let admin = agent.admin.to_string();
    eventually(Duration::from_secs(10), "both upstreams", || async {
        let u = integration_tests::client()
            .get(agent.admin_url("/upstreams"))
            .bearer_auth("s3cret")
            .send()
            .await
            .ok()?
            .json::<serde_json::Value>()
            .await
            .ok()?;
        (u["upstreams"].as_array()?.len() == 2).then_some(())
    })
    .await;

    // Without the token: refused, exit 3, and it says why.
    let o = status(&admin, None, &[]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{out}{err}");
    assert!(
        err.contains("401") && err.contains("EDGE_AGENT_ADMIN_TOKEN"),
        "{err}"
    );
    let o = status(&admin, Some("wrong"), &[]);
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o).1.contains("the token was refused"));

    // With it: the table; `down` has no available endpoint, so exit 1.
    let o = status(&admin, Some("s3cret"), &[]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(out.starts_with("ready: yes\n"), "{out}");
    assert!(out.contains(&format!("file    {registry}  yes")), "{out}");
    assert!(
        out.contains("upstream svc  balancer roundrobin  available 1/1"),
        "{out}"
    );
    assert!(
        out.contains("upstream down  balancer roundrobin  available 0/1"),
        "{out}"
    );
    assert!(
        out.contains(&format!("  {}  available  1", a.addr)),
        "{out}"
    );
    assert!(out.contains("  127.0.0.1:9  registry-unhealthy"), "{out}");
    assert!(
        err.contains("upstream down: no available endpoint (1 known)"),
        "{err}"
    );

    // --json: the document itself.
    let o = status(&admin, Some("s3cret"), &["--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json prints JSON");
    assert_eq!(doc["ready"], true);
    assert_eq!(doc["upstreams"].as_array().unwrap().len(), 2);
    assert_eq!(o.status.code(), Some(1));

    // Once `down` is gone every upstream has an endpoint: exit 0.
    write_services(&path, &[("svc", &[(a.addr, 1)])]);
    eventually(Duration::from_secs(10), "status to exit 0", || async {
        (status(&admin, Some("s3cret"), &[]).status.code() == Some(0)).then_some(())
    })
    .await;
}

#[test]
fn no_agent_listening_exits_3_naming_the_address() {
    let admin = format!("127.0.0.1:{}", free_port());
    let o = status(&admin, None, &[]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{out}{err}");
    assert!(
        err.contains(&admin) && err.contains("cannot connect"),
        "{err}"
    );
}
