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

use crate::config::UpstreamSettings;
use crate::upstream::Endpoint;

pub mod chash;
pub mod ewma;
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
pub const REGISTRY: &[(&str, Factory)] = &[("roundrobin", roundrobin::build)];

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
}
