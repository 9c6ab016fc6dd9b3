//! The Consul registry: passing instances from blocking health queries, watched per service on
//! demand, and the catalog's service names from a blocking catalog query.
//!
//! ```text
//! EDGE_AGENT_REGISTRY=consul://127.0.0.1:8500
//! EDGE_AGENT_REGISTRY=consul+https://consul.internal:8501?dc=eu1&tag=v2&near=_agent&wait=5m&idle_ttl=10m
//! EDGE_AGENT_REGISTRY=consul://?service=payments&service=users      # address from CONSUL_HTTP_ADDR
//! ```
//!
//! # Client
//! A thin typed client on `reqwest` + `serde` (two GET endpoints), not a Consul crate. Looked at
//! (crates.io, 2026): `consul` 0.4.2 is a blocking client on reqwest 0.11 with `error-chain`,
//! unreleased for years; `consulrs` 0.1.0 has a single 2021 release; `rs-consul` 0.15 (Roblox) is
//! maintained and async and does blocking queries on `/v1/health/service`, but it needs edition
//! 2024 (our MSRV is 1.80), brings its own hyper-rustls stack with webpki roots only (no
//! `CONSUL_CACERT`, no client certificate), has no `tag` filter on the health endpoint and does
//! not escape the service name. Two endpoints do not justify that; reqwest (json + rustls) is
//! already in the tree.
//!
//! # URL and environment
//! - `consul://host:port` speaks HTTP, `consul+https://` HTTPS. With no host (`consul://`) the
//!   address comes from `CONSUL_HTTP_ADDR` (`host:port`, `http://…` or `https://…`), else
//!   [`DEFAULT_ADDR`]. `CONSUL_HTTP_SSL=true` turns HTTPS on as well. Port defaults: 8500
//!   (HTTP), 8501 (HTTPS).
//! - `CONSUL_HTTP_TOKEN` (or the file named by `CONSUL_HTTP_TOKEN_FILE`) is sent as
//!   `X-Consul-Token` on every call. It never appears in [`Discovery::describe`], logs or errors,
//!   and there is deliberately no URL parameter for it.
//! - TLS: `CONSUL_CACERT` (PEM bundle added to the roots), `CONSUL_CLIENT_CERT` +
//!   `CONSUL_CLIENT_KEY` (PEM, client authentication), `CONSUL_HTTP_SSL_VERIFY=false` (accept
//!   any certificate; tests only). `CONSUL_CAPATH` and `CONSUL_TLS_SERVER_NAME` are not read.
//! - Query parameters: `dc`, `tag` (repeatable: an instance must carry every tag), `near`
//!   (e.g. `_agent`), `wait` (blocking-query wait, default [`DEFAULT_WAIT`], at most
//!   [`MAX_WAIT`] as Consul caps it), `idle_ttl` (default [`DEFAULT_IDLE_TTL`]) and `service`
//!   (repeatable: services watched from start and never dropped for idleness). Durations take
//!   `ms`, `s`, `m` or `h`. Unknown parameters are refused when the URL is parsed.
//!
//! # Watching
//! - Catalog: one blocking query on `/v1/catalog/services`, always running. Every answer is sent
//!   as [`Event::Catalog`] (names lower-cased; the agent routes on lower-cased hosts and Consul
//!   matches service names case-insensitively), so a service removed from Consul is dropped by
//!   the agent on the next answer. There is **no grace period** for a removed service: the
//!   catalog only drops a name once its last instance is deregistered, and the instance watch has
//!   by then already emptied its set; suspicious mass removal is the agent's guard to judge. The
//!   catalog also lets [`Discovery::watch`] answer `false` for names Consul does not know. Its
//!   cost: Consul moves the catalog's index on every registration change in the datacenter, and
//!   each answer is the whole name → tags map, so this one query wakes with the datacenter's
//!   registration churn (not with health changes).
//! - Instances: one blocking query per watched service on
//!   `/v1/health/service/<name>?passing`. A watch starts on [`Discovery::watch`] (the agent calls
//!   it on a routing miss, to keep it alive, and for configured services) or from the URL's
//!   `service=` list. Watches live in a `moka` cache with `time_to_idle = idle_ttl`; `watch`
//!   touches the entry. When an entry idles out the eviction listener tells the run loop, which
//!   aborts the task and sends [`Update::NotFound`]. Moka evicts lazily, so the run loop calls
//!   `run_pending_tasks` every [`HOUSEKEEPING_TICK`]. A name asked for while absent from the
//!   catalog is remembered (same cache, same TTL, no query) and its watch starts as soon as the
//!   catalog lists it; a watched service that leaves the catalog has its watch paused and a
//!   `NotFound` sent. The cache holds at most [`MAX_WATCHED`] names. A stopped watch sends
//!   nothing after its stop (see `Running`: its answers pass a gate the run loop closes first).
//! - Connections: each running watch holds one HTTP/1.1 connection while it blocks, plus one for
//!   the catalog. Consul caps connections per client IP (`limits.http_max_conns_per_client`, 200
//!   by default) and answers 429 beyond it; the error then says so, with the number of watches
//!   held, since an agent watching about 200 services through one address meets the cap.
//! - Blocking queries follow Consul's rules: send `index` and `wait`, read `X-Consul-Index`; an
//!   index that goes backwards resets to 0, and an index of 0 is raised to 1 (Consul's docs:
//!   "sanitize index values to be at least 1"), so a buggy answer cannot make a busy loop. An
//!   answer whose index did not move that came back in under [`MIN_UNCHANGED_INTERVAL`] is
//!   followed by a pause for the rest of it (Consul's "rate limit" rule). Every answer is a full
//!   [`Update::Reset`], sent even when nothing changed (the agent diffs), which also refreshes
//!   the staleness gauge. Each call's timeout is `wait + wait/16` (Consul's own jitter) `+`
//!   [`TIMEOUT_MARGIN`].
//! - Staleness: a source answers when a blocking query returns, so with the default 5 m wait an
//!   idle, healthy Consul source shows a staleness of up to ~5 m (less with more watches). Alert
//!   on `edge_agent_discovery_errors_total` rather than staleness, or lower `wait`.
//!
//! # Mapping
//! Identity `<node>/<service id>`; address `Service.Address`, else `Node.Address`; port
//! `Service.Port` (entries without one are skipped with a `parse` error); weight
//! `Service.Weights.Passing` (default [`DEFAULT_WEIGHT`]); healthy (only passing instances are
//! asked for). Metadata: `Service.Meta` keys as-is, plus `tags` (comma-joined) and `node` unless
//! the meta has its own. Zone: meta `zone`.
//!
//! # Errors
//! Connection refused, timeouts, non-2xx statuses and bad JSON yield an error event (`connect`,
//! `timeout`, `status`/`auth` for 401/403, `parse`); the agent keeps its last good set. Each
//! watch then retries after a delay from `backon`'s exponential back-off with jitter
//! ([`BACKOFF_MIN`] to [`BACKOFF_MAX`]) and starts over from index 0, so the first answer after an
//! outage is a fresh reset. Consul answers anonymous reads under a default-deny ACL with 200 and
//! an empty result, so an empty answer carrying `X-Consul-Default-Acl-Policy: deny` when no
//! token is set, or any answer with `X-Consul-Results-Filtered-By-ACLs: true`, is still used but
//! also yields an `auth` error event saying why it is empty.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use moka::notification::RemovalCause;
use reqwest::header::{HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use url::Url;

use crate::http::Failure;
use crate::{join_host_port, DEFAULT_WEIGHT};
use crate::{BoxFuture, Discovery, ErrorKind, Event, Instance, Sink, SourceError, Update};

/// Address used when neither the URL nor `CONSUL_HTTP_ADDR` names one.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8500";
/// Blocking-query wait when the URL names none (Consul's own default is 5 m too).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// Consul caps `wait` at 10 minutes.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// Shortest `wait` or `idle_ttl` accepted.
pub const MIN_DURATION: Duration = Duration::from_millis(100);
/// How long an on-demand watch lives without a `watch` call.
pub const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(600);
/// Added to `wait + wait/16` for each call's timeout.
pub const TIMEOUT_MARGIN: Duration = Duration::from_secs(5);
/// Bound on establishing a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry delay after a failed call (jitter adds up to as much again).
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An answer whose index did not move that came back faster than this is followed by a pause
/// for the rest of it, so a misbehaving server cannot drive a busy loop.
pub const MIN_UNCHANGED_INTERVAL: Duration = Duration::from_millis(500);
/// How often the run loop lets moka process expirations (and so idle watches stop).
pub const HOUSEKEEPING_TICK: Duration = Duration::from_secs(1);
/// Most service names remembered for on-demand watching (watched or waiting to appear).
pub const MAX_WATCHED: u64 = 10_000;

pub const ENV_ADDR: &str = "CONSUL_HTTP_ADDR";
pub const ENV_TOKEN: &str = "CONSUL_HTTP_TOKEN";
pub const ENV_TOKEN_FILE: &str = "CONSUL_HTTP_TOKEN_FILE";
pub const ENV_CACERT: &str = "CONSUL_CACERT";
pub const ENV_CLIENT_CERT: &str = "CONSUL_CLIENT_CERT";
pub const ENV_CLIENT_KEY: &str = "CONSUL_CLIENT_KEY";
pub const ENV_SSL: &str = "CONSUL_HTTP_SSL";
pub const ENV_SSL_VERIFY: &str = "CONSUL_HTTP_SSL_VERIFY";

const HEADER_INDEX: &str = "x-consul-index";
const HEADER_TOKEN: &str = "x-consul-token";
const HEADER_DEFAULT_POLICY: &str = "x-consul-default-acl-policy";
const HEADER_FILTERED: &str = "x-consul-results-filtered-by-acls";

/// The ACL token; `Debug` never shows it.
#[derive(Clone)]
struct Token(HeaderValue);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Orders from [`Discovery::watch`] and the moka eviction listener to the run loop.
#[derive(Debug)]
enum Cmd {
    /// Watch (or keep watching) `name`; `generation` identifies the cache entry.
    Want { name: String, generation: u64 },
    /// The cache entry `generation` of `name` idled out.
    Idle { name: String, generation: u64 },
}

/// A source watching one Consul datacenter.
pub struct ConsulDiscovery {
    /// `http(s)://host:port`.
    base: String,
    https: bool,
    /// `host:port`, for describe and messages.
    authority: String,
    token: Option<Token>,
    dc: Option<String>,
    tags: Vec<String>,
    near: Option<String>,
    wait: Duration,
    idle_ttl: Duration,
    pinned: Vec<String>,
    client: reqwest::Client,
    /// Lower-cased catalog names once the catalog has answered.
    catalog: RwLock<Option<HashSet<String>>>,
    /// Health watches running now (each holds one connection to Consul while it blocks).
    watching: AtomicUsize,
    /// Names asked for on demand → entry generation.
    wanted: moka::sync::Cache<String, u64>,
    generation: AtomicU64,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    cmd_rx: Mutex<Option<mpsc::UnboundedReceiver<Cmd>>>,
}

impl fmt::Debug for ConsulDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulDiscovery")
            .field("url", &self.describe())
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "t" | "true" | "yes" | "on"
    )
}

/// A service name as the agent routes it: trimmed and lower-cased; `None` when it cannot be a
/// Consul service name.
fn normalize(name: &str) -> Option<String> {
    let n = name.trim().to_ascii_lowercase();
    let ok = !n.is_empty()
        && n.len() <= 255
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    ok.then_some(n)
}

impl ConsulDiscovery {
    /// From `consul://…` or `consul+https://…`, reading Consul's variables from the environment.
    pub fn from_url(url: &str) -> Result<Self, SourceError> {
        Self::from_url_with_env(url, |k| std::env::var(k).ok())
    }

    /// As [`ConsulDiscovery::from_url`], reading variables through `env`.
    pub fn from_url_with_env(
        url: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SourceError> {
        let invalid = |reason: String| SourceError::Invalid {
            url: url.to_string(),
            reason,
        };
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let parsed = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(SourceError::Invalid {
                url: "consul://<redacted>".into(),
                reason: format!("no credentials in the URL: set {ENV_TOKEN} instead"),
            });
        }
        let mut https = match parsed.scheme() {
            "consul" => false,
            "consul+https" => true,
            other => {
                return Err(invalid(format!(
                    "scheme {other:?}: expected consul or consul+https"
                )))
            }
        };
        if env(ENV_SSL).is_some_and(|v| truthy(&v)) {
            https = true;
        }
        let host = parsed.host_str().filter(|h| !h.is_empty());
        let (host, port) = match host {
            Some(h) => (h.to_string(), parsed.port()),
            None => {
                let addr = env(ENV_ADDR).unwrap_or_else(|| DEFAULT_ADDR.to_string());
                let rest = if let Some(r) = addr.strip_prefix("https://") {
                    https = true;
                    r
                } else if let Some(r) = addr.strip_prefix("http://") {
                    r
                } else if addr.contains("://") {
                    return Err(invalid(format!(
                        "{ENV_ADDR}={addr:?}: only http://, https:// or host:port are supported"
                    )));
                } else {
                    addr.as_str()
                };
                let u = Url::parse(&format!("http://{}", rest.trim_end_matches('/')))
                    .map_err(|e| invalid(format!("{ENV_ADDR}={addr:?}: {e}")))?;
                let h = u
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| invalid(format!("{ENV_ADDR}={addr:?}: no host")))?;
                (h.to_string(), u.port())
            }
        };
        let port = port.unwrap_or(if https { 8501 } else { 8500 });
        let authority = if host.starts_with('[') {
            format!("{host}:{port}")
        } else {
            join_host_port(&host, port)
        };
        let mut dc = None;
        let mut tags = Vec::new();
        let mut near = None;
        let mut wait = DEFAULT_WAIT;
        let mut idle_ttl = DEFAULT_IDLE_TTL;
        let mut pinned: Vec<String> = Vec::new();
        for (key, value) in parsed.query_pairs() {
            let value = value.trim().to_string();
            match key.as_ref() {
                "dc" => dc = Some(value).filter(|v| !v.is_empty()),
                "tag" if !value.is_empty() => tags.push(value),
                "tag" => return Err(invalid("tag= needs a value".into())),
                "near" => near = Some(value).filter(|v| !v.is_empty()),
                "wait" => {
                    wait = crate::parse_duration(&value, MIN_DURATION)
                        .map_err(|e| invalid(format!("wait={value:?}: {e}")))?;
                    if wait > MAX_WAIT {
                        return Err(invalid(format!(
                            "wait={value:?}: Consul caps the wait at {MAX_WAIT:?}"
                        )));
                    }
                }
                "idle_ttl" => {
                    idle_ttl = crate::parse_duration(&value, MIN_DURATION)
                        .map_err(|e| invalid(format!("idle_ttl={value:?}: {e}")))?
                }
                "service" => {
                    for name in value.split(',').filter(|n| !n.trim().is_empty()) {
                        let n = normalize(name).ok_or_else(|| {
                            invalid(format!("service={name:?}: not a Consul service name"))
                        })?;
                        if !pinned.contains(&n) {
                            pinned.push(n);
                        }
                    }
                }
                other => {
                    return Err(invalid(format!(
                    "unknown parameter {other:?} (known: dc, tag, near, wait, idle_ttl, service)"
                )))
                }
            }
        }
        let token = match env(ENV_TOKEN) {
            Some(t) => Some(t),
            None => match env(ENV_TOKEN_FILE) {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .map_err(|e| invalid(format!("{ENV_TOKEN_FILE}={path:?}: {e}")))?,
                ),
                None => None,
            },
        };
        let token = match token.map(|t| t.trim().to_string()) {
            Some(t) if !t.is_empty() => {
                let mut v = HeaderValue::from_str(&t)
                    .map_err(|_| invalid(format!("{ENV_TOKEN}: not a valid header value")))?;
                v.set_sensitive(true);
                Some(Token(v))
            }
            _ => None,
        };
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .user_agent(concat!("edge-agent/", env!("CARGO_PKG_VERSION")));
        if https {
            if let Some(path) = env(ENV_CACERT) {
                let pem = std::fs::read(&path)
                    .map_err(|e| invalid(format!("{ENV_CACERT}={path:?}: {e}")))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| invalid(format!("{ENV_CACERT}={path:?}: {e}")))?;
                for c in certs {
                    builder = builder.add_root_certificate(c);
                }
            }
            match (env(ENV_CLIENT_CERT), env(ENV_CLIENT_KEY)) {
                (Some(cert), Some(key)) => {
                    let mut pem = std::fs::read(&cert)
                        .map_err(|e| invalid(format!("{ENV_CLIENT_CERT}={cert:?}: {e}")))?;
                    pem.push(b'\n');
                    pem.extend(
                        std::fs::read(&key)
                            .map_err(|e| invalid(format!("{ENV_CLIENT_KEY}={key:?}: {e}")))?,
                    );
                    let id = reqwest::Identity::from_pem(&pem)
                        .map_err(|e| invalid(format!("{ENV_CLIENT_CERT}/{ENV_CLIENT_KEY}: {e}")))?;
                    builder = builder.identity(id);
                }
                (None, None) => {}
                _ => {
                    return Err(invalid(format!(
                        "{ENV_CLIENT_CERT} and {ENV_CLIENT_KEY} go together"
                    )))
                }
            }
            if env(ENV_SSL_VERIFY).is_some_and(|v| !truthy(&v)) {
                builder = builder.danger_accept_invalid_certs(true);
            }
        }
        let client = builder
            .build()
            .map_err(|e| invalid(format!("cannot build the HTTP client: {e}")))?;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let listener_tx = cmd_tx.clone();
        let wanted = moka::sync::Cache::builder()
            .max_capacity(MAX_WATCHED)
            .time_to_idle(idle_ttl)
            .eviction_listener(move |name: Arc<String>, generation: u64, cause| {
                if matches!(cause, RemovalCause::Expired | RemovalCause::Size) {
                    let _ = listener_tx.send(Cmd::Idle {
                        name: (*name).clone(),
                        generation,
                    });
                }
            })
            .build();
        let scheme = if https { "https" } else { "http" };
        Ok(ConsulDiscovery {
            base: format!("{scheme}://{authority}"),
            https,
            authority,
            token,
            dc,
            tags,
            near,
            wait,
            idle_ttl,
            pinned,
            client,
            catalog: RwLock::new(None),
            watching: AtomicUsize::new(0),
            wanted,
            generation: AtomicU64::new(1),
            cmd_tx,
            cmd_rx: Mutex::new(Some(cmd_rx)),
        })
    }

    pub fn wait(&self) -> Duration {
        self.wait
    }

    pub fn idle_ttl(&self) -> Duration {
        self.idle_ttl
    }

    /// `http(s)://host:port` of the Consul HTTP API.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Timeout of one blocking call: the wait, Consul's jitter (wait/16) and a margin.
    pub fn call_timeout(&self) -> Duration {
        self.wait + self.wait / 16 + TIMEOUT_MARGIN
    }

    fn catalog_contains(&self, name: &str) -> Option<bool> {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.contains(name))
    }
}

/// One answer of a blocking query.
#[derive(Debug)]
struct Answer {
    body: Value,
    index: Option<u64>,
    /// Why the answer may be empty because of ACLs, if the headers say so.
    acl: Option<String>,
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
    async fn get(&self, segments: &[&str], index: u64, health: bool) -> Result<Answer, Failure> {
        let mut url = Url::parse(&self.base).expect("base URL parses");
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
            self.authority,
            &url[url::Position::BeforePath..]
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
        if !node.node.is_empty() {
            metadata.entry("node".into()).or_insert(node.node);
        }
        inst.zone = metadata.get("zone").filter(|z| !z.is_empty()).cloned();
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

fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(BACKOFF_MIN)
        .with_max_delay(BACKOFF_MAX)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The run loop's view of one watched name.
struct Watch {
    /// Generation of the cache entry (0 for `service=` names, which never idle out).
    generation: u64,
    task: Option<Running>,
}

/// A running health watch: its task, and the gate its answers pass through.
///
/// The run loop stops a watch (its service left the catalog, or it idled out) and then reports
/// the service gone. Aborting alone cannot order the two: a task on another worker thread may be
/// in the middle of sending its last answer, which would land after `NotFound` and bring the
/// service back with whatever that answer held (seen: an empty set that answered 503 instead of
/// 404, for good). The task sends while holding the gate, and the run loop closes the gate
/// before it aborts, so nothing from a stopped watch follows the stop.
struct Running {
    abort: AbortHandle,
    gate: Gate,
}

impl Running {
    /// Closes the gate (waiting out a send in progress) and aborts the task.
    async fn stop(&self) {
        self.gate.close().await;
        self.abort.abort();
    }
}

/// Lets a watch's answers through until closed; see [`Running`].
#[derive(Clone)]
struct Gate(Arc<tokio::sync::Mutex<bool>>);

impl Gate {
    fn new() -> Gate {
        Gate(Arc::new(tokio::sync::Mutex::new(true)))
    }

    /// Sends `event` unless the gate is closed; `false` when closed or the agent is gone.
    async fn send(&self, sink: &Sink, event: Event) -> bool {
        let open = self.0.lock().await;
        *open && sink.send(event).await
    }

    /// Closes the gate; returns once a send in progress has finished.
    async fn close(&self) {
        *self.0.lock().await = false;
    }
}

impl ConsulDiscovery {
    /// Watches one service's passing instances until aborted or the sink closes.
    async fn watch_service(self: Arc<Self>, name: String, sink: Sink, gate: Gate) {
        /// Counts the watch in `watching` for as long as it runs (abort included).
        struct Counted<'a>(&'a AtomicUsize);
        impl Drop for Counted<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.watching.fetch_add(1, Ordering::Relaxed);
        let _counted = Counted(&self.watching);
        let mut index = 0u64;
        let mut delays = backoff();
        let mut failing = false;
        loop {
            let started = Instant::now();
            match self
                .get(&["v1", "health", "service", &name], index, true)
                .await
            {
                Ok(answer) => {
                    delays = backoff();
                    if failing {
                        tracing::info!(service = %name, "consul health watch answering again");
                        failing = false;
                    }
                    let next = next_index(index, answer.index);
                    match parse_health(&answer.body) {
                        Ok((instances, problems)) => {
                            tracing::debug!(service = %name, index = next, instances = instances.len(), "consul health answer");
                            let ev = Event::Service {
                                service: name.clone(),
                                update: Update::Reset(instances),
                            };
                            if !gate.send(&sink, ev).await {
                                return;
                            }
                            for p in problems {
                                sink.error(ErrorKind::Parse, format!("consul service {name}: {p}"))
                                    .await;
                            }
                            if let Some(note) = answer.acl {
                                sink.error(
                                    ErrorKind::Auth,
                                    format!("consul service {name}: {note}"),
                                )
                                .await;
                            }
                        }
                        Err(e) => {
                            // A well-formed HTTP answer with the wrong shape: keep the last set,
                            // start over from 0 after a back-off.
                            sink.error(ErrorKind::Parse, format!("consul service {name}: {e}"))
                                .await;
                            index = 0;
                            tokio::time::sleep(delays.next().unwrap_or(BACKOFF_MAX)).await;
                            continue;
                        }
                    }
                    if next == index && started.elapsed() < MIN_UNCHANGED_INTERVAL {
                        tokio::time::sleep(MIN_UNCHANGED_INTERVAL - started.elapsed()).await;
                    }
                    index = next;
                }
                Err(f) => {
                    failing = true;
                    index = 0;
                    if !sink.error(f.kind, f.message).await {
                        return;
                    }
                    tokio::time::sleep(delays.next().unwrap_or(BACKOFF_MAX)).await;
                }
            }
            if sink.tx.is_closed() {
                return;
            }
        }
    }

    /// One catalog call from `index`, after `delay`.
    async fn catalog_call(self: Arc<Self>, index: u64, delay: Duration) -> Result<Answer, Failure> {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.get(&["v1", "catalog", "services"], index, false).await
    }

    fn start_task(self: &Arc<Self>, tasks: &mut JoinSet<()>, name: &str, sink: &Sink) -> Running {
        tracing::info!(service = %name, "consul: watching service");
        let gate = Gate::new();
        let abort = tasks.spawn(self.clone().watch_service(
            name.to_string(),
            sink.clone(),
            gate.clone(),
        ));
        Running { abort, gate }
    }

    async fn run_loop(self: Arc<Self>, sink: Sink) {
        let Some(mut cmds) = self.cmd_rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            sink.error(ErrorKind::Io, "consul source is already running")
                .await;
            return;
        };
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut watches: HashMap<String, Watch> = HashMap::new();
        for name in &self.pinned {
            let task = Some(self.start_task(&mut tasks, name, &sink));
            watches.insert(
                name.clone(),
                Watch {
                    generation: 0,
                    task,
                },
            );
        }
        let mut tick = tokio::time::interval(HOUSEKEEPING_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut index = 0u64;
        let mut delays = backoff();
        let mut call_started = Instant::now();
        let mut call = Box::pin(self.clone().catalog_call(0, Duration::ZERO));
        loop {
            tokio::select! {
                res = &mut call => {
                    let mut delay = Duration::ZERO;
                    let parsed = res.and_then(|a| {
                        parse_catalog(&a.body)
                            .map(|names| (names, a.index, a.acl))
                            .map_err(|e| Failure { kind: ErrorKind::Parse, message: format!("consul catalog: {e}") })
                    });
                    match parsed {
                        Ok((names, got, acl)) => {
                            delays = backoff();
                            let next = next_index(index, got);
                            tracing::debug!(index = next, services = names.len(), "consul catalog answer");
                            let set: HashSet<String> = names.iter().cloned().collect();
                            *self.catalog.write().unwrap_or_else(|e| e.into_inner()) = Some(set.clone());
                            if !sink.send(Event::Catalog(names)).await {
                                break;
                            }
                            if let Some(note) = acl {
                                sink.error(ErrorKind::Auth, format!("consul catalog: {note}")).await;
                            }
                            // Start waiting watches whose service appeared; pause those whose
                            // service left.
                            for (name, w) in watches.iter_mut() {
                                match (set.contains(name), &w.task) {
                                    (true, None) => w.task = Some(self.start_task(&mut tasks, name, &sink)),
                                    (false, Some(t)) => {
                                        t.stop().await;
                                        w.task = None;
                                        tracing::info!(service = %name, "consul: service left the catalog");
                                        sink.send(Event::Service { service: name.clone(), update: Update::NotFound }).await;
                                    }
                                    _ => {}
                                }
                            }
                            if next == index && call_started.elapsed() < MIN_UNCHANGED_INTERVAL {
                                delay = MIN_UNCHANGED_INTERVAL - call_started.elapsed();
                            }
                            index = next;
                        }
                        Err(f) => {
                            index = 0;
                            if !sink.error(f.kind, f.message).await {
                                break;
                            }
                            delay = delays.next().unwrap_or(BACKOFF_MAX);
                        }
                    }
                    call_started = Instant::now() + delay;
                    call = Box::pin(self.clone().catalog_call(index, delay));
                }
                Some(cmd) = cmds.recv() => match cmd {
                    Cmd::Want { name, generation } => {
                        let present = self.catalog_contains(&name).unwrap_or(true);
                        let w = watches.entry(name.clone()).or_insert(Watch { generation, task: None });
                        if w.generation != 0 {
                            w.generation = generation;
                        }
                        if w.task.is_none() && present {
                            w.task = Some(self.start_task(&mut tasks, &name, &sink));
                        }
                    }
                    Cmd::Idle { name, generation } => {
                        if let Some(w) = watches.get(&name) {
                            if w.generation == generation && generation != 0 {
                                let had_task = w.task.is_some();
                                if let Some(t) = &w.task {
                                    t.stop().await;
                                }
                                watches.remove(&name);
                                if had_task {
                                    tracing::info!(service = %name, ttl = ?self.idle_ttl, "consul: watch idle, stopped");
                                    if !sink.send(Event::Service { service: name, update: Update::NotFound }).await {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = tick.tick() => {
                    self.wanted.run_pending_tasks();
                    if sink.tx.is_closed() {
                        break;
                    }
                }
            }
        }
        tasks.abort_all();
    }
}

impl Discovery for ConsulDiscovery {
    fn kind(&self) -> &'static str {
        "consul"
    }

    fn describe(&self) -> String {
        let scheme = if self.https { "consul+https" } else { "consul" };
        let mut u = Url::parse(&format!("http://{}", self.authority)).expect("authority parses");
        {
            let mut q = u.query_pairs_mut();
            if let Some(dc) = &self.dc {
                q.append_pair("dc", dc);
            }
            for t in &self.tags {
                q.append_pair("tag", t);
            }
            if let Some(n) = &self.near {
                q.append_pair("near", n);
            }
            q.append_pair("wait", &format!("{:?}", self.wait));
            q.append_pair("idle_ttl", &format!("{:?}", self.idle_ttl));
            for s in &self.pinned {
                q.append_pair("service", s);
            }
        }
        format!(
            "{scheme}://{}/?{}",
            self.authority,
            u.query().unwrap_or_default()
        )
    }

    fn run(self: Arc<Self>, sink: Sink) -> BoxFuture {
        Box::pin(self.run_loop(sink))
    }

    fn on_demand(&self) -> bool {
        true
    }

    fn watch(&self, service: &str) -> bool {
        let Some(name) = normalize(service) else {
            return false;
        };
        let known = self.catalog_contains(&name);
        if self.pinned.contains(&name) {
            return known.unwrap_or(true);
        }
        if self.wanted.get(&name).is_none() {
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
            let entry = self
                .wanted
                .entry(name.clone())
                .or_insert_with(|| generation);
            if entry.is_fresh() {
                let _ = self.cmd_tx.send(Cmd::Want {
                    name,
                    generation: entry.into_value(),
                });
            }
        }
        known.unwrap_or(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(url: &str, env: &[(&str, &str)]) -> Result<ConsulDiscovery, SourceError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ConsulDiscovery::from_url_with_env(url, move |k| env.get(k).cloned())
    }

    fn answer(service: &str, n: usize) -> Event {
        let instances = (0..n)
            .map(|i| Instance::new("127.0.0.1", 9000 + i as u16))
            .collect();
        Event::Service {
            service: service.to_string(),
            update: Update::Reset(instances),
        }
    }

    /// The stop of a watch orders against its answers: an answer being sent when the watch is
    /// stopped arrives before the stop's `NotFound`, and nothing the watch sends afterwards
    /// arrives at all (CI once saw an empty answer land after `NotFound`: 503 for good where
    /// the service had gone and 404 was due).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_watch_sends_nothing_after_the_stop() {
        fn label(ev: Event) -> String {
            match ev {
                Event::Catalog(_) => "catalog".to_string(),
                Event::Service {
                    update: Update::Reset(v),
                    ..
                } => format!("reset {}", v.len()),
                Event::Service {
                    update: Update::NotFound,
                    ..
                } => "not found".to_string(),
                _ => "other".to_string(),
            }
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let sink = Sink::new(0, tx);
        // A full channel, so the watch's first send blocks while it holds the gate.
        assert!(sink.send(Event::Catalog(vec![])).await);
        let gate = Gate::new();
        let (go, next_answer) = tokio::sync::oneshot::channel::<()>();
        let (watch_gate, watch_sink) = (gate.clone(), sink.clone());
        let watch = tokio::spawn(async move {
            let first = watch_gate.send(&watch_sink, answer("web", 0)).await;
            next_answer.await.unwrap();
            let second = watch_gate.send(&watch_sink, answer("web", 1)).await;
            (first, second)
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while gate.0.try_lock().is_ok() {
            assert!(Instant::now() < deadline, "the watch never took the gate");
            tokio::task::yield_now().await;
        }
        let mut closing = tokio::spawn(async move { gate.close().await });
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut closing)
                .await
                .is_err(),
            "close waits for the send in progress"
        );
        let mut recv = async || {
            let (_, ev) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("an event within 5 s")
                .expect("channel open");
            label(ev)
        };
        assert_eq!(recv().await, "catalog");
        assert_eq!(recv().await, "reset 0");
        tokio::time::timeout(Duration::from_secs(5), closing)
            .await
            .expect("close returns once the send is done")
            .unwrap();
        let gone = Event::Service {
            service: "web".into(),
            update: Update::NotFound,
        };
        assert!(sink.send(gone).await);
        go.send(()).unwrap();
        assert_eq!(
            watch.await.unwrap(),
            (true, false),
            "the later answer is refused"
        );
        assert_eq!(recv().await, "not found");
        drop(sink);
        assert!(rx.recv().await.is_none(), "nothing after the stop");
    }

    #[test]
    fn url_and_environment() {
        let c = src("consul://127.0.0.1:18500?dc=eu1&tag=a&tag=b&near=_agent&wait=2s&idle_ttl=1m&service=Web,api", &[("CONSUL_HTTP_TOKEN", "s3cret")]).unwrap();
        assert_eq!(c.base(), "http://127.0.0.1:18500");
        assert_eq!(c.wait(), Duration::from_secs(2));
        assert_eq!(c.idle_ttl(), Duration::from_secs(60));
        assert_eq!(
            c.call_timeout(),
            Duration::from_millis(2000 + 125) + TIMEOUT_MARGIN
        );
        assert!(c.has_token());
        assert_eq!(c.pinned, vec!["web", "api"]);
        let d = c.describe();
        assert!(
            !d.contains("s3cret") && !format!("{c:?}").contains("s3cret"),
            "{d}"
        );
        assert!(
            d.starts_with("consul://127.0.0.1:18500/?dc=eu1&tag=a&tag=b&near=_agent"),
            "{d}"
        );

        // No host: CONSUL_HTTP_ADDR, with its scheme; defaults otherwise.
        let c = src("consul://", &[("CONSUL_HTTP_ADDR", "https://consul.local")]).unwrap();
        assert_eq!(c.base(), "https://consul.local:8501");
        assert!(c
            .describe()
            .starts_with("consul+https://consul.local:8501/"));
        let c = src("consul://", &[]).unwrap();
        assert_eq!(c.base(), "http://127.0.0.1:8500");
        assert_eq!(c.wait(), DEFAULT_WAIT);
        let c = src("consul://?dc=x", &[("CONSUL_HTTP_ADDR", "10.0.0.1:9500")]).unwrap();
        assert_eq!(c.base(), "http://10.0.0.1:9500");
        let c = src("consul://h:1", &[("CONSUL_HTTP_SSL", "true")]).unwrap();
        assert_eq!(c.base(), "https://h:1");
        let c = src("consul+https://[::1]:8501", &[]).unwrap();
        assert_eq!(c.base(), "https://[::1]:8501");

        for bad in [
            "consul://h?wait=11m",
            "consul://h?wait=5x",
            "consul://h?bogus=1",
            "consul://h?service=a/b",
            "consul://h?tag=",
        ] {
            assert!(
                matches!(src(bad, &[]), Err(SourceError::Invalid { .. })),
                "{bad}"
            );
        }
        let err = src("consul://tok@h:1", &[]).unwrap_err().to_string();
        assert!(!err.contains("tok"), "{err}");
        assert!(src("consul://", &[("CONSUL_HTTP_ADDR", "unix:///tmp/c.sock")]).is_err());
        assert!(src("consul+https://h", &[("CONSUL_CACERT", "/nonexistent.pem")]).is_err());
        assert!(src("consul+https://h", &[("CONSUL_CLIENT_CERT", "/x.pem")]).is_err());
    }

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
            {"Node": {"Node": "n2", "Address": "10.0.0.2"},
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
        assert_eq!(a.metadata["version"], "2");
        assert_eq!(a.metadata["node"], "n1");
        let b = &set[1];
        assert_eq!(
            (b.addr.as_str(), b.weight, b.zone.clone()),
            ("192.168.1.5", 1, None)
        );
        assert!(!b.metadata.contains_key("tags"));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("n3/web-3"), "{problems:?}");
        assert!(parse_health(&serde_json::json!({"x": 1})).is_err());
        assert_eq!(parse_health(&Value::Null).unwrap().0, vec![]);
    }

    #[test]
    fn catalog_names_are_lower_cased() {
        let body = serde_json::json!({"consul": [], "Web": ["v1"], "api": []});
        assert_eq!(parse_catalog(&body).unwrap(), vec!["api", "consul", "web"]);
        assert!(parse_catalog(&serde_json::json!([1])).is_err());
    }

    /// One request the scripted server saw: path and query.
    type Seen = Arc<Mutex<Vec<String>>>;

    /// What the scripted server answers: status, index, body; `None` holds the request open.
    type Script = Arc<dyn Fn(&str, &str) -> Option<(u16, u64, String)> + Send + Sync>;

    /// A minimal HTTP/1.1 server on loopback answering from `script`, recording requests.
    async fn scripted(script: Script) -> (u16, Seen) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Seen = Arc::default();
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (script, seen) = (script.clone(), seen2.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match conn.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end);
                        let target = head.split(' ').nth(1).unwrap_or("").to_string();
                        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
                        seen.lock().unwrap().push(target.clone());
                        let Some((status, index, body)) = script(path, query) else {
                            std::future::pending::<()>().await;
                            return;
                        };
                        let resp = format!(
                            "HTTP/1.1 {status} X\r\nX-Consul-Index: {index}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if conn.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, seen)
    }

    fn entry(port: u16) -> String {
        format!(
            r#"{{"Node":{{"Node":"n","Address":"127.0.0.1"}},"Service":{{"ID":"web-{port}","Service":"web","Port":{port}}}}}"#
        )
    }

    async fn next_event(rx: &mut mpsc::Receiver<(usize, Event)>) -> Event {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an event within 10 s")
            .expect("sink open")
            .1
    }

    /// The next event about `service`, skipping catalog events.
    async fn next_for(rx: &mut mpsc::Receiver<(usize, Event)>, service: &str) -> Event {
        loop {
            match next_event(rx).await {
                Event::Catalog(_) => continue,
                Event::Service { service: s, .. } if s != service => continue,
                ev => return ev,
            }
        }
    }

    fn ports(ev: &Event) -> Vec<u16> {
        match ev {
            Event::Service {
                update: Update::Reset(set),
                ..
            } => set.iter().map(|i| i.port).collect(),
            other => panic!("expected a reset, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn blocking_query_index_rules_and_errors() {
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let script: Script = Arc::new(move |path, query| {
            if path == "/v1/catalog/services" {
                return (!query.contains("index=")).then(|| (200, 10, r#"{"web":[]}"#.into()));
            }
            let n = c.fetch_add(1, Ordering::SeqCst);
            match n {
                0 => Some((200, 5, format!("[{}]", entry(1)))),
                1 => Some((500, 0, "boom".into())),
                2 => Some((200, 7, format!("[{},{}]", entry(1), entry(2)))),
                3 => Some((200, 3, format!("[{}]", entry(2)))),
                4 => Some((200, 4, "not json".into())),
                5 => Some((200, 0, format!("[{}]", entry(1)))),
                6 => Some((200, 9, format!("[{}]", entry(1)))),
                _ => None,
            }
        });
        let (port, seen) = scripted(script).await;
        let src = Arc::new(src(&format!("consul://127.0.0.1:{port}?wait=2s&tag=t1"), &[]).unwrap());
        let (tx, mut rx) = mpsc::channel(64);
        assert!(src.watch("Web"));
        tokio::spawn(src.clone().run(Sink::new(0, tx)));
        assert_eq!(ports(&next_for(&mut rx, "web").await), vec![1]);
        assert!(matches!(
            next_for(&mut rx, "web").await,
            Event::Error {
                kind: ErrorKind::Status,
                ..
            }
        ));
        assert_eq!(ports(&next_for(&mut rx, "web").await), vec![1, 2]);
        assert_eq!(ports(&next_for(&mut rx, "web").await), vec![2]);
        assert!(matches!(
            next_for(&mut rx, "web").await,
            Event::Error {
                kind: ErrorKind::Parse,
                ..
            }
        ));
        assert_eq!(ports(&next_for(&mut rx, "web").await), vec![1]);
        assert_eq!(ports(&next_for(&mut rx, "web").await), vec![1]);
        // Unknown names are refused once the catalog is known.
        assert!(!src.watch("nope"));
        let health: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t.starts_with("/v1/health/service/web"))
            .cloned()
            .collect();
        let index_of = |t: &String| {
            t.split(['?', '&'])
                .find_map(|kv| kv.strip_prefix("index="))
                .map(String::from)
        };
        let indexes: Vec<Option<String>> = health.iter().take(7).map(index_of).collect();
        let want: Vec<Option<String>> = [None, Some("5"), None, Some("7"), None, None, Some("1")]
            .iter()
            .map(|o| o.map(String::from))
            .collect();
        // Error → 0; backwards (7 → 3) → 0; 0 → 1.
        assert_eq!(indexes, want, "{health:#?}");
        assert!(
            health[1].contains("passing=true")
                && health[1].contains("tag=t1")
                && health[1].contains("wait=2000ms"),
            "{}",
            health[1]
        );
    }

    #[tokio::test]
    async fn on_demand_watches_start_idle_out_and_wait_for_the_catalog() {
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = released.clone();
        let script: Script = Arc::new(move |path, query| match path {
            "/v1/catalog/services" if !query.contains("index=") => {
                Some((200, 10, r#"{"web":[]}"#.into()))
            }
            "/v1/catalog/services" if query.contains("index=10") && r.load(Ordering::SeqCst) => {
                Some((200, 11, r#"{"web":[],"later":[]}"#.into()))
            }
            "/v1/catalog/services" if query.contains("index=10") => {
                Some((200, 10, r#"{"web":[]}"#.into()))
            }
            "/v1/health/service/web" if !query.contains("index=") => {
                Some((200, 5, format!("[{}]", entry(1))))
            }
            "/v1/health/service/later" if !query.contains("index=") => {
                Some((200, 5, format!("[{}]", entry(3))))
            }
            _ => None,
        });
        let (port, seen) = scripted(script).await;
        let src = Arc::new(src(&format!("consul://127.0.0.1:{port}?idle_ttl=1s"), &[]).unwrap());
        assert!(src.on_demand());
        let (tx, mut rx) = mpsc::channel(64);
        tokio::spawn(src.clone().run(Sink::new(0, tx)));
        assert_eq!(
            next_event(&mut rx).await,
            Event::Catalog(vec!["web".into()])
        );
        assert!(src.watch("web"));
        assert_eq!(ports(&next_for(&mut rx, "web").await), vec![1]);
        // Absent: refused, remembered, started once the catalog lists it. Until then the
        // catalog query returns unchanged at once, which the spin guard paces.
        assert!(!src.watch("later"));
        released.store(true, Ordering::SeqCst);
        assert_eq!(ports(&next_for(&mut rx, "later").await), vec![3]);
        // Not touched again: both idle out and are reported gone.
        let mut gone = Vec::new();
        while gone.len() < 2 {
            if let Event::Service {
                service,
                update: Update::NotFound,
            } = next_event(&mut rx).await
            {
                gone.push(service);
            }
        }
        gone.sort();
        assert_eq!(gone, vec!["later", "web"]);
        let n = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t.starts_with("/v1/health/service/web"))
            .count();
        assert_eq!(
            n,
            2,
            "one fetch, one blocking query: {:?}",
            seen.lock().unwrap()
        );
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
