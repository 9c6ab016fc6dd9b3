//! The mass-deregistration guard: an answer that removes most of a service's endpoints at once,
//! or empties it, is held until it is confirmed, because a registry that suddenly forgets a
//! service is more often broken (a restarted Eureka, a Consul agent that lost its catalog, a
//! truncated file) than right.
//!
//! An update from one source for one service is *suspicious* when it removes more than
//! `max_removal_percent` of the endpoints that source reported (by identity), or leaves none.
//! A suspicious update is held, logged and counted (`edge_agent_discovery_held_total{source}`);
//! the last good set keeps serving. It applies when the source repeats the same answer
//! `confirm_answers` times in a row (polling registries), or when `confirm_window` has passed
//! since it was first held (push and blocking-query registries answer only on change). Any
//! non-suspicious answer replaces a held one. Services in `opt_out` are never held. Additions
//! and small removals are never delayed.
//!
//! Configuration: the `[guard]` table of `EDGE_AGENT_CONFIG`, and `EDGE_AGENT_REMOVAL_GUARD=off`
//! to disable it (on by default).
use std::collections::HashSet;
use std::time::Duration;

use discovery::Instance;

/// Share of a service's endpoints one update may remove without being held, percent.
pub const DEFAULT_MAX_REMOVAL_PERCENT: u32 = 50;
/// How long a suspicious update is held before it applies anyway.
pub const DEFAULT_CONFIRM_WINDOW: Duration = Duration::from_secs(30);
/// Identical consecutive answers that confirm a suspicious update.
pub const DEFAULT_CONFIRM_ANSWERS: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardConfig {
    pub enabled: bool,
    pub max_removal_percent: u32,
    pub confirm_window: Duration,
    pub confirm_answers: u32,
    /// Services whose updates always apply at once.
    pub opt_out: Vec<String>,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            enabled: true,
            max_removal_percent: DEFAULT_MAX_REMOVAL_PERCENT,
            confirm_window: DEFAULT_CONFIRM_WINDOW,
            confirm_answers: DEFAULT_CONFIRM_ANSWERS,
            opt_out: Vec::new(),
        }
    }
}

impl GuardConfig {
    /// Whether replacing `current` by `next` (`None`: the service is gone) is suspicious.
    pub fn suspicious(
        &self,
        service: &str,
        current: &[Instance],
        next: Option<&[Instance]>,
    ) -> bool {
        let next = next.unwrap_or(&[]);
        if !self.applies(service, current.len()) {
            return false;
        }
        let kept: HashSet<&str> = next.iter().map(|i| i.id.as_str()).collect();
        let removed = current
            .iter()
            .filter(|i| !kept.contains(i.id.as_str()))
            .count();
        self.holds(service, current.len(), removed, next.len())
    }

    /// Whether an update that takes a service of `len` instances to `left`, `removed` of the
    /// old ids gone, is suspicious: it empties the service or removes more than
    /// `max_removal_percent` of it.
    pub fn holds(&self, service: &str, len: usize, removed: usize, left: usize) -> bool {
        self.applies(service, len)
            && (left == 0 || removed * 100 > self.max_removal_percent as usize * len)
    }

    fn applies(&self, service: &str, len: usize) -> bool {
        self.enabled && len > 0 && !self.opt_out.iter().any(|s| s == service)
    }
}

/// A held update.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub next: Option<Vec<Instance>>,
    /// Process-clock ms when first held.
    pub since_ms: u64,
    pub answers: u32,
}

impl Held {
    /// When the confirmation window lets the update apply anyway (process-clock ms).
    pub fn applies_at_ms(&self, cfg: &GuardConfig) -> u64 {
        self.since_ms + cfg.confirm_window.as_millis() as u64
    }

    pub fn confirmed(&self, cfg: &GuardConfig, now_ms: u64) -> bool {
        self.answers >= cfg.confirm_answers
            || now_ms.saturating_sub(self.since_ms) >= cfg.confirm_window.as_millis() as u64
    }
}

/// What the admin API shows of one service's held updates (every source's, merged): the
/// endpoints they would remove, which keep serving meanwhile, and when they apply anyway.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeldView {
    /// Process-clock ms when the oldest held update was first seen.
    pub since_ms: u64,
    /// Process-clock ms when the first of them applies by its window.
    pub applies_at_ms: u64,
    /// The most identical answers any of them has had so far.
    pub answers: u32,
    /// Ids of the endpoints the held updates would remove.
    pub removed: HashSet<String>,
}

impl HeldView {
    /// Adds one source's held update: `current` is what that source says now.
    pub fn add(&mut self, held: &Held, cfg: &GuardConfig, current: &[Instance]) {
        let kept: HashSet<&str> = held.next.iter().flatten().map(|i| i.id.as_str()).collect();
        let first = self.removed.is_empty() && self.since_ms == 0;
        self.removed.extend(
            current
                .iter()
                .filter(|i| !kept.contains(i.id.as_str()))
                .map(|i| i.id.clone()),
        );
        let applies = held.applies_at_ms(cfg);
        if first {
            (self.since_ms, self.applies_at_ms) = (held.since_ms, applies);
        } else {
            self.since_ms = self.since_ms.min(held.since_ms);
            self.applies_at_ms = self.applies_at_ms.min(applies);
        }
        self.answers = self.answers.max(held.answers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ports: &[u16]) -> Vec<Instance> {
        ports
            .iter()
            .map(|p| Instance::new("127.0.0.1", *p))
            .collect()
    }

    #[test]
    fn what_is_suspicious() {
        let g = GuardConfig::default();
        let cur = set(&[1, 2, 3, 4]);
        assert!(
            !g.suspicious("s", &cur, Some(&set(&[1, 2]))),
            "half is allowed"
        );
        assert!(
            g.suspicious("s", &cur, Some(&set(&[1]))),
            "three quarters is not"
        );
        assert!(g.suspicious("s", &cur, Some(&[])), "emptied");
        assert!(g.suspicious("s", &cur, None), "gone");
        assert!(
            !g.suspicious("s", &cur, Some(&set(&[1, 2, 3, 4, 5, 6]))),
            "growth"
        );
        assert!(!g.suspicious("s", &[], None), "nothing to lose");
        assert!(
            g.suspicious("s", &cur, Some(&set(&[5, 6, 7, 8]))),
            "a wholesale replacement removes every known endpoint"
        );
        let off = GuardConfig {
            opt_out: vec!["s".into()],
            ..Default::default()
        };
        assert!(!off.suspicious("s", &cur, None));
        assert!(off.suspicious("t", &cur, None));
    }

    #[test]
    fn confirmation_by_answers_or_window() {
        let g = GuardConfig::default();
        let h = Held {
            next: None,
            since_ms: 1000,
            answers: 1,
        };
        assert!(!h.confirmed(&g, 1000));
        assert!(h.confirmed(&g, 31_000));
        assert!(Held { answers: 3, ..h }.confirmed(&g, 1000));
    }

    #[test]
    fn a_held_view_names_what_would_go_and_when() {
        let g = GuardConfig::default();
        let cur = set(&[1, 2, 3, 4]);
        let mut v = HeldView::default();
        v.add(
            &Held {
                next: Some(set(&[4])),
                since_ms: 5_000,
                answers: 2,
            },
            &g,
            &cur,
        );
        let mut ids: Vec<&str> = v.removed.iter().map(String::as_str).collect();
        ids.sort();
        assert_eq!(ids, ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        assert_eq!((v.since_ms, v.applies_at_ms, v.answers), (5_000, 35_000, 2));
        // A second source's hold of the whole service: merged, the earlier window wins.
        v.add(
            &Held {
                next: None,
                since_ms: 1_000,
                answers: 1,
            },
            &g,
            &set(&[9]),
        );
        assert_eq!(v.removed.len(), 4);
        assert_eq!((v.since_ms, v.applies_at_ms, v.answers), (1_000, 31_000, 2));
    }
}
