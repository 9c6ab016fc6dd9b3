//! Consul's HTTP API as this adapter uses it: one blocking GET, the typed answers and their
//! parsing, and Consul's index and ACL rules.
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use ::url::Url;
use reqwest::header::HeaderMap;
use serde::Deserialize;
use serde_json::Value;

use super::{ConsulDiscovery, ENV_TOKEN};
use crate::http::Failure;
use crate::{ErrorKind, Instance, DEFAULT_WEIGHT};

const HEADER_INDEX: &str = "x-consul-index";
const HEADER_TOKEN: &str = "x-consul-token";
const HEADER_DEFAULT_POLICY: &str = "x-consul-default-acl-policy";
const HEADER_FILTERED: &str = "x-consul-results-filtered-by-acls";

/// One answer of a blocking query.
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) body: Value,
    pub(super) index: Option<u64>,
    /// Why the answer may be empty because of ACLs, if the headers say so.
    pub(super) acl: Option<String>,
}

/// The next index to send after an answer carrying `got`, following Consul's rules: backwards
/// → 0 (start over), 0 or missing → 1 (never a non-blocking loop).
pub fn next_index(prev: u64, got: Option<u64>) -> u64 {
    match got {
        Some(i) if i < prev => 0,
        Some(0) | None => 1,
        Some(i) => i,
    }
}

/// Explains an answer that ACLs may have emptied, from its headers.
fn acl_note(headers: &HeaderMap, has_token: bool, empty: bool) -> Option<String> {
    let header = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase)
    };
    if header(HEADER_FILTERED).as_deref() == Some("true") {
        return Some(format!(
            "Consul filtered this answer by ACL ({HEADER_FILTERED}: true): the token in \
             {ENV_TOKEN} lacks service:read/node:read on some services"
        ));
    }
    if !has_token && empty && header(HEADER_DEFAULT_POLICY).as_deref() == Some("deny") {
        return Some(format!(
            "Consul's ACL default policy is deny and {ENV_TOKEN} is not set: anonymous reads \
             return nothing; set {ENV_TOKEN} to a token with service:read and node:read"
        ));
    }
    None
}

impl ConsulDiscovery {
    /// A blocking GET of `path` (segments) from `index`.
    pub(super) async fn get(
        &self,
        segments: &[&str],
        index: u64,
        health: bool,
    ) -> Result<Answer, Failure> {
        let (at, server) = self.server();
        let result = self.get_from(server, segments, index, health).await;
        result.map_err(|mut f| {
            self.failed_on(at, &mut f.message);
            f
        })
    }

    /// One blocking GET from `server`.
    async fn get_from(
        &self,
        server: &super::Server,
        segments: &[&str],
        index: u64,
        health: bool,
    ) -> Result<Answer, Failure> {
        let mut url = Url::parse(&server.base).expect("base URL parses");
        url.path_segments_mut()
            .expect("http URL has a path")
            .extend(segments);
        {
            let mut q = url.query_pairs_mut();
            if health {
                q.append_pair("passing", "true");
                for t in &self.tags {
                    q.append_pair("tag", t);
                }
                if let Some(n) = &self.near {
                    q.append_pair("near", n);
                }
            }
            if let Some(dc) = &self.dc {
                q.append_pair("dc", dc);
            }
            if index > 0 {
                q.append_pair("index", &index.to_string());
                q.append_pair("wait", &format!("{}ms", self.wait.as_millis()));
            }
        }
        let shown = format!(
            "consul GET {}{}",
            server.authority,
            &url[::url::Position::BeforePath..]
        );
        let mut req = self.client.get(url).timeout(self.call_timeout());
        if let Some(t) = &self.token {
            req = req.header(HEADER_TOKEN, t.0.clone());
        }
        let what: &str = &shown;
        let resp = req.send().await.map_err(|e| Failure::request(what, e))?;
        if !resp.status().is_success() {
            let too_many = resp.status() == reqwest::StatusCode::TOO_MANY_REQUESTS;
            let mut failure = Failure::status(what, resp).await;
            if too_many {
                // Consul's answer when one client IP holds too many connections: every watched
                // service holds one while it blocks (HTTP/1.1), plus one for the catalog.
                failure.message.push_str(&format!(
                    " (Consul's limits.http_max_conns_per_client, 200 by default, counts this \
                     host's connections: this agent blocks on {} service watches plus the \
                     catalog; raise the limit, or lower idle_ttl so unused watches stop sooner)",
                    self.watching.load(Ordering::Relaxed)
                ));
            }
            return Err(failure);
        }
        let headers = resp.headers().clone();
        let index = headers
            .get(HEADER_INDEX)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let bytes = resp.bytes().await.map_err(|e| Failure::request(what, e))?;
        let body: Value = serde_json::from_slice(&bytes).map_err(|e| Failure {
            kind: ErrorKind::Parse,
            message: format!("{shown}: not JSON: {e}"),
        })?;
        let empty = match &body {
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            Value::Null => true,
            _ => false,
        };
        Ok(Answer {
            acl: acl_note(&headers, self.token.is_some(), empty),
            body,
            index,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct NodeJson {
    node: String,
    address: String,
    meta: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct WeightsJson {
    passing: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct ServiceJson {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    tags: Option<Vec<String>>,
    address: String,
    port: i64,
    meta: Option<BTreeMap<String, String>>,
    weights: Option<WeightsJson>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EntryJson {
    node: NodeJson,
    service: ServiceJson,
}

/// Parses a `/v1/health/service/<name>` answer: the instances, and one message per entry
/// skipped or defaulted. `Err` when the answer is not an array.
pub fn parse_health(body: &Value) -> Result<(Vec<Instance>, Vec<String>), String> {
    let entries = match body {
        Value::Array(a) => a,
        Value::Null => return Ok((Vec::new(), Vec::new())),
        other => return Err(format!("expected an array, got {}", kind_of(other))),
    };
    let mut out = Vec::with_capacity(entries.len());
    let mut problems = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let entry: EntryJson = match serde_json::from_value(e.clone()) {
            Ok(x) => x,
            Err(err) => {
                problems.push(format!("entry #{}: {err}; skipped", i + 1));
                continue;
            }
        };
        let (node, svc) = (entry.node, entry.service);
        let sid = if svc.id.is_empty() {
            svc.service.clone()
        } else {
            svc.id.clone()
        };
        let id = format!("{}/{}", node.node, sid);
        let port = match u16::try_from(svc.port) {
            Ok(p) if p != 0 => p,
            _ => {
                problems.push(format!(
                    "instance {id:?}: port {} unusable; skipped",
                    svc.port
                ));
                continue;
            }
        };
        let addr = if svc.address.trim().is_empty() {
            node.address.trim()
        } else {
            svc.address.trim()
        };
        if addr.is_empty() {
            problems.push(format!(
                "instance {id:?}: no Service.Address or Node.Address; skipped"
            ));
            continue;
        }
        let addr = addr.trim_start_matches('[').trim_end_matches(']');
        let mut inst = Instance::new(addr, port);
        inst.id = id.clone();
        if let Err(e) = crate::check_instance(&inst) {
            problems.push(format!("instance {id:?}: {e}; skipped"));
            continue;
        }
        inst.weight = match svc.weights.and_then(|w| w.passing) {
            None => DEFAULT_WEIGHT,
            Some(w) => match u32::try_from(w) {
                Ok(w) => w,
                Err(_) => {
                    problems.push(format!(
                        "instance {id:?}: Weights.Passing {w} out of range; using {DEFAULT_WEIGHT}"
                    ));
                    DEFAULT_WEIGHT
                }
            },
        };
        let mut metadata = svc.meta.unwrap_or_default();
        let tags = svc.tags.unwrap_or_default();
        if !tags.is_empty() {
            metadata
                .entry("tags".into())
                .or_insert_with(|| tags.join(","));
        }
        // Each tag as a key of its own, so `subset = { "tag:v2" = "true" }` selects by tag.
        for t in tags.iter().filter(|t| !t.is_empty()) {
            metadata
                .entry(format!("tag:{t}"))
                .or_insert_with(|| "true".into());
        }
        // Zone: the service's meta `zone`, else the node's meta `zone`.
        let node_zone = node
            .meta
            .as_ref()
            .and_then(|m| m.get("zone"))
            .filter(|z| !z.is_empty())
            .cloned();
        if !node.node.is_empty() {
            metadata.entry("node".into()).or_insert(node.node);
        }
        inst.zone = metadata
            .get("zone")
            .filter(|z| !z.is_empty())
            .cloned()
            .or(node_zone);
        inst.metadata = metadata;
        out.push(inst);
    }
    out.sort();
    Ok((out, problems))
}

/// Parses a `/v1/catalog/services` answer: lower-cased names, sorted and deduplicated.
pub fn parse_catalog(body: &Value) -> Result<Vec<String>, String> {
    match body {
        Value::Object(o) => {
            let mut names: Vec<String> = o.keys().map(|k| k.to_ascii_lowercase()).collect();
            names.sort();
            names.dedup();
            Ok(names)
        }
        Value::Null => Ok(Vec::new()),
        other => Err(format!("expected an object, got {}", kind_of(other))),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    #[test]
    fn index_rules() {
        assert_eq!(next_index(0, Some(7)), 7);
        assert_eq!(next_index(7, Some(7)), 7);
        assert_eq!(next_index(7, Some(9)), 9);
        assert_eq!(next_index(9, Some(3)), 0, "backwards resets");
        assert_eq!(next_index(0, Some(0)), 1, "0 is raised to 1");
        assert_eq!(next_index(5, None), 1);
    }

    #[test]
    fn health_mapping() {
        let body = serde_json::json!([
            {"Node": {"Node": "n1", "Address": "10.0.0.1"},
             "Service": {"ID": "web-1", "Service": "web", "Tags": ["v2", "canary"], "Address": "",
                         "Port": 8080, "Meta": {"zone": "z1", "version": "2"},
                         "Weights": {"Passing": 3, "Warning": 1}},
             "Checks": []},
            {"Node": {"Node": "n2", "Address": "10.0.0.2", "Meta": {"zone": "node-zone"}},
             "Service": {"ID": "web-2", "Service": "web", "Tags": null, "Address": "192.168.1.5",
                         "Port": 8081, "Meta": null}},
            {"Node": {"Node": "n3", "Address": "10.0.0.3"},
             "Service": {"ID": "web-3", "Service": "web", "Port": 0}},
            "junk"
        ]);
        let (set, problems) = parse_health(&body).unwrap();
        assert_eq!(set.len(), 2, "{set:?}");
        let a = &set[0];
        assert_eq!(
            (a.id.as_str(), a.addr.as_str(), a.port, a.weight, a.healthy),
            ("n1/web-1", "10.0.0.1", 8080, 3, true)
        );
        assert_eq!(a.zone.as_deref(), Some("z1"));
        assert_eq!(a.metadata["tags"], "v2,canary");
        assert_eq!(a.metadata["tag:v2"], "true");
        assert_eq!(a.metadata["tag:canary"], "true");
        assert_eq!(a.metadata["version"], "2");
        assert_eq!(a.metadata["node"], "n1");
        let b = &set[1];
        assert_eq!(
            (b.addr.as_str(), b.weight, b.zone.as_deref()),
            ("192.168.1.5", 1, Some("node-zone")),
            "no service meta zone: the node's"
        );
        assert!(!b.metadata.contains_key("tags"));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("n3/web-3"), "{problems:?}");
        assert!(parse_health(&serde_json::json!({"x": 1})).is_err());
        assert_eq!(parse_health(&Value::Null).unwrap().0, vec![]);
    }

    /// Defect 1: an address `http::uri::Authority` refuses is skipped with a problem naming the
    /// instance and the address; the rest of the answer is used.
    #[test]
    fn an_address_that_cannot_be_dialled_is_skipped_and_named() {
        let body = serde_json::json!([
            {"Node": {"Node": "n1", "Address": "10.0.0.1"},
             "Service": {"ID": "good", "Service": "web", "Port": 8080}},
            {"Node": {"Node": "n2", "Address": "10.0.0.2"},
             "Service": {"ID": "spaced", "Service": "web", "Address": "foo bar", "Port": 8080}},
            {"Node": {"Node": "n3", "Address": "é.example"},
             "Service": {"ID": "accented", "Service": "web", "Port": 8080}}
        ]);
        let (set, problems) = parse_health(&body).unwrap();
        let ids: Vec<&str> = set.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["n1/good"]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("n2/spaced") && problems[0].contains("\"foo bar\""),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("n3/accented") && problems[1].contains("\"é.example\""),
            "{problems:?}"
        );
    }

    #[test]
    fn catalog_names_are_lower_cased() {
        let body = serde_json::json!({"consul": [], "Web": ["v1"], "api": []});
        assert_eq!(parse_catalog(&body).unwrap(), vec!["api", "consul", "web"]);
        assert!(parse_catalog(&serde_json::json!([1])).is_err());
    }

    #[test]
    fn acl_notes() {
        let mut h = HeaderMap::new();
        assert!(acl_note(&h, false, true).is_none());
        h.insert(HEADER_DEFAULT_POLICY, HeaderValue::from_static("deny"));
        assert!(acl_note(&h, false, true).unwrap().contains(ENV_TOKEN));
        assert!(acl_note(&h, true, true).is_none());
        assert!(acl_note(&h, false, false).is_none());
        h.insert(HEADER_FILTERED, HeaderValue::from_static("true"));
        assert!(acl_note(&h, true, false).unwrap().contains("filtered"));
    }
}
