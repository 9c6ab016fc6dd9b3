//! Validation: builds the [`Config`] from flags/env and the file, reporting every problem at
//! once, each naming the variable or field and the value.
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::file::*;
use super::*;
use crate::balancer::{Options, Spec, SpecError};
use crate::guard::GuardConfig;
use crate::health::active::{self, ActiveHealth};
use crate::health::outlier;
use crate::health::passive::PassiveHealth;
use crate::route::RouteConfig;
use crate::tls::{ClientTls, TlsSettings, ALPN_HTTP1};
use crate::upstream::{self as up, UpstreamConfig, UpstreamSettings};

pub(super) fn build(cli: &Cli, file: &FileConfig, errs: &mut Vec<String>) -> Config {
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
    let default_options = Options {
        hash_on: None,
        ewma_decay: crate::load::DEFAULT_DECAY,
    };
    let default_spec = balancer_spec(bname, &bval, "agent", &default_options, errs);
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
    let access_log = crate::access_log::Settings::parse(
        cli.access_log.as_deref(),
        cli.access_log_format.as_deref(),
        cli.access_log_query.as_deref(),
    )
    .unwrap_or_else(|e| {
        errs.extend(e);
        Default::default()
    });
    let request_id = crate::access_log::on_off("EDGE_AGENT_REQUEST_ID", cli.request_id.as_deref())
        .unwrap_or_else(|e| {
            errs.push(e);
            false
        });
    let zone = pick(&cli.zone, &a.zone, "EDGE_AGENT_ZONE", "agent.zone")
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty());
    let upstreams = upstreams(&file.upstream, default_spec.name(), zone.as_deref(), errs);
    let default_settings = UpstreamSettings::with_balancer(default_spec);
    let routes = routes(&file.route, &upstreams, errs);
    let guard = guard(cli, &file.guard, errs);
    let resync_interval = match pick(
        &cli.resync_interval,
        &a.resync_interval,
        "EDGE_AGENT_RESYNC_INTERVAL",
        "agent.resync_interval",
    ) {
        Some((_, v)) if v.trim().eq_ignore_ascii_case("off") => None,
        Some((name, v)) => match duration(name, &v, errs) {
            Some(d) if d < MIN_RESYNC_INTERVAL => {
                errs.push(format!(
                    "{name}={v:?}: must be at least {MIN_RESYNC_INTERVAL:?} (or off)"
                ));
                None
            }
            d => d,
        },
        None => Some(crate::cache::DEFAULT_RESYNC_INTERVAL),
    };
    Config {
        listen,
        admin_listen,
        registries,
        config_file: cli.config.clone(),
        shutdown_grace,
        state_dir: cli.state_dir.clone(),
        admin_token: cli.admin_token.clone().filter(|t| !t.trim().is_empty()),
        log_json,
        access_log,
        request_id,
        resync_interval,
        dynamic: Dynamic {
            default_settings,
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
/// Shortest resync interval accepted: each one reads every watched service again.
const MIN_RESYNC_INTERVAL: Duration = Duration::from_secs(1);

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
    zone: Option<&str>,
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
        let mut settings = UpstreamSettings::default();
        if let Some(v) = &u.connect_timeout {
            settings.connect_timeout = duration(&format!("{at}.connect_timeout"), v, errs)
                .unwrap_or(up::DEFAULT_CONNECT_TIMEOUT);
        }
        if let Some(v) = &u.read_timeout {
            settings.read_timeout = duration(&format!("{at}.read_timeout"), v, errs)
                .unwrap_or(up::DEFAULT_READ_TIMEOUT);
        }
        if let Some(r) = u.retries {
            if r > up::MAX_RETRIES {
                errs.push(format!("{at}.retries = {r}: at most {}", up::MAX_RETRIES));
            }
            settings.retries = r.min(up::MAX_RETRIES);
        }
        if let Some(v) = &u.retry_timeout {
            settings.retry_timeout = duration(&format!("{at}.retry_timeout"), v, errs)
                .unwrap_or(up::DEFAULT_RETRY_TIMEOUT);
        }
        if let Some(v) = &u.ewma_decay {
            settings.ewma_decay = duration(&format!("{at}.ewma_decay"), v, errs)
                .unwrap_or(crate::load::DEFAULT_DECAY);
        }
        if let Some(v) = &u.slow_start {
            settings.slow_start = duration(&format!("{at}.slow_start"), v, errs);
        }
        if let Some(v) = &u.max_retry_after {
            settings.max_retry_after = duration(&format!("{at}.max_retry_after"), v, errs)
                .unwrap_or(crate::retry::DEFAULT_MAX_RETRY_AFTER);
        }
        if let Some(v) = &u.drain_timeout {
            settings.drain_timeout = duration(&format!("{at}.drain_timeout"), v, errs)
                .unwrap_or(up::DEFAULT_DRAIN_TIMEOUT);
        }
        let b = &mut settings.breakers;
        for (key, value, into) in [
            ("max_connections", u.max_connections, &mut b.max_connections),
            ("max_pending", u.max_pending, &mut b.max_pending),
            ("max_requests", u.max_requests, &mut b.max_requests),
            ("max_retries", u.max_retries, &mut b.max_retries),
        ] {
            if let Some(v) = value {
                match u32::try_from(v) {
                    Ok(n) if n >= 1 => *into = n,
                    _ => errs.push(format!(
                        "{at}.{key} = {v}: must be a whole number from 1 to {}",
                        u32::MAX
                    )),
                }
            }
        }
        if let Some(p) = &u.protocol {
            match crate::h2pool::UpstreamProtocol::parse(p) {
                Some(p) => settings.protocol = Some(p),
                None => errs.push(format!(
                    "{at}.protocol = {p:?}: expected {}",
                    crate::h2pool::PROTOCOL_VALUES
                )),
            }
        }
        if let Some(n) = u.retry_buffer {
            if n > crate::replay::MAX_RETRY_BUFFER as u64 {
                errs.push(format!(
                    "{at}.retry_buffer = {n}: at most {} bytes",
                    crate::replay::MAX_RETRY_BUFFER
                ));
            }
            settings.retry_buffer = n.min(crate::replay::MAX_RETRY_BUFFER as u64) as usize;
        }
        let options = Options {
            hash_on: u.hash_on.as_deref(),
            ewma_decay: settings.ewma_decay,
        };
        settings.balancer = match &u.balancer {
            Some(b) => balancer_spec(&format!("{at}.balancer"), b, &at, &options, errs),
            None => balancer_spec("", default_balancer, &at, &options, errs),
        };
        if let Some(c) = &u.checks {
            if let Some(p) = &c.passive {
                settings.passive = passive(&at, p, errs);
            }
            if let Some(a) = &c.active {
                settings.active = Some(active(&at, a, errs));
            }
        }
        settings.subset = super::subsets::upstream(&at, u, zone, errs);
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
            if !discovery::is_kind(src) {
                errs.push(format!(
                    "{at}.source = {src:?}: expected one of {}",
                    discovery::kinds().join(", ")
                ));
            }
        }
        settings.tls = u.tls;
        settings.tls_client = upstream_tls(&at, u, service.as_deref().unwrap_or(&id), errs);
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

/// The upstream's TLS setup from its `tls_*` keys, built (files read and parsed) now, when
/// `tls = true` or any `tls_*` key is set; every problem names the field, the file and the error.
fn upstream_tls(
    at: &str,
    u: &UpstreamFile,
    default_name: &str,
    errs: &mut Vec<String>,
) -> Option<ClientTls> {
    let any_key = u.tls_server_name.is_some()
        || u.tls_ca_file.is_some()
        || u.tls_cert_file.is_some()
        || u.tls_key_file.is_some();
    if u.tls != Some(true) && !any_key {
        return None;
    }
    let path = |v: &Option<String>| {
        v.as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from)
    };
    let settings = TlsSettings {
        server_name: u
            .tls_server_name
            .as_deref()
            .map(str::trim)
            .unwrap_or(default_name)
            .to_string(),
        ca_file: path(&u.tls_ca_file),
        cert_file: path(&u.tls_cert_file),
        key_file: path(&u.tls_key_file),
        // ALPN as the upstream's protocol asks (`h2`, `auto`: h2 then http/1.1).
        alpn: u
            .protocol
            .as_deref()
            .and_then(crate::h2pool::UpstreamProtocol::parse)
            .map_or_else(|| vec![ALPN_HTTP1.to_vec()], |p| p.alpn()),
    };
    match ClientTls::build(&settings) {
        Ok(t) => Some(t),
        Err(e) => {
            errs.push(format!("{at}.{e}"));
            None
        }
    }
}

/// The balancer `name` (given as `field`) with its own settings from the options of the
/// upstream at `at`. Every problem is reported naming its field and value, and round robin
/// stands in: an unknown name, an option the balancer does not read (`hash_on` for anything
/// but `chash`), an invalid option value.
fn balancer_spec(
    field: &str,
    name: &str,
    at: &str,
    options: &Options,
    errs: &mut Vec<String>,
) -> Spec {
    let name = name.trim();
    match Spec::new(name, options) {
        Ok(spec) => spec,
        Err(SpecError::Unknown { known, .. }) => {
            errs.push(format!(
                "{field}={name:?}: unknown balancer (known: {known})"
            ));
            Spec::round_robin()
        }
        Err(SpecError::NotRead {
            option: "hash_on",
            balancer,
            readers,
        }) => {
            errs.push(format!(
                "{at}.hash_on = {:?}: read only by balancer {readers}, not by {balancer:?} (set balancer = \"chash\" or remove hash_on)",
                options.hash_on.unwrap_or_default()
            ));
            Spec::round_robin()
        }
        Err(SpecError::NotRead {
            option,
            balancer,
            readers,
        }) => {
            errs.push(format!(
                "{at}.{option}: read only by balancer {readers}, not by {balancer:?}"
            ));
            Spec::round_robin()
        }
        Err(SpecError::Invalid(e)) => {
            errs.push(format!("{at}.{e}"));
            Spec::round_robin()
        }
    }
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
    if p.consecutive_gateway_failures == Some(0) {
        errs.push(format!(
            "{at}.consecutive_gateway_failures = 0: must be at least 1"
        ));
    }
    let interval = p
        .interval
        .as_ref()
        .and_then(|v| duration(&format!("{at}.interval"), v, errs))
        .unwrap_or(d.interval);
    let success_rate = match &p.success_rate {
        Some(f) if f.enabled == Some(false) => None,
        Some(f) => {
            let sr = outlier::SuccessRate::default();
            let at = format!("{at}.success_rate");
            if let Some(x) = f.stdev_factor.filter(|x| !(*x > 0.0 && x.is_finite())) {
                errs.push(format!("{at}.stdev_factor = {x}: must be greater than 0"));
            }
            Some(outlier::SuccessRate {
                minimum_hosts: at_least_one(&format!("{at}.minimum_hosts"), f.minimum_hosts, errs)
                    .unwrap_or(sr.minimum_hosts),
                request_volume: at_least_one(
                    &format!("{at}.request_volume"),
                    f.request_volume,
                    errs,
                )
                .unwrap_or(sr.request_volume),
                stdev_factor: f
                    .stdev_factor
                    .filter(|x| *x > 0.0)
                    .unwrap_or(sr.stdev_factor),
            })
        }
        None => d.success_rate.clone(),
    };
    let failure_percentage = match &p.failure_percentage {
        Some(f) if f.enabled == Some(false) => None,
        Some(f) => {
            let fp = outlier::FailurePercentage::default();
            let at = format!("{at}.failure_percentage");
            Some(outlier::FailurePercentage {
                threshold: percent(format!("{at}.threshold"), f.threshold, fp.threshold, errs),
                minimum_hosts: at_least_one(&format!("{at}.minimum_hosts"), f.minimum_hosts, errs)
                    .unwrap_or(fp.minimum_hosts),
                request_volume: at_least_one(
                    &format!("{at}.request_volume"),
                    f.request_volume,
                    errs,
                )
                .unwrap_or(fp.request_volume),
            })
        }
        None => None,
    };
    PassiveHealth {
        enabled: p.enabled.unwrap_or(true),
        consecutive_failures,
        consecutive_gateway_failures: p.consecutive_gateway_failures.filter(|n| *n > 0),
        interval,
        success_rate,
        failure_percentage,
        failure_statuses: statuses(format!("{at}.failure_statuses"), &p.failure_statuses, errs),
        failure_grpc_statuses: match &p.failure_grpc_statuses {
            None => d.failure_grpc_statuses.clone(),
            Some(codes) => {
                for c in codes.iter().filter(|&&c| c > crate::grpc::MAX_STATUS) {
                    errs.push(format!(
                        "{at}.failure_grpc_statuses: {c} is not a gRPC status code (0-{})",
                        crate::grpc::MAX_STATUS
                    ));
                }
                codes.clone()
            }
        },
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

/// A count that must be at least 1; `None` when absent or refused.
fn at_least_one(name: &str, v: Option<u32>, errs: &mut Vec<String>) -> Option<u32> {
    match v {
        Some(0) => {
            errs.push(format!("{name} = 0: must be at least 1"));
            None
        }
        v => v,
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
            .unwrap_or(active::DEFAULT_CHECK_INTERVAL),
        timeout: a
            .timeout
            .as_ref()
            .and_then(|v| duration(&format!("{at}.timeout"), v, errs))
            .unwrap_or(active::DEFAULT_CHECK_TIMEOUT),
        healthy_threshold: threshold(
            "healthy_threshold",
            a.healthy_threshold,
            active::DEFAULT_HEALTHY_THRESHOLD,
            errs,
        ),
        unhealthy_threshold: threshold(
            "unhealthy_threshold",
            a.unhealthy_threshold,
            active::DEFAULT_UNHEALTHY_THRESHOLD,
            errs,
        ),
        initially_unhealthy: a.initially_unhealthy.unwrap_or(false),
    }
}

fn routes(raw: &[RouteFile], ups: &[UpstreamConfig], errs: &mut Vec<String>) -> Vec<RouteConfig> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let at = format!("route[{i}]");
        let (upstream, headers, subset_from_header, split) =
            super::subsets::route(&at, r, ups, errs);
        let host = r.host.as_ref().map(|h| h.trim().to_ascii_lowercase());
        let path_prefix = r.path_prefix.as_ref().map(|p| p.trim().to_string());
        if let Some(p) = &path_prefix {
            if !p.starts_with('/') {
                errs.push(format!("{at}.path_prefix = {p:?}: must start with '/'"));
            }
        }
        if host.is_none() && path_prefix.is_none() && headers.is_empty() {
            errs.push(format!("{at}: give host, path_prefix or headers"));
        }
        out.push(RouteConfig {
            host,
            path_prefix,
            strip_prefix: r.strip_prefix.unwrap_or(true),
            upstream,
            headers,
            subset_from_header,
            split,
        });
    }
    out
}
