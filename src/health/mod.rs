//! Endpoint health verdicts: passive (outlier ejection from live traffic, `passive.rs`), active
//! probes (`active.rs`) and slow start.
//!
//! Verdicts live in each endpoint's [`Health`] (atomics, keyed by endpoint identity like the
//! rest of the endpoint's state, so they survive registry changes). The request path only
//! *reads* them: [`Health::is_up`] is two relaxed loads. Transitions happen in three places:
//!
//! - **Passive** ([`passive::record`], called for every finished try through
//!   `endpoint::Attempt`): a failure (connect error, timeout, a configured 5xx) bumps a
//!   consecutive-failure counter; at the threshold the endpoint is ejected for
//!   `base_ejection_time × 2^(repeats)`, capped at `max_ejection_time`, unless that would eject
//!   more than `max_ejection_percent` of the upstream. A success resets the counter. The repeat
//!   count resets when an endpoint stays in for `max_ejection_time`.
//! - **Expiry and panic mode** (`checks.rs`, a task every `SWEEP_INTERVAL`): returns endpoints
//!   whose ejection expired ([`passive::expire`]) and sets each upstream's panic flag: when the
//!   share of endpoints the agent considers healthy falls below `panic_threshold`, the upstream
//!   balances over all of them (Envoy's panic mode).
//! - **Active probes** ([`active::probe`], scheduled by `checks.rs`): HTTP GET or TCP connect
//!   per endpoint in the current table, with jitter, off the request path;
//!   `unhealthy_threshold` consecutive failures mark it down, `healthy_threshold` successes up.
//!
//! This layer knows endpoints only by their [`Health`] (and their connection pool, for
//! probes); the loops that walk the routing table live above it, in `checks.rs`.
//!
//! Slow start: an endpoint that joins an upstream after its first build is admitted with
//! probability rising linearly from [`SLOW_START_MIN_SHARE`] to 1 over the window, so its
//! effective weight ramps up whatever the balancer.
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

pub mod active;
pub mod outlier;
pub mod passive;

/// Share of traffic a slow-starting endpoint gets at the start of its window.
pub const SLOW_START_MIN_SHARE: f64 = 0.1;

/// Health verdicts of one endpoint.
#[derive(Debug)]
pub struct Health {
    consecutive: AtomicU32,
    /// Consecutive gateway failures (502/503/504, connect errors, timeouts) only.
    consecutive_gateway: AtomicU32,
    /// Tries and failures since the interval detectors last looked (`outlier.rs`).
    window_requests: AtomicU32,
    window_failures: AtomicU32,
    ejected: AtomicBool,
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
    last_return_ms: AtomicU64,
    active_up: AtomicBool,
    /// Positive: consecutive probe successes; negative: failures.
    streak: AtomicI32,
    next_probe_ms: AtomicU64,
    /// Until when the endpoint asked not to be sent new requests (429, or 503 with
    /// `Retry-After`); 0 = never. Not a health failure: see [`Outcome::Backoff`].
    backoff_until_ms: AtomicU64,
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
            consecutive_gateway: AtomicU32::new(0),
            window_requests: AtomicU32::new(0),
            window_failures: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            last_return_ms: AtomicU64::new(0),
            active_up: AtomicBool::new(!initially_unhealthy),
            streak: AtomicI32::new(0),
            next_probe_ms: AtomicU64::new(0),
            backoff_until_ms: AtomicU64::new(0),
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

    /// The tries and failures since the last call, for the interval detectors.
    pub fn take_window(&self) -> outlier::Sample {
        outlier::Sample {
            requests: self.window_requests.swap(0, Ordering::Relaxed),
            failures: self.window_failures.swap(0, Ordering::Relaxed),
        }
    }

    /// Whether the endpoint asked, at `now`, not to get new requests yet.
    #[inline]
    pub fn backed_off(&self, now: u64) -> bool {
        self.backoff_until_ms.load(Ordering::Relaxed) > now
    }

    /// Milliseconds of back-off left at `now`.
    pub fn backoff_left_ms(&self, now: u64) -> u64 {
        self.backoff_until_ms
            .load(Ordering::Relaxed)
            .saturating_sub(now)
    }

    /// No new requests until `now + d` (a later back-off already set is kept).
    pub fn back_off(&self, now: u64, d: Duration) {
        self.backoff_until_ms
            .fetch_max(now + d.as_millis() as u64, Ordering::Relaxed);
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
    /// A failure the endpoint's gateway side shows: 502, 503, 504, a connect error or a
    /// timeout. Counts as a [`Outcome::Failure`] and also towards
    /// `consecutive_gateway_failures`.
    GatewayFailure,
    /// The endpoint is rate limiting (429, or 503 with `Retry-After`): neither a success nor a
    /// failure. Passive health and the latency estimate are left as they are (a fast 429
    /// counted as a success would pull traffic *towards* the limited endpoint), and the
    /// endpoint gets no new request for the given time.
    Backoff(Duration),
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
