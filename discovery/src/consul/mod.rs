//! The Consul registry: passing instances from blocking health queries, watched per service on
//! demand, and the catalog's service names from a blocking catalog query.
//!
//! ```text
//! EDGE_AGENT_REGISTRY=consul://127.0.0.1:8500
//! EDGE_AGENT_REGISTRY=consul+https://consul.internal:8501?dc=eu1&tag=v2&near=_agent&wait=5m&idle_ttl=10m
//! EDGE_AGENT_REGISTRY=consul://?service=payments&service=users      # address from CONSUL_HTTP_ADDR
//! EDGE_AGENT_REGISTRY=consul://10.0.0.1:8500?server=10.0.0.2:8500&server=10.0.0.3   # failover list
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
//! - Several servers (or agents): repeated `server=host[:port]` (same scheme and port default
//!   as the URL; no path, no credentials; a server listed twice is refused). The agent splits
//!   `EDGE_AGENT_REGISTRY` on commas, hence a parameter rather than `consul://a,b,c`. The URL's
//!   host comes first; with no host (`consul://?server=a&server=b`) the list is the `server=`
//!   values only and `CONSUL_HTTP_ADDR` is not read. Every call goes to one current server; a
//!   call that fails (connection, timeout, status, bad JSON) moves the current server on to the
//!   next in order (once per failure, however many watches saw it: a compare-and-swap on the
//!   index), its error says `trying <next> next`, and the watch retries there after its usual
//!   back-off. There is no return to the first server while the current one answers. The
//!   servers of one datacenter share the Raft index, so a blocking query could carry on, but a
//!   failed watch starts over from index 0 anyway. The liveness check asks each server in turn
//!   from the current one: the source is up while any answers.
//! - `CONSUL_HTTP_TOKEN` (or the file named by `CONSUL_HTTP_TOKEN_FILE`) is sent as
//!   `X-Consul-Token` on every call. It never appears in [`Discovery::describe`], logs or errors,
//!   and there is deliberately no URL parameter for it.
//! - TLS: `CONSUL_CACERT` (PEM bundle added to the roots), `CONSUL_CLIENT_CERT` +
//!   `CONSUL_CLIENT_KEY` (PEM, client authentication), `CONSUL_HTTP_SSL_VERIFY=false` (accept
//!   any certificate; tests only). `CONSUL_CAPATH` and `CONSUL_TLS_SERVER_NAME` are not read.
//!   The client is built by the crate's shared `http` module, which gives the Eureka adapter the
//!   same options (as URL query keys).
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
//! `Service.Port` (entries without one, or whose address is not a valid host — see
//! [`crate::check_instance`] — are skipped with a `parse` error naming the instance and the
//! address); weight
//! `Service.Weights.Passing` (default [`DEFAULT_WEIGHT`]); healthy (only passing instances are
//! asked for). Metadata: `Service.Meta` keys as-is, plus `tags` (comma-joined), each tag as
//! `tag:<name> = "true"` (so a subset can select `{ "tag:v2" = "true" }`) and `node`, each unless
//! the meta has its own. Zone, in this order: `Service.Meta.zone`, then `Node.Meta.zone`
//! (an empty value counts as unset).
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
//!
//! # Layout
//! - `mod.rs` (this file): the source type, its [`Discovery`] impl and the constants above.
//! - `url.rs`: building a source from its URL and Consul's environment variables.
//! - `api.rs`: the HTTP API: one blocking GET, the answers' typed JSON and their parsing
//!   ([`parse_health`], [`parse_catalog`]), index and ACL rules.
//! - `watch.rs`: the tasks: one blocking health query per watched service, the catalog query
//!   and the run loop that starts, stops and gates them.
//!
//! The blocking GET lives with the API rather than with the watches: it is where the headers
//! (`X-Consul-Index`, the ACL ones) are read into an `api::Answer`, so the watch loop only
//! sees typed answers.
use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ::url::Url;
use reqwest::header::HeaderValue;
use tokio::sync::mpsc;

use crate::{BoxFuture, Discovery, Sink};

mod api;
mod url;
mod watch;

pub use api::{next_index, parse_catalog, parse_health};

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

/// One Consul agent or server the source may ask.
#[derive(Debug, Clone, PartialEq)]
struct Server {
    /// `http(s)://host:port`.
    base: String,
    /// `host:port`, for describe and messages.
    authority: String,
}

/// A source watching one Consul datacenter.
pub struct ConsulDiscovery {
    /// The URL's host (or `CONSUL_HTTP_ADDR`) and then each `server=`, in failover order.
    servers: Vec<Server>,
    /// Index in `servers` of the one every call goes to now; a failed call moves it on.
    current: AtomicUsize,
    https: bool,
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
    /// The server calls go to now, with its index (to hand to [`ConsulDiscovery::failed_on`]).
    fn server(&self) -> (usize, &Server) {
        let i = self.current.load(Ordering::Relaxed) % self.servers.len();
        (i, &self.servers[i])
    }

    /// A call to server `i` failed: with more than one server, move every call on to the next
    /// (unless another call already has) and say which in `message`.
    fn failed_on(&self, i: usize, message: &mut String) {
        if self.servers.len() < 2 {
            return;
        }
        let next = (i + 1) % self.servers.len();
        let _ = self
            .current
            .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed);
        let now = self.server().1;
        message.push_str(&format!("; trying {} next", now.authority));
    }

    fn catalog_contains(&self, name: &str) -> Option<bool> {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.contains(name))
    }
}

impl Discovery for ConsulDiscovery {
    fn kind(&self) -> &'static str {
        "consul"
    }

    /// `GET /v1/status/leader`: answered by any agent without an ACL token. With several
    /// servers, each in turn from the current one until one answers: the source is live while
    /// any of them is.
    fn liveness(self: Arc<Self>) -> Option<crate::LivenessFuture> {
        Some(Box::pin(async move {
            let (first, _) = self.server();
            let n = self.servers.len();
            let calls: Vec<(String, String)> = (0..n)
                .map(|k| &self.servers[(first + k) % n])
                .map(|s| {
                    (
                        format!("consul liveness ({}/v1/status/leader)", s.authority),
                        format!("{}/v1/status/leader", s.base),
                    )
                })
                .collect();
            crate::http::any_answers(&self.client, calls).await
        }))
    }

    /// `GET /v1/health/service/<name>?passing` without an index: answered at once. Consul
    /// answers an unknown service with an empty list, read as `None`.
    fn read(self: Arc<Self>, service: &str) -> Option<crate::ReadFuture> {
        let name = normalize(service)?;
        Some(Box::pin(async move {
            let answer = self
                .get(&["v1", "health", "service", &name], 0, true)
                .await
                .map_err(|f| (f.kind, f.message))?;
            let (instances, _problems) = api::parse_health(&answer.body).map_err(|e| {
                (
                    crate::ErrorKind::Parse,
                    format!("consul service {name}: {e}"),
                )
            })?;
            Ok((!instances.is_empty()).then_some(instances))
        }))
    }

    fn describe(&self) -> String {
        let scheme = if self.https { "consul+https" } else { "consul" };
        let first = &self.servers[0].authority;
        let mut u = Url::parse(&format!("http://{first}")).expect("authority parses");
        {
            let mut q = u.query_pairs_mut();
            for s in &self.servers[1..] {
                q.append_pair("server", &s.authority);
            }
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
        format!("{scheme}://{first}/?{}", u.query().unwrap_or_default())
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
