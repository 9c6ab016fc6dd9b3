//! The health tasks that walk the routing table: the sweeper (expired ejections back in, panic
//! mode per upstream, zone shares refreshed) and the active prober. The verdicts themselves live in `health/`; these
//! loops only decide when and for which endpoints, and log what changed. Endpoints that left
//! the table are neither swept nor probed.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::clock;
use crate::health::{active, outlier, passive};
use crate::metrics as m;
use crate::state::State;
use crate::upstream::Upstream;

/// How often ejections are expired and panic flags recomputed.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(200);
/// How often the prober looks for endpoints due a probe.
pub const PROBE_TICK: Duration = Duration::from_millis(100);

/// Returns expired ejections and recomputes the panic flag of every upstream in the table:
/// when the share of endpoints the agent considers healthy (up, and not backing off after a
/// 429) falls below `panic_threshold`, the upstream balances over all of them (logged on entry and exit, `edge_agent_upstream_panic`).
pub fn sweep(state: &State, now: u64) {
    let table = state.table.load();
    for up in table.upstreams.values() {
        let mut eligible = 0usize;
        let mut healthy = 0usize;
        for ep in up.endpoints.iter() {
            let h = &ep.state.health;
            if passive::expire(h, now) {
                tracing::info!(upstream = %up.id, endpoint = %ep.authority, "ejection over: endpoint back in");
            }
            if ep.healthy && ep.weight > 0 {
                eligible += 1;
                if h.is_up() && !h.backed_off(now) {
                    healthy += 1;
                }
            }
        }
        // Zone shares follow availability between rebuilds (`subset.rs`).
        up.subsets.refresh();
        outliers(up, now);
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

/// Every `interval` of the upstream's passive settings: takes each endpoint's window of tries
/// and ejects the outliers the success-rate and failure-percentage detectors find
/// (`health/outlier.rs`), each logged with the detector and its numbers.
fn outliers(up: &Upstream, now: u64) {
    let p = &up.settings().passive;
    if !p.enabled || (p.success_rate.is_none() && p.failure_percentage.is_none()) {
        return;
    }
    let due = &up.runtime.outliers_due_ms;
    let at = due.load(Ordering::Relaxed);
    if at == 0 {
        // The first window starts now.
        due.store(now + p.interval.as_millis() as u64, Ordering::Relaxed);
        for ep in up.endpoints.iter() {
            ep.state.health.take_window();
        }
        return;
    }
    if now < at {
        return;
    }
    due.store(now + p.interval.as_millis() as u64, Ordering::Relaxed);
    let samples: Vec<Option<outlier::Sample>> = up
        .endpoints
        .iter()
        .map(|ep| {
            let s = ep.state.health.take_window();
            (!ep.state.health.ejected()).then_some(s)
        })
        .collect();
    for (i, finding) in outlier::evaluate(
        &samples,
        p.success_rate.as_ref(),
        p.failure_percentage.as_ref(),
    ) {
        let ep = &up.endpoints[i];
        let h = &ep.state.health;
        let share = || crate::endpoint::ejected_share(&up.endpoints);
        let s = samples[i].unwrap_or_default();
        let detector = match finding {
            outlier::Finding::SuccessRate { .. } => passive::Detector::SuccessRate,
            outlier::Finding::FailurePercentage { .. } => passive::Detector::FailurePercentage,
        };
        match passive::eject(h, p, now, share, detector, s.failures) {
            passive::Verdict::Ejected { nth, time, .. } => {
                up.runtime.metrics.ejection();
                match finding {
                    outlier::Finding::SuccessRate {
                        rate,
                        mean,
                        stdev,
                        threshold,
                    } => {
                        tracing::warn!(upstream = %up.id, endpoint = %ep.authority, detector = detector.name(), requests = s.requests, failures = s.failures, success_rate = rate, mean, stdev, threshold, ejection = nth, for_ms = time.as_millis() as u64, "endpoint ejected");
                    }
                    outlier::Finding::FailurePercentage { percent, threshold } => {
                        tracing::warn!(upstream = %up.id, endpoint = %ep.authority, detector = detector.name(), requests = s.requests, failures = s.failures, failure_percent = percent, threshold, ejection = nth, for_ms = time.as_millis() as u64, "endpoint ejected");
                    }
                }
            }
            passive::Verdict::Capped { .. } => {
                tracing::debug!(upstream = %up.id, endpoint = %ep.authority, detector = detector.name(), "not ejected: max_ejection_percent reached");
            }
            passive::Verdict::Noted => {}
        }
    }
}

/// Runs [`sweep`] forever.
pub async fn sweep_loop(state: Arc<State>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sweep(&state, clock::now_ms());
    }
}

/// Runs active probes forever: every [`PROBE_TICK`], each endpoint of an upstream with active
/// checks whose next probe is due gets one, on its own task.
pub async fn probe_loop(state: Arc<State>) {
    let mut tick = tokio::time::interval(PROBE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = clock::now_ms();
        let table = state.table.load();
        for up in table.upstreams.values() {
            let Some(cfg) = up.settings().active.clone() else {
                continue;
            };
            for ep in up.endpoints.iter() {
                if !active::due(&ep.state.health, &cfg, now) {
                    continue;
                }
                let (up, ep, cfg) = (up.clone(), ep.clone(), cfg.clone());
                tokio::spawn(async move {
                    let connect_timeout = up.settings().connect_timeout;
                    let tls = up.tls_for(&ep);
                    let ok =
                        active::probe(&ep.state.pool, &ep.authority, tls, &cfg, connect_timeout)
                            .await;
                    match active::apply(&ep.state.health, &cfg, ok) {
                        Some(true) => {
                            tracing::info!(upstream = %up.id, endpoint = %ep.authority, "active check: endpoint healthy")
                        }
                        Some(false) => {
                            tracing::warn!(upstream = %up.id, endpoint = %ep.authority, "active check: endpoint unhealthy")
                        }
                        None => {}
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;
    use crate::endpoint::Attempt;
    use crate::health::Outcome;
    use crate::state::SourceStatus;
    use crate::table::Dynamic;
    use crate::upstream::{Upstream, UpstreamConfig, UpstreamSettings};
    use discovery::{Event, Instance};
    use std::time::Instant;

    /// A cache with one upstream "u" of `n` endpoints and the given settings.
    fn setup(n: u16, settings: UpstreamSettings) -> (Cache, Arc<State>) {
        let state = State::new(vec![SourceStatus::new("file", "file://x".into())]);
        let mut cache = Cache::new(state.clone(), dynamic(settings));
        let set = (1..=n).map(|p| Instance::new("127.0.0.1", p)).collect();
        let d = cache.apply(0, Event::Snapshot([("u".to_string(), set)].into()));
        cache.rebuild(Some(&d));
        (cache, state)
    }

    fn dynamic(settings: UpstreamSettings) -> Dynamic {
        Dynamic {
            upstreams: vec![UpstreamConfig {
                id: "u".into(),
                service: Some("u".into()),
                source: None,
                nodes: vec![],
                settings,
            }],
            ..Default::default()
        }
    }

    fn upstream(state: &State) -> Arc<Upstream> {
        state.table.load().upstreams["u"].clone()
    }

    fn passive(consecutive: u32, base_s: u64, max_s: u64, max_pct: u32) -> UpstreamSettings {
        let mut s = UpstreamSettings::default();
        s.passive.consecutive_failures = consecutive;
        s.passive.base_ejection_time = Duration::from_secs(base_s);
        s.passive.max_ejection_time = Duration::from_secs(max_s);
        s.passive.max_ejection_percent = max_pct;
        s
    }

    fn fail(up: &Upstream, i: usize) {
        let fb = up.feedback();
        drop(Attempt::start(&up.endpoints[i], &fb, Instant::now()).finish(Outcome::Failure));
    }

    #[test]
    fn ejections_through_the_table_never_pass_max_ejection_percent_and_expire() {
        let (_c, state) = setup(4, passive(1, 10, 100, 50));
        let up = upstream(&state);
        for i in 0..4 {
            fail(&up, i);
        }
        let ejected: Vec<bool> = up
            .endpoints
            .iter()
            .map(|e| e.state.health.ejected())
            .collect();
        assert_eq!(ejected, vec![true, true, false, false]);
        let until = up.endpoints[0].state.health.ejected_for_ms(clock::now_ms());
        assert!(until > 9_000 && until <= 10_000, "{until}");
        sweep(&state, clock::now_ms() + 10_001);
        assert!(up.endpoints.iter().all(|e| !e.state.health.ejected()));
    }

    /// #17: one endpoint of five failing 30 % of its tries (never 5 in a row) is ejected by
    /// the success-rate detector at the end of the interval, not before; the others stay.
    #[test]
    fn success_rate_ejects_the_outlier_at_the_end_of_the_interval() {
        let mut s = passive(5, 10, 100, 50);
        s.passive.interval = Duration::from_secs(10);
        let (_c, state) = setup(5, s);
        let up = upstream(&state);
        let t0 = clock::now_ms();
        sweep(&state, t0); // opens the first window
        let fb = up.feedback();
        for round in 0..100 {
            for (i, ep) in up.endpoints.iter().enumerate() {
                let outcome = if i == 4 && round % 10 < 3 {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                drop(Attempt::start(ep, &fb, Instant::now()).finish(outcome));
            }
        }
        let ejected = |up: &Upstream| -> Vec<bool> {
            up.endpoints
                .iter()
                .map(|e| e.state.health.ejected())
                .collect()
        };
        assert_eq!(ejected(&up), vec![false; 5], "3 in a row never reach 5");
        sweep(&state, t0 + 5_000);
        assert_eq!(ejected(&up), vec![false; 5], "the interval is not over");
        sweep(&state, t0 + 10_000);
        assert_eq!(ejected(&up), vec![false, false, false, false, true]);
        // Before the next interval ends nothing is looked at again; the 10 s ejection holds.
        sweep(&state, t0 + 19_999);
        assert_eq!(ejected(&up).iter().filter(|e| **e).count(), 1);
    }

    #[test]
    fn consecutive_gateway_failures_count_only_gateway_failures() {
        let mut s = passive(100, 10, 100, 50);
        s.passive.consecutive_gateway_failures = Some(3);
        s.passive.success_rate = None;
        let (_c, state) = setup(2, s);
        let up = upstream(&state);
        let fb = up.feedback();
        let ep = &up.endpoints[0];
        let run = |o: Outcome| drop(Attempt::start(ep, &fb, Instant::now()).finish(o));
        run(Outcome::GatewayFailure);
        run(Outcome::GatewayFailure);
        run(Outcome::Failure); // a plain 500 breaks the run
        run(Outcome::GatewayFailure);
        run(Outcome::GatewayFailure);
        assert!(!ep.state.health.ejected());
        run(Outcome::GatewayFailure);
        assert!(ep.state.health.ejected(), "three gateway failures in a row");
    }

    #[test]
    fn panic_mode_below_threshold_and_back() {
        let mut s = passive(1, 10, 100, 100);
        s.passive.panic_threshold = 50;
        let (_c, state) = setup(4, s);
        let up = upstream(&state);
        for i in 0..3 {
            fail(&up, i);
        }
        let now = clock::now_ms();
        sweep(&state, now + 1);
        assert!(
            up.runtime.panic.load(Ordering::Relaxed),
            "1 of 4 healthy < 50%"
        );
        // In panic, every endpoint is usable again.
        assert!(up
            .endpoints
            .iter()
            .all(|e| e.usable(true, now, None, &up.runtime.rng)));
        sweep(&state, now + 20_000);
        assert!(!up.runtime.panic.load(Ordering::Relaxed));
    }

    /// Defect 2 of #12: a reload that changed an upstream's settings started a runtime with
    /// `panic = false`, so the sweeper never saw panic mode end (the gauge stayed at 1 and
    /// "panic mode over" was never logged). The new runtime carries the flag over.
    #[test]
    fn panic_mode_survives_a_settings_change_and_is_seen_to_end() {
        let mut s = passive(1, 10, 100, 100);
        s.passive.panic_threshold = 50;
        let (mut c, state) = setup(4, s.clone());
        let up = upstream(&state);
        for i in 0..3 {
            fail(&up, i);
        }
        sweep(&state, clock::now_ms() + 1);
        assert!(up.runtime.panic.load(Ordering::Relaxed));
        // The reload lowers the threshold: 1 of 4 healthy is no longer panic.
        let mut lower = s;
        lower.passive.panic_threshold = 10;
        c.reload(dynamic(lower));
        let after = upstream(&state);
        assert!(!Arc::ptr_eq(&up.runtime, &after.runtime), "a new runtime");
        assert!(
            after.runtime.panic.load(Ordering::Relaxed),
            "the flag is carried over"
        );
        sweep(&state, clock::now_ms() + 2);
        assert!(
            !after.runtime.panic.load(Ordering::Relaxed),
            "the sweep sees panic mode end"
        );
    }

    #[test]
    fn late_joiners_slow_start_and_keep_health_across_changes() {
        let s = UpstreamSettings {
            slow_start: Some(Duration::from_secs(30)),
            ..Default::default()
        };
        let (mut c, state) = setup(3, s);
        let up = upstream(&state);
        assert!(up.endpoints.iter().all(|e| e.state.health.joined_ms == 0));
        fail(&up, 0);
        assert_eq!(
            up.endpoints[0].state.health.consecutive_failures(),
            1,
            "one failure recorded, below the threshold of 5"
        );
        let set = (1..=4).map(|p| Instance::new("127.0.0.1", p)).collect();
        let d = c.apply(0, Event::Snapshot([("u".to_string(), set)].into()));
        c.rebuild(Some(&d));
        let up2 = upstream(&state);
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
            1,
            "the failure count survived the change"
        );
        assert!(
            Arc::ptr_eq(&old.state, &up.endpoints[0].state),
            "the same state, not a copy"
        );
    }
}
