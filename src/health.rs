//! Endpoint health: passive (outlier ejection from live traffic), active probes, panic mode and
//! slow start.
//!
//! Verdicts live in each endpoint's [`Health`] (atomics, keyed by endpoint identity like the
//! rest of `EndpointState`, so they survive registry changes). The request path only *reads*
//! them: [`Health::is_up`] is two relaxed loads. Transitions happen in three places:
//!
//! - **Passive** ([`record`], called by the proxy after every try): a failure (connect error,
//!   timeout, a configured 5xx) bumps a consecutive-failure counter; at the threshold the endpoint
//!   is ejected for `base_ejection_time × 2^(repeats)`, capped at `max_ejection_time`, unless that
//!   would eject more than `max_ejection_percent` of the upstream. A success resets the counter.
//!   The repeat count resets when an endpoint stays in for `max_ejection_time`.
//! - **Sweeper** ([`sweep`], a task every [`SWEEP_INTERVAL`]): returns endpoints whose ejection
//!   expired and sets each upstream's panic flag: when the share of endpoints the agent
//!   considers healthy falls below `panic_threshold`, the upstream balances over all of them
//!   (Envoy's panic mode), logged on entry and exit and shown in `edge_agent_upstream_panic`.
//! - **Active probes** ([`probe_loop`]): HTTP GET or TCP connect per endpoint in the current
//!   table (endpoints that left the table are not probed), with jitter, off the request path;
//!   `unhealthy_threshold` consecutive failures mark it down, `healthy_threshold` successes up.
//!
//! Registry health and the agent's checks combine: an endpoint carries traffic only when the
//! registry says healthy *and* it is neither ejected nor failing its probes (or the upstream is
//! in panic mode, which overrides only the agent's own verdicts).
//!
//! Slow start: an endpoint that joins an upstream after its first build is admitted with
//! probability rising linearly from [`SLOW_START_MIN_SHARE`] to 1 over the window, so its
//! effective weight ramps up whatever the balancer.
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request, Uri};
use http_body_util::{Either, Empty};
use rand::Rng;

use crate::cache::Shared;
use crate::config::{ActiveHealth, PassiveHealth};
use crate::metrics as m;
use crate::upstream::{Endpoint, Upstream};

/// How often ejections are expired and panic flags recomputed.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(200);
/// How often the prober looks for endpoints due a probe.
pub const PROBE_TICK: Duration = Duration::from_millis(100);
/// Share of traffic a slow-starting endpoint gets at the start of its window.
pub const SLOW_START_MIN_SHARE: f64 = 0.1;

/// Milliseconds on the process clock (monotonic, from first use). Never 0.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Health verdicts of one endpoint.
#[derive(Debug)]
pub struct Health {
    consecutive: AtomicU32,
    ejected: AtomicBool,
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
    last_return_ms: AtomicU64,
    active_up: AtomicBool,
    /// Positive: consecutive probe successes; negative: failures.
    streak: AtomicI32,
    next_probe_ms: AtomicU64,
    /// When the endpoint joined (for slow start); 0 = no ramp.
    pub joined_ms: u64,
}

impl Default for Health {
    fn default() -> Self {
        Health::new(false, 0)
    }
}

impl Health {
    pub fn new(initially_unhealthy: bool, joined_ms: u64) -> Self {
        Health {
            consecutive: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            last_return_ms: AtomicU64::new(0),
            active_up: AtomicBool::new(!initially_unhealthy),
            streak: AtomicI32::new(0),
            next_probe_ms: AtomicU64::new(0),
            joined_ms,
        }
    }

    /// Neither ejected nor failing active probes.
    pub fn is_up(&self) -> bool {
        !self.ejected.load(Ordering::Relaxed) && self.active_up.load(Ordering::Relaxed)
    }

    pub fn ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }

    pub fn active_up(&self) -> bool {
        self.active_up.load(Ordering::Relaxed)
    }

    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive.load(Ordering::Relaxed)
    }

    /// Milliseconds of ejection left at `now`.
    pub fn ejected_for_ms(&self, now: u64) -> u64 {
        if self.ejected() {
            self.ejected_until_ms
                .load(Ordering::Relaxed)
                .saturating_sub(now)
        } else {
            0
        }
    }

    /// Slow-start admission factor at `now` (1.0 when not ramping).
    pub fn slow_start_factor(&self, now: u64, window: Option<Duration>) -> f64 {
        let (Some(w), j) = (window, self.joined_ms) else {
            return 1.0;
        };
        if j == 0 || w.is_zero() {
            return 1.0;
        }
        let elapsed = now.saturating_sub(j) as f64 / w.as_millis() as f64;
        if elapsed >= 1.0 {
            1.0
        } else {
            SLOW_START_MIN_SHARE + (1.0 - SLOW_START_MIN_SHARE) * elapsed
        }
    }
}

/// What one try at an endpoint came to, for passive health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

/// Whether a response status counts as a failure under `p`.
pub fn failed_status(p: &PassiveHealth, status: u16) -> bool {
    if p.failure_statuses.is_empty() {
        (500..600).contains(&status)
    } else {
        p.failure_statuses.contains(&status)
    }
}

/// Passive health: records one try's outcome and ejects the endpoint when it crosses the
/// threshold. Returns true when this call ejected it.
pub fn record(up: &Upstream, ep: &Endpoint, outcome: Outcome, now: u64) -> bool {
    let p = &up.settings().passive;
    let h = &ep.state.health;
    if outcome == Outcome::Success {
        if h.consecutive.load(Ordering::Relaxed) != 0 {
            h.consecutive.store(0, Ordering::Relaxed);
        }
        return false;
    }
    if !p.enabled {
        return false;
    }
    let n = h.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
    if n < p.consecutive_failures || h.ejected() {
        return false;
    }
    let total = up.endpoints.len();
    let ejected = up
        .endpoints
        .iter()
        .filter(|e| e.state.health.ejected())
        .count();
    if (ejected + 1) * 100 > p.max_ejection_percent as usize * total {
        tracing::debug!(upstream = %up.id, endpoint = %ep.authority, "not ejected: max_ejection_percent reached");
        return false;
    }
    if h.ejected
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return false;
    }
    // Repeat ejections double the time, unless the endpoint stayed in for max_ejection_time.
    let last_return = h.last_return_ms.load(Ordering::Relaxed);
    if last_return != 0 && now.saturating_sub(last_return) > p.max_ejection_time.as_millis() as u64
    {
        h.ejections.store(0, Ordering::Relaxed);
    }
    let k = h.ejections.fetch_add(1, Ordering::Relaxed).min(20);
    let time = p
        .base_ejection_time
        .saturating_mul(1u32 << k.min(16))
        .min(p.max_ejection_time);
    h.ejected_until_ms
        .store(now + time.as_millis() as u64, Ordering::Relaxed);
    h.consecutive.store(0, Ordering::Relaxed);
    up.runtime.metrics.ejection();
    tracing::warn!(upstream = %up.id, endpoint = %ep.authority, failures = n, ejection = k + 1, for_ms = time.as_millis() as u64, "endpoint ejected");
    true
}

/// Returns expired ejections and recomputes the panic flag of every upstream in the table.
pub fn sweep(shared: &Shared, now: u64) {
    let table = shared.table.load();
    for up in table.upstreams.values() {
        let mut eligible = 0usize;
        let mut healthy = 0usize;
        for ep in up.endpoints.iter() {
            let h = &ep.state.health;
            if h.ejected() && h.ejected_until_ms.load(Ordering::Relaxed) <= now {
                h.ejected.store(false, Ordering::Relaxed);
                h.last_return_ms.store(now, Ordering::Relaxed);
                tracing::info!(upstream = %up.id, endpoint = %ep.authority, "ejection over: endpoint back in");
            }
            if ep.healthy && ep.weight > 0 {
                eligible += 1;
                if h.is_up() {
                    healthy += 1;
                }
            }
        }
        let threshold = up.settings().passive.panic_threshold as usize;
        let panic = eligible > 0 && healthy * 100 < threshold * eligible;
        if up.runtime.panic.swap(panic, Ordering::Relaxed) != panic {
            if panic {
                tracing::warn!(upstream = %up.id, healthy, eligible, "panic mode: too few healthy endpoints, balancing over all of them");
            } else {
                tracing::info!(upstream = %up.id, healthy, eligible, "panic mode over");
            }
            metrics::gauge!(m::UPSTREAM_PANIC, "upstream" => up.id.to_string()).set(if panic {
                1.0
            } else {
                0.0
            });
        }
    }
}

/// Runs [`sweep`] forever.
pub async fn sweep_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sweep(&shared, now_ms());
    }
}

/// Runs active probes forever: every [`PROBE_TICK`], each endpoint of an upstream with active
/// checks whose next probe is due gets one, on its own task.
pub async fn probe_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(PROBE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = now_ms();
        let table = shared.table.load();
        for up in table.upstreams.values() {
            let Some(cfg) = up.settings().active.clone() else {
                continue;
            };
            for ep in up.endpoints.iter() {
                let h = &ep.state.health;
                let due = h.next_probe_ms.load(Ordering::Relaxed);
                if due > now {
                    continue;
                }
                // Next probe after one interval, ±10% jitter so probes do not synchronise.
                let interval = cfg.interval.as_millis() as u64;
                let jitter = rand::rng().random_range(0..=interval / 5);
                h.next_probe_ms
                    .store(now + interval - interval / 10 + jitter, Ordering::Relaxed);
                let (up, ep, cfg) = (up.clone(), ep.clone(), cfg.clone());
                tokio::spawn(async move {
                    let ok = probe(&up, &ep, &cfg).await;
                    apply_probe(&up, &ep, &cfg, ok);
                });
            }
        }
    }
}

/// Most of a probe's answer read to keep its connection for the next probe.
pub const PROBE_BODY_LIMIT: usize = 64 * 1024;

/// One probe: TCP connect, or HTTP GET expecting a listed status (default 200–399).
async fn probe(up: &Upstream, ep: &Endpoint, cfg: &ActiveHealth) -> bool {
    let Some(path) = &cfg.http_path else {
        let addr = ep.authority.as_str().to_string();
        return matches!(
            tokio::time::timeout(cfg.timeout, tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        );
    };
    let uri = match Uri::try_from(path.as_str()) {
        Ok(u) => u,
        Err(_) => return false,
    };
    let mut req = Request::new(Either::Right(Empty::<Bytes>::new()));
    *req.uri_mut() = uri;
    let host = cfg.host.as_deref().unwrap_or(ep.authority.as_str());
    if let Ok(v) = http::HeaderValue::from_str(host) {
        req.headers_mut().insert(header::HOST, v);
    }
    req.headers_mut().insert(
        header::USER_AGENT,
        http::HeaderValue::from_static("edge-agent-health-check"),
    );
    let probe = async {
        let (resp, conn) = ep
            .state
            .pool
            .send(&ep.authority, req, up.settings().connect_timeout)
            .await
            .ok()?;
        let status = resp.status().as_u16();
        // Read the answer to the end so the connection can be reused; a health page larger
        // than PROBE_BODY_LIMIT is not buffered, its connection is dropped instead.
        let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(
            resp.into_body(),
            PROBE_BODY_LIMIT,
        ))
        .await;
        if body.is_ok() {
            ep.state.pool.put(conn);
        }
        Some(status)
    };
    match tokio::time::timeout(cfg.timeout, probe).await {
        Ok(Some(s)) => {
            if cfg.expected_statuses.is_empty() {
                (200..400).contains(&s)
            } else {
                cfg.expected_statuses.contains(&s)
            }
        }
        _ => false,
    }
}

/// Applies one probe result to the endpoint's active verdict.
pub fn apply_probe(up: &Upstream, ep: &Endpoint, cfg: &ActiveHealth, ok: bool) {
    let h = &ep.state.health;
    let streak = h.streak.load(Ordering::Relaxed);
    let streak = match (ok, streak) {
        (true, s) if s > 0 => s.saturating_add(1),
        (true, _) => 1,
        (false, s) if s < 0 => s.saturating_sub(1),
        (false, _) => -1,
    };
    h.streak.store(streak, Ordering::Relaxed);
    let up_now = h.active_up();
    if !up_now && streak >= cfg.healthy_threshold as i32 {
        h.active_up.store(true, Ordering::Relaxed);
        tracing::info!(upstream = %up.id, endpoint = %ep.authority, "active check: endpoint healthy");
    } else if up_now && -streak >= cfg.unhealthy_threshold as i32 {
        h.active_up.store(false, Ordering::Relaxed);
        tracing::warn!(upstream = %up.id, endpoint = %ep.authority, "active check: endpoint unhealthy");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Cache, SourceStatus};
    use crate::config::{Dynamic, UpstreamConfig, UpstreamSettings};
    use discovery::{Event, Instance};

    /// A cache with one upstream "u" of `n` endpoints and the given settings.
    fn setup(n: u16, settings: UpstreamSettings) -> (Cache, Arc<Shared>) {
        let shared = Shared::new(vec![SourceStatus::new("file", "file://x".into())]);
        let mut cache = Cache::new(
            shared.clone(),
            Dynamic {
                default_balancer: "roundrobin".into(),
                domain_suffix: None,
                upstreams: vec![UpstreamConfig {
                    id: "u".into(),
                    service: Some("u".into()),
                    source: None,
                    nodes: vec![],
                    settings,
                }],
                routes: vec![],
                guard: Default::default(),
            },
        );
        let set = (1..=n).map(|p| Instance::new("127.0.0.1", p)).collect();
        let d = cache.apply(0, Event::Snapshot([("u".to_string(), set)].into()));
        cache.rebuild(Some(&d));
        (cache, shared)
    }

    fn upstream(shared: &Shared) -> Arc<Upstream> {
        shared.table.load().upstreams["u"].clone()
    }

    fn passive(consecutive: u32, base_s: u64, max_s: u64, max_pct: u32) -> UpstreamSettings {
        let mut s = UpstreamSettings::with_balancer("roundrobin");
        s.passive.consecutive_failures = consecutive;
        s.passive.base_ejection_time = Duration::from_secs(base_s);
        s.passive.max_ejection_time = Duration::from_secs(max_s);
        s.passive.max_ejection_percent = max_pct;
        s
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets() {
        let (_c, shared) = setup(4, passive(3, 10, 100, 50));
        let up = upstream(&shared);
        let ep = &up.endpoints[0];
        assert!(!record(&up, ep, Outcome::Failure, 1000));
        assert!(!record(&up, ep, Outcome::Failure, 1000));
        assert!(!record(&up, ep, Outcome::Success, 1000));
        assert!(!record(&up, ep, Outcome::Failure, 1000));
        assert!(!record(&up, ep, Outcome::Failure, 1000));
        assert!(
            record(&up, ep, Outcome::Failure, 1000),
            "third in a row ejects"
        );
        assert!(!ep.state.health.is_up());
        assert_eq!(ep.state.health.ejected_for_ms(1000), 10_000);
    }

    #[test]
    fn ejection_time_doubles_and_is_capped_and_expires() {
        let (_c, shared) = setup(4, passive(1, 10, 35, 50));
        let up = upstream(&shared);
        let ep = &up.endpoints[0];
        let mut now = 1000;
        for expected in [10_000, 20_000, 35_000, 35_000] {
            assert!(record(&up, ep, Outcome::Failure, now));
            assert_eq!(ep.state.health.ejected_for_ms(now), expected);
            sweep(&shared, now + expected - 1);
            assert!(ep.state.health.ejected(), "still out just before expiry");
            now += expected;
            sweep(&shared, now);
            assert!(!ep.state.health.ejected(), "back in at expiry");
        }
        // Staying in for longer than max_ejection_time resets the doubling.
        now += 36_000;
        assert!(record(&up, ep, Outcome::Failure, now));
        assert_eq!(ep.state.health.ejected_for_ms(now), 10_000);
    }

    #[test]
    fn never_more_than_max_ejection_percent() {
        let (_c, shared) = setup(4, passive(1, 10, 100, 50));
        let up = upstream(&shared);
        let ejected: Vec<bool> = up
            .endpoints
            .iter()
            .map(|e| record(&up, e, Outcome::Failure, 1000))
            .collect();
        assert_eq!(ejected, vec![true, true, false, false]);
    }

    #[test]
    fn panic_mode_below_threshold_and_back() {
        let mut s = passive(1, 10, 100, 100);
        s.passive.panic_threshold = 50;
        let (_c, shared) = setup(4, s);
        let up = upstream(&shared);
        for e in &up.endpoints[..3] {
            assert!(record(&up, e, Outcome::Failure, 1000));
        }
        sweep(&shared, 1001);
        assert!(
            up.runtime.panic.load(Ordering::Relaxed),
            "1 of 4 healthy < 50%"
        );
        // In panic, every endpoint is usable again.
        let ctx = crate::balancer::PickContext {
            client_ip: [127, 0, 0, 1].into(),
            key: None,
            now_ms: 1001,
            panic: true,
            slow_start: None,
        };
        assert!(up.endpoints.iter().all(|e| e.usable(&ctx)));
        sweep(&shared, 20_000);
        assert!(!up.runtime.panic.load(Ordering::Relaxed));
    }

    #[test]
    fn active_thresholds() {
        let mut s = UpstreamSettings::with_balancer("roundrobin");
        let cfg = ActiveHealth {
            http_path: Some("/".into()),
            host: None,
            expected_statuses: vec![],
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            initially_unhealthy: false,
        };
        s.active = Some(cfg.clone());
        let (_c, shared) = setup(2, s);
        let up = upstream(&shared);
        let ep = &up.endpoints[0];
        apply_probe(&up, ep, &cfg, false);
        apply_probe(&up, ep, &cfg, false);
        assert!(ep.state.health.active_up(), "two failures are not enough");
        apply_probe(&up, ep, &cfg, false);
        assert!(!ep.state.health.active_up());
        apply_probe(&up, ep, &cfg, true);
        assert!(!ep.state.health.active_up(), "one success is not enough");
        apply_probe(&up, ep, &cfg, true);
        assert!(ep.state.health.active_up());
    }

    #[test]
    fn slow_start_ramps_linearly_from_the_minimum_share() {
        let h = Health::new(false, 1000);
        let w = Some(Duration::from_secs(10));
        assert_eq!(h.slow_start_factor(1000, w), SLOW_START_MIN_SHARE);
        let mid = h.slow_start_factor(6000, w);
        assert!((mid - (SLOW_START_MIN_SHARE + (1.0 - SLOW_START_MIN_SHARE) * 0.5)).abs() < 1e-9);
        assert_eq!(h.slow_start_factor(11_000, w), 1.0);
        assert_eq!(h.slow_start_factor(1000, None), 1.0);
        assert_eq!(
            Health::new(false, 0).slow_start_factor(5, w),
            1.0,
            "first set: no ramp"
        );
    }

    #[test]
    fn late_joiners_slow_start_and_keep_health_across_changes() {
        let mut s = UpstreamSettings::with_balancer("roundrobin");
        s.slow_start = Some(Duration::from_secs(30));
        let (mut c, shared) = setup(3, s);
        let up = upstream(&shared);
        assert!(up.endpoints.iter().all(|e| e.state.health.joined_ms == 0));
        assert!(
            record(&up, &up.endpoints[0], Outcome::Failure, 1)
                || up.settings().passive.consecutive_failures > 1
        );
        let set = (1..=4).map(|p| Instance::new("127.0.0.1", p)).collect();
        let d = c.apply(0, Event::Snapshot([("u".to_string(), set)].into()));
        c.rebuild(Some(&d));
        let up2 = upstream(&shared);
        let new = up2
            .endpoints
            .iter()
            .find(|e| e.authority.port_u16() == Some(4))
            .unwrap();
        assert!(new.state.health.joined_ms > 0, "the new endpoint ramps");
        let old = up2
            .endpoints
            .iter()
            .find(|e| e.authority.port_u16() == Some(1))
            .unwrap();
        assert_eq!(
            old.state.health.consecutive_failures(),
            up.endpoints[0].state.health.consecutive_failures()
        );
        assert!(Arc::ptr_eq(&old.state, &up.endpoints[0].state));
    }
}
