//! Eureka's JSON answers (`/apps`, `/apps/delta`) with their quirks, and the GET that fetches
//! one.
use std::collections::BTreeMap;

use serde_json::Value;

use super::{EurekaDiscovery, Server, STATUS_UP};
use crate::http::Failure;
use crate::{ErrorKind, Instance, Sink, DEFAULT_WEIGHT};

/// What an instance entry says it is in a delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Added,
    Modified,
    Deleted,
    Other(String),
}

/// One instance as the local copy keeps it: its status (for the hash) and, when it parsed, the
/// instance to route to.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub status: String,
    pub instance: Option<Instance>,
}

/// One instance entry of an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Upper-case app name as Eureka spells it.
    pub app: String,
    pub id: String,
    pub action: Action,
    pub entry: Entry,
}

/// A parsed `/apps` or `/apps/delta` answer.
#[derive(Debug, Default, PartialEq)]
pub struct Answer {
    pub items: Vec<Item>,
    /// `apps__hashcode`: the hash of the server's whole registry.
    pub hashcode: Option<String>,
    /// One message per entry skipped or defaulted, naming app, instance and field.
    pub problems: Vec<String>,
}

/// Parses an answer. `Err` only when it has no `applications` object at all.
pub fn parse_answer(value: &Value) -> Result<Answer, String> {
    let apps = value
        .get("applications")
        .filter(|a| a.is_object())
        .ok_or("no \"applications\" object in the answer")?;
    let mut answer = Answer {
        hashcode: apps.get("apps__hashcode").and_then(scalar_string),
        ..Answer::default()
    };
    for (i, app) in one_or_many(apps.get("application")).into_iter().enumerate() {
        let app_name = app.get("name").and_then(scalar_string);
        for (j, inst) in one_or_many(app.get("instance")).into_iter().enumerate() {
            let name = app_name
                .clone()
                .or_else(|| inst.get("app").and_then(scalar_string))
                .filter(|n| !n.is_empty());
            let Some(name) = name else {
                answer.problems.push(format!(
                    "application #{} instance #{}: no app name; skipped",
                    i + 1,
                    j + 1
                ));
                continue;
            };
            match parse_instance(inst) {
                Ok((id, action, entry, problems)) => {
                    for p in problems {
                        answer
                            .problems
                            .push(format!("app {name} instance {id:?}: {p}"));
                    }
                    answer.items.push(Item {
                        app: name.clone(),
                        id,
                        action,
                        entry,
                    });
                }
                Err(e) => answer
                    .problems
                    .push(format!("app {name} instance #{}: {e}; skipped", j + 1)),
            }
        }
    }
    Ok(answer)
}

/// `null`/absent → nothing, an array → its items, anything else → itself.
fn one_or_many(v: Option<&Value>) -> Vec<&Value> {
    match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.iter().collect(),
        Some(other) => vec![other],
    }
}

/// A string or number as a string.
fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn truthy(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// A port field: `{"$": 9001, "@enabled": "true"}`, `$` a number or string, or a bare number.
/// `Ok(None)` when absent.
fn port_field(
    v: Option<&Value>,
    field: &str,
    enabled_default: bool,
) -> Result<Option<(u16, bool)>, String> {
    let (raw, enabled) = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => {
            let enabled = match o.get("@enabled") {
                None | Some(Value::Null) => enabled_default,
                Some(e) => truthy(e)
                    .ok_or_else(|| format!("{field}.@enabled = {e}: expected true or false"))?,
            };
            (o.get("$").cloned().unwrap_or(Value::Null), enabled)
        }
        Some(other) => (other.clone(), true),
    };
    let port = match &raw {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    match port {
        Some(p) if p <= u16::MAX as u64 => Ok(Some((p as u16, enabled))),
        _ => Err(format!("{field} = {raw}: expected a port number")),
    }
}

/// Parses one instance entry: its identity, action, entry, and non-fatal problems. `Err` when
/// it has no identity at all (it cannot be tracked).
fn parse_instance(v: &Value) -> Result<(String, Action, Entry, Vec<String>), String> {
    if !v.is_object() {
        return Err(format!("expected an object, got {v}"));
    }
    let text = |k: &str| {
        v.get(k)
            .and_then(scalar_string)
            .filter(|s| !s.trim().is_empty())
    };
    let host_name = text("hostName");
    let ip = text("ipAddr");
    let port = port_field(v.get("port"), "port", true);
    let secure = port_field(v.get("securePort"), "securePort", false);
    // The second of the pair: whether the port dialled is the secure one.
    let chosen: Result<(u16, bool), String> = match (&port, &secure) {
        (Ok(Some((p, true))), _) if *p != 0 => Ok((*p, false)),
        (_, Ok(Some((p, true)))) if *p != 0 => Ok((*p, true)),
        (Err(e), _) | (_, Err(e)) => Err(e.clone()),
        _ => Err("no enabled port (port and securePort disabled or missing)".into()),
    };
    let raw_port = match (&chosen, &port) {
        (Ok((p, _)), _) => Some(*p),
        (_, Ok(Some((p, _)))) => Some(*p),
        _ => None,
    };
    let id = text("instanceId")
        .or_else(|| {
            let host = host_name.clone().or_else(|| ip.clone())?;
            Some(match raw_port {
                Some(p) => format!("{host}:{p}"),
                None => host,
            })
        })
        .ok_or("no instanceId, hostName or ipAddr")?;
    let action = match text("actionType")
        .as_deref()
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        None | Some("ADDED") => Action::Added,
        Some("MODIFIED") => Action::Modified,
        Some("DELETED") => Action::Deleted,
        Some(other) => Action::Other(other.to_string()),
    };
    let status = text("status")
        .map(|s| s.trim().to_ascii_uppercase())
        .unwrap_or_else(|| "UNKNOWN".into());
    let mut problems = Vec::new();
    let instance = (|| {
        let (port, secure_port) = chosen?;
        let addr = ip.or(host_name).ok_or("no ipAddr or hostName")?;
        let mut metadata = BTreeMap::new();
        match v.get("metadata") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, val) in m {
                    if k.starts_with('@') {
                        continue;
                    }
                    match val {
                        Value::Null => {}
                        Value::String(s) => {
                            metadata.insert(k.clone(), s.clone());
                        }
                        other => {
                            metadata.insert(k.clone(), other.to_string());
                        }
                    }
                }
            }
            Some(other) => {
                problems.push(format!("metadata = {other}: expected an object; ignored"))
            }
        }
        let mut inst = Instance::new(addr.trim(), port);
        inst.id = id.clone();
        crate::check_instance(&inst).map_err(|e| e.to_string())?;
        inst.healthy = status == STATUS_UP;
        if let Some(w) = metadata.get("weight") {
            match w.trim().parse::<u32>() {
                Ok(w) => inst.weight = w,
                Err(_) => problems.push(format!("metadata weight = {w:?}: expected a non-negative integer; using {DEFAULT_WEIGHT}")),
            }
        }
        inst.zone = metadata
            .get("zone")
            .cloned()
            .filter(|z| !z.is_empty())
            .or_else(|| {
                v.get("dataCenterInfo")?
                    .get("metadata")?
                    .get("availability-zone")
                    .and_then(scalar_string)
                    .filter(|z| !z.is_empty())
            });
        if secure_port {
            // The agent dials TLS to it unless the instance's metadata or the upstream's
            // `tls` key says otherwise.
            metadata
                .entry("secure".into())
                .or_insert_with(|| "true".into());
        }
        inst.metadata = metadata;
        Ok::<_, String>(inst)
    })();
    let instance = match instance {
        Ok(i) => Some(i),
        Err(e) => {
            problems.push(format!("{e}; skipped"));
            None
        }
    };
    Ok((id, action, Entry { status, instance }, problems))
}

impl EurekaDiscovery {
    /// `GET {base}{path}` as JSON: the parsed body and its size.
    /// `GET <server><path>` for JSON, with the source's credentials and timeout: the answer,
    /// and how to name the call in messages.
    async fn send(
        &self,
        server: &Server,
        path: &str,
    ) -> Result<(reqwest::Response, String), Failure> {
        let url = format!("{}{path}", server.base);
        let mut req = self
            .client
            .get(&url)
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(self.timeout);
        if let Some(c) = &self.credentials {
            req = req.basic_auth(&c.user, c.password.as_ref());
        }
        let what = format!("eureka GET {url}");
        let resp = req.send().await.map_err(|e| Failure::request(&what, e))?;
        Ok((resp, what))
    }

    async fn get(&self, server: &Server, path: &str) -> Result<(Value, usize), Failure> {
        let (resp, what) = self.send(server, path).await?;
        let what: &str = &what;
        let url = &what["eureka GET ".len()..];
        if !resp.status().is_success() {
            return Err(Failure::status(what, resp).await);
        }
        let body = resp.bytes().await.map_err(|e| Failure::request(what, e))?;
        let value = serde_json::from_slice(&body).map_err(|e| Failure {
            kind: ErrorKind::Parse,
            message: format!("eureka GET {url}: not JSON: {e}"),
        })?;
        Ok((value, body.len()))
    }

    /// `GET <server>/apps/<NAME>`: one app, now (the first request for a name the last poll
    /// did not have). `None`: Eureka does not know it (404).
    pub(super) async fn fetch_app(
        &self,
        server: &Server,
        app: &str,
        sink: Option<&Sink>,
    ) -> Result<Option<Answer>, Failure> {
        let path = format!("/apps/{}", app.to_ascii_uppercase());
        let (resp, what) = self.send(server, &path).await?;
        let what: &str = &what;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(Failure::status(what, resp).await);
        }
        let value: Value = resp.json().await.map_err(|e| Failure {
            kind: ErrorKind::Parse,
            message: format!("{what}: not JSON: {e}"),
        })?;
        // One app's answer is `{"application": …}`: read it as a registry of that app alone.
        let wrapped =
            serde_json::json!({"applications": {"application": value.get("application")}});
        let answer = parse_answer(&wrapped).map_err(|e| Failure {
            kind: ErrorKind::Parse,
            message: format!("{what}: {e}"),
        })?;
        if let Some(sink) = sink {
            for p in &answer.problems {
                sink.error(ErrorKind::Parse, format!("eureka {}: {p}", server.display))
                    .await;
            }
        }
        Ok(Some(answer))
    }

    pub(super) async fn fetch_answer(
        &self,
        server: &Server,
        path: &str,
        sink: &Sink,
    ) -> Result<(Answer, usize), Failure> {
        let (value, bytes) = self.get(server, path).await?;
        let answer = parse_answer(&value).map_err(|e| Failure {
            kind: ErrorKind::Parse,
            message: format!("eureka GET {}{path}: {e}", server.base),
        })?;
        for p in &answer.problems {
            sink.error(ErrorKind::Parse, format!("eureka {}: {p}", server.display))
                .await;
        }
        Ok((answer, bytes))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::eureka::Registry;

    pub(in crate::eureka) fn inst(id: &str, status: &str, port: u16, action: &str) -> Value {
        serde_json::json!({
            "instanceId": id, "hostName": "h", "app": "HELLO", "ipAddr": "127.0.0.1",
            "status": status, "port": {"$": port, "@enabled": "true"},
            "securePort": {"$": 443, "@enabled": "false"},
            "dataCenterInfo": {"@class": "x", "name": "MyOwn"},
            "metadata": {"@class": "java.util.Collections$EmptyMap"},
            "actionType": action
        })
    }

    pub(in crate::eureka) fn apps(hash: &str, app: &str, instances: Vec<Value>) -> Value {
        serde_json::json!({"applications": {"versions__delta": "1", "apps__hashcode": hash,
            "application": [{"name": app, "instance": instances}]}})
    }

    #[test]
    fn parses_eureka_quirks_and_maps_fields() {
        // Single objects instead of arrays, `$` as a string, `@enabled` as a boolean.
        let v = serde_json::json!({"applications": {"apps__hashcode": "DOWN_1_UP_2_", "application": {
            "name": "HELLO",
            "instance": [
                {"instanceId": "a", "hostName": "ha", "ipAddr": "10.0.0.1", "status": "UP",
                 "port": {"$": "9001", "@enabled": true},
                 "metadata": {"weight": "3", "zone": "z1", "version": 2, "@class": "x"},
                 "lastUpdatedTimestamp": 1700000000000_u64},
                {"hostName": "hb", "ipAddr": "10.0.0.2", "status": "DOWN",
                 "port": {"$": 9002, "@enabled": "false"}, "securePort": {"$": 9443, "@enabled": "true"},
                 "dataCenterInfo": {"name": "Amazon", "metadata": {"availability-zone": "us-east-1a"}},
                 "lastUpdatedTimestamp": "1700000000000"},
                {"instanceId": "c", "hostName": "hc", "ipAddr": "10.0.0.3", "status": "UP",
                 "port": 9003, "metadata": {"weight": "heavy"}}
            ]
        }}});
        let answer = parse_answer(&v).unwrap();
        assert_eq!(answer.hashcode.as_deref(), Some("DOWN_1_UP_2_"));
        let reg = Registry::from_full(&answer);
        assert_eq!(reg.hashcode(), "DOWN_1_UP_2_");
        let snap = reg.snapshot();
        let hello = &snap["hello"];
        assert_eq!(hello.len(), 3);
        let by_id: HashMap<&str, &Instance> = hello.iter().map(|i| (i.id.as_str(), i)).collect();
        let a = by_id["a"];
        assert_eq!(
            (a.addr.as_str(), a.port, a.weight, a.healthy),
            ("10.0.0.1", 9001, 3, true)
        );
        assert_eq!(a.zone.as_deref(), Some("z1"));
        assert_eq!(a.metadata["version"], "2");
        assert!(!a.metadata.contains_key("@class"));
        // No instanceId: hostName:port; only the secure port enabled; zone from dataCenterInfo.
        let b = by_id["hb:9443"];
        assert_eq!((b.port, b.healthy), (9443, false));
        assert_eq!(
            b.metadata["secure"], "true",
            "the secure port is dialled with TLS"
        );
        assert!(!a.metadata.contains_key("secure"));
        assert_eq!(b.zone.as_deref(), Some("us-east-1a"));
        // Bare number port; non-numeric weight → 1 with a problem named.
        let c = by_id["c"];
        assert_eq!((c.port, c.weight), (9003, 1));
        assert_eq!(answer.problems.len(), 1, "{:?}", answer.problems);
        assert!(
            answer.problems[0].contains("\"heavy\""),
            "{:?}",
            answer.problems
        );
    }

    /// Defect 1: an address `http::uri::Authority` refuses is skipped with a problem naming the
    /// app, the instance and the address; it still counts in the hash.
    #[test]
    fn an_address_that_cannot_be_dialled_is_skipped_named_and_still_counted() {
        let mut spaced = inst("spaced", "UP", 9002, "ADDED");
        spaced["ipAddr"] = serde_json::json!("foo bar");
        let mut accented = inst("accented", "UP", 9003, "ADDED");
        accented["ipAddr"] = serde_json::json!(null);
        accented["hostName"] = serde_json::json!("é.example");
        let v = apps(
            "UP_3_",
            "HELLO",
            vec![inst("good", "UP", 9001, "ADDED"), spaced, accented],
        );
        let answer = parse_answer(&v).unwrap();
        assert_eq!(answer.problems.len(), 2, "{:?}", answer.problems);
        let p = &answer.problems;
        assert!(
            p[0].contains("HELLO") && p[0].contains("\"spaced\"") && p[0].contains("\"foo bar\""),
            "{p:?}"
        );
        assert!(
            p[1].contains("\"accented\"") && p[1].contains("\"é.example\""),
            "{p:?}"
        );
        let reg = Registry::from_full(&answer);
        let ids: Vec<String> = reg.snapshot()["hello"]
            .iter()
            .map(|i| i.id.clone())
            .collect();
        assert_eq!(ids, ["good"]);
        assert_eq!(reg.hashcode(), "UP_3_");
    }

    #[test]
    fn a_malformed_instance_is_skipped_named_and_still_counted() {
        let mut bad = inst("bad", "UP", 1, "ADDED");
        bad["port"] = serde_json::json!({"$": "not-a-port", "@enabled": "true"});
        let v = apps(
            "UP_2_",
            "HELLO",
            vec![
                inst("good", "UP", 9001, "ADDED"),
                bad,
                serde_json::json!("junk"),
            ],
        );
        let answer = parse_answer(&v).unwrap();
        assert_eq!(answer.problems.len(), 2, "{:?}", answer.problems);
        assert!(
            answer.problems[0].contains("\"bad\"") && answer.problems[0].contains("not-a-port")
        );
        assert!(answer.problems[1].contains("#3"), "{:?}", answer.problems);
        let reg = Registry::from_full(&answer);
        assert_eq!(reg.snapshot()["hello"].len(), 1);
        // The skipped one still counts, so the hash agrees with the server's.
        assert_eq!(reg.hashcode(), "UP_2_");
        assert!(parse_answer(&serde_json::json!({"x": 1})).is_err());
        let empty = parse_answer(
            &serde_json::json!({"applications": {"apps__hashcode": "", "application": []}}),
        )
        .unwrap();
        assert_eq!(Registry::from_full(&empty).hashcode(), "");
    }
}
