//! Circuit breakers (Envoy's names and defaults): limits on what an upstream may hold at once,
//! so that overload is answered at once (503, `x-edge-agent-overflow: <limit>`) instead of
//! queueing without bound.
//!
//! - `max_requests`: requests in flight to the upstream (from routing until the response body
//!   is done).
//! - `max_retries`: retries in flight to the upstream at once, beside the retry budget (which
//!   bounds retries as a share of requests over time). Over it a request is not retried: the
//!   client gets the last answer (with the overflow header) or, when there is none, the 503.
//! - `max_connections` and `max_pending` are settings of the same family, kept here with their
//!   defaults; they bound an endpoint's connections and the requests waiting for one.
//!
//! A [`Gate`] is one shared counter; [`Gate::enter`] takes a place if there is one and returns
//! a [`Slot`] that gives it back on drop (a cancelled request cannot leak a place). This file is
//! a leaf: it knows counters, not upstreams.
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Connections per endpoint.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
/// Requests waiting for a connection, per upstream.
pub const DEFAULT_MAX_PENDING: u32 = 1024;
/// Requests in flight, per upstream.
pub const DEFAULT_MAX_REQUESTS: u32 = 1024;
/// Retries in flight, per upstream.
pub const DEFAULT_MAX_RETRIES: u32 = 3;

/// An upstream's limits (`[[upstream]]` keys of the same names; each at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreakers {
    pub max_connections: u32,
    pub max_pending: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

impl Default for CircuitBreakers {
    fn default() -> Self {
        CircuitBreakers {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_pending: DEFAULT_MAX_PENDING,
            max_requests: DEFAULT_MAX_REQUESTS,
            max_retries: DEFAULT_MAX_RETRIES,
        }
    }
}

/// Which limit a request ran into: the value of `x-edge-agent-overflow` and of the `limit`
/// label of `edge_agent_overflow_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Connections,
    Pending,
    Requests,
    Retries,
}

impl Limit {
    pub fn name(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::Pending => "pending",
            Limit::Requests => "requests",
            Limit::Retries => "retries",
        }
    }
}

/// A shared count of places taken.
#[derive(Debug, Default, Clone)]
pub struct Gate(Arc<AtomicU32>);

impl Gate {
    /// Takes a place if fewer than `max` are taken.
    #[inline]
    pub fn enter(&self, max: u32) -> Option<Slot> {
        let taken = self.0.fetch_add(1, Ordering::AcqRel);
        if taken >= max {
            self.0.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(self.0.clone()))
    }

    /// Places taken now.
    pub fn taken(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A place in a [`Gate`], given back on drop.
#[derive(Debug)]
pub struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_admits_up_to_its_limit_and_frees_on_drop() {
        let g = Gate::default();
        let held: Vec<Slot> = (0..3).filter_map(|_| g.enter(3)).collect();
        assert_eq!(held.len(), 3);
        assert!(g.enter(3).is_none(), "a fourth place over a limit of 3");
        assert_eq!(g.taken(), 3, "a refused entry leaves no count behind");
        drop(held);
        assert_eq!(g.taken(), 0);
        assert!(g.enter(1).is_some());
    }
}
