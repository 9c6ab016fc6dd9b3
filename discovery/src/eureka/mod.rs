//! The Eureka registry: the whole catalog fetched the way Eureka's own Java client does it, a
//! full fetch followed by deltas reconciled against the server's hash.
//!
//! ```text
//! EDGE_AGENT_REGISTRY=eureka://127.0.0.1:8761/eureka
//! EDGE_AGENT_REGISTRY=eureka+https://user:secret@eureka-a:8761/eureka?server=eureka-b:8761/eureka&interval=5s
//! EDGE_AGENT_REGISTRY=eureka+https://eureka:8761/eureka?ca_file=/etc/pki/ca.pem&client_cert=/etc/pki/agent.pem&client_key=/etc/pki/agent.key
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
//! - TLS (`eureka+https://` only; refused on `eureka://`), the same options as the Consul
//!   adapter's, applied to every server of the URL: `ca_file=` (PEM bundle added to the roots;
//!   Consul's `CONSUL_CACERT`), `client_cert=` + `client_key=` (PEM, client authentication;
//!   `CONSUL_CLIENT_CERT`/`CONSUL_CLIENT_KEY`), `ssl_verify=false` (accept any certificate;
//!   tests only; `CONSUL_HTTP_SSL_VERIFY`). The files are read when the URL is parsed, so a bad
//!   path or PEM is refused at start (naming the key and the path), not on the first fetch.
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
//!   enabled port: `port`, or `securePort` when only that one is enabled. When it is the secure
//!   port, metadata `secure = "true"` is added (unless the instance's metadata has `secure`
//!   already), which the agent reads as "dial with TLS" unless the upstream's `tls` key says
//!   otherwise.
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
//! - Leniency: one malformed instance (an address that is not a valid host, see
//!   [`crate::check_instance`], included) is skipped with a `parse` error event naming the app,
//!   the instance and the field; the rest of the answer is used. Its status still counts in the hash,
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
//!
//! # Layout
//! - `mod.rs` (this file): the source type, the run loop (failover between servers, back-off)
//!   and its [`Discovery`] impl.
//! - `url.rs`: building a source from its URL (servers, interval, timeout, credentials).
//! - `wire.rs`: Eureka's JSON with its quirks ([`parse_answer`]) and the GET that fetches it.
//! - `registry.rs`: the local copy ([`Registry`]), deltas applied to it, the reconciliation
//!   hash, and one round (full fetch or delta, full fetch again on a hash mismatch).
//!
//! The run loop stays here rather than beside the registry: it is about servers (which one to
//! ask next, when to back off), not about the copy, which it only drops after a failure.
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::{BoxFuture, Discovery, Event, Sink};

mod registry;
mod url;
mod wire;

pub use registry::Registry;
use registry::Round;
pub use wire::{parse_answer, Action, Answer, Entry, Item};

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
    lookups: Lookups,
}

/// First-request lookups (#17, `lookup.rs`): a request for a name the last poll did not have
/// asks Eureka for that app at once (`GET /apps/<NAME>`) rather than waiting up to a whole
/// `interval`.
#[derive(Debug)]
struct Lookups {
    /// Lower-cased apps the last snapshot sent had.
    known: std::sync::RwLock<std::collections::HashSet<String>>,
    asked: crate::lookup::Asked,
    tx: tokio::sync::mpsc::UnboundedSender<String>,
    rx: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
}

impl Lookups {
    fn new(
        tx: tokio::sync::mpsc::UnboundedSender<String>,
        rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    ) -> Self {
        Lookups {
            known: Default::default(),
            asked: Default::default(),
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
        }
    }

    /// Whether `name` may exist: known, or a lookup is asked or under way.
    fn want(&self, name: &str) -> bool {
        if self
            .known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
        {
            return true;
        }
        match self.asked.ask(name) {
            crate::lookup::Ask::New => self.tx.send(name.to_string()).is_ok(),
            crate::lookup::Ask::Pending => true,
            crate::lookup::Ask::Answered => false,
        }
    }

    fn sent(&self, snapshot: &std::collections::BTreeMap<String, Vec<crate::Instance>>) {
        *self.known.write().unwrap_or_else(|e| e.into_inner()) = snapshot.keys().cloned().collect();
    }
}

impl EurekaDiscovery {
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
        let Some(mut lookups) = self
            .lookups
            .rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
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
                    let snapshot = reg.snapshot();
                    self.lookups.sent(&snapshot);
                    if !sink.send(Event::Snapshot(snapshot)).await {
                        return;
                    }
                    if !self
                        .wait_answering_lookups(server, &mut local, &mut lookups, &sink)
                        .await
                    {
                        return;
                    }
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

impl EurekaDiscovery {
    /// Waits one `interval` before the next poll, answering first-request lookups meanwhile:
    /// a name Eureka has joins the local copy (so the next delta agrees with it) and a new
    /// snapshot is sent; a name it does not have is `NotFound`, so the waiting request gets
    /// its 404 at once. `false` when the agent has gone away.
    async fn wait_answering_lookups(
        &self,
        server: &Server,
        local: &mut Option<Registry>,
        lookups: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
        sink: &Sink,
    ) -> bool {
        let next_poll = tokio::time::sleep(self.interval);
        tokio::pin!(next_poll);
        loop {
            let name = tokio::select! {
                _ = &mut next_poll => return true,
                name = lookups.recv() => match name {
                    Some(n) => n,
                    None => return true,
                },
            };
            let sent = match self.fetch_app(server, &name, Some(sink)).await {
                Ok(Some(answer)) if !answer.items.is_empty() => {
                    tracing::debug!(server = %server.display, app = %name, instances = answer.items.len(), "eureka lookup found the app");
                    let reg = local.get_or_insert_with(Registry::default);
                    reg.replace_app(&answer);
                    let snapshot = reg.snapshot();
                    self.lookups.sent(&snapshot);
                    sink.send(Event::Snapshot(snapshot)).await
                }
                Ok(_) => {
                    tracing::debug!(server = %server.display, app = %name, "eureka lookup: no such app");
                    sink.send(Event::Service {
                        service: name.clone(),
                        update: crate::Update::NotFound,
                    })
                    .await
                }
                Err(f) => sink.error(f.kind, f.message).await,
            };
            self.lookups.asked.answered(&name);
            if !sent {
                return false;
            }
        }
    }
}

impl Discovery for EurekaDiscovery {
    fn kind(&self) -> &'static str {
        "eureka"
    }

    /// `GET <server>/apps/<a name no one registers>` on each server in turn until one answers
    /// (a 404 is an answer): the source is live while any peer of the cluster is.
    fn liveness(self: Arc<Self>) -> Option<crate::LivenessFuture> {
        Some(Box::pin(async move {
            let calls: Vec<(String, String)> = self
                .servers
                .iter()
                .map(|s| {
                    (
                        format!("eureka liveness ({})", s.display),
                        format!("{}/apps/EDGE-AGENT-LIVENESS", s.base),
                    )
                })
                .collect();
            crate::http::any_answers(&self.client, calls).await
        }))
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

    /// `GET <first server>/apps/<NAME>`, for the agent's resync: the delta fetch's hash
    /// reconciliation catches a lost change that alters the status counts, this one any other
    /// (a moved port, new metadata).
    fn read(self: Arc<Self>, service: &str) -> Option<crate::ReadFuture> {
        let name = service.trim().to_ascii_lowercase();
        Some(Box::pin(async move {
            let server = &self.servers[0];
            // Problems in the answer were reported by the poll already; a read only compares.
            let answer = self
                .fetch_app(server, &name, None)
                .await
                .map_err(|f| (f.kind, f.message))?;
            let mut reg = Registry::default();
            if let Some(a) = &answer {
                reg.replace_app(a);
            }
            Ok(reg.snapshot().remove(&name))
        }))
    }

    /// Eureka is polled whole; "on demand" here is only the first-request lookup of a name the
    /// last poll did not have ([`Lookups`]).
    fn on_demand(&self) -> bool {
        true
    }

    fn watch(&self, service: &str) -> bool {
        self.lookups.want(&service.trim().to_ascii_lowercase())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::Mutex;

    use serde_json::Value;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    use super::wire::tests::{apps, inst};
    use super::*;
    use crate::{ErrorKind, Instance};

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
