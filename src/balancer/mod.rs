//! Load balancers.
//!
//! A balancer is built off the request path from an upstream's endpoint list (it is part of the
//! upstream snapshot and is rebuilt with it) and answers one question on the request path: which
//! endpoint to try next, skipping those already tried. [`Candidates`] turns that into an
//! iterator, so retries and "skip the one that just failed" compose without special cases.
//!
//! Adding a balancer: one file implementing [`Balancer`] and one line in [`REGISTRY`].
//! Upstreams hold a `Box<dyn Balancer>`: one indirect call per pick, a few nanoseconds, bought for
//! a plugin boundary that stays this simple.
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::UpstreamSettings;
use crate::upstream::Endpoint;

pub mod chash;
#[cfg(test)]
mod custom_example;
pub mod ewma;
pub mod least_conn;
pub mod roundrobin;

/// Picks endpoints for one upstream.
pub trait Balancer: Send + Sync {
    /// The index (into `endpoints`) of the next endpoint to try: an available one not in
    /// `tried`. `None` when there is none left.
    fn next(&self, endpoints: &[Endpoint], ctx: &PickContext, tried: &Tried) -> Option<usize>;
}

/// Builds a balancer for an endpoint list.
pub type Factory = fn(&[Endpoint], &UpstreamSettings) -> Box<dyn Balancer>;

/// Every balancer by its configuration name.
pub const REGISTRY: &[(&str, Factory)] = &[
    ("roundrobin", roundrobin::build),
    ("chash", chash::build),
    ("ewma", ewma::build),
    ("least_conn", least_conn::build),
    #[cfg(test)]
    ("first_usable", custom_example::build),
];

/// The factory for a configuration name.
pub fn factory(name: &str) -> Option<Factory> {
    REGISTRY.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// Names of all balancers, for error messages and help.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|(n, _)| *n).collect()
}

/// What a balancer may know of the request. Owned and `Copy`, so a candidate iterator does not
/// borrow the request the proxy is about to send.
#[derive(Debug, Clone, Copy)]
pub struct PickContext {
    pub client_ip: IpAddr,
    /// Hash of the request's balancing key, when the upstream hashes on one and the request has
    /// it.
    pub key: Option<u64>,
    /// Process-clock milliseconds ([`crate::health::now_ms`]) when the pick started.
    pub now_ms: u64,
    /// Panic mode: the agent's own health verdicts are ignored (too few endpoints are healthy).
    pub panic: bool,
    /// The upstream's slow-start window.
    pub slow_start: Option<std::time::Duration>,
}

/// Indices already tried for one request. Holds a few inline; retries are few.
#[derive(Debug, Default, Clone)]
pub struct Tried {
    inline: [u32; 4],
    len: usize,
    more: Vec<u32>,
}

impl Tried {
    pub fn contains(&self, i: usize) -> bool {
        let i = i as u32;
        self.inline[..self.len.min(4)].contains(&i) || self.more.contains(&i)
    }

    pub fn insert(&mut self, i: usize) {
        if self.contains(i) {
            return;
        }
        if self.len < self.inline.len() {
            self.inline[self.len] = i as u32;
            self.len += 1;
        } else {
            self.more.push(i as u32);
        }
    }

    pub fn len(&self) -> usize {
        self.len + self.more.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The endpoints to try for one request, in order, each at most once.
pub struct Candidates<'a> {
    balancer: &'a dyn Balancer,
    endpoints: &'a [Endpoint],
    ctx: PickContext,
    tried: Tried,
}

impl<'a> Candidates<'a> {
    pub fn new(balancer: &'a dyn Balancer, endpoints: &'a [Endpoint], ctx: PickContext) -> Self {
        Candidates {
            balancer,
            endpoints,
            ctx,
            tried: Tried::default(),
        }
    }
}

impl<'a> Iterator for Candidates<'a> {
    type Item = &'a Endpoint;

    fn next(&mut self) -> Option<&'a Endpoint> {
        let i = self.balancer.next(self.endpoints, &self.ctx, &self.tried)?;
        self.tried.insert(i);
        self.endpoints.get(i)
    }
}

/// Lock-free random numbers for balancers: SplitMix64 over an atomic counter. A draw is one
/// relaxed `fetch_add` and a few multiplies, with no lock and no thread-local; concurrent
/// pickers get different numbers because each `fetch_add` returns a different counter value.
/// Seeded explicitly in tests, so pick sequences are reproducible.
#[derive(Debug)]
pub struct Rng(AtomicU64);

/// SplitMix64's increment (2^64 / golden ratio).
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(AtomicU64::new(seed))
    }

    /// Seeded from the thread RNG, so agents on many hosts do not pick in lockstep.
    pub fn from_entropy() -> Self {
        Rng::new(rand::random())
    }

    pub fn next_u64(&self) -> u64 {
        let s = self
            .0
            .fetch_add(GOLDEN_GAMMA, Ordering::Relaxed)
            .wrapping_add(GOLDEN_GAMMA);
        mix64(s)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift (no modulo bias worth the name).
    pub fn below(&self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// SplitMix64's finaliser: a bijective 64-bit mix.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Random draws [`two_choices`] makes before it falls back to a scan.
pub const SAMPLE_DRAWS: usize = 8;

/// Power of two choices: two distinct indices in `0..n` for which `eligible` holds, drawn
/// uniformly, first draw first (so "keep the first on a tie" is a fair coin). The second is
/// `None` when only one index is eligible; `None` overall when none is. Costs O(1) while most
/// endpoints are eligible; after [`SAMPLE_DRAWS`] misses (most endpoints down or tried) it
/// scans from a random start, which is O(n) and slightly less uniform, but only then.
pub fn two_choices(
    n: usize,
    rng: &Rng,
    eligible: impl Fn(usize) -> bool,
) -> Option<(usize, Option<usize>)> {
    if n == 0 {
        return None;
    }
    let mut first = None;
    // Two draws per random word (its high and low halves, each mapped to `0..n` by
    // multiply-shift): one atomic step per pair instead of one per draw (#8: the pick cost).
    for _ in 0..SAMPLE_DRAWS / 2 {
        let r = rng.next_u64();
        for half in [r >> 32, r & 0xffff_ffff] {
            let i = ((half * n as u64) >> 32) as usize;
            match first {
                None if eligible(i) => first = Some(i),
                Some(f) if i != f && eligible(i) => return Some((f, Some(i))),
                _ => {}
            }
        }
    }
    let start = rng.below(n);
    for step in 0..n {
        let i = (start + step) % n;
        if first == Some(i) || !eligible(i) {
            continue;
        }
        match first {
            None => first = Some(i),
            Some(f) => return Some((f, Some(i))),
        }
    }
    first.map(|f| (f, None))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for balancer tests.
    use super::*;

    pub fn endpoints(weights: &[u32]) -> Vec<Endpoint> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let mut inst = discovery::Instance::new("127.0.0.1", 10_000 + i as u16);
                inst.weight = *w;
                Endpoint::from_instance(&inst, "file", Default::default())
            })
            .collect()
    }

    pub fn ctx() -> PickContext {
        PickContext {
            client_ip: IpAddr::from([127, 0, 0, 1]),
            key: None,
            now_ms: 0,
            panic: false,
            slow_start: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tried_spills_past_inline() {
        let mut t = Tried::default();
        for i in 0..10 {
            t.insert(i);
            t.insert(i);
        }
        assert_eq!(t.len(), 10);
        assert!((0..10).all(|i| t.contains(i)));
        assert!(!t.contains(10));
    }

    #[test]
    fn candidates_never_repeat_and_end() {
        let eps = testing::endpoints(&[5, 1, 1]);
        let b = roundrobin::build(&eps, &UpstreamSettings::with_balancer("roundrobin"));
        let seen: Vec<u16> = Candidates::new(b.as_ref(), &eps, testing::ctx())
            .map(|e| e.authority.port_u16().unwrap())
            .collect();
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(seen.len(), 3);
        assert_eq!(sorted.len(), 3);
    }

    /// Every registered balancer, with and without a hash key, with one endpoint down and one
    /// of weight 0: each usable endpoint comes exactly once, then the iterator ends.
    #[test]
    fn every_balancer_yields_each_usable_endpoint_once() {
        let mut eps = testing::endpoints(&[1, 2, 3, 0, 1, 1, 5]);
        eps[4].healthy = false;
        for (name, build) in REGISTRY {
            let mut settings = UpstreamSettings::with_balancer(name);
            settings.hash_on = Some(crate::config::HashOn::Ip);
            let b = build(&eps, &settings);
            for key in [None, Some(1), Some(u64::MAX), Some(0x1234_5678)] {
                for _ in 0..20 {
                    let ctx = PickContext {
                        key,
                        ..testing::ctx()
                    };
                    let mut seen: Vec<usize> = Candidates::new(b.as_ref(), &eps, ctx)
                        .map(|e| eps.iter().position(|x| x.id == e.id).unwrap())
                        .collect();
                    seen.sort();
                    assert_eq!(seen, vec![0, 1, 2, 5, 6], "{name} key {key:?}");
                }
            }
        }
    }

    #[test]
    fn every_balancer_handles_empty_and_all_down() {
        let mut down = testing::endpoints(&[1, 1]);
        for e in &mut down {
            e.healthy = false;
        }
        for (name, build) in REGISTRY {
            let mut settings = UpstreamSettings::with_balancer(name);
            settings.hash_on = Some(crate::config::HashOn::Ip);
            for eps in [Vec::new(), down.clone()] {
                let b = build(&eps, &settings);
                for key in [None, Some(7)] {
                    let ctx = PickContext {
                        key,
                        ..testing::ctx()
                    };
                    assert_eq!(b.next(&eps, &ctx, &Tried::default()), None, "{name}");
                }
            }
        }
    }

    #[test]
    fn two_choices_are_distinct_uniform_and_fall_back_to_a_scan() {
        let rng = Rng::new(1);
        let mut firsts = [0usize; 4];
        let mut pairs = [[0usize; 4]; 4];
        for _ in 0..40_000 {
            let (a, b) = two_choices(4, &rng, |_| true).unwrap();
            let b = b.unwrap();
            assert_ne!(a, b);
            firsts[a] += 1;
            pairs[a][b] += 1;
        }
        assert!(firsts
            .iter()
            .all(|&c| (c as f64 / 40_000.0 - 0.25).abs() < 0.01));
        assert!(pairs.iter().flatten().filter(|&&c| c > 0).count() == 12);
        // One eligible among many: found by the scan.
        for _ in 0..100 {
            assert_eq!(two_choices(1_000, &rng, |i| i == 777), Some((777, None)));
        }
        assert_eq!(two_choices(1_000, &rng, |_| false), None);
        assert_eq!(two_choices(0, &rng, |_| true), None);
        // Same seed, same sequence.
        let (x, y) = (Rng::new(5), Rng::new(5));
        assert!((0..100).all(|_| x.next_u64() == y.next_u64()));
    }
}
