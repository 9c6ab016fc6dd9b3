//! Prometheus metrics through the `metrics` facade.
//!
//! Names are a contract (`edge_agent_*`). The request path records through handles registered
//! once per upstream (and per common status code, lazily), so recording a request is two atomic
//! operations and no label hashing; rare status codes take the facade's slow path.
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS_TOTAL: &str = "edge_agent_requests_total";
pub const REQUEST_DURATION: &str = "edge_agent_request_duration_seconds";
pub const ENDPOINTS: &str = "edge_agent_endpoints";
pub const DISCOVERY_UPDATES: &str = "edge_agent_discovery_updates_total";
pub const DISCOVERY_ERRORS: &str = "edge_agent_discovery_errors_total";
pub const DISCOVERY_STALENESS: &str = "edge_agent_discovery_staleness_seconds";
pub const RETRIES_TOTAL: &str = "edge_agent_retries_total";
pub const CONFIG_RELOADS: &str = "edge_agent_config_reloads_total";
pub const UPSTREAM_ERRORS: &str = "edge_agent_upstream_errors_total";
pub const DISCOVERY_HELD: &str = "edge_agent_discovery_held_total";
pub const RESYNC_CORRECTIONS: &str = "edge_agent_discovery_resync_corrections_total";
pub const UPSTREAM_PANIC: &str = "edge_agent_upstream_panic";
pub const EJECTIONS: &str = "edge_agent_ejections_total";
pub const RETRY_BUDGET_EXHAUSTED: &str = "edge_agent_retry_budget_exhausted_total";
pub const CHASH_FALLBACK: &str = "edge_agent_chash_fallback_total";
pub const ACCESS_LOG_DROPPED: &str = "edge_agent_access_log_dropped_total";
pub const OVERFLOW: &str = "edge_agent_overflow_total";
pub const DISCOVERY_SOURCE_UP: &str = "edge_agent_discovery_source_up";
pub const ZONE_SPILL: &str = "edge_agent_zone_spill_total";
pub const SUBSET_FALLBACK: &str = "edge_agent_subset_fallback_total";
pub const UPGRADES_ACTIVE: &str = "edge_agent_upgrades_active";

/// Histogram buckets for request duration, in seconds.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Status codes that get a pre-registered counter handle.
const COMMON: [u16; 16] = [
    200, 201, 202, 204, 301, 302, 304, 400, 401, 403, 404, 429, 500, 502, 503, 504,
];

/// The client side's protocol: the `protocol` label of `edge_agent_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.0 or HTTP/1.1.
    Http1,
    /// HTTP/2 (cleartext), other than gRPC.
    H2,
    /// gRPC (`content-type: application/grpc…`), whatever the HTTP version.
    Grpc,
    /// A WebSocket (or other HTTP/1.1 Upgrade) handshake.
    Websocket,
}

impl Protocol {
    /// Every value, in the order of their index.
    pub const ALL: [Protocol; 4] = [
        Protocol::Http1,
        Protocol::H2,
        Protocol::Grpc,
        Protocol::Websocket,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2 => "h2",
            Protocol::Grpc => "grpc",
            Protocol::Websocket => "websocket",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often histogram samples are folded into their buckets. The recorder keeps every sample
/// until then: without upkeep an agent nobody scrapes grows by 8 bytes per request (found in #8:
/// RSS 14.9 → 26.6 MiB over a one-minute load run) and the first scrape stalls on the backlog.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Installs the global recorder once and returns the handle that renders `/metrics`.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), DURATION_BUCKETS)
                .expect("static bucket list is non-empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests); then ours only renders.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            // A plain thread, not a task: draining a second of samples must not hold up a
            // worker that is serving requests.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the metrics upkeep thread");
            }
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(
        REQUESTS_TOTAL,
        "Proxied requests by upstream, status and the client's protocol."
    );
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time to the upstream's response headers."
    );
    metrics::describe_gauge!(ENDPOINTS, "Endpoints per upstream by state.");
    metrics::describe_counter!(
        DISCOVERY_UPDATES,
        "Answers received from each discovery source."
    );
    metrics::describe_counter!(DISCOVERY_ERRORS, "Discovery errors by source and kind.");
    metrics::describe_gauge!(
        DISCOVERY_STALENESS,
        metrics::Unit::Seconds,
        "Seconds since each source last answered."
    );
    metrics::describe_counter!(RETRIES_TOTAL, "Retried requests by upstream.");
    metrics::describe_counter!(CONFIG_RELOADS, "Configuration reloads by result.");
    metrics::describe_counter!(
        UPSTREAM_ERRORS,
        "Failed upstream attempts by upstream and kind."
    );
    metrics::describe_counter!(
        DISCOVERY_HELD,
        "Updates held by the removal guard (they would remove most of a service), by source."
    );
    metrics::describe_counter!(
        RESYNC_CORRECTIONS,
        "Services whose periodic re-read differed from what the watch had pushed, by source."
    );
    metrics::describe_gauge!(
        UPSTREAM_PANIC,
        "1 while an upstream is in panic mode (too few healthy endpoints: all are used)."
    );
    metrics::describe_counter!(
        EJECTIONS,
        "Endpoints ejected by passive health, by upstream."
    );
    metrics::describe_counter!(
        RETRY_BUDGET_EXHAUSTED,
        "Retries not made because the upstream's retry budget was spent."
    );
    metrics::describe_counter!(
        CHASH_FALLBACK,
        "chash requests without their key, balanced round robin instead."
    );
    metrics::describe_counter!(
        ACCESS_LOG_DROPPED,
        "Access-log lines dropped because the writer fell behind (its queue was full)."
    );
    metrics::describe_gauge!(
        DISCOVERY_SOURCE_UP,
        "1 while every source of a kind answers its liveness call, 0 when one does not."
    );
    metrics::describe_counter!(
        OVERFLOW,
        "Requests answered 503 at once (or not retried) because an upstream's circuit breaker was full, by upstream and limit."
    );
    metrics::describe_counter!(
        ZONE_SPILL,
        "Requests of a zone-aware upstream that started outside the local zone, by upstream."
    );
    metrics::describe_counter!(
        SUBSET_FALLBACK,
        "Requests whose subset had no available endpoint (or whose header named no subset), handled by the upstream's fallback, by upstream."
    );
    metrics::describe_gauge!(
        UPGRADES_ACTIVE,
        "Open HTTP/1.1 Upgrade (WebSocket) tunnels, by upstream."
    );
}

/// Every metric name, for the test that each has HELP text.
pub const ALL: &[&str] = &[
    REQUESTS_TOTAL,
    REQUEST_DURATION,
    ENDPOINTS,
    DISCOVERY_UPDATES,
    DISCOVERY_ERRORS,
    DISCOVERY_STALENESS,
    RETRIES_TOTAL,
    CONFIG_RELOADS,
    UPSTREAM_ERRORS,
    DISCOVERY_HELD,
    RESYNC_CORRECTIONS,
    UPSTREAM_PANIC,
    EJECTIONS,
    RETRY_BUDGET_EXHAUSTED,
    CHASH_FALLBACK,
    ACCESS_LOG_DROPPED,
    OVERFLOW,
    ZONE_SPILL,
    SUBSET_FALLBACK,
    DISCOVERY_SOURCE_UP,
    UPGRADES_ACTIVE,
];

/// Metric handles for one upstream.
pub struct UpstreamMetrics {
    upstream: String,
    duration: Histogram,
    retries: Counter,
    ejections: Counter,
    budget_exhausted: Counter,
    chash_fallback: Counter,
    zone_spill: Counter,
    subset_fallback: Counter,
    by_status: [[OnceLock<Counter>; COMMON.len()]; Protocol::ALL.len()],
}

impl UpstreamMetrics {
    pub fn new(upstream: &str) -> Self {
        UpstreamMetrics {
            upstream: upstream.to_string(),
            duration: metrics::histogram!(REQUEST_DURATION, "upstream" => upstream.to_string()),
            retries: metrics::counter!(RETRIES_TOTAL, "upstream" => upstream.to_string()),
            ejections: metrics::counter!(EJECTIONS, "upstream" => upstream.to_string()),
            budget_exhausted: metrics::counter!(RETRY_BUDGET_EXHAUSTED, "upstream" => upstream.to_string()),
            chash_fallback: metrics::counter!(CHASH_FALLBACK, "upstream" => upstream.to_string()),
            zone_spill: metrics::counter!(ZONE_SPILL, "upstream" => upstream.to_string()),
            subset_fallback: metrics::counter!(SUBSET_FALLBACK, "upstream" => upstream.to_string()),
            by_status: Default::default(),
        }
    }

    /// Records one finished request.
    pub fn request(&self, protocol: Protocol, status: u16, elapsed: Duration) {
        self.duration.record(elapsed.as_secs_f64());
        match COMMON.iter().position(|&c| c == status) {
            Some(i) => self.by_status[protocol.index()][i]
                .get_or_init(|| self.status_counter(protocol, status))
                .increment(1),
            None => self.status_counter(protocol, status).increment(1),
        }
    }

    fn status_counter(&self, protocol: Protocol, status: u16) -> Counter {
        metrics::counter!(REQUESTS_TOTAL, "upstream" => self.upstream.clone(), "status" => status.to_string(), "protocol" => protocol.as_str())
    }

    pub fn retry(&self) {
        self.retries.increment(1);
    }

    pub fn ejection(&self) {
        self.ejections.increment(1);
    }

    /// A request over one of the upstream's circuit breakers (a rare path: the counter is
    /// looked up when it happens).
    pub fn overflow(&self, limit: &'static str) {
        metrics::counter!(OVERFLOW, "upstream" => self.upstream.clone(), "limit" => limit)
            .increment(1);
    }

    pub fn retry_budget_exhausted(&self) {
        self.budget_exhausted.increment(1);
    }

    /// A `chash` request without its key, balanced round robin instead.
    pub fn chash_fallback(&self) {
        self.chash_fallback.increment(1);
    }

    /// A zone-aware request that started outside the local zone.
    pub fn zone_spill(&self) {
        self.zone_spill.increment(1);
    }

    /// A request handled by its upstream's subset `fallback`.
    pub fn subset_fallback(&self) {
        self.subset_fallback.increment(1);
    }

    pub fn upstream_error(&self, kind: &'static str) {
        metrics::counter!(UPSTREAM_ERRORS, "upstream" => self.upstream.clone(), "kind" => kind)
            .increment(1);
    }
}

/// Records requests that matched no upstream (404) or failed before one was chosen.
pub fn unrouted(protocol: Protocol, status: u16) {
    metrics::counter!(REQUESTS_TOTAL, "upstream" => "", "status" => status.to_string(), "protocol" => protocol.as_str())
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Defect 8 of #12: five metrics had no HELP text.
    #[test]
    fn every_metric_has_help_text() {
        let handle = install();
        let m = UpstreamMetrics::new("help-test");
        m.request(Protocol::Http1, 200, Duration::from_millis(1));
        m.retry();
        m.ejection();
        m.retry_budget_exhausted();
        m.chash_fallback();
        m.overflow("requests");
        m.zone_spill();
        m.subset_fallback();
        m.upstream_error("connect");
        metrics::gauge!(ENDPOINTS, "upstream" => "help-test", "state" => "healthy").set(1.0);
        metrics::gauge!(UPSTREAM_PANIC, "upstream" => "help-test").set(0.0);
        metrics::gauge!(UPGRADES_ACTIVE, "upstream" => "help-test").set(0.0);
        metrics::gauge!(DISCOVERY_STALENESS, "source" => "file").set(0.0);
        metrics::gauge!(DISCOVERY_SOURCE_UP, "source" => "file").set(1.0);
        metrics::counter!(ACCESS_LOG_DROPPED).increment(0);
        for name in [
            DISCOVERY_UPDATES,
            DISCOVERY_ERRORS,
            CONFIG_RELOADS,
            DISCOVERY_HELD,
            RESYNC_CORRECTIONS,
        ] {
            metrics::counter!(name, "source" => "file").increment(1);
        }
        let text = handle.render();
        for &name in ALL {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP for {name} in:\n{text}"
            );
        }
    }
}
