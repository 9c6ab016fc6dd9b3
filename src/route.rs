//! Routes and the routing table: what the request path reads, and how a request finds its
//! upstream (configured routes in order, or zero-config by Host / first path segment).
//!
//! The table is built off the request path (`table.rs`) and swapped whole through an
//! `ArcSwap` (`state.rs`); a request loads it once, without a lock.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, Uri};

use crate::rng::{mix64, Rng};
use crate::upstream::Upstream;

/// A configured route, as validated.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RouteConfig {
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub strip_prefix: bool,
    /// The upstream; empty when the route has a `split`.
    pub upstream: String,
    /// `headers`: every (lower-cased) name must be present with exactly this value.
    pub headers: Vec<(String, String)>,
    /// `subset_from_header`.
    pub subset_from_header: Option<HeaderRule>,
    /// `split`: upstream ids with their weights (sum > 0), instead of `upstream`.
    pub split: Vec<(String, u32)>,
}

impl RouteConfig {
    /// The upstreams the route may send to.
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        let one = (!self.upstream.is_empty()).then_some(self.upstream.as_str());
        one.into_iter()
            .chain(self.split.iter().map(|(u, _)| u.as_str()))
    }
}

/// `subset_from_header = { header = "x-version", key = "version" }`: a request with the header
/// goes to the upstream's endpoints whose metadata `key` is the header's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRule {
    /// Lower-cased header name.
    pub header: String,
    pub key: String,
}

/// A header rule, parsed for the request path.
#[derive(Debug)]
pub struct SubsetHeader {
    pub header: HeaderName,
    pub key: Box<str>,
}

/// A configured route.
#[derive(Debug, Clone)]
pub struct Route {
    pub host: Option<Box<str>>,
    pub path_prefix: Option<Box<str>>,
    pub strip_prefix: bool,
    pub upstream: Arc<str>,
    /// Headers that must match exactly.
    pub headers: Box<[(HeaderName, Box<str>)]>,
    pub subset_header: Option<Arc<SubsetHeader>>,
    /// `split`: upstream ids with cumulative weights; empty for a single upstream.
    pub split: Box<[(Arc<str>, u64)]>,
    /// Draws for splits without a hash key.
    pub rng: Arc<Rng>,
    /// A header name that did not parse (validation refuses these): the route never matches.
    dead: bool,
}

/// What the request tells routing besides Host and path: headers (for header matches and
/// header subsets), and the URI and client IP (for a split's `chash` key).
#[derive(Clone, Copy)]
pub struct RequestFacts<'r> {
    pub headers: &'r HeaderMap,
    pub uri: &'r Uri,
    pub client_ip: IpAddr,
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
    /// The route's `subset_from_header`.
    pub subset_header: Option<&'a Arc<SubsetHeader>>,
}

/// Why no upstream was found; its text is the 404 body.
#[derive(Debug, PartialEq)]
pub enum NoRoute<'a> {
    Service(&'a str),
    Nothing { path: &'a str },
}

impl RoutingTable {
    /// Finds the upstream for a request by Host and path alone (routes with header matches do
    /// not match; splits draw at random).
    pub fn resolve<'a, 'r>(
        &'a self,
        host: Option<&'r str>,
        path: &'r str,
    ) -> Result<Resolved<'a>, NoRoute<'r>> {
        self.resolve_request(host, path, None)
    }

    /// Finds the upstream for a request. Allocation-free unless the Host header has upper case.
    pub fn resolve_request<'a, 'r>(
        &'a self,
        host: Option<&'r str>,
        path: &'r str,
        facts: Option<RequestFacts<'_>>,
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
                if r.dead || r.host.as_deref().is_some_and(|h| h != host) {
                    continue;
                }
                if !r.headers.is_empty() {
                    let Some(f) = facts else { continue };
                    let all = r.headers.iter().all(|(name, want)| {
                        f.headers
                            .get(name)
                            .is_some_and(|v| v.as_bytes() == want.as_bytes())
                    });
                    if !all {
                        continue;
                    }
                }
                let strip = match &r.path_prefix {
                    Some(p) if path.starts_with(&**p) && r.strip_prefix => {
                        p.trim_end_matches('/').len()
                    }
                    Some(p) if path.starts_with(&**p) => 0,
                    Some(_) => continue,
                    None => 0,
                };
                let id = match r.split.last() {
                    Some(&(_, total)) => self.split_pick(r, total, facts),
                    None => &r.upstream,
                };
                if let Some(upstream) = self.upstreams.get(&**id) {
                    return Ok(Resolved {
                        upstream,
                        strip,
                        subset_header: r.subset_header.as_ref(),
                    });
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
            return Ok(Resolved {
                upstream,
                strip: 0,
                subset_header: None,
            });
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
                    subset_header: None,
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

impl RoutingTable {
    /// The split target for one request: by the request's hash key when a target's balancer is
    /// `chash` and the request has its key (the same user stays on one side; a reload that
    /// moves weight moves only the keys in the changed range), else a random draw.
    fn split_pick<'s>(
        &self,
        r: &'s Route,
        total: u64,
        facts: Option<RequestFacts<'_>>,
    ) -> &'s Arc<str> {
        let key = facts.and_then(|f| {
            r.split.iter().find_map(|(id, _)| {
                let up = self.upstreams.get(&**id)?;
                up.settings().balancer.key(f.headers, f.uri, f.client_ip)?
            })
        });
        let x = match key {
            Some(k) => ((u128::from(mix64(k ^ 0x0073_706c_6974)) * u128::from(total)) >> 64) as u64,
            None => r.rng.below(total as usize) as u64,
        };
        r.split
            .iter()
            .find(|(_, cum)| x < *cum)
            .map_or(&r.split[r.split.len() - 1].0, |(id, _)| id)
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
        let mut dead = false;
        let mut name = |n: &str| {
            HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| dead = true)
                .ok()
        };
        let headers = r
            .headers
            .iter()
            .filter_map(|(n, v)| Some((name(n)?, v.as_str().into())))
            .collect();
        let subset_header = r.subset_from_header.as_ref().and_then(|h| {
            Some(Arc::new(SubsetHeader {
                header: name(&h.header)?,
                key: h.key.as_str().into(),
            }))
        });
        let mut cum = 0u64;
        let split = r
            .split
            .iter()
            .filter(|(_, w)| *w > 0)
            .map(|(id, w)| {
                cum += u64::from(*w);
                (Arc::from(id.as_str()), cum)
            })
            .collect();
        Route {
            host: r.host.as_deref().map(Into::into),
            path_prefix: r.path_prefix.as_deref().map(Into::into),
            strip_prefix: r.strip_prefix,
            upstream: r.upstream.as_str().into(),
            headers,
            subset_header,
            split,
            rng: Arc::new(Rng::from_entropy()),
            dead,
        }
    }
}
