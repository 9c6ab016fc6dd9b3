//! DNS as a registry: SRV records (host, port, priority, weight) or A/AAAA records (addresses,
//! with the port from the URL), re-resolved on the records' TTL.
//!
//! ```text
//! EDGE_AGENT_REGISTRY=dns://127.0.0.1:8600?name=web.service.consul&type=srv
//! EDGE_AGENT_REGISTRY=dns://10.0.0.2?name=_pay._tcp.example.internal&service=pay
//! EDGE_AGENT_REGISTRY=dns://[::1]:53?name=db.internal&type=a&port=5432&service=db
//! EDGE_AGENT_REGISTRY=dns://127.0.0.1:8600?name_template={service}.service.consul   # zero-config
//! EDGE_AGENT_REGISTRY=dns://?name_template=_{service}._tcp.example.internal        # /etc/resolv.conf
//! ```
//!
//! # Resolver
//! [`hickory_resolver`], not a hand-written DNS client. The URL's `host:port` is the one name
//! server asked (an IP address; port [`DEFAULT_PORT`] when absent), over UDP with TCP on
//! truncation; `dns://` with no host uses the system's servers and options from
//! `/etc/resolv.conf`. The resolver's own cache is off (`cache_size = 0`): this module decides
//! when to ask again, from the TTLs it reads, so a record's TTL above `max_ttl` cannot make a
//! cached answer outlive `max_ttl`. Every name is asked fully qualified (a trailing `.` is
//! added), so no search domain is tried. `/etc/hosts` is read only with the system resolver.
//!
//! # URL
//! - `name`: the record to resolve; `service`: the service it feeds (default: the first label
//!   of `name` with leading `_` removed, so `_pay._tcp.example.internal` → `pay` and
//!   `web.service.consul` → `web`). Watched from start and never dropped.
//! - `type`: `srv` (default) or `a` (A and AAAA records); `port` is required with `a` and refused
//!   with `srv` (SRV records carry their own port).
//! - `name_template`: zero-config. A routing miss for Host `pay` resolves the template with
//!   `{service}` replaced by `pay` (`{service}.service.consul` → `pay.service.consul`), watched
//!   on demand like Consul's health watches and dropped after `idle_ttl` without requests.
//!   Names that cannot be a DNS name once templated are refused at once (404).
//! - `min_ttl` (default [`DEFAULT_MIN_TTL`]), `max_ttl` (default [`DEFAULT_MAX_TTL`]): bounds
//!   on the re-resolve interval; `idle_ttl` (default [`DEFAULT_IDLE_TTL`]); `timeout` (default
//!   [`DEFAULT_TIMEOUT`]): one query attempt, [`ATTEMPTS`] attempts per lookup. Durations take
//!   `ms`, `s`, `m` or `h`. Unknown parameters are refused, naming the parameter and its value.
//!
//! # Semantics
//! - SRV: the lowest priority present is used and the others ignored (RFC 2782: they are
//!   fallbacks for clients that try one server at a time; the agent's own health checks and
//!   retries cover the same ground within one priority). The weight is the instance's weight;
//!   a weight of 0 takes no traffic unless every record of that priority has weight 0, in which
//!   case all get weight 1 (RFC 2782's "no preference"). A target of `.` ("decidedly not
//!   available") is ignored; if every record is `.`, the service is `NotFound`. Each target is
//!   resolved to A and AAAA records, from the answer's additional section when it has them
//!   (Consul's does), else with its own two lookups; several addresses per target are several
//!   instances. Identity is `address:port`; two records naming the same address and port are
//!   one instance with the larger weight. Metadata: `target` (the SRV target, without the final
//!   dot) and `priority`.
//! - A/AAAA: both record types are asked for; each address is an instance on the URL's `port`,
//!   metadata `name`.
//! - Re-resolving: after an answer the name is asked again once the smallest TTL among the
//!   records used has run out, bounded by `min_ttl` and `max_ttl` (Consul and dnsmasq give TTL
//!   0 by default: that is `min_ttl`). Never on a request. Every answer is a full
//!   [`Update::Reset`], sent even when nothing changed (the agent diffs; it refreshes the
//!   staleness gauge).
//! - NXDOMAIN (for the record, or for both address types of an `a` name) is
//!   [`Update::NotFound`], asked again after the negative TTL from the SOA (bounded the same
//!   way); an on-demand name last seen as NXDOMAIN makes [`Discovery::watch`] answer `false`,
//!   so the request gets 404 at once while the watch goes on. A name that exists with no record
//!   of the type (NODATA) is an empty set: the agent's removal guard judges it.
//! - SERVFAIL, REFUSED and other error codes, timeouts and unreachable servers keep the last
//!   good set: an [`Event::Error`] (kind `status`, `timeout`, `connect`; the agent counts it
//!   under `source="dns"`) and a retry after a back-off from `min_ttl` to `max_ttl`. A target
//!   whose addresses fail that way fails the whole answer (the last good set stays); a target
//!   that does not exist is skipped with a `parse` error and the rest is delivered.
//!
//! The source sits with the other adapters in the `discovery` crate: it only turns DNS answers
//! into [`Event`]s and knows nothing of the agent's tables.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::TokioResolver;
use moka::notification::RemovalCause;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use url::Url;

use crate::{
    check_instance, join_host_port, BoxFuture, Discovery, ErrorKind, Event, Instance, Sink,
    SourceError, Update,
};

/// Name server port when the URL names none.
pub const DEFAULT_PORT: u16 = 53;
/// Shortest re-resolve interval: records with a smaller TTL (Consul's and dnsmasq's default 0)
/// are asked again after this long.
pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(1);
/// Longest re-resolve interval, whatever the records' TTL.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(60);
/// How long an on-demand name is watched without a request for its service (Consul's default).
pub const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(600);
/// One query attempt's timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts per lookup before it counts as a timeout.
pub const ATTEMPTS: usize = 2;
/// Shortest duration any parameter accepts.
pub const MIN_DURATION: Duration = Duration::from_millis(100);
/// How often the run loop lets moka process expirations (so idle watches stop).
pub const HOUSEKEEPING_TICK: Duration = Duration::from_secs(1);
/// Most names watched on demand at once.
pub const MAX_WATCHED: u64 = 10_000;
/// What `name_template` must contain.
pub const SERVICE_PLACEHOLDER: &str = "{service}";

/// Which records a source asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// SRV, targets resolved to A/AAAA.
    Srv,
    /// A and AAAA, on a port from the URL.
    A { port: u16 },
}

/// Orders from [`Discovery::watch`] and the moka eviction listener to the run loop.
#[derive(Debug)]
enum Cmd {
    Want { service: String, generation: u64 },
    Idle { service: String, generation: u64 },
}

/// A DNS source (see the module doc).
pub struct DnsDiscovery {
    /// `ip:port` of the name server, `None` for the system's.
    server: Option<(IpAddr, u16)>,
    config: ResolverConfig,
    opts: ResolverOpts,
    kind: RecordKind,
    /// `service=` and its record (`name=`), watched from start.
    pinned: Option<(String, Name)>,
    template: Option<String>,
    min_ttl: Duration,
    max_ttl: Duration,
    idle_ttl: Duration,
    timeout: Duration,
    /// On-demand services whose last answer was NXDOMAIN.
    missing: RwLock<HashSet<String>>,
    wanted: moka::sync::Cache<String, u64>,
    generation: AtomicU64,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    cmd_rx: Mutex<Option<mpsc::UnboundedReceiver<Cmd>>>,
}

impl fmt::Debug for DnsDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsDiscovery")
            .field("url", &self.describe())
            .finish_non_exhaustive()
    }
}

/// A service name as the agent routes it (trimmed, lower-cased), if it can be part of a DNS
/// name: letters, digits, `-`, `_`, and dots between non-empty labels.
fn normalize(service: &str) -> Option<String> {
    let s = service.trim().to_ascii_lowercase();
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    ok.then_some(s)
}

/// `name` as a fully qualified DNS name.
fn fqdn(name: &str) -> Result<Name, String> {
    let name = name.trim();
    if name.is_empty() || name == "." {
        return Err("empty name".into());
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err("an IP address, not a name".into());
    }
    let mut n = Name::from_ascii(name).map_err(|e| e.to_string())?;
    n.set_fqdn(true);
    Ok(n)
}

/// The service a record feeds when `service=` is not given: its first label, leading `_`
/// removed.
fn service_of(name: &str) -> Option<String> {
    normalize(name.split('.').next()?.trim_start_matches('_'))
}

impl DnsDiscovery {
    /// From a `dns://` URL (see the module doc).
    pub fn from_url(url: &str) -> Result<Self, SourceError> {
        let invalid = |reason: String| SourceError::Invalid {
            url: url.to_string(),
            reason,
        };
        let parsed = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if parsed.scheme() != "dns" {
            return Err(invalid(format!(
                "scheme {:?}: expected dns",
                parsed.scheme()
            )));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(invalid("a DNS URL takes no credentials".into()));
        }
        if !matches!(parsed.path(), "" | "/") {
            return Err(invalid(format!(
                "path {:?}: the record goes in name=, e.g. dns://127.0.0.1:8600?name=web.service.consul",
                parsed.path()
            )));
        }
        let server = match parsed.host_str().filter(|h| !h.is_empty()) {
            None => None,
            Some(h) => {
                let ip: IpAddr = h
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
                    .map_err(|_| {
                        invalid(format!(
                            "resolver {h:?}: must be an IP address (or nothing, for /etc/resolv.conf)"
                        ))
                    })?;
                Some((ip, parsed.port().unwrap_or(DEFAULT_PORT)))
            }
        };
        let mut name: Option<String> = None;
        let mut service: Option<String> = None;
        let mut typ: Option<String> = None;
        let mut port: Option<u16> = None;
        let mut template: Option<String> = None;
        let mut min_ttl = DEFAULT_MIN_TTL;
        let mut max_ttl = DEFAULT_MAX_TTL;
        let mut idle_ttl = DEFAULT_IDLE_TTL;
        let mut timeout = DEFAULT_TIMEOUT;
        let mut seen = HashSet::new();
        for (key, value) in parsed.query_pairs() {
            let value = value.trim().to_string();
            if !seen.insert(key.to_string()) {
                return Err(invalid(format!(
                    "{key}={value:?}: {key} is given twice (one record per URL; list several URLs)"
                )));
            }
            let duration = |v: &str| {
                crate::parse_duration(v, MIN_DURATION)
                    .map_err(|e| invalid(format!("{key}={v:?}: {e}")))
            };
            match key.as_ref() {
                "name" => {
                    fqdn(&value).map_err(|e| invalid(format!("name={value:?}: {e}")))?;
                    name = Some(value);
                }
                "service" => {
                    service = Some(normalize(&value).ok_or_else(|| {
                        invalid(format!(
                            "service={value:?}: a service name is letters, digits, '-', '_' and '.'"
                        ))
                    })?)
                }
                "type" => typ = Some(value.to_ascii_lowercase()),
                "port" => {
                    port = Some(
                        value
                            .parse::<u16>()
                            .ok()
                            .filter(|p| *p != 0)
                            .ok_or_else(|| invalid(format!("port={value:?}: expected 1-65535")))?,
                    )
                }
                "name_template" => {
                    if !value.contains(SERVICE_PLACEHOLDER) {
                        return Err(invalid(format!(
                            "name_template={value:?}: must contain {SERVICE_PLACEHOLDER}, e.g. {SERVICE_PLACEHOLDER}.service.consul"
                        )));
                    }
                    fqdn(&value.replace(SERVICE_PLACEHOLDER, "x"))
                        .map_err(|e| invalid(format!("name_template={value:?}: {e}")))?;
                    template = Some(value);
                }
                "min_ttl" => min_ttl = duration(&value)?,
                "max_ttl" => max_ttl = duration(&value)?,
                "idle_ttl" => idle_ttl = duration(&value)?,
                "timeout" => timeout = duration(&value)?,
                other => {
                    return Err(invalid(format!(
                        "unknown parameter {other}={value:?} (known: name, type, service, port, name_template, min_ttl, max_ttl, idle_ttl, timeout)"
                    )))
                }
            }
        }
        let kind = match typ.as_deref() {
            None | Some("srv") => {
                if let Some(p) = port {
                    return Err(invalid(format!(
                        "port=\"{p}\": only for type=a (SRV records carry their own port)"
                    )));
                }
                RecordKind::Srv
            }
            Some("a") => RecordKind::A {
                port: port.ok_or_else(|| {
                    invalid("type=\"a\": needs port= (A/AAAA records carry no port)".into())
                })?,
            },
            Some(other) => return Err(invalid(format!("type={other:?}: expected srv or a"))),
        };
        let pinned = match (name, service) {
            (Some(n), s) => {
                let s = match s.or_else(|| service_of(&n)) {
                    Some(s) => s,
                    None => {
                        return Err(invalid(format!(
                            "name={n:?}: no service name in its first label: add service="
                        )))
                    }
                };
                Some((
                    s,
                    fqdn(&n).map_err(|e| invalid(format!("name={n:?}: {e}")))?,
                ))
            }
            (None, Some(s)) => {
                return Err(invalid(format!(
                    "service={s:?}: needs name= (the record it is resolved from)"
                )))
            }
            (None, None) => None,
        };
        if pinned.is_none() && template.is_none() {
            return Err(invalid(
                "needs name= (a record to watch) or name_template= (zero-config), e.g. dns://127.0.0.1:8600?name=web.service.consul".into(),
            ));
        }
        if min_ttl > max_ttl {
            return Err(invalid(format!(
                "min_ttl={min_ttl:?} is above max_ttl={max_ttl:?}"
            )));
        }
        let (config, mut opts) = match server {
            Some((ip, port)) => {
                let mut ns = NameServerConfig::udp_and_tcp(ip);
                for c in &mut ns.connections {
                    c.port = port;
                }
                let mut opts = ResolverOpts::default();
                opts.use_hosts_file = ResolveHosts::Never;
                (ResolverConfig::from_name_servers(vec![ns]), opts)
            }
            None => hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| invalid(format!("no resolver given and /etc/resolv.conf: {e}")))?,
        };
        opts.cache_size = 0;
        opts.timeout = timeout;
        opts.attempts = ATTEMPTS;
        opts.try_tcp_on_error = true;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let listener_tx = cmd_tx.clone();
        let wanted = moka::sync::Cache::builder()
            .max_capacity(MAX_WATCHED)
            .time_to_idle(idle_ttl)
            .eviction_listener(move |service: Arc<String>, generation: u64, cause| {
                if matches!(cause, RemovalCause::Expired | RemovalCause::Size) {
                    let _ = listener_tx.send(Cmd::Idle {
                        service: (*service).clone(),
                        generation,
                    });
                }
            })
            .build();
        Ok(DnsDiscovery {
            server,
            config,
            opts,
            kind,
            pinned,
            template,
            min_ttl,
            max_ttl,
            idle_ttl,
            timeout,
            missing: RwLock::new(HashSet::new()),
            wanted,
            generation: AtomicU64::new(1),
            cmd_tx,
            cmd_rx: Mutex::new(Some(cmd_rx)),
        })
    }

    pub fn record_kind(&self) -> RecordKind {
        self.kind
    }

    /// The service and record watched from start, if any.
    pub fn pinned(&self) -> Option<(&str, String)> {
        self.pinned
            .as_ref()
            .map(|(s, n)| (s.as_str(), n.to_ascii()))
    }

    /// The record `service` is resolved from, if this source can resolve it.
    pub fn record_for(&self, service: &str) -> Option<Name> {
        if let Some((s, n)) = &self.pinned {
            if s == service {
                return Some(n.clone());
            }
        }
        let service = normalize(service)?;
        let t = self.template.as_ref()?;
        fqdn(&t.replace(SERVICE_PLACEHOLDER, &service)).ok()
    }

    /// The re-resolve interval for records whose smallest TTL is `ttl` seconds.
    pub fn interval(&self, ttl: Option<u32>) -> Duration {
        Duration::from_secs(u64::from(ttl.unwrap_or(0))).clamp(self.min_ttl, self.max_ttl)
    }

    fn is_missing(&self, service: &str) -> bool {
        self.missing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(service)
    }

    fn set_missing(&self, service: &str, missing: bool) {
        if self.is_missing(service) == missing {
            return;
        }
        let mut m = self.missing.write().unwrap_or_else(|e| e.into_inner());
        if missing {
            m.insert(service.to_string());
        } else {
            m.remove(service);
        }
    }

    fn server_label(&self) -> String {
        match self.server {
            Some((ip, port)) => join_host_port(&ip.to_string(), port),
            None => "the system resolver".into(),
        }
    }
}

impl Discovery for DnsDiscovery {
    fn kind(&self) -> &'static str {
        "dns"
    }

    fn describe(&self) -> String {
        let mut u = Url::parse("dns://x").expect("static URL parses");
        {
            let mut q = u.query_pairs_mut();
            if let Some((s, n)) = &self.pinned {
                q.append_pair("name", n.to_ascii().trim_end_matches('.'));
                q.append_pair("service", s);
            }
            match self.kind {
                RecordKind::Srv => {
                    q.append_pair("type", "srv");
                }
                RecordKind::A { port } => {
                    q.append_pair("type", "a");
                    q.append_pair("port", &port.to_string());
                }
            }
            if let Some(t) = &self.template {
                q.append_pair("name_template", t);
            }
            q.append_pair("min_ttl", &format!("{:?}", self.min_ttl));
            q.append_pair("max_ttl", &format!("{:?}", self.max_ttl));
            q.append_pair("idle_ttl", &format!("{:?}", self.idle_ttl));
            q.append_pair("timeout", &format!("{:?}", self.timeout));
        }
        let server = match self.server {
            Some((ip, port)) => join_host_port(&ip.to_string(), port),
            None => String::new(),
        };
        format!("dns://{server}/?{}", u.query().unwrap_or_default())
    }

    fn run(self: Arc<Self>, sink: Sink) -> BoxFuture {
        Box::pin(self.run_loop(sink))
    }

    fn on_demand(&self) -> bool {
        self.template.is_some()
    }

    fn watch(&self, service: &str) -> bool {
        let Some(service) = normalize(service) else {
            return false;
        };
        if self.pinned.as_ref().is_some_and(|(s, _)| *s == service) {
            return true;
        }
        if self.record_for(&service).is_none() {
            return false;
        }
        if self.wanted.get(&service).is_none() {
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
            let entry = self
                .wanted
                .entry(service.clone())
                .or_insert_with(|| generation);
            if entry.is_fresh() {
                let _ = self.cmd_tx.send(Cmd::Want {
                    service: service.clone(),
                    generation: entry.into_value(),
                });
            }
        }
        !self.is_missing(&service)
    }
}

/// A failed lookup: the last good set stays.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

/// What one resolution of a service's record gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The instances (possibly none: NODATA), the smallest TTL among the records used, and
    /// entries that were skipped.
    Found {
        instances: Vec<Instance>,
        ttl: Option<u32>,
        problems: Vec<String>,
    },
    /// NXDOMAIN, with the negative TTL when the answer had an SOA.
    NotFound { ttl: Option<u32> },
}

/// One record type's lookup, with its failure modes told apart.
enum Looked {
    Records(Vec<Record>),
    /// NODATA: the name exists without records of the type.
    NoData(Option<u32>),
    /// NXDOMAIN.
    NxDomain(Option<u32>),
}

/// A response code as DNS tools print it (`SERVFAIL`, `REFUSED`, …).
fn rcode(code: ResponseCode) -> String {
    match code {
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        other => format!("{other} ({})", u16::from(other)),
    }
}

fn classify(name: &Name, rtype: RecordType, e: NetError) -> Result<Looked, Failure> {
    let what = format!("{} {rtype}", name.to_ascii().trim_end_matches('.'));
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr)) => match nr.response_code {
            ResponseCode::NXDomain => Ok(Looked::NxDomain(nr.negative_ttl)),
            ResponseCode::NoError => Ok(Looked::NoData(nr.negative_ttl)),
            code => Err(Failure {
                kind: ErrorKind::Status,
                message: format!("{what}: no records, response code {}", rcode(code)),
            }),
        },
        NetError::Dns(DnsError::ResponseCode(code)) => Err(Failure {
            kind: ErrorKind::Status,
            message: format!("{what}: the server answered {}", rcode(code)),
        }),
        NetError::Timeout => Err(Failure {
            kind: ErrorKind::Timeout,
            message: format!("{what}: no answer (timed out)"),
        }),
        NetError::Io(_) | NetError::NoConnections | NetError::Busy => Err(Failure {
            kind: ErrorKind::Connect,
            message: format!("{what}: {e}"),
        }),
        NetError::Proto(_) => Err(Failure {
            kind: ErrorKind::Parse,
            message: format!("{what}: {e}"),
        }),
        other => Err(Failure {
            kind: ErrorKind::Status,
            message: format!("{what}: {other}"),
        }),
    }
}

async fn lookup(r: &TokioResolver, name: &Name, rtype: RecordType) -> Result<Looked, Failure> {
    match r.lookup(name.clone(), rtype).await {
        Ok(l) => Ok(Looked::Records(
            l.answers()
                .iter()
                .chain(l.additionals())
                .filter(|r| r.record_type() == rtype)
                .cloned()
                .collect(),
        )),
        Err(e) => classify(name, rtype, e),
    }
}

/// A and AAAA of `name`: the addresses with their TTLs, or `None` when both are NXDOMAIN.
async fn addresses(
    r: &TokioResolver,
    name: &Name,
) -> Result<Option<(Vec<IpAddr>, Option<u32>)>, Failure> {
    let (a, aaaa) = tokio::join!(
        lookup(r, name, RecordType::A),
        lookup(r, name, RecordType::AAAA)
    );
    let (a, aaaa) = (a?, aaaa?);
    if let (Looked::NxDomain(_), Looked::NxDomain(_)) = (&a, &aaaa) {
        return Ok(None);
    }
    let mut ips = Vec::new();
    let mut ttl = None;
    for l in [a, aaaa] {
        if let Looked::Records(records) = l {
            for rec in records {
                if let Some(ip) = ip_of(&rec) {
                    ttl = min_ttl(ttl, rec.ttl);
                    ips.push(ip);
                }
            }
        }
    }
    Ok(Some((ips, ttl)))
}

fn ip_of(rec: &Record) -> Option<IpAddr> {
    match &rec.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    }
}

fn min_ttl(a: Option<u32>, b: u32) -> Option<u32> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// One SRV record the agent uses: its target, port and effective weight.
#[derive(Debug, Clone, PartialEq)]
pub struct SrvChoice {
    pub target: Name,
    pub port: u16,
    pub priority: u16,
    pub weight: u32,
    pub ttl: u32,
}

/// The SRV records of the lowest priority present, with weight 0 promoted to 1 when every one of
/// them is 0; targets of `.` dropped. Empty when no usable record is left.
pub fn select_srv(records: &[Record]) -> Vec<SrvChoice> {
    let srvs: Vec<(&hickory_resolver::proto::rr::rdata::SRV, u32)> = records
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) if !s.target.is_root() && s.port != 0 => Some((s, r.ttl)),
            _ => None,
        })
        .collect();
    let Some(lowest) = srvs.iter().map(|(s, _)| s.priority).min() else {
        return Vec::new();
    };
    let chosen: Vec<_> = srvs
        .into_iter()
        .filter(|(s, _)| s.priority == lowest)
        .collect();
    let all_zero = chosen.iter().all(|(s, _)| s.weight == 0);
    chosen
        .into_iter()
        .map(|(s, ttl)| SrvChoice {
            target: s.target.clone(),
            port: s.port,
            priority: s.priority,
            weight: if all_zero { 1 } else { u32::from(s.weight) },
            ttl,
        })
        .collect()
}

/// Address records in `records` for `target` (case-insensitive), with their smallest TTL.
pub fn glue_for(target: &Name, records: &[Record]) -> (Vec<IpAddr>, Option<u32>) {
    let mut ips = Vec::new();
    let mut ttl = None;
    for rec in records {
        if rec.name.eq_ignore_root(target) {
            if let Some(ip) = ip_of(rec) {
                ips.push(ip);
                ttl = min_ttl(ttl, rec.ttl);
            }
        }
    }
    (ips, ttl)
}

/// Instances keyed by `address:port`, the larger weight kept when two records name one.
fn insert(out: &mut BTreeMap<String, Instance>, inst: Instance) {
    match out.get(&inst.id) {
        Some(have) if have.weight >= inst.weight => {}
        _ => {
            out.insert(inst.id.clone(), inst);
        }
    }
}

fn instance(ip: IpAddr, port: u16, weight: u32, meta: &[(&str, String)]) -> Instance {
    let mut i = Instance::new(ip.to_string(), port);
    i.weight = weight;
    i.metadata = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    i
}

impl DnsDiscovery {
    /// Resolves `name` once into an [`Answer`].
    pub async fn resolve(&self, r: &TokioResolver, name: &Name) -> Result<Answer, Failure> {
        let mut out = BTreeMap::new();
        let mut problems = Vec::new();
        let shown = name.to_ascii().trim_end_matches('.').to_string();
        let ttl = match self.kind {
            RecordKind::A { port } => match addresses(r, name).await? {
                None => return Ok(Answer::NotFound { ttl: None }),
                Some((ips, ttl)) => {
                    for ip in ips {
                        insert(&mut out, instance(ip, port, 1, &[("name", shown.clone())]));
                    }
                    ttl
                }
            },
            RecordKind::Srv => {
                let (records, additionals) = match r.lookup(name.clone(), RecordType::SRV).await {
                    Ok(l) => (l.answers().to_vec(), l.additionals().to_vec()),
                    Err(e) => match classify(name, RecordType::SRV, e)? {
                        Looked::NxDomain(ttl) => return Ok(Answer::NotFound { ttl }),
                        Looked::NoData(ttl) => {
                            return Ok(Answer::Found {
                                instances: Vec::new(),
                                ttl,
                                problems,
                            })
                        }
                        Looked::Records(_) => unreachable!("classify never yields records"),
                    },
                };
                let chosen = select_srv(&records);
                if chosen.is_empty() {
                    let any_srv = records.iter().any(|r| r.record_type() == RecordType::SRV);
                    if any_srv {
                        // Only `.` targets: decidedly not available.
                        return Ok(Answer::NotFound { ttl: None });
                    }
                    return Ok(Answer::Found {
                        instances: Vec::new(),
                        ttl: None,
                        problems,
                    });
                }
                let mut ttl = None;
                let mut resolved: HashMap<Name, (Vec<IpAddr>, Option<u32>)> = HashMap::new();
                for c in &chosen {
                    ttl = min_ttl(ttl, c.ttl);
                    let key = c.target.to_lowercase();
                    if !resolved.contains_key(&key) {
                        let (ips, t) = glue_for(&c.target, &additionals);
                        let got = if ips.is_empty() {
                            match addresses(r, &c.target).await? {
                                Some(found) => found,
                                None => {
                                    problems.push(format!(
                                        "{shown}: SRV target {} does not exist (NXDOMAIN): skipped",
                                        c.target
                                    ));
                                    (Vec::new(), None)
                                }
                            }
                        } else {
                            (ips, t)
                        };
                        resolved.insert(key.clone(), got);
                    }
                    let (ips, t) = &resolved[&key];
                    if let Some(t) = t {
                        ttl = min_ttl(ttl, *t);
                    }
                    let target = c.target.to_ascii().trim_end_matches('.').to_string();
                    for ip in ips {
                        let meta = [
                            ("target", target.clone()),
                            ("priority", c.priority.to_string()),
                        ];
                        insert(&mut out, instance(*ip, c.port, c.weight, &meta));
                    }
                }
                ttl
            }
        };
        let mut instances = Vec::with_capacity(out.len());
        for (_, inst) in out {
            match check_instance(&inst) {
                Ok(()) => instances.push(inst),
                Err(e) => problems.push(format!("{shown}: instance {}: {e}", inst.id)),
            }
        }
        Ok(Answer::Found {
            instances,
            ttl,
            problems,
        })
    }
}

fn backoff(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Lets a watch's answers through until closed, so nothing a stopped watch sends can follow
/// the `NotFound` that reports the stop (the same ordering the Consul watches need; see
/// `consul/watch.rs`).
#[derive(Clone)]
struct Gate(Arc<tokio::sync::Mutex<bool>>);

impl Gate {
    fn new() -> Gate {
        Gate(Arc::new(tokio::sync::Mutex::new(true)))
    }

    async fn send(&self, sink: &Sink, event: Event) -> bool {
        let open = self.0.lock().await;
        *open && sink.send(event).await
    }

    async fn close(&self) {
        *self.0.lock().await = false;
    }
}

struct Running {
    abort: AbortHandle,
    gate: Gate,
}

impl Running {
    async fn stop(&self) {
        self.gate.close().await;
        self.abort.abort();
    }
}

struct Watch {
    /// Generation of the cache entry (0 for the pinned name, which never idles out).
    generation: u64,
    task: Running,
}

impl DnsDiscovery {
    /// Resolves one service's record until aborted or the sink closes.
    async fn watch_name(
        self: Arc<Self>,
        r: Arc<TokioResolver>,
        service: String,
        name: Name,
        sink: Sink,
        gate: Gate,
    ) {
        let mut delays = backoff(self.min_ttl, self.max_ttl);
        let mut failing = false;
        loop {
            let wait = match self.resolve(&r, &name).await {
                Ok(answer) => {
                    delays = backoff(self.min_ttl, self.max_ttl);
                    if failing {
                        tracing::info!(%service, "dns: answering again");
                        failing = false;
                    }
                    let (update, ttl, problems) = match answer {
                        Answer::Found {
                            instances,
                            ttl,
                            problems,
                        } => {
                            self.set_missing(&service, false);
                            tracing::debug!(%service, instances = instances.len(), ?ttl, "dns answer");
                            (Update::Reset(instances), ttl, problems)
                        }
                        Answer::NotFound { ttl } => {
                            self.set_missing(&service, true);
                            tracing::debug!(%service, ?ttl, "dns: NXDOMAIN");
                            (Update::NotFound, ttl, Vec::new())
                        }
                    };
                    let ev = Event::Service {
                        service: service.clone(),
                        update,
                    };
                    if !gate.send(&sink, ev).await {
                        return;
                    }
                    for p in problems {
                        sink.error(ErrorKind::Parse, format!("dns service {service}: {p}"))
                            .await;
                    }
                    self.interval(ttl)
                }
                Err(f) => {
                    failing = true;
                    let message = format!(
                        "dns service {service} via {}: {}",
                        self.server_label(),
                        f.message
                    );
                    if !sink.error(f.kind, message).await {
                        return;
                    }
                    delays.next().unwrap_or(self.max_ttl)
                }
            };
            tokio::time::sleep(wait).await;
            if sink.tx.is_closed() {
                return;
            }
        }
    }

    fn start(
        self: &Arc<Self>,
        r: &Arc<TokioResolver>,
        tasks: &mut JoinSet<()>,
        service: &str,
        name: Name,
        sink: &Sink,
    ) -> Running {
        tracing::info!(%service, record = %name, "dns: watching");
        let gate = Gate::new();
        let abort = tasks.spawn(self.clone().watch_name(
            r.clone(),
            service.to_string(),
            name,
            sink.clone(),
            gate.clone(),
        ));
        Running { abort, gate }
    }

    async fn run_loop(self: Arc<Self>, sink: Sink) {
        let Some(mut cmds) = self.cmd_rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            sink.error(ErrorKind::Io, "dns source is already running")
                .await;
            return;
        };
        let resolver = loop {
            let built = TokioResolver::builder_with_config(
                self.config.clone(),
                TokioRuntimeProvider::default(),
            )
            .with_options(self.opts.clone())
            .build();
            match built {
                Ok(r) => break Arc::new(r),
                Err(e) => {
                    if !sink
                        .error(
                            ErrorKind::Io,
                            format!("dns: cannot build the resolver: {e}"),
                        )
                        .await
                    {
                        return;
                    }
                    tokio::time::sleep(self.max_ttl).await;
                }
            }
        };
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut watches: HashMap<String, Watch> = HashMap::new();
        match &self.pinned {
            Some((service, name)) => {
                let task = self.start(&resolver, &mut tasks, service, name.clone(), &sink);
                watches.insert(
                    service.clone(),
                    Watch {
                        generation: 0,
                        task,
                    },
                );
            }
            // Nothing to report until a name is asked for: an empty catalog marks the source
            // as answered (the agent's /ready waits for every source).
            None => {
                if !sink.send(Event::Catalog(Vec::new())).await {
                    return;
                }
            }
        }
        let mut tick = tokio::time::interval(HOUSEKEEPING_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(cmd) = cmds.recv() => match cmd {
                    Cmd::Want { service, generation } => {
                        if let Some(w) = watches.get_mut(&service) {
                            if w.generation != 0 {
                                w.generation = generation;
                            }
                            continue;
                        }
                        if let Some(name) = self.record_for(&service) {
                            let task = self.start(&resolver, &mut tasks, &service, name, &sink);
                            watches.insert(service, Watch { generation, task });
                        }
                    }
                    Cmd::Idle { service, generation } => {
                        let idle = watches
                            .get(&service)
                            .is_some_and(|w| w.generation == generation && generation != 0);
                        if idle {
                            if let Some(w) = watches.remove(&service) {
                                w.task.stop().await;
                            }
                            self.set_missing(&service, false);
                            tracing::info!(%service, ttl = ?self.idle_ttl, "dns: watch idle, stopped");
                            let gone = Event::Service { service, update: Update::NotFound };
                            if !sink.send(gone).await {
                                break;
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

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_resolver::proto::rr::rdata::{A, AAAA, SRV};

    use super::*;

    fn src(url: &str) -> DnsDiscovery {
        DnsDiscovery::from_url(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn err(url: &str) -> String {
        DnsDiscovery::from_url(url).err().unwrap().to_string()
    }

    fn name(s: &str) -> Name {
        fqdn(s).unwrap()
    }

    fn srv(prio: u16, weight: u16, port: u16, target: &str, ttl: u32) -> Record {
        let t = if target == "." {
            Name::root()
        } else {
            name(target)
        };
        Record::from_rdata(
            name("_web._tcp.example"),
            ttl,
            RData::SRV(SRV::new(prio, weight, port, t)),
        )
    }

    #[test]
    fn urls() {
        let s = src("dns://127.0.0.1:8600?name=web.service.consul");
        assert_eq!(s.record_kind(), RecordKind::Srv);
        assert_eq!(s.pinned(), Some(("web", "web.service.consul.".to_string())));
        assert!(!s.on_demand());
        assert_eq!(
            s.describe(),
            "dns://127.0.0.1:8600/?name=web.service.consul&service=web&type=srv&min_ttl=1s&max_ttl=60s&idle_ttl=600s&timeout=2s"
        );
        let s = src("dns://[::1]?name=_pay._tcp.example.internal");
        assert_eq!(s.pinned().unwrap().0, "pay");
        assert_eq!(s.server, Some(("::1".parse().unwrap(), 53)));
        assert!(
            s.describe().starts_with("dns://[::1]:53/?"),
            "{}",
            s.describe()
        );
        let s = src("dns://127.0.0.1?name=db.internal&type=A&port=5432&service=Main-DB");
        assert_eq!(s.record_kind(), RecordKind::A { port: 5432 });
        assert_eq!(s.pinned().unwrap().0, "main-db");
        let s = src("dns://127.0.0.1:5353?name_template={service}.service.consul&min_ttl=500ms&max_ttl=5m&idle_ttl=30s&timeout=1s");
        assert!(s.on_demand() && s.pinned().is_none());
        assert_eq!(s.interval(Some(0)), Duration::from_millis(500));
        assert_eq!(s.interval(None), Duration::from_millis(500));
        assert_eq!(s.interval(Some(90)), Duration::from_secs(90));
        assert_eq!(s.interval(Some(86_400)), Duration::from_secs(300));
        assert_eq!(
            s.record_for("Pay").unwrap().to_ascii(),
            "pay.service.consul."
        );
        assert_eq!(
            s.record_for("pay.default").unwrap().to_ascii(),
            "pay.default.service.consul."
        );
        assert!(s.record_for("a b").is_none() && s.record_for("a..b").is_none());
        assert!(s.record_for(&"x".repeat(64)).is_none());
        // The system resolver (this machine has an /etc/resolv.conf).
        if std::path::Path::new("/etc/resolv.conf").exists() {
            let s = src("dns://?name_template=_{service}._tcp.example.internal");
            assert!(s.server.is_none());
            assert!(s.describe().starts_with("dns:///?"), "{}", s.describe());
        }

        for (url, want) in [
            (
                "dns://127.0.0.1",
                "needs name= (a record to watch) or name_template=",
            ),
            (
                "dns://resolver.local?name=a.b",
                "resolver \"resolver.local\": must be an IP",
            ),
            (
                "dns://127.0.0.1?name=a.b&type=mx",
                "type=\"mx\": expected srv or a",
            ),
            ("dns://127.0.0.1?name=a.b&type=a", "type=\"a\": needs port="),
            (
                "dns://127.0.0.1?name=a.b&port=80",
                "port=\"80\": only for type=a",
            ),
            (
                "dns://127.0.0.1?name=a.b&type=a&port=0",
                "port=\"0\": expected 1-65535",
            ),
            ("dns://127.0.0.1?name=a.b&type=a&port=http", "port=\"http\""),
            (
                "dns://127.0.0.1?name=10.0.0.1",
                "name=\"10.0.0.1\": an IP address",
            ),
            ("dns://127.0.0.1?name=a..b", "name=\"a..b\""),
            (
                "dns://127.0.0.1?name=a.b&name=c.d",
                "name=\"c.d\": name is given twice",
            ),
            (
                "dns://127.0.0.1?service=web",
                "service=\"web\": needs name=",
            ),
            ("dns://127.0.0.1?name=a.b&service=a/b", "service=\"a/b\""),
            (
                "dns://127.0.0.1?name_template=web.consul",
                "name_template=\"web.consul\": must contain {service}",
            ),
            (
                "dns://127.0.0.1?name_template={service}..x",
                "name_template=\"{service}..x\"",
            ),
            (
                "dns://127.0.0.1?name=a.b&min_ttl=5s&max_ttl=1s",
                "min_ttl=5s is above max_ttl=1s",
            ),
            ("dns://127.0.0.1?name=a.b&max_ttl=soon", "max_ttl=\"soon\""),
            (
                "dns://127.0.0.1?name=a.b&min_ttl=1ms",
                "min_ttl=\"1ms\": must be at least",
            ),
            (
                "dns://127.0.0.1?name=a.b&idle_ttl=600000000h",
                "idle_ttl=\"600000000h\"",
            ),
            (
                "dns://127.0.0.1?name=a.b&ttl=5",
                "unknown parameter ttl=\"5\"",
            ),
            ("dns://127.0.0.1/web.consul", "path \"/web.consul\""),
            ("dns://u:p@127.0.0.1?name=a.b", "no credentials"),
        ] {
            let got = err(url);
            assert!(got.contains(want), "{url}: {got}");
        }
    }

    #[test]
    fn srv_selection_priority_weight_and_dot() {
        let records = [
            srv(10, 5, 80, "a.example", 30),
            srv(10, 0, 81, "b.example", 20),
            srv(20, 9, 82, "c.example", 5),
        ];
        let got = select_srv(&records);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!((got[0].port, got[0].weight), (80, 5));
        assert_eq!((got[1].port, got[1].weight), (81, 0), "0 takes no traffic");
        // All zero: all equal.
        let got = select_srv(&[srv(1, 0, 80, "a.example", 1), srv(1, 0, 81, "b.example", 1)]);
        assert!(got.iter().all(|c| c.weight == 1), "{got:?}");
        // "." is not available; nothing usable is left.
        assert!(select_srv(&[srv(1, 1, 80, ".", 1)]).is_empty());
        let got = select_srv(&[srv(0, 1, 80, ".", 1), srv(5, 1, 81, "b.example", 1)]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].port, 81);
    }

    #[test]
    fn glue_matches_the_target_case_insensitively() {
        let recs = [
            Record::from_rdata(
                name("A.Example"),
                7,
                RData::A(A(Ipv4Addr::new(10, 0, 0, 1))),
            ),
            Record::from_rdata(name("a.example"), 3, RData::AAAA(AAAA(Ipv6Addr::LOCALHOST))),
            Record::from_rdata(
                name("b.example"),
                1,
                RData::A(A(Ipv4Addr::new(10, 0, 0, 2))),
            ),
        ];
        let (ips, ttl) = glue_for(&name("a.example"), &recs);
        assert_eq!(
            ips,
            vec![IpAddr::from([10, 0, 0, 1]), IpAddr::V6(Ipv6Addr::LOCALHOST)]
        );
        assert_eq!(ttl, Some(3));
        assert_eq!(glue_for(&name("c.example"), &recs), (vec![], None));
    }

    #[test]
    fn one_instance_per_address_and_port_with_the_larger_weight() {
        let mut out = BTreeMap::new();
        insert(&mut out, instance(IpAddr::from([10, 0, 0, 1]), 80, 2, &[]));
        insert(&mut out, instance(IpAddr::from([10, 0, 0, 1]), 80, 7, &[]));
        insert(&mut out, instance(IpAddr::from([10, 0, 0, 1]), 80, 1, &[]));
        insert(
            &mut out,
            instance(IpAddr::V6(Ipv6Addr::LOCALHOST), 80, 1, &[]),
        );
        let ids: Vec<_> = out.values().map(|i| (i.id.clone(), i.weight)).collect();
        assert_eq!(
            ids,
            vec![("10.0.0.1:80".to_string(), 7), ("[::1]:80".to_string(), 1)]
        );
    }

    #[test]
    fn on_demand_watch_asks_the_run_loop_once_per_entry() {
        let s = src("dns://127.0.0.1:1?name=web.x&name_template={service}.svc.x");
        assert!(s.watch("web"), "the pinned name");
        assert!(s.watch("Pay"));
        assert!(s.watch("pay"));
        assert!(!s.watch("a b"), "not a DNS name");
        let mut rx = s.cmd_rx.lock().unwrap().take().unwrap();
        match rx.try_recv() {
            Ok(Cmd::Want { service, .. }) => assert_eq!(service, "pay"),
            other => panic!("{other:?}"),
        }
        assert!(rx.try_recv().is_err(), "one Want per entry");
        s.set_missing("pay", true);
        assert!(!s.watch("pay"), "last answer NXDOMAIN: 404 at once");
        s.set_missing("pay", false);
        assert!(s.watch("pay"));
        // Without a template, only the pinned name.
        let s = src("dns://127.0.0.1:1?name=web.x");
        assert!(!s.watch("pay"));
    }
}
