//! Service discovery for edge-agent: the [`Discovery`] trait, the instance model and one module
//! per registry.
//!
//! A discovery source is a stream of [`Event`]s (the shape Linkerd's resolver uses): full
//! snapshots or per-service resets from watches and pushes, adds and removes from deltas. After a
//! reconnect an adapter's first answer is a reset, so endpoints that went away while it was
//! disconnected do not linger. Adapters never panic on bad registry data: a malformed entry is
//! skipped with an [`Event::Error`] (kind `parse`), a failed call is reported the same way, and
//! the agent keeps its last good view. Every instance an adapter delivers has passed
//! [`check_instance`], so its `host:port` is a valid HTTP authority.
//!
//! Registry URLs are read through one table, [`SCHEMES`]: a new adapter is one module plus one
//! row there.
//!
//! This crate knows nothing of HTTP proxying.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;

pub mod consul;
pub mod dns;
pub mod eureka;
pub mod file;
mod http;
pub mod lookup;
pub use http::ClientError;
pub mod nacos;

/// One instance of a service as a registry reports it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Instance {
    /// Registry identity of the instance (Consul node+service id, Eureka instanceId, …). Where a
    /// registry has none, `host:port`.
    pub id: String,
    /// IP address (or host name) to dial.
    pub addr: String,
    pub port: u16,
    /// Relative weight; 0 means the instance is known but takes no traffic.
    pub weight: u32,
    /// What the registry says of the instance's health. The agent's own checks combine with it:
    /// both must say healthy for the instance to carry traffic.
    pub healthy: bool,
    pub zone: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

impl Instance {
    /// An instance with default weight 1, healthy, no zone or metadata, identified by its address.
    pub fn new(addr: impl Into<String>, port: u16) -> Self {
        let addr = addr.into();
        Instance {
            id: join_host_port(&addr, port),
            addr,
            port,
            weight: DEFAULT_WEIGHT,
            healthy: true,
            zone: None,
            metadata: BTreeMap::new(),
        }
    }

    /// `host:port`, with IPv6 hosts bracketed.
    pub fn authority(&self) -> String {
        join_host_port(&self.addr, self.port)
    }
}

/// Why an instance from a registry cannot be dialled (see [`check_instance`]).
#[derive(Debug, thiserror::Error)]
pub enum InvalidInstance {
    #[error("no address")]
    NoAddress,
    #[error("port 0")]
    NoPort,
    #[error("address {addr:?} ({authority:?} is not a valid host:port): {source}")]
    Address {
        addr: String,
        authority: String,
        #[source]
        source: ::http::uri::InvalidUri,
    },
}

/// Whether an instance can be dialled: a non-empty address that, joined with its port
/// ([`Instance::authority`]), parses as an HTTP authority (`http::uri::Authority`: `foo bar` and
/// `é.example` do not), and a port other than 0. Every adapter calls it where instances enter,
/// skips an instance it refuses and reports it as a `parse` error naming the service, the
/// instance and the address; the rest of the service is delivered as usual.
pub fn check_instance(instance: &Instance) -> Result<(), InvalidInstance> {
    if instance.addr.trim().is_empty() {
        return Err(InvalidInstance::NoAddress);
    }
    if instance.port == 0 {
        return Err(InvalidInstance::NoPort);
    }
    let authority = instance.authority();
    match ::http::uri::Authority::try_from(authority.as_str()) {
        Ok(_) => Ok(()),
        Err(source) => Err(InvalidInstance::Address {
            addr: instance.addr.clone(),
            authority,
            source,
        }),
    }
}

/// The weight an instance gets when its registry entry names none.
pub const DEFAULT_WEIGHT: u32 = 1;

/// `host:port`, bracketing IPv6 literals.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A change to one service's instance set.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The complete set: instances not listed are gone.
    Reset(Vec<Instance>),
    /// Instances added or changed (matched by `id`).
    Add(Vec<Instance>),
    /// Instances removed, by `id`.
    Remove(Vec<String>),
    /// The registry does not know the service (it may appear later).
    NotFound,
}

/// What a source tells the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Every service the source knows, each with its complete instance set. Services the source
    /// reported before and does not list now are gone.
    Snapshot(BTreeMap<String, Vec<Instance>>),
    /// One service changed.
    Service { service: String, update: Update },
    /// The names of every service in the source's catalog (zero-config mode for sources that
    /// watch instances on demand). Services absent from the list are gone.
    Catalog(Vec<String>),
    /// A call failed or an answer (or part of one) was refused. The last good view stays.
    Error { kind: ErrorKind, message: String },
}

/// Where a discovery error came from, used as the `kind` label of
/// `edge_agent_discovery_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The registry could not be reached.
    Connect,
    /// A call took longer than its timeout.
    Timeout,
    /// The registry answered with an error status.
    Status,
    /// The answer (or one entry of it) could not be parsed or failed validation.
    Parse,
    /// A local I/O error (reading a file).
    Io,
    /// Credentials were refused.
    Auth,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Status => "status",
            ErrorKind::Parse => "parse",
            ErrorKind::Io => "io",
            ErrorKind::Auth => "auth",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The sending half an adapter writes its events into. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Sink {
    source: usize,
    tx: mpsc::Sender<(usize, Event)>,
}

impl Sink {
    /// A sink tagging every event with `source` (the index of the source in the agent's list).
    pub fn new(source: usize, tx: mpsc::Sender<(usize, Event)>) -> Self {
        Sink { source, tx }
    }

    /// Sends one event; `false` when the agent has gone away and the adapter should stop.
    pub async fn send(&self, event: Event) -> bool {
        self.tx.send((self.source, event)).await.is_ok()
    }

    /// Reports an error event, logging it too.
    pub async fn error(&self, kind: ErrorKind, message: impl Into<String>) -> bool {
        let message = message.into();
        tracing::warn!(source = self.source, %kind, "{message}");
        self.send(Event::Error { kind, message }).await
    }
}

/// A boxed future, the return type of [`Discovery::run`].
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Why a liveness call failed: the kind for `edge_agent_discovery_errors_total` and a message.
pub type LivenessError = (ErrorKind, String);
/// One liveness call ([`Discovery::liveness`]).
pub type LivenessFuture = Pin<Box<dyn Future<Output = Result<(), LivenessError>> + Send + 'static>>;
/// How long a liveness call may take before the registry counts as hung.
pub const LIVENESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// One direct read of a service ([`Discovery::read`]): its instances now, `None` when the
/// registry does not know it.
pub type ReadFuture =
    Pin<Box<dyn Future<Output = Result<Option<Vec<Instance>>, LivenessError>> + Send + 'static>>;

/// A registry adapter.
pub trait Discovery: Send + Sync + 'static {
    /// Short label for metrics and logs: the `kind` of the source's row in [`SCHEMES`].
    fn kind(&self) -> &'static str;

    /// Where the source points, with any secret removed, for logs and `/upstreams`.
    fn describe(&self) -> String;

    /// Runs until the sink is closed, sending events as the registry changes. Must never
    /// return early on registry errors: report them and retry with back-off.
    fn run(self: Arc<Self>, sink: Sink) -> BoxFuture;

    /// True for sources that watch a service's instances only once asked to ([`watch`]), so
    /// registry load grows with what the host calls rather than with the catalog.
    ///
    /// [`watch`]: Discovery::watch
    fn on_demand(&self) -> bool {
        false
    }

    /// Asks an on-demand source to watch `service` (or keeps an existing watch alive). The agent
    /// calls it on a routing miss (and waits, bounded, for the first answer), every
    /// `TOUCH_INTERVAL` for each service that served requests since, and at start for services
    /// named in the configuration. A source stops a watch that has not been touched for its idle
    /// TTL and then sends `Update::NotFound` for it. Returns false when the source knows the
    /// service does not exist (so the request can be answered 404 at once). Sources that report
    /// their whole catalog ignore it.
    fn watch(&self, _service: &str) -> bool {
        true
    }

    /// One cheap call that shows the registry answers, bounded by [`LIVENESS_TIMEOUT`]; the
    /// agent runs it every few seconds beside the watches, because a blocking query or a push
    /// stream cannot tell a hung registry from a quiet one. Any answer counts (even an error
    /// status): it is the silence that is measured. `None`: nothing to check (a file).
    fn liveness(self: Arc<Self>) -> Option<LivenessFuture> {
        None
    }

    /// Reads `service` once, now (a non-blocking query, not a watch), with the same filters
    /// its watch uses, bounded by the source's call timeout. The agent asks it to confirm an
    /// update the removal guard holds (a blocking query or a push never repeats an unchanged
    /// answer) and to resync what the watch pushed on a slow timer. `None`: the source has no
    /// such read (a file, whose watch is the file itself).
    fn read(self: Arc<Self>, _service: &str) -> Option<ReadFuture> {
        None
    }
}

/// The agent's state directory variable, read by adapters that keep files of their own.
pub const ENV_STATE_DIR: &str = "EDGE_AGENT_STATE_DIR";

/// The agent's state directory as `env` gives it: `EDGE_AGENT_STATE_DIR` when set, else
/// `/var/lib/edge-agent` for root, else `$XDG_STATE_HOME/edge-agent` or
/// `~/.local/state/edge-agent`; `None` when none of these can be found. (The agent's own
/// default, in `src/`, is the same.)
pub fn state_dir(env: impl Fn(&str) -> Option<String>) -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    let set = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    if let Some(dir) = set(ENV_STATE_DIR) {
        return Some(PathBuf::from(dir));
    }
    // /proc/self belongs to the effective user.
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if root {
        Some(PathBuf::from("/var/lib/edge-agent"))
    } else if let Some(xdg) = set("XDG_STATE_HOME") {
        Some(PathBuf::from(xdg).join("edge-agent"))
    } else {
        set("HOME").map(|home| PathBuf::from(home).join(".local/state/edge-agent"))
    }
}

/// Longest duration a registry URL may give (intervals, waits, TTLs): a year. Longer values are
/// typos, and some libraries panic on them (moka refuses a time-to-idle over 1,000 years).
pub const MAX_URL_DURATION: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// A duration in a registry URL's query: `500ms`, `5s`, `1.5s`, `5m`, `1h`, or a bare number of
/// seconds; at least `min`, at most [`MAX_URL_DURATION`]. Shared by every adapter so the URLs
/// read alike.
pub fn parse_duration(s: &str, min: std::time::Duration) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| "expected a duration such as 500ms, 5s or 5m".to_string())?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown unit {other:?} (use ms, s, m or h)")),
    };
    let d = std::time::Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())?;
    if d < min {
        return Err(format!("must be at least {min:?}"));
    }
    if d > MAX_URL_DURATION {
        return Err("must be at most a year".into());
    }
    Ok(d)
}

/// Errors building a source from its URL.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("registry URL {url:?}: {reason}")]
    Invalid { url: String, reason: String },
    /// The HTTP client could not be built from the source's TLS options.
    #[error("registry URL {url:?}: {source}")]
    Client {
        url: String,
        #[source]
        source: ClientError,
    },
    #[error(
        "registry URL {url:?}: scheme {scheme:?} is not supported (supported: {})",
        supported_schemes()
    )]
    Unsupported { url: String, scheme: String },
}

/// One registry URL scheme: what `EDGE_AGENT_REGISTRY` may start with, the kind of source it
/// builds, and how to build it.
#[derive(Clone, Copy)]
pub struct Scheme {
    /// The URL scheme, before `://`.
    pub scheme: &'static str,
    /// The source's kind: what its [`Discovery::kind`] returns and what an upstream's `source`
    /// names in the agent's configuration. Several schemes may share one kind.
    pub kind: &'static str,
    /// Builds a source from a whole URL of this scheme.
    pub build: fn(&str) -> Result<Arc<dyn Discovery>, SourceError>,
}

impl fmt::Debug for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheme")
            .field("scheme", &self.scheme)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Every registry URL scheme, in the order error messages and [`kinds`] list them. A new
/// registry adapter is one module plus one row here.
pub const SCHEMES: &[Scheme] = &[
    Scheme {
        scheme: "file",
        kind: "file",
        build: |url| Ok(Arc::new(file::FileDiscovery::from_url(url)?)),
    },
    Scheme {
        scheme: "eureka",
        kind: "eureka",
        build: |url| Ok(Arc::new(eureka::EurekaDiscovery::from_url(url)?)),
    },
    Scheme {
        scheme: "eureka+https",
        kind: "eureka",
        build: |url| Ok(Arc::new(eureka::EurekaDiscovery::from_url(url)?)),
    },
    Scheme {
        scheme: "consul",
        kind: "consul",
        build: |url| Ok(Arc::new(consul::ConsulDiscovery::from_url(url)?)),
    },
    Scheme {
        scheme: "consul+https",
        kind: "consul",
        build: |url| Ok(Arc::new(consul::ConsulDiscovery::from_url(url)?)),
    },
    Scheme {
        scheme: "nacos",
        kind: "nacos",
        build: |url| Ok(Arc::new(nacos::NacosDiscovery::from_url(url)?)),
    },
    Scheme {
        scheme: "dns",
        kind: "dns",
        build: |url| Ok(Arc::new(dns::DnsDiscovery::from_url(url)?)),
    },
];

/// The distinct source kinds of [`SCHEMES`], in table order: `file`, `eureka`, `consul`,
/// `nacos`, `dns`.
pub fn kinds() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for s in SCHEMES {
        if !out.contains(&s.kind) {
            out.push(s.kind);
        }
    }
    out
}

/// Whether `name` is the kind of some source (`consul`, …), as an upstream's `source` must be.
pub fn is_kind(name: &str) -> bool {
    SCHEMES.iter().any(|s| s.kind == name)
}

/// `file, eureka, eureka+https, …`: the schemes of [`SCHEMES`] for messages.
fn supported_schemes() -> String {
    let names: Vec<&str> = SCHEMES.iter().map(|s| s.scheme).collect();
    names.join(", ")
}

/// Builds a source from a registry URL (`file:///abs/path.toml`, `consul://127.0.0.1:8500`, …),
/// by its scheme's row in [`SCHEMES`].
pub fn from_url(url: &str) -> Result<Arc<dyn Discovery>, SourceError> {
    let url = url.trim();
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    if scheme.is_empty() {
        return Err(SourceError::Invalid {
            url: url.to_string(),
            reason: "expected scheme://…, e.g. file:///etc/edge-agent/services.toml".into(),
        });
    }
    match SCHEMES.iter().find(|s| s.scheme == scheme) {
        Some(s) => (s.build)(url),
        None => Err(SourceError::Unsupported {
            url: url.to_string(),
            scheme: scheme.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_authority_is_bracketed() {
        assert_eq!(Instance::new("::1", 80).authority(), "[::1]:80");
        assert_eq!(Instance::new("127.0.0.1", 80).authority(), "127.0.0.1:80");
    }

    #[test]
    fn instances_that_cannot_be_dialled_are_refused() {
        for good in [
            Instance::new("10.0.0.1", 80),
            Instance::new("::1", 8080),
            Instance::new("[::1]", 8080),
            Instance::new("svc-1.internal", 443),
            Instance::new("my_host", 1),
        ] {
            assert!(check_instance(&good).is_ok(), "{good:?}");
        }
        for (addr, port, want) in [
            ("foo bar", 80, "\"foo bar\""),
            ("é.example", 80, "\"é.example\""),
            ("a/b", 80, "\"a/b\""),
            ("", 80, "no address"),
            (" ", 80, "no address"),
            ("10.0.0.1", 0, "port 0"),
        ] {
            let err = check_instance(&Instance::new(addr, port)).unwrap_err();
            assert!(err.to_string().contains(want), "{addr:?}: {err}");
        }
        let err = check_instance(&Instance::new("foo bar", 80)).unwrap_err();
        assert!(
            std::error::Error::source(&err).is_some(),
            "the cause is kept"
        );
    }

    #[test]
    fn durations() {
        let min = std::time::Duration::from_millis(100);
        assert_eq!(parse_duration("500ms", min).unwrap().as_millis(), 500);
        assert_eq!(parse_duration("1.5s", min).unwrap().as_millis(), 1500);
        assert_eq!(parse_duration("2", min).unwrap().as_secs(), 2);
        assert_eq!(parse_duration("5m", min).unwrap().as_secs(), 300);
        assert_eq!(parse_duration("1h", min).unwrap().as_secs(), 3600);
        assert!(parse_duration("10ms", min)
            .unwrap_err()
            .contains("at least"));
        assert!(parse_duration("5 fortnights", min)
            .unwrap_err()
            .contains("fortnights"));
        assert!(parse_duration("soon", min).is_err());
        // Found by the registry_url fuzz target: moka panicked on this idle_ttl.
        assert!(parse_duration("600000000h", min)
            .unwrap_err()
            .contains("at most"));
        let err = from_url("consul://127.0.0.1:8500?idle_ttl=600000000h")
            .err()
            .unwrap();
        assert!(err.to_string().contains("idle_ttl"), "{err}");
    }

    #[test]
    fn the_schemes_table_feeds_from_url_kinds_and_errors() {
        assert_eq!(kinds(), ["file", "eureka", "consul", "nacos", "dns"]);
        assert!(is_kind("consul") && is_kind("eureka") && !is_kind("consul+https"));
        assert!(is_kind("dns") && !is_kind("k8s") && !is_kind(""));
        let err = from_url("gopher://x").err().unwrap().to_string();
        assert!(
            err.contains("supported: file, eureka, eureka+https, consul, consul+https, nacos, dns"),
            "{err}"
        );
        // Every row builds a source of its kind (the URL is only parsed, nothing is dialled).
        for s in SCHEMES {
            let url = match s.kind {
                "file" => "file:///nonexistent/services.toml".to_string(),
                "dns" => "dns://127.0.0.1:1?name=web.service.consul".to_string(),
                _ => format!("{}://127.0.0.1:1", s.scheme),
            };
            let src = from_url(&url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(src.kind(), s.kind, "{url}");
        }
    }

    #[test]
    fn unknown_scheme_is_refused_by_name() {
        let err = from_url("gopher://x").err().unwrap();
        assert!(err.to_string().contains("\"gopher\""), "{err}");
        let err = from_url("no-scheme").err().unwrap();
        assert!(matches!(err, SourceError::Invalid { .. }));
    }
}
