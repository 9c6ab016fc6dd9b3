//! Upstreams and the routing table: the immutable snapshot the request path reads.
//!
//! The table is built off the request path by the cache (`cache.rs`) and swapped whole through
//! an `ArcSwap`; a request loads it once, without a lock. Per-endpoint state
//! ([`EndpointState`]: in-flight count and counters) lives behind an `Arc` keyed by endpoint
//! identity and is handed from one snapshot to the next, so a registry change that adds one
//! instance leaves the others' state, and their pooled connections (`pool.rs`), untouched.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use discovery::Instance;
use http::uri::Authority;

use crate::balancer::ewma::PeakEwma;
use crate::balancer::{Balancer, Candidates, PickContext};
use crate::config::UpstreamSettings;
use crate::health::Health;
use crate::metrics::UpstreamMetrics;
use crate::pool::ConnPool;

/// State of one endpoint that outlives snapshots.
#[derive(Debug, Default)]
pub struct EndpointState {
    in_flight: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    /// Latency estimate for the `ewma` balancer.
    pub ewma: PeakEwma,
    /// Passive and active health verdicts.
    pub health: Health,
    /// Idle keep-alive connections to the endpoint.
    pub pool: ConnPool,
}

impl EndpointState {
    pub fn new(health: Health) -> Self {
        EndpointState {
            health,
            ..Default::default()
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
    pub fn record_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts one request in flight on an endpoint until dropped, so a cancelled request cannot
/// leak a count.
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>);

impl InFlight {
    pub fn start(state: &Arc<EndpointState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(state))
    }

    /// The endpoint's state.
    pub fn state(&self) -> &EndpointState {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One endpoint in a snapshot.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub id: Arc<str>,
    pub authority: Authority,
    pub weight: u32,
    /// The registry's view of health.
    pub healthy: bool,
    pub zone: Option<Arc<str>>,
    /// Kind of the source it came from (`file`, `consul`, … or `static`).
    pub source: &'static str,
    pub state: Arc<EndpointState>,
    /// The authority's port, and where its host part lies in it, kept so [`Endpoint::is`] does
    /// not parse the authority (it runs for every endpoint of a changed upstream).
    port: u16,
    host_at: (u16, u16),
}

impl Endpoint {
    pub fn from_instance(inst: &Instance, source: &'static str, state: Arc<EndpointState>) -> Self {
        let authority = Authority::try_from(inst.authority().as_str())
            .unwrap_or_else(|_| Authority::from_static("invalid.invalid:1"));
        let port = authority.port_u16().unwrap_or(0);
        // `host()` is a slice of `as_str()` (after any user info). An authority longer than u16
        // (no DNS name is) reads as an empty host: never the same endpoint.
        let (all, host) = (authority.as_str(), authority.host());
        let start = host.as_ptr() as usize - all.as_ptr() as usize;
        let host_at = match (u16::try_from(start), u16::try_from(start + host.len())) {
            (Ok(a), Ok(b)) => (a, b),
            _ => (0, 0),
        };
        Endpoint {
            port,
            host_at,
            id: inst.id.as_str().into(),
            authority,
            weight: inst.weight,
            healthy: inst.healthy,
            zone: inst.zone.as_deref().map(Into::into),
            source,
            state,
        }
    }

    /// The authority's host part (`[…]` kept for IPv6), as `Authority::host` gives it.
    fn host(&self) -> &str {
        let (a, b) = self.host_at;
        self.authority
            .as_str()
            .get(usize::from(a)..usize::from(b))
            .unwrap_or("")
    }

    /// Whether this endpoint is the instance's: same id and address (its state belongs to it).
    pub fn is(&self, inst: &Instance) -> bool {
        fn bare(h: &str) -> &str {
            h.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(h)
        }
        self.port == inst.port && *self.id == *inst.id && bare(self.host()) == bare(&inst.addr)
    }

    /// Whether source, weight, health and zone are the instance's: with [`Endpoint::is`],
    /// whether `from_instance(inst, source, _)` would build this very endpoint.
    pub fn has_attributes_of(&self, inst: &Instance, source: &'static str) -> bool {
        self.source == source
            && self.weight == inst.weight
            && self.healthy == inst.healthy
            && self.zone.as_deref() == inst.zone.as_deref()
    }

    /// Whether the endpoint may take traffic as far as the registry and the agent's health
    /// checks are concerned (slow start aside).
    pub fn available(&self) -> bool {
        self.healthy && self.weight > 0 && self.state.health.is_up()
    }

    /// Whether a balancer may pick the endpoint for this request: registry-healthy with weight,
    /// up by the agent's checks (unless the upstream is in panic mode), and admitted by slow
    /// start.
    #[inline]
    pub fn usable(&self, ctx: &PickContext) -> bool {
        self.healthy
            && self.weight > 0
            && (ctx.panic || self.state.health.is_up())
            && (self.state.health.joined_ms == 0 || self.admitted(ctx))
    }

    fn admitted(&self, ctx: &PickContext) -> bool {
        let f = self
            .state
            .health
            .slow_start_factor(ctx.now_ms, ctx.slow_start);
        f >= 1.0 || rand::random::<f64>() < f
    }
}

/// What an upstream keeps across snapshots: its settings, metric handles and counters.
/// Replaced only when its settings change (connection pools live with the endpoints).
pub struct UpstreamRuntime {
    pub settings: UpstreamSettings,
    pub metrics: UpstreamMetrics,
    /// Panic mode (set by the health sweeper).
    pub panic: AtomicBool,
    /// Requests routed to the upstream (tells on-demand sources it is in use).
    pub requests: AtomicU64,
    /// Retry budget, in hundredths of a retry (see `proxy`).
    pub retry_tokens: AtomicI64,
}

/// One upstream in a snapshot.
pub struct Upstream {
    pub id: Arc<str>,
    /// Discovery service name, `None` for static nodes.
    pub service: Option<Arc<str>>,
    pub runtime: Arc<UpstreamRuntime>,
    pub endpoints: Box<[Endpoint]>,
    pub balancer: Box<dyn Balancer>,
    /// When the endpoint set last changed.
    pub updated_at: SystemTime,
}

impl Upstream {
    pub fn candidates(&self, ctx: PickContext) -> Candidates<'_> {
        Candidates::new(self.balancer.as_ref(), &self.endpoints, ctx)
    }

    pub fn settings(&self) -> &UpstreamSettings {
        &self.runtime.settings
    }
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
pub struct Table {
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

impl Table {
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

/// How many endpoints are in each state, for `edge_agent_endpoints`.
pub fn count_states(endpoints: &[Endpoint]) -> (usize, usize) {
    let healthy = endpoints.iter().filter(|e| e.available()).count();
    (healthy, endpoints.len() - healthy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(inst: &Instance) -> Endpoint {
        let state = Arc::new(EndpointState::new(crate::health::Health::new(false, 0)));
        Endpoint::from_instance(inst, "file", state)
    }

    #[test]
    fn identity_is_id_host_and_port_with_or_without_ipv6_brackets() {
        let v4 = Instance::new("127.0.0.1", 8080);
        let ep = endpoint(&v4);
        assert!(ep.is(&v4));
        assert!(!ep.is(&Instance::new("127.0.0.1", 8081)), "port");
        let mut other_host = Instance::new("127.0.0.2", 8080);
        other_host.id = v4.id.clone();
        assert!(!ep.is(&other_host), "host");
        let mut other_id = v4.clone();
        other_id.id = "x".into();
        assert!(!ep.is(&other_id), "id");

        let v6 = Instance::new("::1", 9000);
        let ep6 = endpoint(&v6);
        assert_eq!(ep6.authority.as_str(), "[::1]:9000");
        assert!(ep6.is(&v6));
        let mut bracketed = v6.clone();
        bracketed.addr = "[::1]".into();
        assert!(ep6.is(&bracketed), "the same address written with brackets");
        for (e, i) in [(&ep, &v4), (&ep6, &v6)] {
            assert_eq!(e.host(), e.authority.host(), "{i:?}");
        }
    }
}
