//! Lock-free random numbers for the request path: SplitMix64 over an atomic counter. A draw is
//! one relaxed `fetch_add` and a few multiplies, with no lock and no thread-local; concurrent
//! callers get different numbers because each `fetch_add` returns a different counter value.
//! Balancers and slow start draw from one of these, seeded explicitly in tests, so pick
//! sequences are reproducible.
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub struct Rng(AtomicU64);

/// SplitMix64's increment (2^64 / golden ratio).
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

impl Rng {
    pub const fn new(seed: u64) -> Self {
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

    /// Uniform in `[0, 1)`, from the top 53 bits of a draw.
    pub fn unit(&self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

impl Default for Rng {
    fn default() -> Self {
        Rng::from_entropy()
    }
}

/// SplitMix64's finaliser: a bijective 64-bit mix.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_unit_is_in_range() {
        let (x, y) = (Rng::new(5), Rng::new(5));
        assert!((0..100).all(|_| x.next_u64() == y.next_u64()));
        let r = Rng::new(9);
        let draws: Vec<f64> = (0..10_000).map(|_| r.unit()).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
