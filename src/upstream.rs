//! Upstreams: a set of endpoints with a balancer and settings, as one routing table holds it,
//! and what an upstream keeps across tables ([`UpstreamRuntime`]).
//!
//! An upstream's settings are its own: timeouts, retries, the balancer's [`Spec`], passive and
//! active health, slow start. `config/` parses into these types; the defaults are named here
//! (or in the module that owns the setting: `health::passive`, `health::active`, `load`).
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use crate::balancer::{Balancer, Candidates, PickContext, Spec};
use crate::breaker::{CircuitBreakers, Gate};
use crate::endpoint::{Endpoint, Feedback};
use crate::health::active::ActiveHealth;
use crate::health::passive::PassiveHealth;
use crate::metrics::UpstreamMetrics;
use crate::retry::RetryBudget;
use crate::rng::Rng;
use crate::stats::Stats;
use crate::subset::{Picks, SubsetSettings, Subsets, Unavailable};
use crate::tls::{ClientTls, TlsSettings, ALPN_HTTP1};

/// How long an upstream may take to accept a TCP connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an upstream may take to send response headers.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Extra tries after a failed one (see `retry.rs`).
pub const DEFAULT_RETRIES: u32 = 1;
/// Budget for all tries of one request.
pub const DEFAULT_RETRY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long requests and tunnels to an endpoint the registry removed (or marks unhealthy) may
/// go on before what is left is closed (`drain_timeout`, `pool::Drain`).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for `retries`: more is a retry storm, not resilience.
pub const MAX_RETRIES: u32 = 10;

/// Per-upstream behaviour; zero-config upstreams use [`UpstreamSettings::with_balancer`].
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub balancer: Spec,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub retries: u32,
    /// Budget for all tries of one request together.
    pub retry_timeout: Duration,
    /// How fast the endpoints' latency estimates forget (`load.rs`).
    pub ewma_decay: Duration,
    pub slow_start: Option<Duration>,
    /// Longest back-off a 429's or 503's `Retry-After` may impose on an endpoint.
    pub max_retry_after: Duration,
    /// How long a removed endpoint's requests and tunnels may finish (`drain_timeout`).
    pub drain_timeout: Duration,
    pub breakers: CircuitBreakers,
    pub passive: PassiveHealth,
    pub active: Option<ActiveHealth>,
    /// The `tls` key: `Some(true)` every endpoint is dialled with TLS, `Some(false)` none is,
    /// `None` (unset) the registry decides per instance (`endpoint::registry_says_tls`).
    pub tls: Option<bool>,
    /// The TLS setup built from the `tls_*` keys (when `tls = true` or any `tls_*` key is
    /// set); `None`: endpoints the registry marks as TLS get [`UpstreamRuntime::default_tls`].
    pub tls_client: Option<ClientTls>,
    /// `subset`, `fallback`, `zone_aware`, `zone_min_share` (`subset.rs`, `zone.rs`).
    pub subset: SubsetSettings,
    /// How the endpoints are spoken to (`protocol`); `None`: as the registry says, else HTTP/1.1.
    pub protocol: Option<crate::h2pool::UpstreamProtocol>,
    /// Largest request body kept to be replayed on a retry (`retry_buffer`, bytes).
    pub retry_buffer: usize,
}

impl UpstreamSettings {
    pub fn with_balancer(balancer: Spec) -> Self {
        UpstreamSettings {
            balancer,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            retries: DEFAULT_RETRIES,
            retry_timeout: DEFAULT_RETRY_TIMEOUT,
            ewma_decay: crate::load::DEFAULT_DECAY,
            slow_start: None,
            max_retry_after: crate::retry::DEFAULT_MAX_RETRY_AFTER,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            breakers: CircuitBreakers::default(),
            passive: PassiveHealth::default(),
            active: None,
            tls: None,
            tls_client: None,
            subset: SubsetSettings::default(),
            protocol: None,
            retry_buffer: crate::replay::DEFAULT_RETRY_BUFFER,
        }
    }
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        UpstreamSettings::with_balancer(Spec::round_robin())
    }
}

/// A configured upstream.
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

/// What an upstream keeps across routing tables: its settings, metric handles and counters.
/// Replaced only when its settings change (connection pools live with the endpoints).
pub struct UpstreamRuntime {
    pub settings: UpstreamSettings,
    pub metrics: UpstreamMetrics,
    /// Panic mode (set by the health sweeper, `checks.rs`).
    pub panic: AtomicBool,
    /// When the interval outlier detectors next run (`checks.rs`), in `clock::now_ms` time; 0
    /// until the sweeper first sees the upstream.
    pub outliers_due_ms: AtomicU64,
    /// Requests routed to the upstream (tells on-demand sources it is in use).
    pub requests: AtomicU64,
    pub retry_budget: RetryBudget,
    /// Requests in flight (`max_requests`).
    pub requests_in_flight: Gate,
    /// Retries in flight (`max_retries`).
    pub retries_in_flight: Gate,
    /// Requests waiting for a connection (`max_pending`).
    pub pending: Gate,
    /// Draws for slow-start admission.
    pub rng: Rng,
    /// TLS for endpoints the registry marks as TLS when the upstream configures none: the
    /// default roots, SNI the service name; built on first use.
    default_tls: OnceLock<ClientTls>,
    /// Rates, errors and latency for the status page (`stats.rs`).
    pub stats: Stats,
}

impl UpstreamRuntime {
    pub fn new(id: &str, settings: UpstreamSettings) -> Self {
        UpstreamRuntime {
            settings,
            metrics: UpstreamMetrics::new(id),
            panic: AtomicBool::new(false),
            outliers_due_ms: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            retry_budget: RetryBudget::default(),
            requests_in_flight: Gate::default(),
            retries_in_flight: Gate::default(),
            pending: Gate::default(),
            rng: Rng::from_entropy(),
            default_tls: OnceLock::new(),
            stats: Stats::default(),
        }
    }

    /// The TLS setup for an upstream that configures none: verification against the default
    /// roots, SNI and name `server_name`, ALPN `http/1.1`. A name rustls refuses (not a DNS
    /// name) is replaced by one no certificate carries, so the handshake fails closed.
    pub fn default_tls(&self, server_name: &str) -> &ClientTls {
        self.default_tls.get_or_init(|| {
            let mut settings = TlsSettings {
                server_name: server_name.to_string(),
                alpn: vec![ALPN_HTTP1.to_vec()],
                ..Default::default()
            };
            ClientTls::build(&settings).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "registry asks for TLS, but the service name is no TLS name");
                settings.server_name = "invalid.invalid".into();
                ClientTls::build(&settings).expect("default roots and a valid name build")
            })
        })
    }
}

/// One upstream in a routing table.
pub struct Upstream {
    pub id: Arc<str>,
    /// Discovery service name, `None` for static nodes.
    pub service: Option<Arc<str>>,
    pub runtime: Arc<UpstreamRuntime>,
    pub endpoints: Box<[Endpoint]>,
    pub balancer: Box<dyn Balancer>,
    /// Its subsets and zone groups, precomputed over `endpoints`.
    pub subsets: Subsets,
    /// When the endpoint set last changed (kept across rebuilds that change nothing in it,
    /// reloads included).
    pub updated_at: SystemTime,
}

impl Upstream {
    pub fn candidates<'a>(&'a self, ctx: PickContext<'a>) -> Candidates<'a> {
        Candidates::new(self.balancer.as_ref(), &self.endpoints, ctx)
    }

    /// The candidates for one request, by the upstream's subset, fallback and zones (see
    /// `subset.rs`); `header` is the `(key, value)` a route's `subset_from_header` read.
    #[inline]
    pub fn picks<'a>(
        &'a self,
        header: Option<(&str, &str)>,
        ctx: impl FnOnce() -> PickContext<'a>,
    ) -> Result<Picks<'a>, Unavailable> {
        self.subsets.picks(
            (&self.endpoints, self.balancer.as_ref()),
            header,
            ctx,
            &self.runtime.metrics,
        )
    }

    pub fn settings(&self) -> &UpstreamSettings {
        &self.runtime.settings
    }

    /// The TLS setup to dial `ep` with; `None`: clear text. The `tls` key wins over the
    /// registry's hint.
    pub fn tls_for(&self, ep: &Endpoint) -> Option<&ClientTls> {
        let s = &self.runtime.settings;
        if !s.tls.unwrap_or(ep.tls_hint) {
            return None;
        }
        Some(match &s.tls_client {
            Some(t) => t,
            None => self
                .runtime
                .default_tls(self.service.as_deref().unwrap_or(&self.id)),
        })
    }

    /// Where a try at one of the upstream's endpoints reports.
    pub fn feedback(&self) -> Feedback<'_> {
        let settings = self.settings();
        Feedback {
            upstream: &self.id,
            endpoints: &self.endpoints,
            passive: &settings.passive,
            decay: settings.ewma_decay,
            metrics: &self.runtime.metrics,
        }
    }
}
