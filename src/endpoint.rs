//! Endpoints: one instance of an upstream as the request path sees it, the state it keeps
//! across routing-table rebuilds, and the [`Attempt`] guard through which every try feeds back.
//!
//! Per-endpoint state ([`EndpointState`]: in-flight count, counters, latency estimate, health
//! verdicts, pooled connections) lives behind an `Arc` keyed by endpoint identity and is handed
//! from one table to the next, so a registry change that adds one instance leaves the others'
//! state, and their pooled connections (`pool.rs`), untouched.
//!
//! Feedback goes through one place: [`Attempt::start`] counts the try in flight;
//! [`Attempt::finish`] records its latency into the EWMA, its outcome into passive health and
//! the failure counter, and hands back the in-flight guard for the response body to hold;
//! dropping an unfinished attempt (a cancelled request) records nothing and releases the count
//! (tower's `load::peak_ewma` records on a handle the same way). A try whose outcome is only
//! known at the end of its response body (a gRPC status in trailers after the messages) is
//! [`Attempt::defer`]red instead: the body records it through [`Deferred::finish`] when the
//! trailers come, with the same code path. A balancer that needs feedback
//! reads this state and never touches the proxy.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use discovery::Instance;
use http::uri::Authority;

use crate::clock;
use crate::h2pool::{H2Pool, UpstreamProtocol};
use crate::health::passive::{self, PassiveHealth, Verdict};
use crate::health::{Health, Outcome};
use crate::load::PeakEwma;
use crate::metrics::UpstreamMetrics;
use crate::pool::{ConnPool, Drain};
use crate::rng::Rng;

/// State of one endpoint that outlives routing tables.
#[derive(Debug)]
pub struct EndpointState {
    in_flight: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    /// Latency estimate (for the `ewma` balancer and the admin API).
    pub ewma: PeakEwma,
    /// Passive and active health verdicts.
    pub health: Health,
    /// Idle keep-alive connections to the endpoint.
    pub pool: ConnPool,
    /// HTTP/2 connections to the endpoint (`h2pool.rs`).
    pub h2: H2Pool,
    /// Its drain when the registry removes it or marks it unhealthy (`pool::Drain`).
    pub drain: Arc<Drain>,
}

impl Default for EndpointState {
    fn default() -> Self {
        EndpointState::new(Health::default())
    }
}

impl EndpointState {
    pub fn new(health: Health) -> Self {
        let drain = Arc::new(Drain::default());
        EndpointState {
            in_flight: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ewma: PeakEwma::default(),
            health,
            pool: ConnPool::with_drain(drain.clone()),
            h2: H2Pool::with_drain(drain.clone()),
            drain,
        }
    }

    /// Starts draining the endpoint (see `pool::Drain`): its idle connections close now; what
    /// is busy closes after `timeout`, unless the drain ends first. Nothing to do when it is
    /// draining already.
    pub fn begin_drain(&self, timeout: std::time::Duration) {
        let Some(generation) = self.drain.begin() else {
            return;
        };
        self.pool.close_idle();
        self.h2.close_idle();
        // Nothing busy: nothing to time out.
        if self.in_flight() == 0 && self.h2.connections() == 0 {
            return;
        }
        let drain = self.drain.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if drain.expire(generation) {
                tracing::info!(
                    after_ms = timeout.as_millis() as u64,
                    "drain timeout: closing what is left"
                );
            }
        });
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
}

/// Counts one request in flight on an endpoint until dropped, so a cancelled request cannot
/// leak a count.
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>);

impl InFlight {
    /// The drain of the endpoint this request is in flight to.
    pub fn drain(&self) -> &Drain {
        &self.0.drain
    }

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

/// What a finished try reports to, besides the endpoint: the upstream's identity, its endpoints
/// (for the ejection cap), its passive-health settings, the EWMA decay and its metrics.
pub struct Feedback<'a> {
    pub upstream: &'a str,
    pub endpoints: &'a [Endpoint],
    pub passive: &'a PassiveHealth,
    pub decay: Duration,
    pub metrics: &'a UpstreamMetrics,
}

/// One try at an endpoint. Counts in flight from [`Attempt::start`]; [`Attempt::finish`]
/// records the outcome; dropped unfinished, it records nothing.
pub struct Attempt<'a> {
    ep: &'a Endpoint,
    feedback: &'a Feedback<'a>,
    started: Instant,
    in_flight: InFlight,
}

impl<'a> Attempt<'a> {
    /// A try starting at `now` (the caller's clock read, shared with its deadline).
    pub fn start(ep: &'a Endpoint, feedback: &'a Feedback<'a>, now: Instant) -> Self {
        Attempt {
            ep,
            feedback,
            started: now,
            in_flight: InFlight::start(&ep.state),
        }
    }

    /// Records the try's latency and outcome and returns the in-flight guard, which the
    /// response body holds until it is done.
    pub fn finish(self, outcome: Outcome) -> InFlight {
        let now = Instant::now();
        record(
            &self.ep.state,
            &self.ep.authority,
            self.feedback,
            now.saturating_duration_since(self.started),
            clock::ms_at(now),
            outcome,
        );
        self.in_flight
    }

    /// Ends the try's wait for its answer without recording it yet: its outcome comes with
    /// the end of the response body (a gRPC call's `grpc-status` in its trailers, after the
    /// messages). The latency recorded later is this one, the answer's head. The in-flight
    /// guard is returned for the body to hold; [`Deferred::finish`] records against it.
    pub fn defer(self) -> (InFlight, Deferred) {
        let deferred = Deferred {
            authority: self.ep.authority.clone(),
            rtt: self.started.elapsed(),
        };
        (self.in_flight, deferred)
    }
}

/// A try whose answer has begun but whose outcome is not known yet ([`Attempt::defer`]).
/// Dropped unfinished (the client went away, the body was cut), it records nothing, like an
/// unfinished [`Attempt`].
#[derive(Debug)]
pub struct Deferred {
    authority: Authority,
    rtt: Duration,
}

impl Deferred {
    /// Records `outcome` for the try counted by `in_flight` (the guard [`Attempt::defer`]
    /// returned), with the latency of its answer's head.
    pub fn finish(self, in_flight: &InFlight, outcome: Outcome, feedback: &Feedback<'_>) {
        let now = clock::now_ms();
        record(
            &in_flight.0,
            &self.authority,
            feedback,
            self.rtt,
            now,
            outcome,
        );
    }
}

/// The one place a try's outcome is written: latency into the EWMA, the failure counter,
/// passive health (and its log lines and ejection metric).
fn record(
    state: &EndpointState,
    authority: &Authority,
    fb: &Feedback<'_>,
    rtt: Duration,
    now: u64,
    outcome: Outcome,
) {
    match outcome {
        Outcome::Success => state.ewma.observe(rtt, now, fb.decay),
        Outcome::Failure | Outcome::GatewayFailure => {
            state.failures.fetch_add(1, Ordering::Relaxed);
            state.ewma.failure(rtt, now, fb.decay);
        }
        Outcome::Backoff(d) => {
            tracing::debug!(upstream = fb.upstream, endpoint = %authority, for_ms = d.as_millis() as u64, "endpoint backs off (rate limited)");
        }
    }
    let share = || ejected_share(fb.endpoints);
    match passive::record(&state.health, fb.passive, outcome, now, share) {
        Verdict::Noted => {}
        Verdict::Capped { failures } => {
            tracing::debug!(upstream = fb.upstream, endpoint = %authority, failures, "not ejected: max_ejection_percent reached");
        }
        Verdict::Ejected {
            detector,
            failures,
            nth,
            time,
        } => {
            fb.metrics.ejection();
            tracing::warn!(upstream = fb.upstream, endpoint = %authority, detector = detector.name(), failures, ejection = nth, for_ms = time.as_millis() as u64, "endpoint ejected");
        }
    }
}

/// One endpoint in a routing table.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub id: Arc<str>,
    pub authority: Authority,
    pub weight: u32,
    /// The registry's view of health (not the agent's: see [`Endpoint::available`]).
    pub healthy: bool,
    pub zone: Option<Arc<str>>,
    /// The instance's metadata as its registry adapter mapped it (what subsets select on).
    pub metadata: Arc<BTreeMap<String, String>>,
    /// The registry says the instance speaks TLS ([`registry_says_tls`]); an upstream's `tls`
    /// key, when set, overrides it.
    pub tls_hint: bool,
    /// Kind of the source it came from (`file`, `consul`, … or `static`).
    pub source: &'static str,
    pub state: Arc<EndpointState>,
    /// The protocol the registry gives for the instance (`protocol` metadata); the upstream's
    /// `protocol` setting wins over it.
    pub protocol: Option<UpstreamProtocol>,
    /// The authority's port, and where its host part lies in it, kept so [`Endpoint::is`] does
    /// not parse the authority (it runs for every endpoint of a changed upstream).
    port: u16,
    host_at: (u16, u16),
}

/// Why an instance cannot be an endpoint.
#[derive(Debug, thiserror::Error)]
#[error("instance {id:?}: address {address:?} is not a valid host:port")]
pub struct BadAddress {
    pub id: String,
    pub address: String,
    /// The parse error; `None` when it parsed but names no host.
    #[source]
    pub source: Option<http::uri::InvalidUri>,
}

impl Endpoint {
    /// The endpoint for `inst`, or why its address cannot be dialled. Adapters validate
    /// addresses where instances enter; this is the last check, so a bad one is never an
    /// endpoint.
    pub fn from_instance(
        inst: &Instance,
        source: &'static str,
        state: Arc<EndpointState>,
    ) -> Result<Self, BadAddress> {
        let address = inst.authority();
        let bad = |source| BadAddress {
            id: inst.id.clone(),
            address: address.clone(),
            source,
        };
        let authority = Authority::try_from(address.as_str()).map_err(|e| bad(Some(e)))?;
        if authority.host().is_empty() {
            return Err(bad(None));
        }
        let port = authority.port_u16().unwrap_or(0);
        // `host()` is a slice of `as_str()` (after any user info). An authority longer than u16
        // (no DNS name is) reads as an empty host: never the same endpoint.
        let (all, host) = (authority.as_str(), authority.host());
        let start = host.as_ptr() as usize - all.as_ptr() as usize;
        let host_at = match (u16::try_from(start), u16::try_from(start + host.len())) {
            (Ok(a), Ok(b)) => (a, b),
            _ => (0, 0),
        };
        Ok(Endpoint {
            port,
            host_at,
            id: inst.id.as_str().into(),
            authority,
            weight: inst.weight,
            healthy: inst.healthy,
            zone: inst.zone.as_deref().map(Into::into),
            metadata: metadata_of(inst),
            tls_hint: registry_says_tls(inst),
            source,
            state,
            protocol: UpstreamProtocol::from_metadata(&inst.metadata),
        })
    }

    /// The same endpoint (same state) with `inst`'s attributes (weight, health, zone, metadata,
    /// source);
    /// `inst` must be this endpoint's instance ([`Endpoint::is`]).
    pub fn with_attributes_of(&self, inst: &Instance, source: &'static str) -> Self {
        Endpoint {
            id: inst.id.as_str().into(),
            weight: inst.weight,
            healthy: inst.healthy,
            zone: inst.zone.as_deref().map(Into::into),
            metadata: metadata_of(inst),
            tls_hint: registry_says_tls(inst),
            source,
            protocol: UpstreamProtocol::from_metadata(&inst.metadata),
            ..self.clone()
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

    /// Whether source, weight, health, zone and metadata are the instance's: with [`Endpoint::is`],
    /// whether `from_instance(inst, source, _)` would build this very endpoint.
    pub fn has_attributes_of(&self, inst: &Instance, source: &'static str) -> bool {
        self.source == source
            && self.weight == inst.weight
            && self.healthy == inst.healthy
            && self.zone.as_deref() == inst.zone.as_deref()
            && *self.metadata == inst.metadata
            && self.tls_hint == registry_says_tls(inst)
    }

    /// Whether the endpoint may take traffic as far as the registry and the agent's health
    /// checks are concerned (slow start aside).
    pub fn available(&self) -> bool {
        self.healthy && self.weight > 0 && self.state.health.is_up()
    }

    /// Whether a balancer may pick the endpoint now: registry-healthy with weight, up by the
    /// agent's checks and not backing off after a 429 (unless the upstream is in `panic` mode:
    /// then all of them), and admitted by slow start
    /// (a draw from `rng` against the ramp's factor).
    #[inline]
    pub fn usable(
        &self,
        panic: bool,
        now_ms: u64,
        slow_start: Option<Duration>,
        rng: &Rng,
    ) -> bool {
        self.healthy
            && self.weight > 0
            && (panic || (self.state.health.is_up() && !self.state.health.backed_off(now_ms)))
            && (self.state.health.joined_ms == 0 || self.admitted(now_ms, slow_start, rng))
    }

    fn admitted(&self, now_ms: u64, slow_start: Option<Duration>, rng: &Rng) -> bool {
        let f = self.state.health.slow_start_factor(now_ms, slow_start);
        f >= 1.0 || rng.unit() < f
    }
}

/// The instance's metadata, shared: every endpoint without metadata points at one empty map.
fn metadata_of(inst: &Instance) -> Arc<BTreeMap<String, String>> {
    static EMPTY: OnceLock<Arc<BTreeMap<String, String>>> = OnceLock::new();
    if inst.metadata.is_empty() {
        EMPTY.get_or_init(Default::default).clone()
    } else {
        Arc::new(inst.metadata.clone())
    }
}

/// Instance metadata keys whose true value (`true`, `1`, `yes`, any case) says the instance
/// speaks TLS: Consul `Service.Meta`, Nacos and Eureka instance metadata, the file registry's
/// `metadata`. The Eureka adapter sets `secure = "true"` itself when it dials the instance's
/// `securePort` (only that port enabled).
pub const TLS_METADATA_KEYS: [&str; 2] = ["secure", "https"];
/// Consul tags (the adapter's comma-joined `tags` metadata) that say the instance speaks TLS.
pub const TLS_TAGS: [&str; 2] = ["secure", "https"];

/// Whether the registry says `inst` speaks TLS (see [`TLS_METADATA_KEYS`], [`TLS_TAGS`]).
pub fn registry_says_tls(inst: &Instance) -> bool {
    if inst.metadata.is_empty() {
        return false;
    }
    let truthy = |v: &str| {
        let v = v.trim();
        v == "1" || v.eq_ignore_ascii_case("true") || v.eq_ignore_ascii_case("yes")
    };
    TLS_METADATA_KEYS
        .iter()
        .any(|k| inst.metadata.get(*k).is_some_and(|v| truthy(v)))
        || inst.metadata.get("tags").is_some_and(|tags| {
            tags.split(',')
                .any(|t| TLS_TAGS.iter().any(|x| t.trim().eq_ignore_ascii_case(x)))
        })
}

/// (endpoints ejected now, endpoints in all): what `max_ejection_percent` is checked against.
pub fn ejected_share(endpoints: &[Endpoint]) -> (usize, usize) {
    let ejected = endpoints
        .iter()
        .filter(|e| e.state.health.ejected())
        .count();
    (ejected, endpoints.len())
}

/// How many endpoints are available and how many not, for `edge_agent_endpoints`.
pub fn count_states(endpoints: &[Endpoint]) -> (usize, usize) {
    let available = endpoints.iter().filter(|e| e.available()).count();
    (available, endpoints.len() - available)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(inst: &Instance) -> Endpoint {
        let state = Arc::new(EndpointState::new(Health::new(false, 0)));
        Endpoint::from_instance(inst, "file", state).unwrap()
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

    /// Defect 1 of #12: an address `Authority` rejects became `invalid.invalid:1`, an endpoint
    /// shown healthy and given traffic. Now it is refused, naming the instance and the address.
    #[test]
    fn an_undiallable_address_is_no_endpoint() {
        for bad in ["foo bar", "é.example", ""] {
            let mut inst = Instance::new(bad, 80);
            inst.id = "i-1".into();
            let err = Endpoint::from_instance(&inst, "consul", Default::default()).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("i-1") && msg.contains(bad), "{msg}");
        }
    }

    #[test]
    fn registry_tls_hints() {
        let with = |k: &str, v: &str| {
            let mut i = Instance::new("127.0.0.1", 1);
            i.metadata.insert(k.into(), v.into());
            registry_says_tls(&i)
        };
        assert!(with("secure", "true") && with("https", "1") && with("secure", " YES "));
        assert!(!with("secure", "false") && !with("https", "") && !with("tls", "true"));
        assert!(with("tags", "v2, https") && with("tags", "secure"));
        assert!(!with("tags", "v2,insecure"));
        assert!(!registry_says_tls(&Instance::new("127.0.0.1", 1)));
    }

    #[test]
    fn slow_start_admission_draws_from_the_given_rng() {
        let state = Arc::new(EndpointState::new(Health::new(false, 1_000)));
        let ep = Endpoint::from_instance(&Instance::new("127.0.0.1", 1), "file", state).unwrap();
        let window = Some(Duration::from_secs(10));
        let admitted = |seed| {
            let rng = Rng::new(seed);
            (0..10_000)
                .filter(|_| ep.usable(false, 1_000, window, &rng))
                .count()
        };
        // Same seed, same admissions; about SLOW_START_MIN_SHARE of them at the ramp's start.
        assert_eq!(admitted(7), admitted(7));
        let share = admitted(7) as f64 / 10_000.0;
        assert!(
            (share - crate::health::SLOW_START_MIN_SHARE).abs() < 0.02,
            "{share}"
        );
        assert!(ep.usable(false, 11_000, window, &Rng::new(1)), "ramp over");
    }

    fn feedback<'a>(
        endpoints: &'a [Endpoint],
        passive: &'a PassiveHealth,
        metrics: &'a UpstreamMetrics,
    ) -> Feedback<'a> {
        Feedback {
            upstream: "u",
            endpoints,
            passive,
            decay: crate::load::DEFAULT_DECAY,
            metrics,
        }
    }

    #[test]
    fn an_attempt_records_on_finish_and_nothing_when_dropped() {
        let eps: Vec<Endpoint> = (1..=4)
            .map(|p| endpoint(&Instance::new("127.0.0.1", p)))
            .collect();
        let passive = PassiveHealth {
            consecutive_failures: 2,
            ..Default::default()
        };
        let metrics = UpstreamMetrics::new("u");
        let fb = feedback(&eps, &passive, &metrics);
        let ep = &eps[0];
        let a = Attempt::start(ep, &fb, Instant::now());
        assert_eq!(ep.state.in_flight(), 1);
        drop(a);
        assert_eq!(
            ep.state.in_flight(),
            0,
            "a cancelled try releases its count"
        );
        assert_eq!(ep.state.failures(), 0, "and records nothing");
        assert_eq!(ep.state.ewma.value_ns(clock::now_ms(), fb.decay), 0.0);

        let guard = Attempt::start(ep, &fb, Instant::now()).finish(Outcome::Failure);
        assert_eq!(ep.state.in_flight(), 1, "the body holds the count");
        drop(guard);
        assert_eq!((ep.state.in_flight(), ep.state.failures()), (0, 1));
        assert!(ep.state.ewma.value_ns(clock::now_ms(), fb.decay) > 0.0);
        drop(Attempt::start(ep, &fb, Instant::now()).finish(Outcome::Failure));
        assert!(ep.state.health.ejected(), "two failures in a row eject");
        assert_eq!(ep.state.requests(), 3);
    }

    #[test]
    fn a_deferred_attempt_records_when_finished_and_nothing_when_dropped() {
        let eps: Vec<Endpoint> = (1..=4)
            .map(|p| endpoint(&Instance::new("127.0.0.1", p)))
            .collect();
        let passive = PassiveHealth {
            consecutive_failures: 2,
            ..Default::default()
        };
        let metrics = UpstreamMetrics::new("u");
        let fb = feedback(&eps, &passive, &metrics);
        let ep = &eps[0];
        let (guard, deferred) = Attempt::start(ep, &fb, Instant::now()).defer();
        assert_eq!(ep.state.in_flight(), 1);
        drop(deferred);
        drop(guard);
        assert_eq!((ep.state.in_flight(), ep.state.failures()), (0, 0));
        // Two deferred failures in a row eject, as two finished ones do: nothing in between
        // counted the tries as successes.
        for _ in 0..2 {
            let (guard, deferred) = Attempt::start(ep, &fb, Instant::now()).defer();
            deferred.finish(&guard, Outcome::Failure, &fb);
            assert_eq!(ep.state.in_flight(), 1, "the body still holds the count");
        }
        assert_eq!((ep.state.in_flight(), ep.state.failures()), (0, 2));
        assert!(ep.state.health.ejected());
    }
}
