//! Active health: probe settings, one probe (HTTP GET or TCP connect), and the verdict a
//! streak of results leads to. The loop that decides which endpoints are due lives in
//! `checks.rs`, above the routing table.
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{header, Request, Uri};
use http_body_util::{Either, Empty};
use rand::Rng as _;

use super::Health;
use crate::pool::{Admission, ConnPool};
use crate::tls::ClientTls;

/// How often an endpoint is probed.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// How long a probe may take.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Consecutive successes that mark a down endpoint up.
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
/// Consecutive failures that mark an up endpoint down.
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
/// Most of a probe's answer read to keep its connection for the next probe.
pub const PROBE_BODY_LIMIT: usize = 64 * 1024;

/// Active health probes of an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveHealth {
    /// `None`: TCP connect only. `Some(path)`: HTTP GET of that path.
    pub http_path: Option<String>,
    pub host: Option<String>,
    /// Statuses that count as healthy; empty means 200–399.
    pub expected_statuses: Vec<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub initially_unhealthy: bool,
}

impl Default for ActiveHealth {
    fn default() -> Self {
        ActiveHealth {
            http_path: Some("/".into()),
            host: None,
            expected_statuses: Vec::new(),
            interval: DEFAULT_CHECK_INTERVAL,
            timeout: DEFAULT_CHECK_TIMEOUT,
            healthy_threshold: DEFAULT_HEALTHY_THRESHOLD,
            unhealthy_threshold: DEFAULT_UNHEALTHY_THRESHOLD,
            initially_unhealthy: false,
        }
    }
}

/// Whether a probe is due at `now`; if so, schedules the next one after one interval, ±10%
/// jitter so probes do not synchronise.
pub fn due(h: &Health, cfg: &ActiveHealth, now: u64) -> bool {
    if h.next_probe_ms.load(Ordering::Relaxed) > now {
        return false;
    }
    let interval = cfg.interval.as_millis() as u64;
    let jitter = rand::rng().random_range(0..=interval / 5);
    h.next_probe_ms
        .store(now + interval - interval / 10 + jitter, Ordering::Relaxed);
    true
}

/// One probe of the endpoint at `authority`: TCP connect, or HTTP GET expecting a listed
/// status (default 200–399), on the endpoint's own connection pool.
pub async fn probe(
    pool: &ConnPool,
    authority: &Authority,
    tls: Option<&ClientTls>,
    cfg: &ActiveHealth,
    connect_timeout: Duration,
) -> bool {
    let Some(path) = &cfg.http_path else {
        let addr = authority.as_str().to_string();
        return matches!(
            tokio::time::timeout(cfg.timeout, tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        );
    };
    let uri = match Uri::try_from(path.as_str()) {
        Ok(u) => u,
        Err(_) => return false,
    };
    let mut req = Request::new(Either::Right(Empty::<Bytes>::new()));
    *req.uri_mut() = uri;
    let host = cfg.host.as_deref().unwrap_or(authority.as_str());
    if let Ok(v) = http::HeaderValue::from_str(host) {
        req.headers_mut().insert(header::HOST, v);
    }
    req.headers_mut().insert(
        header::USER_AGENT,
        http::HeaderValue::from_static("edge-agent-health-check"),
    );
    let probe = async {
        let (resp, _) = pool
            .send(
                authority,
                tls,
                &mut Some(req),
                connect_timeout,
                Admission::UNLIMITED,
                false,
            )
            .await
            .ok()?;
        let status = resp.status().as_u16();
        // Read the answer to the end so the connection can be reused; a health page larger
        // than PROBE_BODY_LIMIT is not buffered, its connection is dropped instead.
        let mut body = resp.into_body();
        let limited = http_body_util::Limited::new(&mut body, PROBE_BODY_LIMIT);
        let read = http_body_util::BodyExt::collect(limited).await;
        if read.is_ok() {
            if let Some(conn) = body.reusable() {
                pool.put(conn);
            }
        }
        Some(status)
    };
    match tokio::time::timeout(cfg.timeout, probe).await {
        Ok(Some(s)) => {
            if cfg.expected_statuses.is_empty() {
                (200..400).contains(&s)
            } else {
                cfg.expected_statuses.contains(&s)
            }
        }
        _ => false,
    }
}

/// Applies one probe result to the endpoint's active verdict; `Some(up)` when it flipped.
pub fn apply(h: &Health, cfg: &ActiveHealth, ok: bool) -> Option<bool> {
    let streak = h.streak.load(Ordering::Relaxed);
    let streak = match (ok, streak) {
        (true, s) if s > 0 => s.saturating_add(1),
        (true, _) => 1,
        (false, s) if s < 0 => s.saturating_sub(1),
        (false, _) => -1,
    };
    h.streak.store(streak, Ordering::Relaxed);
    let up_now = h.active_up();
    if !up_now && streak >= cfg.healthy_threshold as i32 {
        h.active_up.store(true, Ordering::Relaxed);
        Some(true)
    } else if up_now && -streak >= cfg.unhealthy_threshold as i32 {
        h.active_up.store(false, Ordering::Relaxed);
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_thresholds() {
        let cfg = ActiveHealth {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            ..Default::default()
        };
        let h = Health::default();
        assert_eq!(apply(&h, &cfg, false), None);
        assert_eq!(apply(&h, &cfg, false), None);
        assert!(h.active_up(), "two failures are not enough");
        assert_eq!(apply(&h, &cfg, false), Some(false));
        assert!(!h.active_up());
        assert_eq!(apply(&h, &cfg, true), None);
        assert!(!h.active_up(), "one success is not enough");
        assert_eq!(apply(&h, &cfg, true), Some(true));
        assert!(h.active_up());
    }

    #[test]
    fn a_probe_is_due_once_per_interval() {
        let cfg = ActiveHealth::default();
        let h = Health::default();
        assert!(due(&h, &cfg, 1));
        assert!(!due(&h, &cfg, 2));
        assert!(due(&h, &cfg, 1 + 2 * cfg.interval.as_millis() as u64));
    }
}
