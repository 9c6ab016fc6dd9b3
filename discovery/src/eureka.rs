//! The Eureka registry: the whole catalog fetched the way Eureka's own Java client does it, a
//! full fetch followed by deltas reconciled against the server's hash.
//!
//! ```text
//! EDGE_AGENT_REGISTRY=eureka://127.0.0.1:8761/eureka
//! EDGE_AGENT_REGISTRY=eureka+https://user:secret@eureka-a:8761/eureka?server=eureka-b:8761/eureka&interval=5s
//! ```
//!
//! # URL
//! - `eureka://host:port/path` speaks HTTP, `eureka+https://` HTTPS. The path is the Eureka
//!   service URL's path (what Java clients put in `defaultZone` before `/apps`); when empty it
//!   is [`DEFAULT_PATH`].
//! - Failover servers: the agent splits `EDGE_AGENT_REGISTRY` on commas, so further servers go in
//!   repeated `server=host:port[/path]` query parameters of the same URL (path defaulting as
//!   above, scheme as the main URL's). Servers are tried in the order written.
//! - `interval=` (`500ms`, `5s`, `1m`; default [`DEFAULT_INTERVAL`]) is the time between two
//!   fetches; `timeout=` (default [`DEFAULT_TIMEOUT`]) bounds every HTTP call, connect and body
//!   included. Unknown parameters are refused when the URL is parsed, not when it is first used.
//! - Basic auth from the URL's user info (for every server), else from `EUREKA_USERNAME` and
//!   `EUREKA_PASSWORD`. Credentials never appear in [`Discovery::describe`], logs or errors.
//!
//! # Fetching
//! At start (and after any failure) a full fetch, `GET {base}/apps`; then every interval
//! `GET {base}/apps/delta`, whose ADDED and MODIFIED instances replace (or add) the local copy's
//! and whose DELETED instances leave it. The server sends, with every delta, the hash of its
//! whole registry after those changes: `STATUS_count_` for each status present, sorted by status
//! name (`DOWN_1_UP_2_`), counting every instance whatever its status. The adapter computes the
//! same hash over its local copy; on a mismatch (a change that left the server's delta window
//! before it was fetched, a missed answer) it falls back to a full fetch at once. Both fetches
//! ask for JSON. Each successful fetch, full or delta, yields one [`Event::Snapshot`]: sending an
//! unchanged one is cheap (the agent diffs it) and keeps the staleness gauge honest.
//!
//! # Mapping
//! - Service name: the app name lower-cased, so in zero-config mode every app is routable by
//!   `Host: <app>`.
//! - Identity: `instanceId`, else `hostName:port`. Address: `ipAddr` (else `hostName`) and the
//!   enabled port: `port`, or `securePort` when only that one is enabled. The agent dials what it
//!   dials; the secure port is not a promise of TLS.
//! - Health: only `status == UP` carries traffic. Instances in any other status (DOWN,
//!   STARTING, OUT_OF_SERVICE, UNKNOWN) are still emitted, with `healthy = false`, so `/upstreams`
//!   shows them and why they take no traffic.
//! - Weight: metadata `weight` (default [`DEFAULT_WEIGHT`]); a value that is not a non-negative
//!   integer gives weight 1 and a `parse` error event. Zone: metadata `zone`, else the
//!   `availability-zone` of an Amazon `dataCenterInfo`. Metadata is copied (keys starting with
//!   `@`, Jackson's type hints, left out).
//! - Eureka's JSON quirks are accepted: `application` and `instance` as an array or a single
//!   object, `port` as `{"$": 9001, "@enabled": "true"}` with `$` a number or string and
//!   `@enabled` a string or boolean (or a bare number). Timestamps are not read.
//! - Leniency: one malformed instance is skipped with a `parse` error event naming the app, the
//!   instance and the field; the rest of the answer is used. Its status still counts in the hash,
//!   so a broken entry does not force a full fetch every interval. An answer without an
//!   `applications` object is refused whole.
//!
//! # Errors and failover
//! Connection refused, 5xx, bad JSON or a timeout yield an error event (kinds `connect`,
//! `status`, `parse`, `timeout`; 401/403 give `auth`) and the agent keeps its last good view. The
//! adapter then moves to the next server in order and tries it at once; when every server has
//! failed in a row it waits a delay from an exponential back-off with jitter ([`BACKOFF_MIN`] up
//! to [`BACKOFF_MAX_INTERVALS`] intervals) before the next round. After any failure the local copy
//! is dropped and the next success is a full fetch, so the first answer after an outage is a
//! reset and instances that went away meanwhile do not linger. The adapter stays on the server
//! that answered until that one fails.
//!
//! # Differences from the Java client (`DiscoveryClient`)
//! - Default interval 5 s instead of 30 s (`registryFetchIntervalSeconds`): an edge proxy routes
//!   on this view.
//! - Non-UP instances are kept (unhealthy) rather than filtered out
//!   (`shouldFilterOnlyUpInstances`).
//! - After a failed fetch the Java client keeps its copy and tries a delta next; this adapter
//!   starts over with a full fetch (a reset after reconnect).
//! - Failover is in written order with an immediate try of the next server; the Java client's
//!   `RetryableEurekaHttpClient` retries up to three servers per call and quarantines failed
//!   ones, and its sessioned client moves to another server every 20 minutes. There is no DNS or
//!   zone-based server list, no remote regions, no XML, and no registration of the agent itself.
//! - The hash check is the same (`ApplicationsComparator` style `STATUS_count_`), and like the
//!   Java client's it only counts statuses: a cancel plus a registration both missed in the same
//!   window leave the hash unchanged and go unnoticed until a later full fetch (after an error).
//! - The delta is catalog-wide, so the cost of a fetch does not grow with the services this host
//!   calls; [`Discovery::watch`] is therefore ignored and every app is reported.
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde_json::Value;
use url::Url;

use crate::http::Failure;
use crate::{BoxFuture, Discovery, ErrorKind, Event, Instance, Sink, SourceError, DEFAULT_WEIGHT};

/// Time between two fetches when the URL names none (Eureka's Java client uses 30 s).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Bound on every HTTP call (connect, headers and body) when the URL names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Shortest interval or timeout accepted, so a typo cannot turn the agent into a load test.
pub const MIN_INTERVAL: Duration = Duration::from_millis(50);
/// Service-URL path used when the URL has none.
pub const DEFAULT_PATH: &str = "/eureka";
/// First back-off delay after every server has failed in a row (jitter adds up to as much
/// again).
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// The back-off grows up to this many intervals (Java's
/// `cacheRefreshExecutorExponentialBackOffBound` is 10 too).
pub const BACKOFF_MAX_INTERVALS: u32 = 10;
/// Environment variables read for basic auth when the URL has no user info.
pub const ENV_USERNAME: &str = "EUREKA_USERNAME";
pub const ENV_PASSWORD: &str = "EUREKA_PASSWORD";
/// The status that carries traffic.
pub const STATUS_UP: &str = "UP";

/// Basic-auth credentials; `Debug` never shows them.
#[derive(Clone, PartialEq)]
struct Credentials {
    user: String,
    password: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// One Eureka server: the base URL the REST paths are appended to.
#[derive(Debug, Clone, PartialEq)]
struct Server {
    /// `http(s)://host:port/path`, no trailing slash, no user info.
    base: String,
    /// `host:port/path`, for `describe` and messages.
    display: String,
}

/// A source reading the whole catalog of one Eureka cluster.
#[derive(Debug)]
pub struct EurekaDiscovery {
    servers: Vec<Server>,
    https: bool,
    credentials: Option<Credentials>,
    interval: Duration,
    timeout: Duration,
    client: reqwest::Client,
}

impl EurekaDiscovery {
    /// From `eureka://…` or `eureka+https://…`, credentials falling back to the environment.
    pub fn from_url(url: &str) -> Result<Self, SourceError> {
        Self::from_url_with_env(url, |k| std::env::var(k).ok())
    }

    /// As [`EurekaDiscovery::from_url`], reading variables through `env`.
    pub fn from_url_with_env(
        url: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SourceError> {
        let invalid = |reason: String| SourceError::Invalid {
            url: redact(url),
            reason,
        };
        let parsed = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        let https = match parsed.scheme() {
            "eureka" => false,
            "eureka+https" => true,
            other => {
                return Err(invalid(format!(
                    "scheme {other:?}: expected eureka or eureka+https"
                )))
            }
        };
        let mut credentials = None;
        if !parsed.username().is_empty() {
            credentials = Some(Credentials {
                user: decode(parsed.username()),
                password: parsed.password().map(decode),
            });
        } else if let Some(user) = env(ENV_USERNAME).filter(|u| !u.is_empty()) {
            credentials = Some(Credentials {
                user,
                password: env(ENV_PASSWORD),
            });
        }
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid("no host: expected eureka://host:port/eureka".into()))?;
        let mut servers = vec![server(host, parsed.port(), parsed.path(), https)];
        let mut interval = DEFAULT_INTERVAL;
        let mut timeout = DEFAULT_TIMEOUT;
        for (key, value) in parsed.query_pairs() {
            match key.as_ref() {
                "server" => servers.push(parse_server(&value, https).map_err(&invalid)?),
                "interval" => {
                    interval = crate::parse_duration(&value, MIN_INTERVAL)
                        .map_err(|e| invalid(format!("interval={value:?}: {e}")))?
                }
                "timeout" => {
                    timeout = crate::parse_duration(&value, MIN_INTERVAL)
                        .map_err(|e| invalid(format!("timeout={value:?}: {e}")))?
                }
                other => {
                    return Err(invalid(format!(
                        "unknown parameter {other:?} (known: server, interval, timeout)"
                    )))
                }
            }
        }
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(timeout)
            .timeout(timeout)
            .user_agent(concat!("edge-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| invalid(format!("cannot build the HTTP client: {e}")))?;
        Ok(EurekaDiscovery {
            servers,
            https,
            credentials,
            interval,
            timeout,
            client,
        })
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Base URLs of the servers, in failover order.
    pub fn servers(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.base.clone()).collect()
    }
}

/// The URL with any user info removed, for error messages.
fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => match (url.split_once("://"), url.rfind('@')) {
            (Some((scheme, _)), Some(at)) => format!("{scheme}://{}", &url[at + 1..]),
            _ => url.to_string(),
        },
    }
}

fn decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn server(host: &str, port: Option<u16>, path: &str, https: bool) -> Server {
    let path = path.trim_end_matches('/');
    let path = if path.is_empty() { DEFAULT_PATH } else { path };
    let authority = match port {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let display = format!("{authority}{path}");
    let scheme = if https { "https" } else { "http" };
    Server {
        base: format!("{scheme}://{display}"),
        display,
    }
}

/// `host:port[/path]` from a `server=` parameter.
fn parse_server(value: &str, https: bool) -> Result<Server, String> {
    let scheme = if https { "https" } else { "http" };
    let u = Url::parse(&format!("{scheme}://{value}"))
        .map_err(|e| format!("server={value:?}: {e}; expected host:port/path"))?;
    if !u.username().is_empty() || u.query().is_some() {
        return Err(format!(
            "server={value:?}: expected host:port/path (credentials go in the main URL)"
        ));
    }
    let host = u
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("server={value:?}: no host"))?;
    Ok(server(host, u.port(), u.path(), https))
}

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
    let chosen: Result<u16, String> = match (&port, &secure) {
        (Ok(Some((p, true))), _) if *p != 0 => Ok(*p),
        (_, Ok(Some((p, true)))) if *p != 0 => Ok(*p),
        (Err(e), _) | (_, Err(e)) => Err(e.clone()),
        _ => Err("no enabled port (port and securePort disabled or missing)".into()),
    };
    let raw_port = match (&chosen, &port) {
        (Ok(p), _) => Some(*p),
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
        let port = chosen?;
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

/// The local copy of the server's registry: app (as Eureka spells it) → instance id → entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Registry {
    apps: BTreeMap<String, BTreeMap<String, Entry>>,
}

impl Registry {
    /// The registry a full fetch describes (actions ignored).
    pub fn from_full(answer: &Answer) -> Registry {
        let mut reg = Registry::default();
        for item in &answer.items {
            reg.apps
                .entry(item.app.clone())
                .or_default()
                .insert(item.id.clone(), item.entry.clone());
        }
        reg
    }

    /// Applies a delta: ADDED and MODIFIED replace or add, DELETED removes. Returns messages
    /// for entries with an unknown action (ignored, as the Java client does).
    pub fn apply_delta(&mut self, delta: &Answer) -> Vec<String> {
        let mut ignored = Vec::new();
        for item in &delta.items {
            match &item.action {
                Action::Added | Action::Modified => {
                    self.apps
                        .entry(item.app.clone())
                        .or_default()
                        .insert(item.id.clone(), item.entry.clone());
                }
                Action::Deleted => {
                    if let Some(app) = self.apps.get_mut(&item.app) {
                        app.remove(&item.id);
                        if app.is_empty() {
                            self.apps.remove(&item.app);
                        }
                    }
                }
                Action::Other(a) => ignored.push(format!(
                    "app {} instance {:?}: actionType {a:?} unknown; ignored",
                    item.app, item.id
                )),
            }
        }
        ignored
    }

    /// Eureka's reconciliation hash: `STATUS_count_` for every status present, sorted by name.
    pub fn hashcode(&self) -> String {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for entry in self.apps.values().flat_map(BTreeMap::values) {
            *counts.entry(entry.status.as_str()).or_default() += 1;
        }
        counts.iter().map(|(s, n)| format!("{s}_{n}_")).collect()
    }

    /// Number of instance entries (parsed or not).
    pub fn len(&self) -> usize {
        self.apps.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }

    /// Every app, lower-cased, with the instances that parsed. Apps with none are left out.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<Instance>> {
        let mut out: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
        for (app, entries) in &self.apps {
            let instances: Vec<Instance> = entries
                .values()
                .filter_map(|e| e.instance.clone())
                .collect();
            if !instances.is_empty() {
                out.entry(app.to_lowercase()).or_default().extend(instances);
            }
        }
        for set in out.values_mut() {
            set.sort();
        }
        out
    }
}

/// What one successful round did, for the log.
enum Round {
    Full { reason: &'static str, bytes: usize },
    Delta { changes: usize, bytes: usize },
}

impl EurekaDiscovery {
    /// `GET {base}{path}` as JSON: the parsed body and its size.
    async fn get(&self, server: &Server, path: &str) -> Result<(Value, usize), Failure> {
        let url = format!("{}{path}", server.base);
        let mut req = self
            .client
            .get(&url)
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(self.timeout);
        if let Some(c) = &self.credentials {
            req = req.basic_auth(&c.user, c.password.as_ref());
        }
        let what: &str = &format!("eureka GET {url}");
        let resp = req.send().await.map_err(|e| Failure::request(what, e))?;
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

    async fn fetch_answer(
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

    async fn full(&self, server: &Server, sink: &Sink) -> Result<(Registry, usize), Failure> {
        let (answer, bytes) = self.fetch_answer(server, "/apps", sink).await?;
        Ok((Registry::from_full(&answer), bytes))
    }

    /// One round: a full fetch when there is no local copy, else a delta (and a full fetch
    /// when the hash disagrees).
    async fn round(
        &self,
        server: &Server,
        local: &mut Option<Registry>,
        sink: &Sink,
    ) -> Result<Round, Failure> {
        let Some(reg) = local.as_mut() else {
            let (reg, bytes) = self.full(server, sink).await?;
            *local = Some(reg);
            return Ok(Round::Full {
                reason: "start",
                bytes,
            });
        };
        let (delta, bytes) = self.fetch_answer(server, "/apps/delta", sink).await?;
        let mut next = reg.clone();
        for p in next.apply_delta(&delta) {
            sink.error(ErrorKind::Parse, format!("eureka {}: {p}", server.display))
                .await;
        }
        let ours = next.hashcode();
        if delta.hashcode.as_deref() == Some(ours.as_str()) {
            *reg = next;
            return Ok(Round::Delta {
                changes: delta.items.len(),
                bytes,
            });
        }
        tracing::info!(
            server = %server.display,
            local = %ours,
            remote = delta.hashcode.as_deref().unwrap_or("<none>"),
            "eureka delta hash mismatch: full fetch"
        );
        *local = None;
        let (reg, full_bytes) = self.full(server, sink).await?;
        *local = Some(reg);
        Ok(Round::Full {
            reason: "hash mismatch",
            bytes: bytes + full_bytes,
        })
    }

    async fn run_loop(self: Arc<Self>, sink: Sink) {
        let max = (self.interval * BACKOFF_MAX_INTERVALS).max(BACKOFF_MIN);
        let builder = ExponentialBuilder::default()
            .with_min_delay(BACKOFF_MIN)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times();
        let mut backoff = builder.build();
        let mut current = 0usize;
        let mut failures = 0usize;
        let mut untried = self.servers.len();
        let mut local: Option<Registry> = None;
        loop {
            let server = &self.servers[current];
            match self.round(server, &mut local, &sink).await {
                Ok(round) => {
                    let reg = local
                        .as_ref()
                        .expect("a successful round leaves a local copy");
                    match round {
                        Round::Full { reason, bytes } => tracing::info!(
                            server = %server.display,
                            reason,
                            bytes,
                            instances = reg.len(),
                            hash = %reg.hashcode(),
                            "eureka full fetch"
                        ),
                        Round::Delta { changes, bytes } => tracing::debug!(
                            server = %server.display,
                            changes,
                            bytes,
                            instances = reg.len(),
                            "eureka delta applied"
                        ),
                    }
                    if failures > 0 {
                        tracing::info!(server = %server.display, failures, "eureka answering again");
                    }
                    failures = 0;
                    untried = self.servers.len();
                    backoff = builder.build();
                    if !sink.send(Event::Snapshot(reg.snapshot())).await {
                        return;
                    }
                    tokio::time::sleep(self.interval).await;
                }
                Err(f) => {
                    local = None;
                    failures += 1;
                    let next = (current + 1) % self.servers.len();
                    let message = if self.servers.len() > 1 {
                        format!("{}; trying {} next", f.message, self.servers[next].display)
                    } else {
                        f.message
                    };
                    if !sink.error(f.kind, message).await {
                        return;
                    }
                    current = next;
                    // Back off once every server has had its try since the last back-off.
                    untried -= 1;
                    if untried == 0 {
                        untried = self.servers.len();
                        tokio::time::sleep(backoff.next().unwrap_or(max)).await;
                    }
                }
            }
            if sink.tx.is_closed() {
                return;
            }
        }
    }
}

impl Discovery for EurekaDiscovery {
    fn kind(&self) -> &'static str {
        "eureka"
    }

    fn describe(&self) -> String {
        let scheme = if self.https { "eureka+https" } else { "eureka" };
        let mut s = format!("{scheme}://{}", self.servers[0].display);
        let mut sep = '?';
        for extra in &self.servers[1..] {
            s.push_str(&format!("{sep}server={}", extra.display));
            sep = '&';
        }
        s.push_str(&format!("{sep}interval={:?}", self.interval));
        s
    }

    fn run(self: Arc<Self>, sink: Sink) -> BoxFuture {
        Box::pin(self.run_loop(sink))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    fn inst(id: &str, status: &str, port: u16, action: &str) -> Value {
        serde_json::json!({
            "instanceId": id, "hostName": "h", "app": "HELLO", "ipAddr": "127.0.0.1",
            "status": status, "port": {"$": port, "@enabled": "true"},
            "securePort": {"$": 443, "@enabled": "false"},
            "dataCenterInfo": {"@class": "x", "name": "MyOwn"},
            "metadata": {"@class": "java.util.Collections$EmptyMap"},
            "actionType": action
        })
    }

    fn apps(hash: &str, app: &str, instances: Vec<Value>) -> Value {
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

    #[test]
    fn deltas_apply_and_the_hash_reconciles() {
        let full = apps(
            "UP_2_",
            "HELLO",
            vec![inst("a", "UP", 1, "ADDED"), inst("b", "UP", 2, "ADDED")],
        );
        let mut reg = Registry::from_full(&parse_answer(&full).unwrap());
        let delta = serde_json::json!({"applications": {"apps__hashcode": "OUT_OF_SERVICE_1_UP_2_", "application": [
            {"name": "HELLO", "instance": [inst("a", "OUT_OF_SERVICE", 1, "MODIFIED"), inst("b", "UP", 2, "DELETED")]},
            {"name": "OTHER", "instance": inst("c", "UP", 3, "ADDED")},
            {"name": "HELLO", "instance": [inst("d", "UP", 4, "ADDED")]}
        ]}});
        let delta = parse_answer(&delta).unwrap();
        assert!(reg.apply_delta(&delta).is_empty());
        assert_eq!(reg.hashcode(), "OUT_OF_SERVICE_1_UP_2_");
        assert_eq!(delta.hashcode.as_deref(), Some(reg.hashcode().as_str()));
        let snap = reg.snapshot();
        let ids: Vec<(&str, bool)> = snap["hello"]
            .iter()
            .map(|i| (i.id.as_str(), i.healthy))
            .collect();
        assert_eq!(ids, vec![("a", false), ("d", true)]);
        assert_eq!(snap["other"][0].port, 3);
        // Deleting the last instance of an app drops the app; deleting the unknown is a no-op.
        let del = parse_answer(&apps(
            "X",
            "OTHER",
            vec![
                inst("c", "UP", 3, "DELETED"),
                inst("zz", "UP", 3, "DELETED"),
            ],
        ))
        .unwrap();
        reg.apply_delta(&del);
        assert!(!reg.snapshot().contains_key("other"));
        // A delta that cannot explain the server's hash: mismatch.
        assert_ne!(del.hashcode.as_deref(), Some(reg.hashcode().as_str()));
        // An unknown action is reported and ignored.
        let odd = parse_answer(&apps("", "HELLO", vec![inst("a", "UP", 1, "RENAMED")])).unwrap();
        assert_eq!(reg.apply_delta(&odd).len(), 1);
    }

    #[test]
    fn urls_parse_with_failover_interval_and_credentials() {
        let none = |_: &str| None;
        let d = EurekaDiscovery::from_url_with_env(
            "eureka://127.0.0.1:8761/eureka/?server=127.0.0.1:8762&server=h3:81/x/eureka&interval=500ms&timeout=2s",
            none,
        )
        .unwrap();
        assert_eq!(
            d.servers(),
            vec![
                "http://127.0.0.1:8761/eureka",
                "http://127.0.0.1:8762/eureka",
                "http://h3:81/x/eureka"
            ]
        );
        assert_eq!(
            (d.interval(), d.timeout()),
            (Duration::from_millis(500), Duration::from_secs(2))
        );
        assert_eq!(
            d.describe(),
            "eureka://127.0.0.1:8761/eureka?server=127.0.0.1:8762/eureka&server=h3:81/x/eureka&interval=500ms"
        );
        let d = EurekaDiscovery::from_url_with_env("eureka+https://u%40x:s3cret@eu:8443", none)
            .unwrap();
        assert_eq!(d.servers(), vec!["https://eu:8443/eureka"]);
        assert_eq!(d.interval(), DEFAULT_INTERVAL);
        let c = d.credentials.clone().unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.as_deref()),
            ("u@x", Some("s3cret"))
        );
        assert!(!d.describe().contains("s3cret") && !format!("{d:?}").contains("s3cret"));
        let env = |k: &str| match k {
            ENV_USERNAME => Some("envuser".to_string()),
            ENV_PASSWORD => Some("envpass".to_string()),
            _ => None,
        };
        let d = EurekaDiscovery::from_url_with_env("eureka://eu:8761/eureka", env).unwrap();
        assert_eq!(d.credentials.unwrap().user, "envuser");
        for bad in [
            "eureka://eu:8761/eureka?interval=soon",
            "eureka://eu:8761/eureka?interval=1ms",
            "eureka://eu:8761/eureka?zone=a",
            "eureka://:8761/eureka",
            "eureka://eu:8761/eureka?server=u:p@h2:1",
        ] {
            assert!(
                EurekaDiscovery::from_url_with_env(bad, none).is_err(),
                "{bad} accepted"
            );
        }
        let err = EurekaDiscovery::from_url_with_env("eureka://u:pw@eu:8761/eureka?x=1", none)
            .unwrap_err();
        assert!(!err.to_string().contains("pw"), "{err}");
        assert_eq!(
            crate::from_url("eureka+https://eu:1/e").unwrap().kind(),
            "eureka"
        );
    }

    /// A canned HTTP/1.1 server: path → (status, body); status 0 never answers.
    #[derive(Clone, Default)]
    struct Fake {
        routes: Arc<Mutex<HashMap<String, (u16, String)>>>,
        seen: Arc<Mutex<Vec<String>>>,
    }

    impl Fake {
        async fn start() -> (Fake, String) {
            let fake = Fake::default();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let f = fake.clone();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = listener.accept().await {
                    let f = f.clone();
                    tokio::spawn(async move {
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 1024];
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let head = String::from_utf8_lossy(&buf).to_string();
                        let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                        let auth = head
                            .lines()
                            .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
                            .map(|l| l.trim().to_string())
                            .unwrap_or_default();
                        f.seen
                            .lock()
                            .unwrap()
                            .push(format!("{path} {auth}").trim().to_string());
                        let key = path.rsplit("/eureka").next().unwrap_or("").to_string();
                        let (status, body) = f
                            .routes
                            .lock()
                            .unwrap()
                            .get(&key)
                            .cloned()
                            .unwrap_or((404, String::new()));
                        if status == 0 {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            return;
                        }
                        let resp = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = s.write_all(resp.as_bytes()).await;
                    });
                }
            });
            (fake, addr)
        }

        fn set(&self, path: &str, status: u16, body: &Value) {
            self.routes
                .lock()
                .unwrap()
                .insert(path.to_string(), (status, body.to_string()));
        }

        fn paths(&self) -> Vec<String> {
            self.seen
                .lock()
                .unwrap()
                .iter()
                .map(|s| s.split(' ').next().unwrap().to_string())
                .collect()
        }
    }

    async fn next_event(rx: &mut mpsc::Receiver<(usize, Event)>) -> Event {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some((_, ev))) => ev,
            other => panic!("no event within 10 s: {other:?}"),
        }
    }

    async fn next_snapshot(
        rx: &mut mpsc::Receiver<(usize, Event)>,
    ) -> BTreeMap<String, Vec<Instance>> {
        loop {
            if let Event::Snapshot(s) = next_event(rx).await {
                return s;
            }
        }
    }

    fn ports(s: &BTreeMap<String, Vec<Instance>>, svc: &str) -> Vec<u16> {
        s.get(svc)
            .map(|v| v.iter().map(|i| i.port).collect())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn full_then_deltas_and_a_mismatch_falls_back_to_a_full_fetch() {
        let (fake, addr) = Fake::start().await;
        fake.set(
            "/apps",
            200,
            &apps("UP_1_", "HELLO", vec![inst("a", "UP", 1001, "ADDED")]),
        );
        fake.set(
            "/apps/delta",
            200,
            &apps("UP_2_", "HELLO", vec![inst("b", "UP", 1002, "ADDED")]),
        );
        let url = format!("eureka://user:pw@{addr}/eureka?interval=50ms");
        let src = Arc::new(EurekaDiscovery::from_url_with_env(&url, |_| None).unwrap());
        let (tx, mut rx) = mpsc::channel(64);
        let task = tokio::spawn(src.run(Sink::new(0, tx)));
        assert_eq!(ports(&next_snapshot(&mut rx).await, "hello"), vec![1001]);
        assert_eq!(
            ports(&next_snapshot(&mut rx).await, "hello"),
            vec![1001, 1002]
        );
        assert_eq!(fake.paths(), vec!["/eureka/apps", "/eureka/apps/delta"]);
        // Basic auth went along with every call.
        assert!(fake
            .seen
            .lock()
            .unwrap()
            .iter()
            .all(|s| s.contains("Basic dXNlcjpwdw==")));
        // The server now says three instances are up but the delta explains none of it.
        fake.set(
            "/apps",
            200,
            &apps(
                "UP_3_",
                "HELLO",
                vec![
                    inst("a", "UP", 1001, "ADDED"),
                    inst("b", "UP", 1002, "ADDED"),
                    inst("c", "UP", 1003, "ADDED"),
                ],
            ),
        );
        fake.set("/apps/delta", 200, &apps("UP_3_", "HELLO", vec![]));
        let s = loop {
            let s = next_snapshot(&mut rx).await;
            if s["hello"].len() == 3 {
                break s;
            }
        };
        assert_eq!(ports(&s, "hello"), vec![1001, 1002, 1003]);
        let paths = fake.paths();
        let n = paths.len();
        assert_eq!(
            paths[n - 2..],
            ["/eureka/apps/delta", "/eureka/apps"],
            "{paths:?}"
        );
        task.abort();
    }

    #[tokio::test]
    async fn errors_are_classified_and_the_next_server_takes_over_with_a_full_fetch() {
        let (bad, bad_addr) = Fake::start().await;
        bad.set("/apps", 503, &serde_json::json!({"error": "busy"}));
        let (good, good_addr) = Fake::start().await;
        good.set(
            "/apps",
            200,
            &apps("UP_1_", "HELLO", vec![inst("a", "UP", 1001, "ADDED")]),
        );
        good.set("/apps/delta", 200, &apps("UP_1_", "HELLO", vec![]));
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let url = format!("eureka://{closed}/eureka?server={bad_addr}/eureka&server={good_addr}/eureka&interval=50ms");
        let src = Arc::new(EurekaDiscovery::from_url_with_env(&url, |_| None).unwrap());
        let (tx, mut rx) = mpsc::channel(64);
        let task = tokio::spawn(src.run(Sink::new(0, tx)));
        match next_event(&mut rx).await {
            Event::Error { kind, message } => {
                assert_eq!(kind, ErrorKind::Connect, "{message}");
                assert!(
                    message.contains(&bad_addr),
                    "names the next server: {message}"
                );
            }
            other => panic!("{other:?}"),
        }
        match next_event(&mut rx).await {
            Event::Error { kind, message } => {
                assert_eq!(kind, ErrorKind::Status, "{message}");
                assert!(message.contains("503"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ports(&next_snapshot(&mut rx).await, "hello"), vec![1001]);
        // The good server fails: bad JSON; the next answer (from the next server that works)
        // starts with a full fetch.
        good.routes
            .lock()
            .unwrap()
            .insert("/apps/delta".into(), (200, "{not json".into()));
        loop {
            match next_event(&mut rx).await {
                Event::Snapshot(_) => continue,
                Event::Error { kind, message } => {
                    assert_eq!(kind, ErrorKind::Parse, "{message}");
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        bad.set(
            "/apps",
            200,
            &apps("UP_1_", "HELLO", vec![inst("z", "UP", 2002, "ADDED")]),
        );
        let s = loop {
            let s = next_snapshot(&mut rx).await;
            if ports(&s, "hello") == vec![2002] {
                break s;
            }
        };
        assert_eq!(s.len(), 1);
        assert!(bad.paths().contains(&"/eureka/apps".to_string()));
        task.abort();
    }

    #[tokio::test]
    async fn a_hanging_server_times_out() {
        let (fake, addr) = Fake::start().await;
        fake.set("/apps", 0, &Value::Null);
        let url = format!("eureka://{addr}/eureka?timeout=200ms");
        let src = Arc::new(EurekaDiscovery::from_url_with_env(&url, |_| None).unwrap());
        let (tx, mut rx) = mpsc::channel(64);
        let task = tokio::spawn(src.run(Sink::new(0, tx)));
        match next_event(&mut rx).await {
            Event::Error { kind, message } => assert_eq!(kind, ErrorKind::Timeout, "{message}"),
            other => panic!("{other:?}"),
        }
        task.abort();
    }
}
