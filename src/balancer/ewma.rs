//! Peak-EWMA latency tracking and the `ewma` balancer (Finagle's and Linkerd's design).
//!
//! **Estimate** ([`PeakEwma`], one per endpoint, fed by the proxy). An observation above the
//! current estimate replaces it at once (the peak: a slowing endpoint is noticed on the first
//! slow answer); one below it is blended in with weight `1 - exp(-Δt / decay)`, Δt being the
//! time since the last update, so the estimate sinks toward what the endpoint now answers in,
//! over about `decay` (`ewma_decay`, 10 s by default). While nothing is observed the estimate
//! read by [`PeakEwma::value_ns`] also decays toward zero with the same time constant, so an
//! endpoint avoided for being slow is tried again after a while and can prove it recovered.
//! A failure counts as at least [`FAILURE_PENALTY`] (1 s), so an endpoint that fails fast does
//! not look fast.
//!
//! The state is two atomics (f64 bits and a timestamp), updated with plain loads and stores:
//! two updates racing on one endpoint may lose one observation, or pair one's value with the
//! other's timestamp. The estimate is a heuristic that the next observation corrects, so this
//! is cheaper than a lock or a compare-and-swap loop and good enough.
//!
//! **Balancer.** Power of two choices among usable, untried endpoints: draw two at random, take
//! the one with the lower `estimate × (in_flight + 1) / weight`, the first drawn on a tie. An
//! endpoint without an observation yet (new, or idle so long its estimate decayed to nothing)
//! is given the other one's estimate, so the two are compared by load alone: a newcomer is
//! neither flooded (as a zero estimate would do) nor starved (as a pessimistic default would);
//! if neither has one, both compare by load. The random draws come from a per-balancer
//! lock-free [`Rng`], seeded explicitly in tests.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{two_choices, Balancer, PickContext, Rng, Tried};
use crate::config::UpstreamSettings;
use crate::upstream::Endpoint;

/// The least latency a failed attempt counts as. A connection refused in 100 µs must not make
/// an endpoint look like the fastest in the upstream.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// Per-endpoint peak-EWMA of response latency, lock-free. Times are milliseconds on the
/// process clock ([`crate::health::now_ms`]) so tests can pass their own.
#[derive(Debug, Default)]
pub struct PeakEwma {
    /// f64 bits of the estimate at `at_ms`, nanoseconds; 0 = no observation yet.
    value: AtomicU64,
    /// When `value` was last updated.
    at_ms: AtomicU64,
}

/// `exp(-elapsed / decay)`: the weight the old estimate keeps after `elapsed_ms`.
fn keep(elapsed_ms: u64, decay: Duration) -> f64 {
    let tau = decay.as_secs_f64() * 1e3;
    if tau <= 0.0 {
        return 0.0;
    }
    (-(elapsed_ms as f64) / tau).exp()
}

impl PeakEwma {
    /// Records one observed latency (time to response headers).
    pub fn observe(&self, rtt: Duration, now_ms: u64, decay: Duration) {
        // At least 1 ns, so an observation is never mistaken for "none".
        let rtt = (rtt.as_nanos() as f64).max(1.0);
        let old = f64::from_bits(self.value.load(Ordering::Relaxed));
        let at = self.at_ms.load(Ordering::Relaxed);
        let w = keep(now_ms.saturating_sub(at), decay);
        let next = if old <= 0.0 || rtt >= old * w {
            // First observation, or a peak over the (idle-decayed) estimate: jump to it.
            rtt
        } else {
            old * w + rtt * (1.0 - w)
        };
        self.value.store(next.to_bits(), Ordering::Relaxed);
        self.at_ms.store(now_ms.max(at), Ordering::Relaxed);
    }

    /// Records a failure that came back after `rtt`: observed as at least [`FAILURE_PENALTY`].
    pub fn failure(&self, rtt: Duration, now_ms: u64, decay: Duration) {
        self.observe(rtt.max(FAILURE_PENALTY), now_ms, decay);
    }

    /// The current estimate in nanoseconds, decayed toward zero for the time since the last
    /// observation (0 when nothing was observed).
    pub fn value_ns(&self, now_ms: u64, decay: Duration) -> f64 {
        let v = f64::from_bits(self.value.load(Ordering::Relaxed));
        if v <= 0.0 {
            return 0.0;
        }
        let at = self.at_ms.load(Ordering::Relaxed);
        v * keep(now_ms.saturating_sub(at), decay)
    }
}

pub struct Ewma {
    decay: Duration,
    rng: Rng,
}

pub fn build(endpoints: &[Endpoint], settings: &UpstreamSettings) -> Box<dyn Balancer> {
    Box::new(Ewma::with_rng(endpoints, settings, Rng::from_entropy()))
}

impl Ewma {
    /// A balancer drawing from `rng` (seed it for reproducible tests).
    pub fn with_rng(_endpoints: &[Endpoint], settings: &UpstreamSettings, rng: Rng) -> Self {
        Ewma {
            decay: settings.ewma_decay,
            rng,
        }
    }

    /// `estimate × (in_flight + 1) / weight`, with `estimate` already chosen.
    fn cost(e: &Endpoint, estimate: f64) -> f64 {
        estimate * (e.state.in_flight() as f64 + 1.0) / f64::from(e.weight.max(1))
    }
}

impl Balancer for Ewma {
    fn next(&self, endpoints: &[Endpoint], ctx: &PickContext, tried: &Tried) -> Option<usize> {
        let (a, b) = two_choices(endpoints.len(), &self.rng, |i| {
            !tried.contains(i) && endpoints[i].usable(ctx)
        })?;
        let Some(b) = b else { return Some(a) };
        let (ea, eb) = (&endpoints[a], &endpoints[b]);
        let va = ea.state.ewma.value_ns(ctx.now_ms, self.decay);
        let vb = eb.state.ewma.value_ns(ctx.now_ms, self.decay);
        // No observation: take the other's, so the pair compares by load.
        let (va, vb) = match (va > 0.0, vb > 0.0) {
            (true, true) => (va, vb),
            (true, false) => (va, va),
            (false, true) => (vb, vb),
            (false, false) => (1.0, 1.0),
        };
        if Self::cost(eb, vb) < Self::cost(ea, va) {
            Some(b)
        } else {
            Some(a)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::super::testing::{ctx, endpoints};
    use super::super::Candidates;
    use super::*;
    use crate::upstream::InFlight;

    const DECAY: Duration = Duration::from_secs(10);
    const MS: Duration = Duration::from_millis(1);

    fn at(now_ms: u64) -> PickContext {
        PickContext { now_ms, ..ctx() }
    }

    fn balancer(eps: &[Endpoint], seed: u64) -> Ewma {
        Ewma::with_rng(
            eps,
            &UpstreamSettings::with_balancer("ewma"),
            Rng::new(seed),
        )
    }

    #[test]
    fn peak_jumps_then_decays_toward_observations() {
        let e = PeakEwma::default();
        assert_eq!(e.value_ns(0, DECAY), 0.0);
        e.observe(10 * MS, 1_000, DECAY);
        assert_eq!(e.value_ns(1_000, DECAY), 10e6);
        // A peak replaces the estimate at once.
        e.observe(100 * MS, 1_001, DECAY);
        assert_eq!(e.value_ns(1_001, DECAY), 100e6);
        // Lower observations pull it down gradually: after one decay time of 10 ms answers,
        // about 63% of the way.
        for t in 0..1_000 {
            e.observe(10 * MS, 1_011 + t * 10, DECAY);
        }
        let v = e.value_ns(11_001, DECAY) / 1e6;
        assert!((v - (10.0 + 90.0 * (-1.0f64).exp())).abs() < 1.0, "{v}");
        // Five more decay times: within 0.25% of the observations.
        for t in 0..5_000 {
            e.observe(10 * MS, 11_011 + t * 10, DECAY);
        }
        let v = e.value_ns(61_001, DECAY) / 1e6;
        assert!((v - (10.0 + 90.0 * (-6.0f64).exp())).abs() < 0.05, "{v}");
    }

    #[test]
    fn idle_estimate_decays_toward_zero() {
        let e = PeakEwma::default();
        e.observe(Duration::from_millis(80), 0, DECAY);
        let v = e.value_ns(10_000, DECAY) / 1e6;
        assert!((v - 80.0 * (-1.0f64).exp()).abs() < 0.01, "{v}");
        // An observation after a long idle spell above the decayed estimate is a new peak.
        e.observe(Duration::from_millis(40), 20_000, DECAY);
        assert_eq!(e.value_ns(20_000, DECAY), 40e6);
    }

    #[test]
    fn fast_failures_count_as_the_penalty() {
        let e = PeakEwma::default();
        e.observe(MS, 0, DECAY);
        e.failure(Duration::from_micros(50), 1, DECAY);
        assert_eq!(e.value_ns(1, DECAY), FAILURE_PENALTY.as_nanos() as f64);
        let slow = PeakEwma::default();
        slow.failure(Duration::from_secs(3), 0, DECAY);
        assert_eq!(slow.value_ns(0, DECAY), 3e9);
    }

    /// Sequential picks at 10 ms intervals, each endpoint answering in its `rtt`
    /// (`None` = fails fast). Returns each endpoint's share of the last `measure` picks.
    fn run(rtts: &[Option<u64>], weights: &[u32], picks: usize, measure: usize) -> Vec<f64> {
        let eps = endpoints(weights);
        let b = balancer(&eps, 42);
        let mut counts = vec![0usize; eps.len()];
        for n in 0..picks {
            let now = 1_000 + n as u64 * 10;
            let i = b.next(&eps, &at(now), &Tried::default()).unwrap();
            match rtts[i] {
                Some(ms) => eps[i]
                    .state
                    .ewma
                    .observe(Duration::from_millis(ms), now, DECAY),
                None => eps[i]
                    .state
                    .ewma
                    .failure(Duration::from_micros(100), now, DECAY),
            }
            if n >= picks - measure {
                counts[i] += 1;
            }
        }
        counts.iter().map(|&c| c as f64 / measure as f64).collect()
    }

    #[test]
    fn prefers_the_fast_endpoint() {
        let s = run(&[Some(50), Some(2), Some(5)], &[1, 1, 1], 2_000, 1_000);
        eprintln!("ewma 50ms/2ms/5ms sequential: {s:?}");
        assert!(s[0] < 0.01, "{s:?}");
        assert!(s[1] > 0.6, "{s:?}");
    }

    #[test]
    fn avoids_an_endpoint_that_fails_fast() {
        let s = run(&[None, Some(20), Some(20)], &[1, 1, 1], 2_000, 1_000);
        eprintln!("ewma fails-fast/20ms/20ms: {s:?}");
        assert!(s[0] < 0.01, "{s:?}");
        assert!((s[1] - 0.5).abs() < 0.05, "{s:?}");
    }

    #[test]
    fn in_flight_outweighs_a_small_latency_edge() {
        // Endpoint 0 is slightly faster but has 4 in flight: cost 5 × 10 ms vs 1 × 12 ms.
        let eps = endpoints(&[1, 1]);
        eps[0].state.ewma.observe(10 * MS, 0, DECAY);
        eps[1].state.ewma.observe(12 * MS, 0, DECAY);
        let b = balancer(&eps, 3);
        assert_eq!(b.next(&eps, &at(0), &Tried::default()), Some(0));
        let _held: Vec<InFlight> = (0..4).map(|_| InFlight::start(&eps[0].state)).collect();
        for _ in 0..50 {
            assert_eq!(b.next(&eps, &at(0), &Tried::default()), Some(1));
        }
    }

    #[test]
    fn newcomer_is_compared_by_load_not_flooded() {
        let eps = endpoints(&[1, 1, 1]);
        eps[0].state.ewma.observe(10 * MS, 0, DECAY);
        eps[1].state.ewma.observe(10 * MS, 0, DECAY);
        // Endpoint 2 has no observation: it draws ties (first drawn wins), so about a third.
        let b = balancer(&eps, 8);
        let mut counts = [0usize; 3];
        for _ in 0..30_000 {
            counts[b.next(&eps, &at(0), &Tried::default()).unwrap()] += 1;
        }
        eprintln!("ewma newcomer among equals: {counts:?}");
        assert!(counts
            .iter()
            .all(|&c| (c as f64 / 30_000.0 - 1.0 / 3.0).abs() < 0.02));
    }

    #[test]
    fn shares_follow_weights_under_concurrency() {
        // Equal latency, concurrency 60, random completions (as in least_conn's test).
        let eps = endpoints(&[1, 2, 3]);
        for e in &eps {
            e.state.ewma.observe(10 * MS, 0, DECAY);
        }
        let b = balancer(&eps, 17);
        let done = Rng::new(99);
        let mut open: VecDeque<InFlight> = VecDeque::new();
        let mut counts = [0usize; 3];
        for _ in 0..60_000 {
            let i = b.next(&eps, &at(0), &Tried::default()).unwrap();
            counts[i] += 1;
            open.push_back(InFlight::start(&eps[i].state));
            if open.len() > 60 {
                let k = done.below(open.len());
                open.swap_remove_back(k);
            }
        }
        let s: Vec<f64> = counts.iter().map(|&c| c as f64 / 60_000.0).collect();
        eprintln!("ewma 1:2:3 at concurrency 60: {s:?}");
        for (share, want) in s.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            assert!((share - want).abs() < 0.03, "{s:?}");
        }
    }

    #[test]
    fn one_usable_is_picked_none_gives_none() {
        let mut eps = endpoints(&[1, 1, 1]);
        eps[0].healthy = false;
        eps[2].healthy = false;
        let b = balancer(&eps, 1);
        assert_eq!(b.next(&eps, &at(0), &Tried::default()), Some(1));
        eps[1].healthy = false;
        assert_eq!(b.next(&eps, &at(0), &Tried::default()), None);
    }

    #[test]
    fn candidates_cover_each_usable_once() {
        let mut eps = endpoints(&[1, 2, 3, 1, 1]);
        eps[2].healthy = false;
        eps[0].state.ewma.observe(5 * MS, 0, DECAY);
        let b = balancer(&eps, 4);
        for _ in 0..100 {
            let mut seen: Vec<usize> = Candidates::new(&b, &eps, at(0))
                .map(|e| eps.iter().position(|x| x.id == e.id).unwrap())
                .collect();
            seen.sort();
            assert_eq!(seen, vec![0, 1, 3, 4]);
        }
    }
}
