//! Weighted least connections: the endpoint with the lowest `(in_flight + 1) / weight`. Up to
//! [`FULL_SCAN_MAX`] endpoints every usable one is compared (exact, as nginx, HAProxy and
//! APISIX do); above that, two drawn at random (power of two choices, as Envoy's
//! least-request balancer does).
//!
//! The full scan starts at a rotating offset and keeps the first strictly cheapest endpoint it
//! meets, so equal costs (idle endpoints of one weight) take turns instead of always going to
//! the first in the list (#17).
//!
//! In-flight counts are the RAII guards the proxy holds per attempt
//! ([`crate::endpoint::InFlight`]), so a cancelled request cannot leave a count behind. A pick
//! reads two atomics; the comparison is exact (cross-multiplied integers, no floats). Sampling
//! two instead of scanning all keeps a pick O(1) with a thousand endpoints and avoids the herd
//! effect of every concurrent picker choosing the same least-loaded endpoint from counts that
//! are a moment old. Ties between the two draws go to the first, which is uniformly random, so
//! they are broken fairly.
//!
//! The `+ 1` prices the request being placed: with weights 1 and 3 an idle weight-3 endpoint
//! wins over an idle weight-1 one, and it keeps winning until it holds three times as many. So
//! the weight ratio shows in the shares under concurrency; with strictly sequential traffic
//! (never more than one request in flight) the heavier of the two drawn endpoints always wins.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{two_choices, Balancer, Kind, Options, PickContext, Rng, Settings, Tried};
use crate::endpoint::Endpoint;

/// `balancer = "least_conn"`: no options.
pub const KIND: Kind = Kind {
    name: "least_conn",
    options: &[],
    settings: |_: &Options| Ok(Arc::new(LeastConnSettings)),
};

/// Least connections has no settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeastConnSettings;

impl Settings for LeastConnSettings {
    fn build(&self, _endpoints: &[Endpoint]) -> Box<dyn Balancer> {
        Box::new(LeastConn::with_rng(Rng::from_entropy()))
    }
}

/// Up to this many endpoints a pick scans them all (exact least connections); above it, power
/// of two choices. Sixteen atomic loads cost about what two random draws and their rejections
/// do, and small upstreams are where users notice an inexact pick.
pub const FULL_SCAN_MAX: usize = 16;

pub struct LeastConn {
    rng: Rng,
    /// Where the next full scan starts: rotates so that ties take turns.
    cursor: AtomicUsize,
}

impl LeastConn {
    /// A balancer drawing from `rng` (seed it for reproducible tests).
    pub fn with_rng(rng: Rng) -> Self {
        LeastConn {
            rng,
            cursor: AtomicUsize::new(0),
        }
    }

    /// The cheapest usable endpoint not yet tried, scanning from a rotating start.
    fn scan(&self, endpoints: &[Endpoint], ctx: &PickContext, tried: &Tried) -> Option<usize> {
        let n = endpoints.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<usize> = None;
        for step in 0..n {
            let i = (start + step) % n;
            if tried.contains(i) || !ctx.usable(&endpoints[i]) {
                continue;
            }
            match best {
                Some(b) if !cheaper(&endpoints[i], &endpoints[b]) => {}
                _ => best = Some(i),
            }
        }
        best
    }
}

/// Whether `a` costs less than `b`: `(a.in_flight + 1) / a.weight < (b.in_flight + 1) /
/// b.weight`, cross-multiplied (weights are positive for usable endpoints).
fn cheaper(a: &Endpoint, b: &Endpoint) -> bool {
    let load = |e: &Endpoint| u128::from(e.state.in_flight()) + 1;
    load(a) * u128::from(b.weight) < load(b) * u128::from(a.weight)
}

impl Balancer for LeastConn {
    fn next(&self, endpoints: &[Endpoint], ctx: &PickContext, tried: &Tried) -> Option<usize> {
        if endpoints.is_empty() {
            return None;
        }
        if endpoints.len() <= FULL_SCAN_MAX {
            return self.scan(endpoints, ctx, tried);
        }
        let (a, b) = two_choices(endpoints.len(), &self.rng, |i| {
            !tried.contains(i) && ctx.usable(&endpoints[i])
        })?;
        match b {
            Some(b) if cheaper(&endpoints[b], &endpoints[a]) => Some(b),
            _ => Some(a),
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

    fn balancer(_eps: &[Endpoint], seed: u64) -> LeastConn {
        LeastConn::with_rng(Rng::new(seed))
    }

    /// Closed loop: `concurrency` requests in flight; each pick holds a guard, and when the
    /// loop is full a random one completes (equal service times). Returns each endpoint's share.
    fn simulate(weights: &[u32], concurrency: usize, picks: usize, seed: u64) -> Vec<f64> {
        let eps = endpoints(weights);
        let b = balancer(&eps, seed);
        let done = Rng::new(seed ^ 0x5555);
        let mut open: VecDeque<InFlight> = VecDeque::new();
        let mut counts = vec![0usize; eps.len()];
        for _ in 0..picks {
            let i = b.next(&eps, &ctx(), &Tried::default()).unwrap();
            counts[i] += 1;
            open.push_back(InFlight::start(&eps[i].state));
            if open.len() > concurrency {
                let k = done.below(open.len());
                open.swap_remove_back(k);
            }
        }
        counts.iter().map(|&c| c as f64 / picks as f64).collect()
    }

    #[test]
    fn shares_follow_weights_under_concurrency() {
        let s = simulate(&[1, 2, 3], 60, 60_000, 7);
        eprintln!("least_conn 1:2:3 at concurrency 60: {s:?}");
        for (share, want) in s.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            assert!((share - want).abs() < 0.03, "{s:?}");
        }
    }

    #[test]
    fn equal_weights_at_rest_spread_evenly() {
        let s = simulate(&[1, 1, 1, 1], 1, 40_000, 3);
        eprintln!("least_conn 1:1:1:1 sequential: {s:?}");
        assert!(s.iter().all(|x| (x - 0.25).abs() < 0.02), "{s:?}");
    }

    #[test]
    fn a_small_upstream_gets_the_exact_least_loaded() {
        let eps = endpoints(&[1, 1, 1]);
        let b = balancer(&eps, 11);
        let _held: Vec<InFlight> = (0..5).map(|_| InFlight::start(&eps[0].state)).collect();
        let _one = InFlight::start(&eps[1].state);
        // A full scan: the idle endpoint wins every pick (P2C would give it two thirds).
        for _ in 0..300 {
            assert_eq!(b.next(&eps, &ctx(), &Tried::default()), Some(2));
        }
        // Tried, the next cheapest.
        let mut tried = Tried::default();
        tried.insert(2);
        assert_eq!(b.next(&eps, &ctx(), &tried), Some(1));
    }

    #[test]
    fn ties_in_a_small_upstream_take_turns() {
        let eps = endpoints(&[1, 1, 1, 1]);
        let b = balancer(&eps, 2);
        let picks: Vec<usize> = (0..8)
            .map(|_| b.next(&eps, &ctx(), &Tried::default()).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn a_large_upstream_samples_two() {
        let eps = endpoints(&[1; FULL_SCAN_MAX + 1]);
        let b = balancer(&eps, 11);
        let _held: Vec<InFlight> = (0..FULL_SCAN_MAX)
            .map(|i| InFlight::start(&eps[i].state))
            .collect();
        let mut idle = 0;
        for _ in 0..3_000 {
            if b.next(&eps, &ctx(), &Tried::default()) == Some(FULL_SCAN_MAX) {
                idle += 1;
            }
        }
        // The one idle endpoint wins only when drawn: about 2 of 17 picks, not all.
        let share = idle as f64 / 3_000.0;
        eprintln!("least_conn 17 endpoints, one idle: {share}");
        assert!((share - 2.0 / 17.0).abs() < 0.04, "{share}");
    }

    #[test]
    fn weight_offsets_in_flight() {
        // 2 in flight on a weight-3 endpoint (cost 1) beat 1 on a weight-1 one (cost 2).
        let eps = endpoints(&[1, 3]);
        let b = balancer(&eps, 5);
        let _a = InFlight::start(&eps[0].state);
        let _b: Vec<InFlight> = (0..2).map(|_| InFlight::start(&eps[1].state)).collect();
        for _ in 0..100 {
            assert_eq!(b.next(&eps, &ctx(), &Tried::default()), Some(1));
        }
    }

    #[test]
    fn one_usable_is_picked_none_gives_none() {
        let mut eps = endpoints(&[1, 1, 0]);
        eps[0].healthy = false;
        let b = balancer(&eps, 1);
        for _ in 0..50 {
            assert_eq!(b.next(&eps, &ctx(), &Tried::default()), Some(1));
        }
        eps[1].healthy = false;
        assert_eq!(b.next(&eps, &ctx(), &Tried::default()), None);
    }

    #[test]
    fn candidates_cover_each_usable_once() {
        let mut eps = endpoints(&[1, 2, 3, 1, 1]);
        eps[3].healthy = false;
        let b = balancer(&eps, 9);
        for _ in 0..100 {
            let mut seen: Vec<usize> = Candidates::new(&b, &eps, ctx())
                .map(|e| eps.iter().position(|x| x.id == e.id).unwrap())
                .collect();
            seen.sort();
            assert_eq!(seen, vec![0, 1, 2, 4]);
        }
    }
}
