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
use std::sync::Arc;
use std::time::Duration;

use super::{two_choices, Balancer, Kind, Options, PickContext, Rng, Settings, Tried};
use crate::endpoint::Endpoint;

/// `balancer = "ewma"`: reads the upstream's `ewma_decay`.
pub const KIND: Kind = Kind {
    name: "ewma",
    options: &[],
    settings: |o: &Options| {
        Ok(Arc::new(EwmaSettings {
            decay: o.ewma_decay,
        }))
    },
};

/// The `ewma` balancer's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EwmaSettings {
    /// How fast old observations fade (the estimate is read with it).
    pub decay: Duration,
}

impl Settings for EwmaSettings {
    fn build(&self, _endpoints: &[Endpoint]) -> Box<dyn Balancer> {
        Box::new(Ewma::with_rng(self.decay, Rng::from_entropy()))
    }
}

pub struct Ewma {
    decay: Duration,
    rng: Rng,
}

impl Ewma {
    /// A balancer reading estimates with `decay` and drawing from `rng` (seed it for
    /// reproducible tests).
    pub fn with_rng(decay: Duration, rng: Rng) -> Self {
        Ewma { decay, rng }
    }

    /// `estimate × (in_flight + 1) / weight`, with `estimate` already chosen.
    fn cost(e: &Endpoint, estimate: f64) -> f64 {
        estimate * (e.state.in_flight() as f64 + 1.0) / f64::from(e.weight.max(1))
    }
}

impl Balancer for Ewma {
    fn next(&self, endpoints: &[Endpoint], ctx: &PickContext, tried: &Tried) -> Option<usize> {
        let (a, b) = two_choices(endpoints.len(), &self.rng, |i| {
            !tried.contains(i) && ctx.usable(&endpoints[i])
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
    use crate::endpoint::InFlight;

    const DECAY: Duration = Duration::from_secs(10);
    const MS: Duration = Duration::from_millis(1);

    fn at(now_ms: u64) -> PickContext<'static> {
        PickContext { now_ms, ..ctx() }
    }

    fn balancer(_eps: &[Endpoint], seed: u64) -> Ewma {
        Ewma::with_rng(DECAY, Rng::new(seed))
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
