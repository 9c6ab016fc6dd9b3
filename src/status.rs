//! `edge-agent status`: reads a running agent's `/upstreams` (address from
//! `EDGE_AGENT_ADMIN_LISTEN`, token from `EDGE_AGENT_ADMIN_TOKEN`) and prints a compact table
//! of sources, upstreams and endpoints, or with `--json` the document itself.
//!
//! Exit codes, so it can serve as a readiness probe: [`EXIT_OK`] when the agent is ready and
//! every upstream has an available endpoint, [`EXIT_DEGRADED`] when it is not ready or an
//! upstream has none, [`EXIT_UNREACHABLE`] when the admin API cannot be read (refused,
//! unauthorized, not JSON). A bad configuration exits 2 before this runs (`main.rs`).
//!
//! It sits in layer 8 beside `lib`: a client of the admin API, it reads only the
//! configuration and the JSON document.
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use crate::config::Config;

/// Ready, and every upstream has an available endpoint.
pub const EXIT_OK: u8 = 0;
/// Not ready, or an upstream without an available endpoint.
pub const EXIT_DEGRADED: u8 = 1;
/// The admin API could not be read.
pub const EXIT_UNREACHABLE: u8 = 3;
/// How long the whole exchange with the admin API may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the subcommand; returns the exit code.
pub fn run(config: &Config, json: bool) -> u8 {
    let addr = connect_addr(config.admin_listen);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edge-agent status: cannot start the runtime: {e}");
            return EXIT_UNREACHABLE;
        }
    };
    let fetched = runtime.block_on(async {
        tokio::time::timeout(TIMEOUT, fetch(addr, config.admin_token.as_deref()))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {TIMEOUT:?}")))
    });
    let doc: Value = match fetched.and_then(|body| {
        serde_json::from_slice(&body).map_err(|e| format!("/upstreams is not JSON: {e}"))
    }) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("edge-agent status: http://{addr}/upstreams (EDGE_AGENT_ADMIN_LISTEN): {e}");
            return EXIT_UNREACHABLE;
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        print!("{}", table(&doc));
    }
    let problems = problems(&doc);
    for p in &problems {
        eprintln!("edge-agent status: {p}");
    }
    if problems.is_empty() {
        EXIT_OK
    } else {
        EXIT_DEGRADED
    }
}

/// An unspecified listen address (`0.0.0.0`, `::`) is reached on loopback.
fn connect_addr(mut a: SocketAddr) -> SocketAddr {
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    a
}

async fn fetch(addr: SocketAddr, token: Option<&str>) -> Result<bytes::Bytes, String> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .uri("/upstreams")
        .header(http::header::HOST, addr.to_string());
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    match status.as_u16() {
        200 => Ok(body),
        401 => Err(format!(
            "401 unauthorized: {} (EDGE_AGENT_ADMIN_TOKEN)",
            if token.is_some() {
                "the token was refused"
            } else {
                "the agent needs a token"
            }
        )),
        _ => Err(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&body).trim()
        )),
    }
}

/// Why the agent is not fit to serve: not ready, upstreams without an available endpoint.
pub fn problems(doc: &Value) -> Vec<String> {
    let mut v = Vec::new();
    if doc["ready"] != true {
        v.push("not ready: a discovery source has not answered yet".to_string());
    }
    for u in doc["upstreams"].as_array().into_iter().flatten() {
        let eps = u["endpoints"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        if !eps.iter().any(|e| e["available"] == true) {
            v.push(format!(
                "upstream {}: no available endpoint ({} known)",
                s(&u["id"]),
                eps.len()
            ));
        }
    }
    v
}

/// An endpoint's state in one word (and detail), as the status page colours it.
pub fn endpoint_state(e: &Value) -> String {
    if e["registry_healthy"] == false {
        "registry-unhealthy".into()
    } else if e["ejected"] == true {
        format!(
            "ejected {}s left (x{})",
            e["ejected_for_ms"].as_u64().unwrap_or(0).div_ceil(1000),
            e["ejections"].as_u64().unwrap_or(0)
        )
    } else if e["active_check_up"] == false {
        "check-failing".into()
    } else if e["held"] == true {
        "held".into()
    } else if e["available"] != true {
        "unavailable".into()
    } else if e["slow_start_factor"].as_f64().is_some_and(|f| f < 1.0) {
        format!(
            "slow-start x{:.2}",
            e["slow_start_factor"].as_f64().unwrap_or(1.0)
        )
    } else {
        "available".into()
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn num(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

/// Lays out rows with columns padded to their widest cell.
fn columns(out: &mut String, indent: &str, rows: &[Vec<String>]) {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::from(indent);
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// The table `edge-agent status` prints.
pub fn table(doc: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ready: {}",
        if doc["ready"] == true { "yes" } else { "NO" }
    );
    let mut rows = vec![vec![
        "SOURCE".into(),
        "URL".into(),
        "ANSWERED".into(),
        "STALENESS".into(),
        "LAST ERROR".into(),
    ]];
    for src in doc["sources"].as_array().into_iter().flatten() {
        rows.push(vec![
            s(&src["kind"]),
            s(&src["url"]),
            if src["answered"] == true { "yes" } else { "no" }.into(),
            format!("{}s", num(&src["staleness_seconds"], 1)),
            s(&src["last_error"]),
        ]);
    }
    out.push('\n');
    columns(&mut out, "", &rows);
    for u in doc["upstreams"].as_array().into_iter().flatten() {
        let eps = u["endpoints"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let avail = eps.iter().filter(|e| e["available"] == true).count();
        let st = &u["stats"];
        let _ = write!(
            out,
            "\nupstream {}  balancer {}  available {}/{}{}",
            s(&u["id"]),
            s(&u["balancer"]),
            avail,
            eps.len(),
            if u["panic"] == true { "  PANIC" } else { "" }
        );
        if st.is_object() {
            let _ = write!(
                out,
                "  {} req/s  {}% errors  p50 {} ms  p99 {} ms",
                num(&st["rps_1m"], 1),
                num(&(st["error_rate_1m"].as_f64().map(|x| x * 100.0).into()), 1),
                num(&st["p50_ms"], 1),
                num(&st["p99_ms"], 1)
            );
        }
        out.push('\n');
        let mut rows = vec![vec![
            "ENDPOINT".into(),
            "STATE".into(),
            "WEIGHT".into(),
            "ZONE".into(),
            "IN-FLIGHT".into(),
            "EWMA MS".into(),
            "REQUESTS".into(),
            "FAILURES".into(),
        ]];
        for e in eps {
            rows.push(vec![
                s(&e["address"]),
                endpoint_state(e),
                s(&e["weight"]),
                s(&e["zone"]),
                s(&e["in_flight"]),
                num(&e["ewma_ms"], 2),
                s(&e["requests"]),
                s(&e["failures"]),
            ]);
        }
        columns(&mut out, "  ", &rows);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Value {
        json!({
            "ready": true,
            "sources": [{"kind": "file", "url": "file:///s.toml", "answered": true,
                         "staleness_seconds": 0.25, "last_error": null}],
            "upstreams": [
                {"id": "a", "balancer": "roundrobin", "panic": false, "endpoints": [
                    {"address": "127.0.0.1:1", "available": true, "registry_healthy": true,
                     "ejected": false, "active_check_up": true, "slow_start_factor": 1.0,
                     "weight": 1, "in_flight": 0, "ewma_ms": 1.5, "requests": 3, "failures": 0},
                    {"address": "127.0.0.1:2", "available": false, "registry_healthy": true,
                     "ejected": true, "ejected_for_ms": 1500, "ejections": 2,
                     "weight": 1, "in_flight": 0, "requests": 9, "failures": 5}]},
            ]
        })
    }

    #[test]
    fn a_healthy_document_has_no_problems_and_a_table_row_per_endpoint() {
        let d = doc();
        assert!(problems(&d).is_empty());
        let t = table(&d);
        assert!(
            t.contains("upstream a  balancer roundrobin  available 1/2"),
            "{t}"
        );
        assert!(t.contains("127.0.0.1:2  ejected 2s left (x2)"), "{t}");
        assert!(t.contains("file    file:///s.toml  yes"), "{t}");
    }

    #[test]
    fn not_ready_or_no_available_endpoint_is_a_problem() {
        let mut d = doc();
        d["ready"] = json!(false);
        d["upstreams"][0]["endpoints"][0]["available"] = json!(false);
        let p = problems(&d);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[1].contains("upstream a: no available endpoint (2 known)"));
    }

    #[test]
    fn unspecified_listen_addresses_are_reached_on_loopback() {
        assert_eq!(
            connect_addr("0.0.0.0:15000".parse().unwrap()),
            "127.0.0.1:15000".parse().unwrap()
        );
        assert_eq!(
            connect_addr("[::]:15000".parse().unwrap()),
            "[::1]:15000".parse().unwrap()
        );
    }
}
