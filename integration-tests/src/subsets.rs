//! Helpers for the subset and zone tests (#14), shared by `subsets.rs` (file registry) and the
//! registry tests (`consul.rs`, `nacos.rs`, `eureka.rs`): requests with headers, who answered
//! them, and an upstream's or endpoint's entry in `/upstreams`.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::{client, eventually, Agent};

/// `GET /` with `Host: host` and `headers` through the agent: (status, `x-backend`, body).
pub async fn get_with(
    agent: &Agent,
    host: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut req = client().get(agent.url("/")).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("request through the agent");
    let status = r.status().as_u16();
    let backend = r
        .headers()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, backend, r.text().await.unwrap_or_default())
}

/// Which backend answered each of `n` requests (all must be 200): backend → count.
pub async fn answered_by(
    agent: &Agent,
    host: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let (status, backend, body) = get_with(agent, host, headers).await;
        assert_eq!(status, 200, "{host} {headers:?}: {body}");
        *out.entry(backend).or_insert(0) += 1;
    }
    out
}

/// Polls (up to `timeout`) until 16 requests in a row to `host` with `headers` are all answered
/// 200, by exactly the backends in `want` (each at least once).
pub async fn until_only(
    agent: &Agent,
    host: &str,
    headers: &[(&str, &str)],
    want: &[&str],
    timeout: Duration,
) {
    let mut want: Vec<&str> = want.to_vec();
    want.sort();
    let what = format!("{host} {headers:?} answered only by {want:?}");
    eventually(timeout, &what, || async {
        let mut seen = Vec::new();
        for _ in 0..16 {
            let (status, backend, _) = get_with(agent, host, headers).await;
            if status != 200 {
                return None;
            }
            seen.push(backend);
        }
        seen.sort();
        seen.dedup();
        (seen == want).then_some(())
    })
    .await
}

/// Polls until a request to `host` with `headers` is answered `status`; returns the body.
pub async fn until_status(
    agent: &Agent,
    host: &str,
    headers: &[(&str, &str)],
    status: u16,
    timeout: Duration,
) -> String {
    let what = format!("{host} {headers:?} answered {status}");
    eventually(timeout, &what, || async {
        let (got, _, body) = get_with(agent, host, headers).await;
        (got == status).then_some(body)
    })
    .await
}

/// Upstream `id`'s entry in a `/upstreams` answer.
pub fn upstream<'a>(u: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    u["upstreams"].as_array()?.iter().find(|x| x["id"] == id)
}

/// The entry of the endpoint at `address` (`ip:port`) in upstream `id`.
pub fn endpoint<'a>(
    u: &'a serde_json::Value,
    id: &str,
    address: &str,
) -> Option<&'a serde_json::Value> {
    upstream(u, id)?["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["address"] == address)
}

/// The counter `name{upstream="id"}` in a `/metrics` answer (0 when absent).
pub fn counter(metrics: &str, name: &str, id: &str) -> u64 {
    let prefix = format!("{name}{{upstream=\"{id}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// An agent configuration file with `toml` in a temporary directory (kept while the returned
/// guard lives).
pub fn config_file(toml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("edge-agent.toml");
    std::fs::write(&path, toml).expect("write the agent's config");
    (dir, path)
}
