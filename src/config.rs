//! Configuration: environment variables (and the same as flags), an optional TOML file, and
//! validation.
//!
//! Precedence: flag / environment variable, then the file's `[agent]` table, then the defaults
//! named below. Everything is validated when the configuration is built, and every problem is
//! reported at once, each naming the variable or field and the value, so `edge-agent
//! check-config` can print them all. A configuration that fails validation is refused at start-up
//! and, on reload, leaves the old one serving.
//!
//! ```toml
//! [agent]
//! listen = "127.0.0.1:15001"
//! registry = ["file://config/services.toml"]
//! balancer = "roundrobin"
//! domain_suffix = ".svc.local"
//!
//! [[upstream]]
//! id = "api"
//! service = "hello"            # discovery service name (default: the id)
//! source = "file"              # only instances from this kind of registry (default: all)
//! balancer = "roundrobin"
//! connect_timeout = "1s"
//! read_timeout = "30s"
//! retries = 1
//!
//! [[upstream]]
//! id = "legacy"
//! nodes = [{ addr = "127.0.0.1:9000", weight = 1 }]   # static nodes, no discovery
//!
//! [[route]]
//! host = "api.local"
//! path_prefix = "/api/"
//! upstream = "api"
//! ```
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Deserialize;

use crate::balancer;
use crate::guard::GuardConfig;

/// Default proxy listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15001";
/// Default admin API listen address (loopback: the admin API is not for other hosts).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:15000";
/// The file registry used when `EDGE_AGENT_REGISTRY` is unset and this file exists.
pub const DEFAULT_REGISTRY_FILE: &str = "config/services.toml";
/// Default balancer for upstreams that name none.
pub const DEFAULT_BALANCER: &str = "roundrobin";
/// How long an upstream may take to accept a TCP connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an upstream may take to send response headers.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Extra tries after a failed one (connect errors; see `proxy`).
pub const DEFAULT_RETRIES: u32 = 1;
/// How long in-flight requests may finish after SIGTERM before the agent exits.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Budget for all tries of one request.
pub const DEFAULT_RETRY_TIMEOUT: Duration = Duration::from_secs(60);
/// `ewma` decay: how fast old latency observations fade.
pub const DEFAULT_EWMA_DECAY: Duration = Duration::from_secs(10);
/// Consecutive failures that eject an endpoint.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// First ejection; doubled on each repeat.
pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
/// Longest ejection.
pub const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
/// Most of an upstream that passive health may eject, percent.
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 50;
/// Healthy share below which an upstream balances over all endpoints, percent.
pub const DEFAULT_PANIC_THRESHOLD: u32 = 50;
/// Active probe defaults.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
/// Upper bound for `retries`: more is a retry storm, not resilience.
pub const MAX_RETRIES: u32 = 10;

const ENV_HELP: &str = "\
Environment (each also a flag; flags and variables override the config file):
  EDGE_AGENT_LISTEN          proxy address                     [default: 127.0.0.1:15001]
  EDGE_AGENT_ADMIN_LISTEN    admin API and /metrics address    [default: 127.0.0.1:15000]
  EDGE_AGENT_REGISTRY        comma-separated registry URLs     [default: file://config/services.toml if it exists]
  EDGE_AGENT_CONFIG          optional TOML file (upstreams, routes, [agent] settings)
  EDGE_AGENT_BALANCER        default balancer: roundrobin      [default: roundrobin]
  EDGE_AGENT_DOMAIN_SUFFIX   suffix ignored in Host headers, e.g. .svc.local
  EDGE_AGENT_SHUTDOWN_GRACE  drain time after SIGTERM          [default: 10s]
  EDGE_AGENT_STATE_DIR       directory for state snapshots     [default: /var/lib/edge-agent as root, else ~/.local/state/edge-agent]
  EDGE_AGENT_ADMIN_TOKEN     bearer token required by the admin API (except /healthz) [default: none]
  EDGE_AGENT_REMOVAL_GUARD   hold updates that remove most of a service: on/off [default: on]
  EDGE_AGENT_LOG_FORMAT      text or json                      [default: text]
  RUST_LOG                   log filter, e.g. info,edge_agent=debug [default: info]
  TOKIO_WORKER_THREADS       proxy worker threads; 1 runs everything on one thread [default: one per CPU]";

#[derive(Debug, Parser, Clone, Default)]
#[command(
    name = "edge-agent",
    version,
    about = "Per-host service-discovery edge agent: routes local calls to healthy instances.",
    after_help = ENV_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Proxy listen address [default: 127.0.0.1:15001]
    #[arg(long, env = "EDGE_AGENT_LISTEN", global = true)]
    pub listen: Option<String>,
    /// Admin API listen address [default: 127.0.0.1:15000]
    #[arg(long, env = "EDGE_AGENT_ADMIN_LISTEN", global = true)]
    pub admin_listen: Option<String>,
    /// Comma-separated registry URLs [default: file://config/services.toml if it exists]
    #[arg(long, env = "EDGE_AGENT_REGISTRY", global = true)]
    pub registry: Option<String>,
    /// Optional TOML config file
    #[arg(long, env = "EDGE_AGENT_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Default balancer [default: roundrobin]
    #[arg(long, env = "EDGE_AGENT_BALANCER", global = true)]
    pub balancer: Option<String>,
    /// Domain suffix stripped from Host headers before lookup
    #[arg(long, env = "EDGE_AGENT_DOMAIN_SUFFIX", global = true)]
    pub domain_suffix: Option<String>,
    /// Drain time after SIGTERM [default: 10s]
    #[arg(long, env = "EDGE_AGENT_SHUTDOWN_GRACE", global = true)]
    pub shutdown_grace: Option<String>,
    /// Directory for state snapshots
    #[arg(long, env = "EDGE_AGENT_STATE_DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    /// Bearer token for the admin API
    #[arg(
        long,
        env = "EDGE_AGENT_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub admin_token: Option<String>,
    /// Mass-deregistration guard: on or off [default: on]
    #[arg(long, env = "EDGE_AGENT_REMOVAL_GUARD", global = true)]
    pub removal_guard: Option<String>,
    /// Log format: text or json [default: text]
    #[arg(long, env = "EDGE_AGENT_LOG_FORMAT", global = true)]
    pub log_format: Option<String>,
}

#[derive(Debug, Subcommand, Clone)]
pub enum Command {
    /// Run the agent (the default)
    Run,
    /// Validate the environment and config file, print every error, exit 0 when valid
    CheckConfig,
}

/// The optional TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub agent: AgentFile,
    #[serde(default)]
    pub upstream: Vec<UpstreamFile>,
    #[serde(default)]
    pub route: Vec<RouteFile>,
    #[serde(default)]
    pub guard: GuardFile,
}

/// `[guard]`: the mass-deregistration guard (see `guard.rs`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardFile {
    pub enabled: Option<bool>,
    pub max_removal_percent: Option<u32>,
    pub confirm_window: Option<String>,
    pub confirm_answers: Option<u32>,
    #[serde(default)]
    pub opt_out: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub registry: Option<StringOrList>,
    pub balancer: Option<String>,
    pub domain_suffix: Option<String>,
    pub shutdown_grace: Option<String>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    pub id: String,
    pub service: Option<String>,
    pub source: Option<String>,
    #[serde(default)]
    pub nodes: Vec<NodeFile>,
    pub balancer: Option<String>,
    pub connect_timeout: Option<String>,
    pub read_timeout: Option<String>,
    pub retries: Option<u32>,
    /// Overall time budget for all tries of one request.
    pub retry_timeout: Option<String>,
    /// `chash` key: `header:<name>`, `cookie:<name>`, `arg:<name>`, `ip` or `path`.
    pub hash_on: Option<String>,
    /// `ewma` decay time.
    pub ewma_decay: Option<String>,
    /// Ramp new endpoints' share up over this window.
    pub slow_start: Option<String>,
    pub checks: Option<ChecksFile>,
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct ChecksFile {
    pub passive: Option<PassiveFile>,
    pub active: Option<ActiveFile>,
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct PassiveFile {
    pub enabled: Option<bool>,
    pub consecutive_failures: Option<u32>,
    /// Statuses counted as failures (default: every 5xx).
    pub failure_statuses: Option<Vec<u16>>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_time: Option<String>,
    pub max_ejection_percent: Option<u32>,
    pub panic_threshold: Option<u32>,
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct ActiveFile {
    /// `http` (default) or `tcp`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub expected_statuses: Option<Vec<u16>>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub healthy_threshold: Option<u32>,
    pub unhealthy_threshold: Option<u32>,
    pub initially_unhealthy: Option<bool>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub addr: String,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    /// Strip the matched prefix before forwarding (default: true).
    pub strip_prefix: Option<bool>,
    pub upstream: String,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub registries: Vec<String>,
    pub config_file: Option<PathBuf>,
    pub shutdown_grace: Duration,
    pub state_dir: Option<PathBuf>,
    pub admin_token: Option<String>,
    pub log_json: bool,
    /// The part that a reload may change.
    pub dynamic: Dynamic,
}

/// Settings a reload can change without a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct Dynamic {
    pub default_balancer: String,
    pub domain_suffix: Option<String>,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    pub guard: GuardConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub id: String,
    /// Discovery service name; `None` for static nodes.
    pub service: Option<String>,
    /// Only instances from sources of this kind (`file`, `consul`, …).
    pub source: Option<String>,
    pub nodes: Vec<(SocketAddr, u32)>,
    pub settings: UpstreamSettings,
}

/// Per-upstream behaviour; zero-config upstreams use [`UpstreamSettings::with_balancer`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamSettings {
    pub balancer: String,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub retries: u32,
    /// Budget for all tries of one request together.
    pub retry_timeout: Duration,
    /// The `chash` key; `None` for other balancers.
    pub hash_on: Option<HashOn>,
    pub ewma_decay: Duration,
    pub slow_start: Option<Duration>,
    pub passive: PassiveHealth,
    pub active: Option<ActiveHealth>,
}

impl UpstreamSettings {
    pub fn with_balancer(balancer: &str) -> Self {
        UpstreamSettings {
            balancer: balancer.to_string(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            retries: DEFAULT_RETRIES,
            retry_timeout: DEFAULT_RETRY_TIMEOUT,
            hash_on: None,
            ewma_decay: DEFAULT_EWMA_DECAY,
            slow_start: None,
            passive: PassiveHealth::default(),
            active: None,
        }
    }
}

/// Where `chash` takes its key from (APISIX's `hash_on` choices).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HashOn {
    Header(http::HeaderName),
    Cookie(String),
    Arg(String),
    Ip,
    Path,
}

impl HashOn {
    pub fn parse(s: &str) -> Result<HashOn, String> {
        let s = s.trim();
        let (kind, name) = match s.split_once(':') {
            Some((k, n)) => (k, Some(n.trim())),
            None => (s, None),
        };
        match (kind, name) {
            ("ip", None) => Ok(HashOn::Ip),
            ("path", None) => Ok(HashOn::Path),
            ("header", Some(n)) if !n.is_empty() => http::HeaderName::try_from(n)
                .map(HashOn::Header)
                .map_err(|_| format!("{n:?} is not a header name")),
            ("cookie", Some(n)) if !n.is_empty() => Ok(HashOn::Cookie(n.to_string())),
            ("arg", Some(n)) if !n.is_empty() => Ok(HashOn::Arg(n.to_string())),
            _ => Err("expected header:<name>, cookie:<name>, arg:<name>, ip or path".into()),
        }
    }
}

/// Passive health (outlier ejection), Envoy-style.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PassiveHealth {
    pub enabled: bool,
    /// Consecutive failures that eject an endpoint.
    pub consecutive_failures: u32,
    /// Statuses counted as failures; empty means every 5xx.
    pub failure_statuses: Vec<u16>,
    /// First ejection time; each repeat ejection doubles it, up to `max_ejection_time`.
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    /// Never eject more than this share (percent) of an upstream's endpoints.
    pub max_ejection_percent: u32,
    /// Below this share (percent) of healthy endpoints, balance over all of them (panic mode).
    pub panic_threshold: u32,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        PassiveHealth {
            enabled: true,
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            failure_statuses: Vec::new(),
            base_ejection_time: DEFAULT_BASE_EJECTION_TIME,
            max_ejection_time: DEFAULT_MAX_EJECTION_TIME,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
            panic_threshold: DEFAULT_PANIC_THRESHOLD,
        }
    }
}

/// Active health probes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ActiveHealth {
    /// `None`: TCP connect only. `Some(path)`: HTTP GET of that path.
    pub http_path: Option<String>,
    pub host: Option<String>,
    /// Statuses that count as healthy; empty means 200–399.
    pub expected_statuses: Vec<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub initially_unhealthy: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub strip_prefix: bool,
    pub upstream: String,
}

/// Every problem found, one line each.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigErrors(pub Vec<String>);

impl Config {
    /// Builds and validates the configuration from flags/env and the optional file.
    pub fn load(cli: &Cli) -> Result<Config, ConfigErrors> {
        let mut errs = Vec::new();
        let file = match &cli.config {
            Some(path) => match read_file(path) {
                Ok(f) => f,
                Err(e) => {
                    errs.push(e);
                    FileConfig::default()
                }
            },
            None => FileConfig::default(),
        };
        let cfg = build(cli, &file, &mut errs);
        if errs.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(errs))
        }
    }
}

/// Reads and parses the TOML file; the error names the file and the line.
pub fn read_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("EDGE_AGENT_CONFIG={}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("EDGE_AGENT_CONFIG={}: {e}", path.display()))
}

fn build(cli: &Cli, file: &FileConfig, errs: &mut Vec<String>) -> Config {
    let a = &file.agent;
    let listen = addr(
        pick(&cli.listen, &a.listen, "EDGE_AGENT_LISTEN", "agent.listen"),
        DEFAULT_LISTEN,
        errs,
    );
    let admin_listen = addr(
        pick(
            &cli.admin_listen,
            &a.admin_listen,
            "EDGE_AGENT_ADMIN_LISTEN",
            "agent.admin_listen",
        ),
        DEFAULT_ADMIN_LISTEN,
        errs,
    );
    let registries = registries(cli, a, errs);
    let (bname, bval) = pick(
        &cli.balancer,
        &a.balancer,
        "EDGE_AGENT_BALANCER",
        "agent.balancer",
    )
    .unwrap_or(("EDGE_AGENT_BALANCER", DEFAULT_BALANCER.to_string()));
    let default_balancer = check_balancer(bname, &bval, errs);
    let shutdown_grace = match pick(
        &cli.shutdown_grace,
        &a.shutdown_grace,
        "EDGE_AGENT_SHUTDOWN_GRACE",
        "agent.shutdown_grace",
    ) {
        Some((name, v)) => duration(name, &v, errs).unwrap_or(DEFAULT_SHUTDOWN_GRACE),
        None => DEFAULT_SHUTDOWN_GRACE,
    };
    let domain_suffix = pick(
        &cli.domain_suffix,
        &a.domain_suffix,
        "EDGE_AGENT_DOMAIN_SUFFIX",
        "agent.domain_suffix",
    )
    .map(|(_, v)| v.trim().to_ascii_lowercase())
    .filter(|v| !v.is_empty())
    .map(|v| {
        if v.starts_with('.') {
            v
        } else {
            format!(".{v}")
        }
    });
    let log_json = match cli.log_format.as_deref().map(str::trim) {
        None | Some("") | Some("text") => false,
        Some("json") => true,
        Some(other) => {
            errs.push(format!(
                "EDGE_AGENT_LOG_FORMAT={other:?}: expected \"text\" or \"json\""
            ));
            false
        }
    };
    if matches!(cli.admin_token.as_deref(), Some(t) if t.trim().is_empty()) {
        errs.push("EDGE_AGENT_ADMIN_TOKEN: empty token".into());
    }
    let upstreams = upstreams(&file.upstream, &default_balancer, errs);
    let routes = routes(&file.route, &upstreams, errs);
    let guard = guard(cli, &file.guard, errs);
    Config {
        listen,
        admin_listen,
        registries,
        config_file: cli.config.clone(),
        shutdown_grace,
        state_dir: cli.state_dir.clone(),
        admin_token: cli.admin_token.clone().filter(|t| !t.trim().is_empty()),
        log_json,
        dynamic: Dynamic {
            default_balancer,
            domain_suffix,
            upstreams,
            routes,
            guard,
        },
    }
}

fn guard(cli: &Cli, g: &GuardFile, errs: &mut Vec<String>) -> GuardConfig {
    let d = GuardConfig::default();
    let enabled = match cli.removal_guard.as_deref().map(str::trim) {
        None | Some("") => g.enabled.unwrap_or(true),
        Some("on") | Some("true") | Some("1") => true,
        Some("off") | Some("false") | Some("0") => false,
        Some(other) => {
            errs.push(format!(
                "EDGE_AGENT_REMOVAL_GUARD={other:?}: expected \"on\" or \"off\""
            ));
            true
        }
    };
    let confirm_answers = match g.confirm_answers {
        Some(0) => {
            errs.push("guard.confirm_answers = 0: must be at least 1".into());
            d.confirm_answers
        }
        Some(n) => n,
        None => d.confirm_answers,
    };
    GuardConfig {
        enabled,
        max_removal_percent: percent(
            "guard.max_removal_percent".into(),
            g.max_removal_percent,
            d.max_removal_percent,
            errs,
        ),
        confirm_window: g
            .confirm_window
            .as_ref()
            .and_then(|v| duration("guard.confirm_window", v, errs))
            .unwrap_or(d.confirm_window),
        confirm_answers,
        opt_out: g
            .opt_out
            .iter()
            .map(|s| s.trim().to_ascii_lowercase())
            .collect(),
    }
}

/// The flag/env value if set, else the file's, with the name to use in errors.
fn pick(
    env: &Option<String>,
    file: &Option<String>,
    env_name: &'static str,
    file_name: &'static str,
) -> Option<(&'static str, String)> {
    env.clone()
        .map(|v| (env_name, v))
        .or_else(|| file.clone().map(|v| (file_name, v)))
}

fn addr(v: Option<(&'static str, String)>, default: &str, errs: &mut Vec<String>) -> SocketAddr {
    let fallback = default.parse().expect("default address parses");
    match v {
        None => fallback,
        Some((name, v)) => v.trim().parse().unwrap_or_else(|_| {
            errs.push(format!("{name}={v:?}: expected ip:port, e.g. {default}"));
            fallback
        }),
    }
}

fn registries(cli: &Cli, a: &AgentFile, errs: &mut Vec<String>) -> Vec<String> {
    let (name, list): (&str, Vec<String>) = match (&cli.registry, &a.registry) {
        (Some(v), _) => (
            "EDGE_AGENT_REGISTRY",
            v.split(',').map(|s| s.trim().to_string()).collect(),
        ),
        (None, Some(StringOrList::One(v))) => ("agent.registry", vec![v.trim().to_string()]),
        (None, Some(StringOrList::Many(v))) => (
            "agent.registry",
            v.iter().map(|s| s.trim().to_string()).collect(),
        ),
        (None, None) => {
            if Path::new(DEFAULT_REGISTRY_FILE).exists() {
                return vec![format!("file://{DEFAULT_REGISTRY_FILE}")];
            }
            return Vec::new();
        }
    };
    let list: Vec<String> = list.into_iter().filter(|s| !s.is_empty()).collect();
    for url in &list {
        if let Err(e) = discovery::from_url(url) {
            errs.push(format!("{name}: {e}"));
        }
    }
    list
}

fn check_balancer(name: &str, v: &str, errs: &mut Vec<String>) -> String {
    let v = v.trim();
    if balancer::factory(v).is_none() {
        errs.push(format!(
            "{name}={v:?}: unknown balancer (known: {})",
            balancer::names().join(", ")
        ));
        return DEFAULT_BALANCER.to_string();
    }
    v.to_string()
}

fn duration(name: &str, v: &str, errs: &mut Vec<String>) -> Option<Duration> {
    match humantime::parse_duration(v.trim()) {
        Ok(d) if d.is_zero() => {
            errs.push(format!("{name}={v:?}: must be greater than zero"));
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            errs.push(format!(
                "{name}={v:?}: invalid duration ({e}); use e.g. \"500ms\" or \"2s\""
            ));
            None
        }
    }
}

fn upstreams(
    raw: &[UpstreamFile],
    default_balancer: &str,
    errs: &mut Vec<String>,
) -> Vec<UpstreamConfig> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, u) in raw.iter().enumerate() {
        let at = format!("upstream[{i}]");
        let id = u.id.trim().to_string();
        if id.is_empty() {
            errs.push(format!("{at}.id: empty"));
        } else if !seen.insert(id.clone()) {
            errs.push(format!("{at}.id = {id:?}: duplicate upstream id"));
        }
        let balancer = match &u.balancer {
            Some(b) => check_balancer(&format!("{at}.balancer"), b, errs),
            None => default_balancer.to_string(),
        };
        let mut settings = UpstreamSettings::with_balancer(&balancer);
        if let Some(v) = &u.connect_timeout {
            settings.connect_timeout = duration(&format!("{at}.connect_timeout"), v, errs)
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        }
        if let Some(v) = &u.read_timeout {
            settings.read_timeout =
                duration(&format!("{at}.read_timeout"), v, errs).unwrap_or(DEFAULT_READ_TIMEOUT);
        }
        if let Some(r) = u.retries {
            if r > MAX_RETRIES {
                errs.push(format!("{at}.retries = {r}: at most {MAX_RETRIES}"));
            }
            settings.retries = r.min(MAX_RETRIES);
        }
        if let Some(v) = &u.retry_timeout {
            settings.retry_timeout =
                duration(&format!("{at}.retry_timeout"), v, errs).unwrap_or(DEFAULT_RETRY_TIMEOUT);
        }
        if let Some(v) = &u.ewma_decay {
            settings.ewma_decay =
                duration(&format!("{at}.ewma_decay"), v, errs).unwrap_or(DEFAULT_EWMA_DECAY);
        }
        if let Some(v) = &u.slow_start {
            settings.slow_start = duration(&format!("{at}.slow_start"), v, errs);
        }
        match (&u.hash_on, balancer.as_str()) {
            (Some(h), _) => match HashOn::parse(h) {
                Ok(h) => settings.hash_on = Some(h),
                Err(e) => errs.push(format!("{at}.hash_on = {h:?}: {e}")),
            },
            (None, "chash") => settings.hash_on = Some(HashOn::Ip),
            _ => {}
        }
        if let Some(c) = &u.checks {
            if let Some(p) = &c.passive {
                settings.passive = passive(&at, p, errs);
            }
            if let Some(a) = &c.active {
                settings.active = Some(active(&at, a, errs));
            }
        }
        let mut nodes = Vec::with_capacity(u.nodes.len());
        for (j, n) in u.nodes.iter().enumerate() {
            match n.addr.trim().parse::<SocketAddr>() {
                Ok(a) if a.port() != 0 => nodes.push((a, n.weight)),
                _ => errs.push(format!(
                    "{at}.nodes[{j}].addr = {:?}: expected ip:port",
                    n.addr
                )),
            }
        }
        let service = u.service.as_ref().map(|s| s.trim().to_string());
        if !u.nodes.is_empty() && service.is_some() {
            errs.push(format!(
                "{at}: give either service (discovery) or nodes (static), not both"
            ));
        }
        let service = if u.nodes.is_empty() {
            Some(service.unwrap_or_else(|| id.clone()))
        } else {
            None
        };
        if let Some(src) = &u.source {
            if !matches!(src.as_str(), "file" | "consul" | "nacos" | "eureka") {
                errs.push(format!(
                    "{at}.source = {src:?}: expected file, consul, nacos or eureka"
                ));
            }
        }
        out.push(UpstreamConfig {
            id,
            service,
            source: u.source.clone(),
            nodes,
            settings,
        });
    }
    out
}

fn percent(name: String, v: Option<u32>, default: u32, errs: &mut Vec<String>) -> u32 {
    match v {
        Some(p) if p > 100 => {
            errs.push(format!("{name} = {p}: a percentage, 0 to 100"));
            default
        }
        Some(p) => p,
        None => default,
    }
}

fn statuses(name: String, v: &Option<Vec<u16>>, errs: &mut Vec<String>) -> Vec<u16> {
    let list = v.clone().unwrap_or_default();
    if let Some(bad) = list.iter().find(|s| !(100..=599).contains(*s)) {
        errs.push(format!("{name}: {bad} is not an HTTP status"));
    }
    list
}

fn passive(at: &str, p: &PassiveFile, errs: &mut Vec<String>) -> PassiveHealth {
    let d = PassiveHealth::default();
    let at = format!("{at}.checks.passive");
    let consecutive_failures = match p.consecutive_failures {
        Some(0) => {
            errs.push(format!("{at}.consecutive_failures = 0: must be at least 1"));
            d.consecutive_failures
        }
        Some(n) => n,
        None => d.consecutive_failures,
    };
    let base = p
        .base_ejection_time
        .as_ref()
        .and_then(|v| duration(&format!("{at}.base_ejection_time"), v, errs))
        .unwrap_or(d.base_ejection_time);
    let max = p
        .max_ejection_time
        .as_ref()
        .and_then(|v| duration(&format!("{at}.max_ejection_time"), v, errs))
        .unwrap_or(d.max_ejection_time.max(base));
    if max < base {
        errs.push(format!(
            "{at}.max_ejection_time = {max:?}: shorter than base_ejection_time {base:?}"
        ));
    }
    PassiveHealth {
        enabled: p.enabled.unwrap_or(true),
        consecutive_failures,
        failure_statuses: statuses(format!("{at}.failure_statuses"), &p.failure_statuses, errs),
        base_ejection_time: base,
        max_ejection_time: max,
        max_ejection_percent: percent(
            format!("{at}.max_ejection_percent"),
            p.max_ejection_percent,
            d.max_ejection_percent,
            errs,
        ),
        panic_threshold: percent(
            format!("{at}.panic_threshold"),
            p.panic_threshold,
            d.panic_threshold,
            errs,
        ),
    }
}

fn active(at: &str, a: &ActiveFile, errs: &mut Vec<String>) -> ActiveHealth {
    let at = format!("{at}.checks.active");
    let http_path = match a.kind.as_deref().unwrap_or("http") {
        "http" => {
            let p = a.path.clone().unwrap_or_else(|| "/".into());
            if !p.starts_with('/') {
                errs.push(format!("{at}.path = {p:?}: must start with '/'"));
            }
            Some(p)
        }
        "tcp" => None,
        other => {
            errs.push(format!(
                "{at}.type = {other:?}: expected \"http\" or \"tcp\""
            ));
            None
        }
    };
    let threshold = |name: &str, v: Option<u32>, d: u32, errs: &mut Vec<String>| match v {
        Some(0) => {
            errs.push(format!("{at}.{name} = 0: must be at least 1"));
            d
        }
        Some(n) => n,
        None => d,
    };
    ActiveHealth {
        http_path,
        host: a.host.clone(),
        expected_statuses: statuses(
            format!("{at}.expected_statuses"),
            &a.expected_statuses,
            errs,
        ),
        interval: a
            .interval
            .as_ref()
            .and_then(|v| duration(&format!("{at}.interval"), v, errs))
            .unwrap_or(DEFAULT_CHECK_INTERVAL),
        timeout: a
            .timeout
            .as_ref()
            .and_then(|v| duration(&format!("{at}.timeout"), v, errs))
            .unwrap_or(DEFAULT_CHECK_TIMEOUT),
        healthy_threshold: threshold(
            "healthy_threshold",
            a.healthy_threshold,
            DEFAULT_HEALTHY_THRESHOLD,
            errs,
        ),
        unhealthy_threshold: threshold(
            "unhealthy_threshold",
            a.unhealthy_threshold,
            DEFAULT_UNHEALTHY_THRESHOLD,
            errs,
        ),
        initially_unhealthy: a.initially_unhealthy.unwrap_or(false),
    }
}

fn routes(raw: &[RouteFile], ups: &[UpstreamConfig], errs: &mut Vec<String>) -> Vec<RouteConfig> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let at = format!("route[{i}]");
        if !ups.iter().any(|u| u.id == r.upstream) {
            errs.push(format!(
                "{at}.upstream = {:?}: no upstream with that id",
                r.upstream
            ));
        }
        let host = r.host.as_ref().map(|h| h.trim().to_ascii_lowercase());
        let path_prefix = r.path_prefix.as_ref().map(|p| p.trim().to_string());
        if let Some(p) = &path_prefix {
            if !p.starts_with('/') {
                errs.push(format!("{at}.path_prefix = {p:?}: must start with '/'"));
            }
        }
        if host.is_none() && path_prefix.is_none() {
            errs.push(format!("{at}: give host, path_prefix or both"));
        }
        out.push(RouteConfig {
            host,
            path_prefix,
            strip_prefix: r.strip_prefix.unwrap_or(true),
            upstream: r.upstream.clone(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> Cli {
        Cli {
            registry: Some("file:///dev/null".into()),
            ..Cli::default()
        }
    }

    fn load_toml(text: &str) -> Result<Config, ConfigErrors> {
        let file: FileConfig =
            toml::from_str(text).map_err(|e| ConfigErrors(vec![e.to_string()]))?;
        let mut errs = Vec::new();
        let c = build(&cli(), &file, &mut errs);
        if errs.is_empty() {
            Ok(c)
        } else {
            Err(ConfigErrors(errs))
        }
    }

    fn err_of(text: &str) -> String {
        load_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults() {
        let c = load_toml("").unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
        assert_eq!(c.dynamic.default_balancer, "roundrobin");
        assert_eq!(c.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
    }

    #[test]
    fn env_overrides_file() {
        let file: FileConfig = toml::from_str("[agent]\nlisten = \"127.0.0.1:1\"\n").unwrap();
        let mut c = cli();
        c.listen = Some("127.0.0.1:2".into());
        let mut errs = Vec::new();
        assert_eq!(build(&c, &file, &mut errs).listen.port(), 2);
        assert_eq!(build(&cli(), &file, &mut errs).listen.port(), 1);
        assert!(errs.is_empty());
    }

    #[test]
    fn bad_env_values_are_named() {
        let mut c = cli();
        c.listen = Some("localhost".into());
        c.balancer = Some("fastest".into());
        c.log_format = Some("xml".into());
        c.registry = Some("gopher://x".into());
        let mut errs = Vec::new();
        build(&c, &FileConfig::default(), &mut errs);
        let all = errs.join("\n");
        assert!(all.contains("EDGE_AGENT_LISTEN=\"localhost\""), "{all}");
        assert!(all.contains("EDGE_AGENT_BALANCER=\"fastest\""), "{all}");
        assert!(all.contains("EDGE_AGENT_LOG_FORMAT=\"xml\""), "{all}");
        assert!(
            all.contains("EDGE_AGENT_REGISTRY") && all.contains("gopher"),
            "{all}"
        );
    }

    #[test]
    fn bad_address_in_nodes() {
        let e = err_of("[[upstream]]\nid = \"a\"\nnodes = [{ addr = \"nowhere\" }]\n");
        assert!(e.contains("upstream[0].nodes[0].addr = \"nowhere\""), "{e}");
    }

    #[test]
    fn unknown_balancer() {
        let e = err_of("[[upstream]]\nid = \"a\"\nbalancer = \"random-ish\"\n");
        assert!(e.contains("upstream[0].balancer=\"random-ish\""), "{e}");
    }

    #[test]
    fn negative_and_zero_timeouts() {
        let e = err_of("[[upstream]]\nid = \"a\"\nconnect_timeout = \"-1s\"\n");
        assert!(e.contains("upstream[0].connect_timeout=\"-1s\""), "{e}");
        let e = err_of("[[upstream]]\nid = \"a\"\nread_timeout = \"0s\"\n");
        assert!(e.contains("upstream[0].read_timeout=\"0s\""), "{e}");
        // A negative number is refused by the parser, with the line.
        let e = err_of("[[upstream]]\nid = \"a\"\nretries = -1\n");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn health_and_hash_fields_are_validated_by_name() {
        let e = err_of(
            "[[upstream]]\nid = \"a\"\nbalancer = \"roundrobin\"\nhash_on = \"header:\"\n\
             [upstream.checks.passive]\nmax_ejection_percent = 150\nconsecutive_failures = 0\n\
             [upstream.checks.active]\ntype = \"udp\"\ninterval = \"soon\"\n",
        );
        for needle in [
            "upstream[0].hash_on = \"header:\"",
            "upstream[0].checks.passive.max_ejection_percent = 150",
            "upstream[0].checks.passive.consecutive_failures = 0",
            "upstream[0].checks.active.type = \"udp\"",
            "upstream[0].checks.active.interval=\"soon\"",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in {e}");
        }
        let c = load_toml(
            "[[upstream]]\nid = \"a\"\nhash_on = \"cookie:sid\"\nslow_start = \"30s\"\n\
             [upstream.checks.active]\npath = \"/health\"\ninterval = \"1s\"\n",
        )
        .unwrap();
        let s = &c.dynamic.upstreams[0].settings;
        assert_eq!(s.hash_on, Some(HashOn::Cookie("sid".into())));
        assert_eq!(s.slow_start, Some(Duration::from_secs(30)));
        assert_eq!(
            s.active.as_ref().unwrap().http_path.as_deref(),
            Some("/health")
        );
        assert!(s.passive.enabled);
    }

    #[test]
    fn duplicate_upstream_id() {
        let e = err_of("[[upstream]]\nid = \"a\"\n[[upstream]]\nid = \"a\"\n");
        assert!(e.contains("upstream[1].id = \"a\": duplicate"), "{e}");
    }

    #[test]
    fn route_to_missing_upstream() {
        let e = err_of("[[route]]\nhost = \"x\"\nupstream = \"ghost\"\n");
        assert!(e.contains("route[0].upstream = \"ghost\""), "{e}");
    }

    #[test]
    fn unknown_field_is_refused_with_line() {
        let e = err_of("[agent]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n");
        assert!(e.contains("lisen") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let e = load_toml(
            "[[upstream]]\nid = \"a\"\nbalancer = \"x\"\nconnect_timeout = \"soon\"\n[[route]]\nupstream = \"b\"\n",
        )
        .unwrap_err();
        assert_eq!(e.0.len(), 4, "{e}");
    }

    #[test]
    fn full_example_config_loads() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/edge-agent.toml");
        let file = read_file(Path::new(path)).unwrap();
        let mut errs = Vec::new();
        let c = build(&cli(), &file, &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        assert!(!c.dynamic.upstreams.is_empty());
        assert!(!c.dynamic.routes.is_empty());
    }
}
