//! First-request lookups (#17), shared by the sources that poll a catalog (Eureka's registry,
//! Nacos's service list): a request for a name the last poll did not have asks the registry
//! for that name at once, instead of answering 404 until the next poll. Each name is asked at
//! most once per [`LOOKUP_GAP`], so a client retrying a name nobody registers costs the
//! registry one call per gap, not one per request.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Shortest time between two lookups of one name.
pub const LOOKUP_GAP: Duration = Duration::from_secs(5);

/// What [`Asked::ask`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Not asked lately: the caller starts the lookup now.
    New,
    /// A lookup is under way: the request waits for it.
    Pending,
    /// Looked up within [`LOOKUP_GAP`] and not found: the request gets its 404 now.
    Answered,
}

/// The names looked up lately: when, and whether the answer is still to come.
#[derive(Debug, Default)]
pub struct Asked(Mutex<HashMap<String, (Instant, bool)>>);

impl Asked {
    pub fn ask(&self, name: &str) -> Ask {
        let mut asked = self.0.lock().unwrap_or_else(|e| e.into_inner());
        asked.retain(|_, (at, pending)| *pending || at.elapsed() < LOOKUP_GAP);
        match asked.get(name) {
            Some((_, true)) => Ask::Pending,
            Some((_, false)) => Ask::Answered,
            None => {
                asked.insert(name.to_string(), (Instant::now(), true));
                Ask::New
            }
        }
    }

    /// The lookup of `name` has answered (found or not).
    pub fn answered(&self, name: &str) {
        if let Some(e) = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(name)
        {
            *e = (Instant::now(), false);
        }
    }

    /// Whether a lookup was asked for `name` and has not answered yet.
    pub fn pending(&self, name: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .is_some_and(|(_, p)| *p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_asked_once_per_gap() {
        let a = Asked::default();
        assert_eq!(a.ask("x"), Ask::New);
        assert_eq!(a.ask("x"), Ask::Pending);
        assert!(a.pending("x"));
        a.answered("x");
        assert!(!a.pending("x"));
        assert_eq!(a.ask("x"), Ask::Answered);
        assert_eq!(a.ask("y"), Ask::New);
    }
}
