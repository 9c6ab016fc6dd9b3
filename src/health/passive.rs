//! Passive health (outlier ejection from live traffic, Envoy-style): its settings and the
//! verdict one try's outcome leads to. The caller (`endpoint::Attempt`) supplies the upstream's
//! ejected share, logs and counts the ejection.
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::outlier::{FailurePercentage, SuccessRate};
use super::{Health, Outcome};

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

/// Passive health settings of an upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct PassiveHealth {
    pub enabled: bool,
    /// Consecutive failures that eject an endpoint.
    pub consecutive_failures: u32,
    /// Consecutive gateway failures (502/503/504, connect errors, timeouts) that eject an
    /// endpoint; `None`: this detector is off.
    pub consecutive_gateway_failures: Option<u32>,
    /// How often the interval detectors (`outlier.rs`) run.
    pub interval: Duration,
    pub success_rate: Option<SuccessRate>,
    pub failure_percentage: Option<FailurePercentage>,
    /// Statuses counted as failures; empty means every 5xx.
    pub failure_statuses: Vec<u16>,
    /// `grpc-status` codes counted as failures (`failure_grpc_statuses`; default
    /// `grpc::DEFAULT_FAILURE_GRPC_STATUSES`, UNAVAILABLE).
    pub failure_grpc_statuses: Vec<u16>,
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
            consecutive_gateway_failures: None,
            interval: super::outlier::DEFAULT_INTERVAL,
            success_rate: Some(SuccessRate::default()),
            failure_percentage: None,
            failure_statuses: Vec::new(),
            failure_grpc_statuses: crate::grpc::DEFAULT_FAILURE_GRPC_STATUSES.to_vec(),
            base_ejection_time: DEFAULT_BASE_EJECTION_TIME,
            max_ejection_time: DEFAULT_MAX_EJECTION_TIME,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
            panic_threshold: DEFAULT_PANIC_THRESHOLD,
        }
    }
}

impl PassiveHealth {
    /// Whether a response status counts as a failure.
    /// Whether a gRPC answer with `grpc-status` `code` counts as a failure.
    pub fn failed_grpc_status(&self, code: u16) -> bool {
        self.failure_grpc_statuses.contains(&code)
    }

    pub fn failed_status(&self, status: u16) -> bool {
        if self.failure_statuses.is_empty() {
            (500..600).contains(&status)
        } else {
            self.failure_statuses.contains(&status)
        }
    }
}

/// Which detector found an endpoint failing (the `detector` field of the ejection's log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detector {
    ConsecutiveFailures,
    ConsecutiveGatewayFailures,
    SuccessRate,
    FailurePercentage,
}

impl Detector {
    pub fn name(self) -> &'static str {
        match self {
            Detector::ConsecutiveFailures => "consecutive_failures",
            Detector::ConsecutiveGatewayFailures => "consecutive_gateway_failures",
            Detector::SuccessRate => "success_rate",
            Detector::FailurePercentage => "failure_percentage",
        }
    }
}

/// What [`record`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing changed state worth telling.
    Noted,
    /// The threshold was crossed but ejecting would pass `max_ejection_percent`.
    Capped { failures: u32 },
    /// Ejected by `detector`: the `nth` ejection in a row, for `time`.
    Ejected {
        detector: Detector,
        failures: u32,
        nth: u32,
        time: Duration,
    },
}

/// Records one try's outcome in `h` and ejects the endpoint when it crosses the threshold.
/// `share` gives (endpoints ejected now, endpoints in all) of the upstream; it is asked only
/// when the threshold is crossed.
pub fn record(
    h: &Health,
    p: &PassiveHealth,
    outcome: Outcome,
    now: u64,
    share: impl FnOnce() -> (usize, usize),
) -> Verdict {
    if let Outcome::Backoff(d) = outcome {
        h.back_off(now, d);
        return Verdict::Noted;
    }
    if !p.enabled {
        return Verdict::Noted;
    }
    h.window_requests.fetch_add(1, Ordering::Relaxed);
    if outcome == Outcome::Success {
        if h.consecutive.load(Ordering::Relaxed) != 0 {
            h.consecutive.store(0, Ordering::Relaxed);
        }
        if h.consecutive_gateway.load(Ordering::Relaxed) != 0 {
            h.consecutive_gateway.store(0, Ordering::Relaxed);
        }
        return Verdict::Noted;
    }
    h.window_failures.fetch_add(1, Ordering::Relaxed);
    let failures = h.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
    let gateway = if outcome == Outcome::GatewayFailure {
        h.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
    } else {
        // Any other failure breaks a run of gateway failures.
        h.consecutive_gateway.store(0, Ordering::Relaxed);
        0
    };
    if h.ejected() {
        return Verdict::Noted;
    }
    let (detector, failures) = if failures >= p.consecutive_failures {
        (Detector::ConsecutiveFailures, failures)
    } else if p.consecutive_gateway_failures.is_some_and(|n| gateway >= n) {
        (Detector::ConsecutiveGatewayFailures, gateway)
    } else {
        return Verdict::Noted;
    };
    eject(h, p, now, share, detector, failures)
}

/// Ejects the endpoint for `base_ejection_time × 2^(repeats)` (capped), unless that would pass
/// `max_ejection_percent` of the upstream (`share` gives ejected and total endpoints).
pub fn eject(
    h: &Health,
    p: &PassiveHealth,
    now: u64,
    share: impl FnOnce() -> (usize, usize),
    detector: Detector,
    failures: u32,
) -> Verdict {
    let (ejected, total) = share();
    if (ejected + 1) * 100 > p.max_ejection_percent as usize * total {
        return Verdict::Capped { failures };
    }
    if h.ejected
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return Verdict::Noted;
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
    h.consecutive_gateway.store(0, Ordering::Relaxed);
    Verdict::Ejected {
        detector,
        failures,
        nth: k + 1,
        time,
    }
}

/// Returns the endpoint if its ejection has expired at `now`; true when this call did.
pub fn expire(h: &Health, now: u64) -> bool {
    if h.ejected() && h.ejected_until_ms.load(Ordering::Relaxed) <= now {
        h.ejected.store(false, Ordering::Relaxed);
        h.last_return_ms.store(now, Ordering::Relaxed);
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(consecutive: u32, base_s: u64, max_s: u64, max_pct: u32) -> PassiveHealth {
        PassiveHealth {
            consecutive_failures: consecutive,
            base_ejection_time: Duration::from_secs(base_s),
            max_ejection_time: Duration::from_secs(max_s),
            max_ejection_percent: max_pct,
            ..Default::default()
        }
    }

    fn ejected(v: Verdict) -> bool {
        matches!(v, Verdict::Ejected { .. })
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets() {
        let p = settings(3, 10, 100, 50);
        let h = Health::default();
        let share = || (0, 4);
        assert!(!ejected(record(&h, &p, Outcome::Failure, 1000, share)));
        assert!(!ejected(record(&h, &p, Outcome::Failure, 1000, share)));
        assert!(!ejected(record(&h, &p, Outcome::Success, 1000, share)));
        assert!(!ejected(record(&h, &p, Outcome::Failure, 1000, share)));
        assert!(!ejected(record(&h, &p, Outcome::Failure, 1000, share)));
        assert!(
            ejected(record(&h, &p, Outcome::Failure, 1000, share)),
            "third in a row ejects"
        );
        assert!(!h.is_up());
        assert_eq!(h.ejected_for_ms(1000), 10_000);
    }

    #[test]
    fn ejection_time_doubles_and_is_capped_and_expires() {
        let p = settings(1, 10, 35, 50);
        let h = Health::default();
        let mut now = 1000;
        for expected in [10_000, 20_000, 35_000, 35_000] {
            assert!(ejected(record(&h, &p, Outcome::Failure, now, || (0, 4))));
            assert_eq!(h.ejected_for_ms(now), expected);
            assert!(!expire(&h, now + expected - 1));
            assert!(h.ejected(), "still out just before expiry");
            now += expected;
            assert!(expire(&h, now));
            assert!(!h.ejected(), "back in at expiry");
        }
        // Staying in for longer than max_ejection_time resets the doubling.
        now += 36_000;
        assert!(ejected(record(&h, &p, Outcome::Failure, now, || (0, 4))));
        assert_eq!(h.ejected_for_ms(now), 10_000);
    }

    #[test]
    fn never_more_than_max_ejection_percent() {
        let p = settings(1, 10, 100, 50);
        let hs: Vec<Health> = (0..4).map(|_| Health::default()).collect();
        let out: Vec<bool> = (0..4)
            .map(|i| {
                let share = || (hs.iter().filter(|h| h.ejected()).count(), hs.len());
                ejected(record(&hs[i], &p, Outcome::Failure, 1000, share))
            })
            .collect();
        assert_eq!(out, vec![true, true, false, false]);
        assert_eq!(
            record(&hs[3], &p, Outcome::Failure, 1000, || (2, 4)),
            Verdict::Capped { failures: 2 }
        );
    }

    #[test]
    fn failure_statuses_default_to_every_5xx() {
        let p = PassiveHealth::default();
        assert!(p.failed_status(500) && p.failed_status(599) && !p.failed_status(404));
        let only = PassiveHealth {
            failure_statuses: vec![503],
            ..Default::default()
        };
        assert!(only.failed_status(503) && !only.failed_status(500));
    }
}
