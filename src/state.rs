//! What the proxy, the admin API and the health tasks read: the current routing table (an
//! `ArcSwap`, swapped whole by the table builder), each discovery source's status, and the
//! on-demand sources a zero-config miss asks to watch a service, and what the removal guard
//! holds.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use discovery::Discovery;
use tokio::sync::watch;

use crate::clock;
use crate::guard::HeldView;
use crate::route::RoutingTable;

/// Held updates by service, as the admin API shows them (`guard.rs`); written by the cache.
pub type HeldByService = std::collections::HashMap<String, HeldView>;

/// The agent's shared state.
pub struct State {
    pub table: ArcSwap<RoutingTable>,
    pub sources: Vec<SourceStatus>,
    /// Sources that watch services only when asked (`Discovery::on_demand`).
    pub on_demand: Vec<Arc<dyn Discovery>>,
    /// Bumped after every table swap; a request waiting for an on-demand watch listens to it.
    pub version: watch::Sender<u64>,
    /// What the removal guard holds now (read by the admin API only).
    pub held: ArcSwap<HeldByService>,
    ready: AtomicBool,
    pub started: SystemTime,
}

impl State {
    pub fn new(sources: Vec<SourceStatus>) -> Arc<Self> {
        Self::with_on_demand(sources, Vec::new())
    }

    pub fn with_on_demand(
        sources: Vec<SourceStatus>,
        on_demand: Vec<Arc<dyn Discovery>>,
    ) -> Arc<Self> {
        let ready = sources.is_empty();
        Arc::new(State {
            table: ArcSwap::from_pointee(RoutingTable::default()),
            sources,
            on_demand,
            version: watch::channel(0).0,
            held: ArcSwap::from_pointee(HeldByService::new()),
            ready: AtomicBool::new(ready),
            started: SystemTime::now(),
        })
    }

    /// Publishes a new routing table and wakes requests waiting for one.
    pub fn publish(&self, table: Arc<RoutingTable>) {
        self.table.store(table);
        self.version.send_modify(|v| *v += 1);
    }

    /// Wakes requests waiting for a routing answer without publishing a table: a source said a
    /// name it was asked for does not exist, so they ask again ([`State::demand`]) and can
    /// answer 404 at once rather than at the end of their wait.
    pub fn wake(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Asks every on-demand source to watch `service`; true when one may have it.
    pub fn demand(&self, service: &str) -> bool {
        self.on_demand
            .iter()
            .fold(false, |any, s| s.watch(service) | any)
    }

    /// True once every source has answered at least once.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Marks the agent ready once every source has answered; true when this call did.
    pub fn update_ready(&self) -> bool {
        if !self.ready() && self.sources.iter().all(SourceStatus::answered) {
            self.ready.store(true, Ordering::Release);
            return true;
        }
        false
    }
}

/// What the admin API shows of one source.
pub struct SourceStatus {
    pub kind: &'static str,
    /// The source's URL with secrets removed.
    pub describe: String,
    answered: AtomicBool,
    last_ok_ms: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl SourceStatus {
    pub fn new(kind: &'static str, describe: String) -> Self {
        SourceStatus {
            kind,
            describe,
            answered: AtomicBool::new(false),
            last_ok_ms: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    pub fn answered(&self) -> bool {
        self.answered.load(Ordering::Acquire)
    }

    /// Seconds since the source last answered (since start when it never has).
    pub fn staleness(&self, started: SystemTime) -> f64 {
        let last = match self.last_ok_ms.load(Ordering::Acquire) {
            0 => started,
            ms => UNIX_EPOCH + Duration::from_millis(ms),
        };
        SystemTime::now()
            .duration_since(last)
            .unwrap_or_default()
            .as_secs_f64()
    }

    /// Sets when the source last answered (Unix ms), without marking it answered: the saved
    /// view loaded at start.
    pub fn set_last_ok_ms(&self, ms: u64) {
        self.last_ok_ms.store(ms, Ordering::Release);
    }

    /// The source answered now.
    pub fn ok(&self) {
        self.last_ok_ms
            .store(clock::unix_now_ms(), Ordering::Release);
        self.answered.store(true, Ordering::Release);
    }

    pub fn set_error(&self, message: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
