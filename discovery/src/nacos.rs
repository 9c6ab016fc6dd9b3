//! The Nacos registry (Nacos 2.x gRPC naming API, through the `nacos-sdk` crate): the service
//! list is polled on an interval, every listed service gets one push subscription whose events
//! become [`Update::Reset`]s.
//!
//! ```text
//! EDGE_AGENT_REGISTRY=nacos://127.0.0.1:8848?namespace=public&group=DEFAULT_GROUP&clusters=a,b
//! EDGE_AGENT_REGISTRY=nacos://?server=10.0.0.1:8848&server=10.0.0.2:8848&list_interval=5s
//! registry = ["nacos://10.0.0.1:8848,10.0.0.2:8848?namespace=prod"]   # config file only
//! ```
//!
//! # URL and environment
//! - Servers: the URL's host part (`host:port`, several comma-separated) plus every `server=`
//!   query parameter (repeatable). `EDGE_AGENT_REGISTRY` is split on commas by the agent, so in
//!   that variable use repeated `server=`; a comma list in the host part only works in a
//!   configuration file's `registry = [...]`. Port default 8848. The gRPC port is the SDK's
//!   default, HTTP port + 1000, unless `grpc_port=` says otherwise.
//! - `namespace` (default `public`; `public` and empty mean the public namespace), `group`
//!   (default `DEFAULT_GROUP`; one group per source — add another source for another group),
//!   `clusters` (comma-separated; empty means all), `list_interval` (service-list poll, default
//!   [`DEFAULT_LIST_INTERVAL`]), `grpc_port`, `cache_dir` (the SDK's write-only disk cache,
//!   default this source's own directory, see below). Durations take `ms`, `s`, `m`. Unknown parameters are
//!   refused.
//! - Credentials: `NACOS_USERNAME` / `NACOS_PASSWORD` (HTTP login, token refreshed by the SDK).
//!   Never in the URL, never in [`Discovery::describe`], `Debug` or logs. Access-key (Aliyun
//!   RAM) signing is not built in: it needs the SDK's `auth-by-aliyun` feature (ring, chrono);
//!   setting `NACOS_ACCESS_KEY` is refused with a message saying so.
//! - `env_first(false)`: the SDK's own `NACOS_CLIENT_*` variables do not override the URL.
//!
//! # Watching
//! - Catalog: [`get_service_list`] (paged) every `list_interval`, since Nacos has no catalog
//!   push. Each answer is sent as [`Event::Catalog`] (names lower-cased, as the agent routes on
//!   lower-cased hosts; the original spelling is kept for calls). New names are subscribed at
//!   once, vanished names are unsubscribed and reported [`Update::NotFound`].
//! - On demand (cheap bonus): [`Discovery::watch`] for a listed name returns true (the
//!   subscription already exists); for an unlisted one it returns false and asks for an early
//!   list refresh (at most one per [`MIN_LIST_GAP`]), so a just-registered service is found on
//!   the next request instead of after a full interval.
//! - Per service: first one direct query (`get_all_instances` without subscribing), sent as a
//!   `Reset` — this proves the server answers, because the SDK's `subscribe()` returns `Ok` even
//!   when its request failed — then `subscribe()`; every SDK change event is a full `Reset`.
//!   The query comes before the subscription, so any push is newer than it.
//! - `naming_push_empty_protection(false)`: otherwise the SDK swallows the "all instances gone"
//!   push. Protection against a suspicious mass removal is the agent's guard.
//! - `naming_load_cache_at_start(false)`: the SDK's disk cache is never read, so it cannot
//!   resurrect instances older than the agent's own last good view (the agent has its own disk
//!   snapshot). The SDK still writes it: nacos-sdk 0.8.3 always attaches its disk store (there
//!   is no option to turn it off), so it goes to a directory of this source's own,
//!   `<state dir>/nacos-sdk-cache/<servers>@<namespace>@<group>` (characters other than
//!   letters, digits, `.`, `_`, `-` replaced by `_`), created with mode `0700` before the SDK
//!   starts. The state directory is `EDGE_AGENT_STATE_DIR`, else the agent's default
//!   ([`crate::state_dir`]); the variable is read from the environment, so a `--state-dir` flag
//!   given to the agent instead of the variable is not seen here. `cache_dir=` overrides the
//!   location (used as given, permissions left to its owner). Before, every agent on the host
//!   shared the predictable `/tmp/edge-agent-nacos/`.
//!
//! # Outages and reconnect
//! The SDK reconnects its gRPC stream by itself and re-subscribes (its "redo" tasks). But its
//! change events are diffed against its in-memory cache, so a reconnect where nothing changed
//! emits nothing, and a change missed during the outage may only show at the SDK's next poll
//! (up to 60 s). So: while the list call fails an error event is sent every `list_interval`
//! (the last good sets stay; staleness grows); on the first successful list after a failure
//! every subscribed service is queried directly and sent as a fresh `Reset`.
//!
//! # Mapping
//! Identity `ip:port#cluster`; weight `round(w × 100)` (Nacos weights are floats, 1.0 → 100;
//! 0 means no traffic); healthy = `healthy && enabled`. Which instances reach the set is the
//! server's choice, and for disabled ones the usual answer is none: rnacos 0.8.8 (the server
//! the integration tests run) leaves instances with `enabled = false` out of every instance
//! list it sends, direct queries and pushes alike, so a disabled instance is *absent* from the
//! set (as if deregistered) until it is enabled again. Unhealthy instances are asked for too
//! (the adapter does not request healthy ones only): where the server lists them they stay in
//! the set with `healthy = false`, where it drops them they are absent; either way they carry
//! no traffic. A disabled instance that a server does list is kept with `healthy = false`. Metadata: the
//! instance's metadata plus `cluster` (the `clusterName`) and `ephemeral`; zone, in this order:
//! metadata `zone`, then the `clusterName` unless it is empty or Nacos's default cluster
//! `DEFAULT` (which names no place). With
//! `clusters=` set, instances of other clusters are dropped client-side too. An instance whose
//! port is outside 1..=65535 or whose address is not a valid host ([`crate::check_instance`])
//! is skipped with a `parse` error naming the service, the instance and the address; the rest
//! of the set is delivered.
//!
//! [`get_service_list`]: nacos_sdk::api::naming::NamingService::get_service_list
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use nacos_sdk::api::naming::{
    NamingChangeEvent, NamingEventListener, NamingService, NamingServiceBuilder, ServiceInstance,
};
use nacos_sdk::api::props::ClientProps;
use tokio::sync::mpsc;
use url::Url;

use crate::{join_host_port, BoxFuture, Discovery, ErrorKind, Event, Instance, Sink};
use crate::{SourceError, Update};

/// Service-list poll interval when the URL names none.
pub const DEFAULT_LIST_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest `list_interval` accepted.
pub const MIN_LIST_INTERVAL: Duration = Duration::from_millis(100);
/// Earliest a `watch` of an unlisted name may trigger another list call.
pub const MIN_LIST_GAP: Duration = Duration::from_secs(1);
/// Bound on each SDK call (list, query, subscribe) and on building the client.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Page size of the service-list call.
pub const LIST_PAGE: i32 = 500;
/// Most pages read per list call (so at most `LIST_PAGE × MAX_PAGES` services).
pub const MAX_PAGES: i32 = 100;
/// Default port of a Nacos server.
pub const DEFAULT_PORT: u16 = 8848;
/// Under the state directory, the folder holding each source's SDK cache directory.
pub const CACHE_SUBDIR: &str = "nacos-sdk-cache";
/// Retry delay after the client could not be built.
pub const BUILD_RETRY: Duration = Duration::from_secs(1);

pub const ENV_USERNAME: &str = "NACOS_USERNAME";
pub const ENV_PASSWORD: &str = "NACOS_PASSWORD";
pub const ENV_ACCESS_KEY: &str = "NACOS_ACCESS_KEY";

/// A password; `Debug` never shows it.
#[derive(Clone)]
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A source watching one Nacos namespace + group.
pub struct NacosDiscovery {
    servers: Vec<String>,
    namespace: String,
    group: String,
    clusters: Vec<String>,
    list_interval: Duration,
    grpc_port: Option<u16>,
    cache_dir: CacheDir,
    username: Option<String>,
    password: Option<Secret>,
    /// Lower-cased name → name as Nacos spells it, once a list call succeeded.
    catalog: RwLock<Option<HashMap<String, String>>>,
    want_tx: mpsc::UnboundedSender<String>,
    want_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    /// First-request lookups of names the last list did not have (`lookup.rs`).
    asked: crate::lookup::Asked,
    /// The SDK client once built, for direct reads ([`Discovery::read`]).
    naming: std::sync::OnceLock<NamingService>,
}

impl fmt::Debug for NacosDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NacosDiscovery")
            .field("url", &self.describe())
            .field("password", &self.password)
            .finish_non_exhaustive()
    }
}

/// Where the SDK writes its disk cache (which nothing reads: see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
enum CacheDir {
    /// `cache_dir=` from the URL, used as it is.
    Given(PathBuf),
    /// This source's own directory under the state directory, created `0700` before the SDK
    /// starts.
    Own(PathBuf),
}

impl CacheDir {
    fn path(&self) -> &Path {
        match self {
            CacheDir::Given(p) | CacheDir::Own(p) => p,
        }
    }

    /// Creates the source's own directory (and any missing parent) with mode `0700`, and
    /// narrows an existing one to `0700`. A `cache_dir=` directory is left to its owner.
    fn prepare(&self) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let CacheDir::Own(dir) = self else {
            return Ok(());
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    }
}

/// `s` as one path component: ASCII letters, digits, `.`, `_` and `-` kept, anything else `_`.
fn file_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `host[:port]` → `host:port` (default port 8848), validated.
fn server_addr(s: &str) -> Result<String, String> {
    let s = s.trim();
    let u = Url::parse(&format!("http://{s}")).map_err(|e| format!("server {s:?}: {e}"))?;
    let host = u
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("server {s:?}: no host"))?;
    if u.path() != "/" || u.query().is_some() || !u.username().is_empty() {
        return Err(format!("server {s:?}: expected host:port"));
    }
    let port = u.port().unwrap_or(DEFAULT_PORT);
    Ok(if host.starts_with('[') {
        format!("{host}:{port}")
    } else {
        join_host_port(host, port)
    })
}

impl NacosDiscovery {
    /// From `nacos://…`, reading credentials from the environment.
    pub fn from_url(url: &str) -> Result<Self, SourceError> {
        Self::from_url_with_env(url, |k| std::env::var(k).ok())
    }

    /// As [`NacosDiscovery::from_url`], reading variables through `env`.
    pub fn from_url_with_env(
        url: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SourceError> {
        let invalid = |reason: String| SourceError::Invalid {
            url: url.to_string(),
            reason,
        };
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let rest = url
            .strip_prefix("nacos://")
            .ok_or_else(|| invalid("expected nacos://host:port".into()))?;
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let hosts = hosts.trim_end_matches('/');
        if hosts.contains('@') {
            return Err(SourceError::Invalid {
                url: "nacos://<redacted>".into(),
                reason: format!("no credentials in the URL: set {ENV_USERNAME}/{ENV_PASSWORD}"),
            });
        }
        let mut servers = Vec::new();
        for h in hosts.split(',').filter(|h| !h.trim().is_empty()) {
            servers.push(server_addr(h).map_err(invalid)?);
        }
        let mut namespace = String::new();
        let mut group = "DEFAULT_GROUP".to_string();
        let mut clusters = Vec::new();
        let mut list_interval = DEFAULT_LIST_INTERVAL;
        let mut grpc_port = None;
        let mut cache_dir = None;
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let value = value.trim().to_string();
            match key.as_ref() {
                "server" => servers.push(server_addr(&value).map_err(invalid)?),
                "namespace" if value == "public" => namespace.clear(),
                "namespace" => namespace = value,
                "group" if value.is_empty() => return Err(invalid("group= needs a value".into())),
                "group" => group = value,
                "clusters" => {
                    clusters = value
                        .split(',')
                        .map(|c| c.trim().to_string())
                        .filter(|c| !c.is_empty())
                        .collect()
                }
                "list_interval" => {
                    list_interval = crate::parse_duration(&value, MIN_LIST_INTERVAL)
                        .map_err(|e| invalid(format!("list_interval={value:?}: {e}")))?
                }
                "grpc_port" => {
                    grpc_port = Some(
                        value
                            .parse::<u16>()
                            .ok()
                            .filter(|p| *p > 0)
                            .ok_or_else(|| invalid(format!("grpc_port={value:?}")))?,
                    )
                }
                "cache_dir" if !value.is_empty() => cache_dir = Some(PathBuf::from(value)),
                other => return Err(invalid(format!("unknown parameter {other:?}"))),
            }
        }
        if servers.is_empty() {
            servers.push(format!("127.0.0.1:{DEFAULT_PORT}"));
        }
        if env(ENV_ACCESS_KEY).is_some() {
            return Err(invalid(format!(
                "{ENV_ACCESS_KEY} is set, but access-key signing is not built in (nacos-sdk \
                 feature auth-by-aliyun); use {ENV_USERNAME}/{ENV_PASSWORD}"
            )));
        }
        let username = env(ENV_USERNAME);
        let password = env(ENV_PASSWORD).map(Secret);
        if username.is_some() != password.is_some() {
            return Err(invalid(format!(
                "set both {ENV_USERNAME} and {ENV_PASSWORD}, or neither"
            )));
        }
        let cache_dir = match cache_dir {
            Some(dir) => CacheDir::Given(dir),
            None => {
                let state = crate::state_dir(env).ok_or_else(|| {
                    invalid(format!(
                        "no directory for the Nacos SDK's cache: set {} or cache_dir=",
                        crate::ENV_STATE_DIR
                    ))
                })?;
                let source = format!(
                    "{}@{}@{group}",
                    servers.join(","),
                    if namespace.is_empty() {
                        "public"
                    } else {
                        &namespace
                    }
                );
                CacheDir::Own(state.join(CACHE_SUBDIR).join(file_name(&source)))
            }
        };
        let (want_tx, want_rx) = mpsc::unbounded_channel();
        Ok(NacosDiscovery {
            servers,
            namespace,
            group,
            clusters,
            list_interval,
            grpc_port,
            cache_dir,
            username,
            password,
            catalog: RwLock::new(None),
            want_tx,
            want_rx: Mutex::new(Some(want_rx)),
            asked: Default::default(),
            naming: std::sync::OnceLock::new(),
        })
    }

    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    pub fn list_interval(&self) -> Duration {
        self.list_interval
    }

    fn props(&self) -> ClientProps {
        let mut p = ClientProps::new()
            .env_first(false)
            .server_addr(self.servers.join(","))
            .namespace(self.namespace.clone())
            .app_name("edge-agent")
            .naming_push_empty_protection(false)
            .naming_load_cache_at_start(false)
            .cache_dir(self.cache_dir.path().to_path_buf());
        if let Some(port) = self.grpc_port {
            p = p.remote_grpc_port(port);
        }
        if let (Some(u), Some(pw)) = (&self.username, &self.password) {
            p = p.auth_username(u.clone()).auth_password(pw.0.clone());
        }
        p
    }

    async fn client(&self) -> Result<NamingService, String> {
        let mut b = NamingServiceBuilder::new(self.props());
        if self.username.is_some() {
            b = b.enable_auth_plugin_http();
        }
        match tokio::time::timeout(CALL_TIMEOUT, b.build()).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no connection within {CALL_TIMEOUT:?}")),
        }
    }

    fn group(&self) -> Option<String> {
        Some(self.group.clone())
    }

    async fn list(&self, naming: &NamingService) -> Result<Vec<String>, String> {
        let mut names = Vec::new();
        for page in 1..=MAX_PAGES {
            let call = naming.get_service_list(page, LIST_PAGE, self.group());
            let (got, count) = match tokio::time::timeout(CALL_TIMEOUT, call).await {
                Ok(r) => r.map_err(|e| e.to_string())?,
                Err(_) => return Err(format!("service list: no answer within {CALL_TIMEOUT:?}")),
            };
            let n = got.len();
            names.extend(got);
            if n < LIST_PAGE as usize || names.len() >= count.max(0) as usize {
                break;
            }
        }
        Ok(names)
    }

    async fn query(
        &self,
        naming: &NamingService,
        name: &str,
    ) -> Result<Vec<ServiceInstance>, String> {
        let call =
            naming.get_all_instances(name.to_string(), self.group(), self.clusters.clone(), false);
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(set)) => Ok(set),
            Ok(Err(e)) => Err(format!("query {name:?}: {e}")),
            Err(_) => Err(format!("query {name:?}: no answer within {CALL_TIMEOUT:?}")),
        }
    }

    /// The instances of `set` in the source's clusters, and one message per instance skipped
    /// because it could not be mapped (bad port or address).
    fn map_set(&self, set: &[ServiceInstance]) -> (Vec<Instance>, Vec<String>) {
        let mut out = Vec::with_capacity(set.len());
        let mut problems = Vec::new();
        let wanted = set.iter().filter(|i| {
            self.clusters.is_empty()
                || self
                    .clusters
                    .iter()
                    .any(|c| Some(c) == i.cluster_name.as_ref())
        });
        for i in wanted {
            match map_instance(i) {
                Ok(inst) => out.push(inst),
                Err(e) => problems.push(format!("{e}; skipped")),
            }
        }
        (out, problems)
    }

    /// Sends `set` as the complete set of `service`, then a `parse` error per instance skipped.
    /// `false` when the agent has gone away.
    async fn send_set(&self, sink: &Sink, service: String, set: &[ServiceInstance]) -> bool {
        let (instances, problems) = self.map_set(set);
        let ev = Event::Service {
            service: service.clone(),
            update: Update::Reset(instances),
        };
        if !sink.send(ev).await {
            return false;
        }
        for p in problems {
            sink.error(ErrorKind::Parse, format!("nacos service {service}: {p}"))
                .await;
        }
        true
    }
}

/// Nacos's cluster for instances registered without one; it names no zone.
pub const DEFAULT_CLUSTER: &str = "DEFAULT";

/// Nacos float weight → integer weight: `round(w × 100)`, 0 for negative or non-finite.
pub fn weight_of(w: f64) -> u32 {
    if w.is_finite() && w > 0.0 {
        (w * 100.0).round().min(u32::MAX as f64) as u32
    } else {
        0
    }
}

/// One Nacos instance → the agent's model (see the module doc's Mapping).
pub fn map_instance(i: &ServiceInstance) -> Result<Instance, String> {
    let port = u16::try_from(i.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("instance {}:{}: bad port", i.ip, i.port))?;
    let cluster = i.cluster_name.clone().unwrap_or_default();
    let mut metadata: BTreeMap<String, String> = i
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.insert("cluster".into(), cluster.clone());
    metadata.insert("ephemeral".into(), i.ephemeral.to_string());
    let mut inst = Instance::new(i.ip.clone(), port);
    inst.id = format!("{}#{cluster}", inst.authority());
    inst.weight = weight_of(i.weight);
    inst.healthy = i.healthy && i.enabled;
    inst.zone = metadata
        .get("zone")
        .filter(|z| !z.is_empty())
        .cloned()
        .or_else(|| Some(cluster.clone()).filter(|c| !c.is_empty() && c != DEFAULT_CLUSTER));
    inst.metadata = metadata;
    crate::check_instance(&inst).map_err(|e| format!("instance {:?}: {e}", inst.id))?;
    Ok(inst)
}

/// Forwards SDK change events to the run loop.
struct Listener(mpsc::UnboundedSender<(String, Vec<ServiceInstance>)>);

impl NamingEventListener for Listener {
    fn event(&self, event: Arc<NamingChangeEvent>) {
        let set = event.instances.clone().unwrap_or_default();
        let _ = self.0.send((event.service_name.clone(), set));
    }
}

fn kind_of(msg: &str) -> ErrorKind {
    let m = msg.to_ascii_lowercase();
    if m.contains("auth") || m.contains("403") || m.contains("401") || m.contains("login") {
        ErrorKind::Auth
    } else if m.contains("within") || m.contains("timeout") || m.contains("timed out") {
        ErrorKind::Timeout
    } else {
        ErrorKind::Connect
    }
}

impl NacosDiscovery {
    async fn run_loop(self: Arc<Self>, sink: Sink) {
        let Some(mut want_rx) = self.want_rx.lock().unwrap().take() else {
            return;
        };
        let naming = loop {
            if let Err(e) = self.cache_dir.prepare() {
                let msg = format!(
                    "nacos: SDK cache directory {}: {e}",
                    self.cache_dir.path().display()
                );
                if !sink.error(ErrorKind::Io, msg).await {
                    return;
                }
                tokio::time::sleep(BUILD_RETRY).await;
                continue;
            }
            match self.client().await {
                Ok(c) => break c,
                Err(e) => {
                    let msg = format!("nacos {}: {e}", self.servers.join(","));
                    if !sink.error(kind_of(&msg), msg).await {
                        return;
                    }
                    tokio::time::sleep(BUILD_RETRY).await;
                }
            }
        };
        let _ = self.naming.set(naming.clone());
        let (push_tx, mut push_rx) = mpsc::unbounded_channel();
        let listener: Arc<dyn NamingEventListener> = Arc::new(Listener(push_tx));
        // Lower-cased → Nacos name, for services with a subscription.
        let mut subscribed: HashMap<String, String> = HashMap::new();
        let mut failing = true;
        let mut tick = tokio::time::interval(self.list_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_list = Instant::now() - MIN_LIST_GAP;
        let mut list_now = false;
        // Names a request asked for that the last list did not have: the next list answers
        // them (a `NotFound` for those it does not have either, so the request's 404 is sent
        // at once).
        let mut wanted: HashSet<String> = HashSet::new();
        loop {
            let mut do_list = false;
            tokio::select! {
                _ = tick.tick() => do_list = true,
                _ = tokio::time::sleep(MIN_LIST_GAP.saturating_sub(last_list.elapsed())),
                    if list_now => do_list = true,
                Some(name) = want_rx.recv() => {
                    if !subscribed.contains_key(&name) {
                        wanted.insert(name);
                        list_now = true;
                    }
                }
                Some((name, set)) = push_rx.recv() => {
                    let service = name.to_ascii_lowercase();
                    if subscribed.contains_key(&service) && !self.send_set(&sink, service, &set).await {
                        return;
                    }
                }
            }
            if !do_list {
                continue;
            }
            list_now = false;
            last_list = Instant::now();
            let names = match self.list(&naming).await {
                Ok(n) => n,
                Err(e) => {
                    failing = true;
                    let msg = format!("nacos service list: {e}");
                    if !sink.error(kind_of(&msg), msg).await {
                        return;
                    }
                    continue;
                }
            };
            let map: HashMap<String, String> = names
                .iter()
                .map(|n| (n.to_ascii_lowercase(), n.clone()))
                .collect();
            *self.catalog.write().unwrap() = Some(map.clone());
            let mut lower: Vec<String> = map.keys().cloned().collect();
            lower.sort();
            if !sink.send(Event::Catalog(lower)).await {
                return;
            }
            let gone: Vec<String> = subscribed
                .keys()
                .filter(|k| !map.contains_key(*k))
                .cloned()
                .collect();
            for service in gone {
                let real = subscribed.remove(&service).unwrap_or_default();
                let call =
                    naming.unsubscribe(real, self.group(), self.clusters.clone(), listener.clone());
                let _ = tokio::time::timeout(CALL_TIMEOUT, call).await;
                let ev = Event::Service {
                    service,
                    update: Update::NotFound,
                };
                if !sink.send(ev).await {
                    return;
                }
            }
            // After a failure, every existing subscription gets a fresh full answer.
            let resync: Vec<(String, String)> = if failing {
                subscribed
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            } else {
                Vec::new()
            };
            failing = false;
            let new: Vec<(String, String)> = map
                .iter()
                .filter(|(k, _)| !subscribed.contains_key(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let news: HashSet<String> = new.iter().map(|(k, _)| k.clone()).collect();
            for (service, real) in resync.into_iter().chain(new) {
                match self.query(&naming, &real).await {
                    Ok(set) => {
                        if !self.send_set(&sink, service.clone(), &set).await {
                            return;
                        }
                    }
                    Err(e) => {
                        failing = true;
                        if !sink.error(kind_of(&e), format!("nacos {e}")).await {
                            return;
                        }
                    }
                }
                if news.contains(&service) {
                    let call = naming.subscribe(
                        real.clone(),
                        self.group(),
                        self.clusters.clone(),
                        listener.clone(),
                    );
                    let _ = tokio::time::timeout(CALL_TIMEOUT, call).await;
                    subscribed.insert(service, real);
                }
            }
            for name in wanted.drain() {
                if !map.contains_key(&name) {
                    let ev = Event::Service {
                        service: name.clone(),
                        update: Update::NotFound,
                    };
                    if !sink.send(ev).await {
                        return;
                    }
                }
                self.asked.answered(&name);
            }
        }
    }
}

impl Discovery for NacosDiscovery {
    fn kind(&self) -> &'static str {
        "nacos"
    }

    /// `GET http://<server>/nacos/v1/console/health/liveness` on each server in turn until one
    /// answers (any status): the SDK's own connection gives no sign of a hung server.
    fn liveness(self: Arc<Self>) -> Option<crate::LivenessFuture> {
        Some(Box::pin(async move {
            let calls: Vec<(String, String)> = self
                .servers
                .iter()
                .map(|s| {
                    (
                        format!("nacos liveness ({s})"),
                        format!("http://{s}/nacos/v1/console/health/liveness"),
                    )
                })
                .collect();
            crate::http::any_answers(crate::http::plain_client(), calls).await
        }))
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "nacos://{}?namespace={}&group={}",
            self.servers.join(","),
            if self.namespace.is_empty() {
                "public"
            } else {
                &self.namespace
            },
            self.group
        );
        if !self.clusters.is_empty() {
            s.push_str(&format!("&clusters={}", self.clusters.join(",")));
        }
        s.push_str(&format!("&list_interval={:?}", self.list_interval));
        if let Some(u) = &self.username {
            s.push_str(&format!(" (user {u})"));
        }
        s
    }

    fn run(self: Arc<Self>, sink: Sink) -> BoxFuture {
        Box::pin(self.run_loop(sink))
    }

    /// `get_all_instances` without subscribing, as the first answer of a subscription is
    /// read (the SDK's own connection; before it is built, nothing to read with).
    fn read(self: Arc<Self>, service: &str) -> Option<crate::ReadFuture> {
        let naming = self.naming.get()?.clone();
        let name = service.trim().to_ascii_lowercase();
        let real = self
            .catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|c| c.get(&name).cloned())
            .unwrap_or(name);
        Some(Box::pin(async move {
            let set = self
                .query(&naming, &real)
                .await
                .map_err(|e| (kind_of(&e), format!("nacos {e}")))?;
            let (instances, _problems) = self.map_set(&set);
            Ok((!instances.is_empty()).then_some(instances))
        }))
    }

    fn on_demand(&self) -> bool {
        true
    }

    fn watch(&self, service: &str) -> bool {
        let name = service.trim().to_ascii_lowercase();
        let known = self
            .catalog
            .read()
            .unwrap()
            .as_ref()
            .map(|c| c.contains_key(&name));
        match known {
            Some(true) => true,
            // Not in the last list: ask for a new list now, and let the request wait for it
            // (`lookup.rs`), once per name and gap.
            Some(false) => match self.asked.ask(&name) {
                crate::lookup::Ask::New => self.want_tx.send(name).is_ok(),
                crate::lookup::Ask::Pending => true,
                crate::lookup::Ask::Answered => false,
            },
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(url: &str, env: &[(&str, &str)]) -> Result<NacosDiscovery, SourceError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        NacosDiscovery::from_url_with_env(url, move |k| env.get(k).cloned())
    }

    #[test]
    fn url_and_environment() {
        let s = src(
            "nacos://127.0.0.1:8848,10.0.0.2?namespace=dev&group=G&clusters=a,b&list_interval=2s",
            &[("NACOS_USERNAME", "u"), ("NACOS_PASSWORD", "s3cret")],
        )
        .unwrap();
        assert_eq!(s.servers(), ["127.0.0.1:8848", "10.0.0.2:8848"]);
        assert_eq!(s.list_interval(), Duration::from_secs(2));
        assert_eq!(s.clusters, ["a", "b"]);
        let d = s.describe();
        assert!(
            !d.contains("s3cret") && !format!("{s:?}").contains("s3cret"),
            "{d}"
        );
        assert!(d.starts_with("nacos://127.0.0.1:8848,10.0.0.2:8848?namespace=dev&group=G"));
        let s = src("nacos://?server=h1:1&server=h2&namespace=public", &[]).unwrap();
        assert_eq!(s.servers(), ["h1:1", "h2:8848"]);
        assert_eq!(s.namespace, "");
        assert_eq!(src("nacos://", &[]).unwrap().servers(), ["127.0.0.1:8848"]);
        for bad in [
            "nacos://h?bogus=1",
            "nacos://h?list_interval=1x",
            "nacos://h?grpc_port=0",
            "nacos://h?group=",
            "nacos://h/x",
            "nacos://user:pw@h",
        ] {
            assert!(src(bad, &[]).is_err(), "{bad}");
        }
        assert!(!src("nacos://user:pw@h", &[])
            .unwrap_err()
            .to_string()
            .contains("pw"));
        assert!(src("nacos://h", &[("NACOS_USERNAME", "u")]).is_err());
        assert!(src("nacos://h", &[("NACOS_ACCESS_KEY", "k")]).is_err());
    }

    /// Defect 21: the SDK's cache goes to this source's own `0700` directory under the state
    /// directory, not to the shared `/tmp/edge-agent-nacos/`. The SDK creates its store's
    /// folders before it connects, so no Nacos server is needed to see where they go.
    #[tokio::test]
    async fn the_sdk_cache_is_private_to_the_source() {
        use std::os::unix::fs::PermissionsExt;
        let state = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("nacos://127.0.0.1:{port}?namespace=dev&group=G");
        let state_str = state.path().to_str().unwrap();
        let s = src(&url, &[("EDGE_AGENT_STATE_DIR", state_str)]).unwrap();
        let dir = state
            .path()
            .join(CACHE_SUBDIR)
            .join(format!("127.0.0.1_{port}_dev_G"));
        assert_eq!(s.cache_dir, CacheDir::Own(dir.clone()));
        assert!(!dir.starts_with(std::env::temp_dir().join("edge-agent-nacos")));
        // cache_dir= is used as given.
        let given = src(&format!("{url}&cache_dir=/srv/nacos"), &[]).unwrap();
        assert_eq!(given.cache_dir, CacheDir::Given("/srv/nacos".into()));

        let (tx, _rx) = mpsc::channel(64);
        let task = tokio::spawn(Arc::new(s).run(Sink::new(0, tx)));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dir.join("naming").is_dir() {
            assert!(
                Instant::now() < deadline,
                "the SDK wrote nothing under {}",
                dir.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
        for d in [state.path().join(CACHE_SUBDIR), dir] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
    }

    #[test]
    fn instance_mapping() {
        let mut i = ServiceInstance {
            ip: "10.0.0.1".into(),
            port: 8080,
            weight: 0.333,
            cluster_name: Some("a".into()),
            ..Default::default()
        };
        i.metadata.insert("zone".into(), "z1".into());
        let m = map_instance(&i).unwrap();
        assert_eq!(m.id, "10.0.0.1:8080#a");
        assert_eq!((m.weight, m.healthy), (33, true));
        assert_eq!(m.zone.as_deref(), Some("z1"));
        assert_eq!(m.metadata["cluster"], "a");
        assert_eq!(m.metadata["ephemeral"], "true");
        // Without metadata `zone`, the cluster is the zone; the default cluster is none.
        i.metadata.clear();
        assert_eq!(map_instance(&i).unwrap().zone.as_deref(), Some("a"));
        i.cluster_name = Some(DEFAULT_CLUSTER.into());
        assert_eq!(map_instance(&i).unwrap().zone, None);
        i.enabled = false;
        assert!(!map_instance(&i).unwrap().healthy);
        i.port = 70000;
        assert!(map_instance(&i).is_err());
        assert_eq!(weight_of(1.0), 100);
    }

    /// Defect 1: in a service's set, the instance with a bad address is skipped and named, the
    /// rest are delivered (before, a bad port was dropped silently and a bad address kept).
    #[test]
    fn a_set_keeps_its_good_instances_and_names_the_bad_ones() {
        let s = src("nacos://h", &[]).unwrap();
        let one = |ip: &str, port: i32| ServiceInstance {
            ip: ip.into(),
            port,
            cluster_name: Some("c".into()),
            ..Default::default()
        };
        let set = [one("10.0.0.1", 80), one("foo bar", 80), one("10.0.0.3", 0)];
        let (instances, problems) = s.map_set(&set);
        let ids: Vec<&str> = instances.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["10.0.0.1:80#c"]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("\"foo bar\""), "{problems:?}");
        assert!(problems[1].contains("10.0.0.3:0"), "{problems:?}");
    }

    /// Defect 1: an address `http::uri::Authority` refuses is refused, naming the instance and
    /// the address.
    #[test]
    fn an_address_that_cannot_be_dialled_is_refused_by_name() {
        for ip in ["foo bar", "é.example", ""] {
            let i = ServiceInstance {
                ip: ip.into(),
                port: 8080,
                cluster_name: Some("a".into()),
                ..Default::default()
            };
            let err = map_instance(&i).unwrap_err();
            assert!(err.contains(&format!("{ip}:8080#a")), "{err}");
        }
        assert_eq!(weight_of(0.0), 0);
        assert_eq!(weight_of(-1.0), 0);
        assert_eq!(weight_of(f64::NAN), 0);
    }
}
