//! Routes and the routing table: what the request path reads, and how a request finds its
//! upstream (configured routes in order, or zero-config by Host / first path segment).
//!
//! The table is built off the request path (`table.rs`) and swapped whole through an
//! `ArcSwap` (`state.rs`); a request loads it once, without a lock.
use std::collections::HashMap;
use std::sync::Arc;

use crate::upstream::Upstream;

/// A configured route, as validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub strip_prefix: bool,
    pub upstream: String,
}

/// A configured route.
#[derive(Debug, Clone)]
pub struct Route {
    pub host: Option<Box<str>>,
    pub path_prefix: Option<Box<str>>,
    pub strip_prefix: bool,
    pub upstream: Arc<str>,
}

/// What the request path reads: every upstream by id, and the routes.
#[derive(Default)]
pub struct RoutingTable {
    pub upstreams: HashMap<Arc<str>, Arc<Upstream>>,
    /// Configured routes, in order. Empty: zero-config routing by service name.
    pub routes: Box<[Route]>,
    /// Lower-cased suffix (with its leading dot) ignored at the end of Host headers.
    pub domain_suffix: Option<Box<str>>,
}

/// The upstream a request goes to and the path prefix to strip.
pub struct Resolved<'a> {
    pub upstream: &'a Arc<Upstream>,
    /// Bytes of the path to drop before forwarding.
    pub strip: usize,
}

/// Why no upstream was found; its text is the 404 body.
#[derive(Debug, PartialEq)]
pub enum NoRoute<'a> {
    Service(&'a str),
    Nothing { path: &'a str },
}

impl RoutingTable {
    /// Finds the upstream for a request. Allocation-free unless the Host header has upper case.
    pub fn resolve<'a, 'r>(
        &'a self,
        host: Option<&'r str>,
        path: &'r str,
    ) -> Result<Resolved<'a>, NoRoute<'r>> {
        let host = host.map(strip_port).unwrap_or("");
        let orig = host;
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        if !self.routes.is_empty() {
            for r in self.routes.iter() {
                if r.host.as_deref().is_some_and(|h| h != host) {
                    continue;
                }
                let strip = match &r.path_prefix {
                    Some(p) if path.starts_with(&**p) && r.strip_prefix => {
                        p.trim_end_matches('/').len()
                    }
                    Some(p) if path.starts_with(&**p) => 0,
                    Some(_) => continue,
                    None => 0,
                };
                if let Some(upstream) = self.upstreams.get(&*r.upstream) {
                    return Ok(Resolved { upstream, strip });
                }
            }
            return Err(NoRoute::Nothing { path });
        }
        // Zero-config: Host names the service (domain suffix ignored), else the first path
        // segment does and is stripped.
        let name = match &self.domain_suffix {
            Some(s) => host.strip_suffix(&**s).unwrap_or(host),
            None => host,
        };
        if let Some(upstream) = self.upstreams.get(name) {
            return Ok(Resolved { upstream, strip: 0 });
        }
        let seg = path
            .strip_prefix('/')
            .and_then(|rest| rest.split(['/', '?']).next())
            .unwrap_or("");
        if !seg.is_empty() {
            if let Some(upstream) = self.upstreams.get(seg) {
                return Ok(Resolved {
                    upstream,
                    strip: 1 + seg.len(),
                });
            }
        }
        let host_is_name =
            !name.is_empty() && name != "localhost" && name.parse::<std::net::IpAddr>().is_err();
        if host_is_name {
            // `name` may borrow the lower-cased copy; lower-casing keeps byte lengths, so the
            // same prefix of the original names it.
            return Err(NoRoute::Service(&orig[..name.len()]));
        }
        if !seg.is_empty() {
            return Err(NoRoute::Service(seg));
        }
        Err(NoRoute::Nothing { path })
    }
}

impl std::fmt::Display for NoRoute<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoRoute::Service(s) => writeln!(f, "edge-agent: no service named {s:?}"),
            NoRoute::Nothing { path } => writeln!(
                f,
                "edge-agent: no route for path {path:?}; name a service by Host header or /<service>/ path"
            ),
        }
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

impl From<&RouteConfig> for Route {
    fn from(r: &RouteConfig) -> Self {
        Route {
            host: r.host.as_deref().map(Into::into),
            path_prefix: r.path_prefix.as_deref().map(Into::into),
            strip_prefix: r.strip_prefix,
            upstream: r.upstream.as_str().into(),
        }
    }
}
