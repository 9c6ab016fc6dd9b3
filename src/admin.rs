//! The admin API: `/` (the status page, `status.html`, which renders `/upstreams`),
//! `/healthz`, `/ready`, `/upstreams` (JSON) and `/metrics` (Prometheus).
//!
//! In `/upstreams`, an endpoint's `available` says whether it may take traffic now (registry
//! healthy, a weight, not ejected, passing active checks); `registry_healthy` is what the
//! registry says alone. `last_update_unix` is when the upstream's endpoint set last changed.
//! `subset` shows the upstream's `subset` (selector), `fallback`, zone mode, the agent's zone
//! and the zone shares now (local first); an endpoint's `in_subset` whether it matches the
//! upstream's subset (every endpoint does when it has none), and `zone` its zone.
//!
//! It listens on loopback by default. With `EDGE_AGENT_ADMIN_TOKEN` set, every path but
//! `/healthz` needs `Authorization: Bearer <token>`, or `Basic` with the token as the password
//! (what a browser sends for the status page once asked), compared in constant time.
use std::convert::Infallible;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Value};

use crate::clock;
use crate::endpoint::Endpoint;
use crate::guard::HeldView;
use crate::state::State;
use crate::subset::Subsets;
use crate::upstream::Upstream;

pub struct Admin {
    state: Arc<State>,
    metrics: PrometheusHandle,
    token: Option<String>,
}

impl Admin {
    pub fn new(state: Arc<State>, metrics: PrometheusHandle, token: Option<String>) -> Arc<Self> {
        Arc::new(Admin {
            state,
            metrics,
            token,
        })
    }

    pub async fn handle<B>(&self, req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
        let path = req.uri().path();
        if path != "/healthz" && !self.authorized(&req) {
            let mut r = reply(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "unauthorized\n".into(),
            );
            let h = r.headers_mut();
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            // Browsers cannot send a bearer token: offered Basic, they ask for a password
            // (the token; any user name) and send it with every request of the page.
            h.append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"edge-agent admin\", charset=\"UTF-8\""),
            );
            return Ok(r);
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Ok(reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            ));
        }
        Ok(match path {
            "/" => status_page(),
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/ready" => {
                if self.state.ready() {
                    reply(StatusCode::OK, "text/plain", "ready\n".into())
                } else {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "waiting for the first answer of every discovery source\n".into(),
                    )
                }
            }
            "/upstreams" => reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&self.upstreams()).unwrap_or_default() + "\n",
            ),
            "/metrics" => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.metrics.render(),
            ),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        })
    }

    fn authorized<B>(&self, req: &Request<B>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let value = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if let Some(given) = value.strip_prefix("Bearer ") {
            return constant_time_eq(given.as_bytes(), token.as_bytes());
        }
        // `Basic base64(user:token)`, from a browser on the status page.
        let Some(basic) = value.strip_prefix("Basic ") else {
            return false;
        };
        use base64::Engine as _;
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(basic.trim()) else {
            return false;
        };
        let password = match decoded.iter().position(|&b| b == b':') {
            Some(i) => &decoded[i + 1..],
            None => return false,
        };
        constant_time_eq(password, token.as_bytes())
    }

    /// The `/upstreams` document.
    pub fn upstreams(&self) -> Value {
        let table = self.state.table.load();
        let started = self.state.started;
        let now = clock::now_ms();
        let held = self.state.held.load();
        let sources: Vec<Value> = self
            .state
            .sources
            .iter()
            .map(|s| {
                json!({
                    "kind": s.kind,
                    "url": s.describe,
                    "answered": s.answered(),
                    "staleness_seconds": round3(s.staleness(started)),
                    "last_error": s.last_error(),
                })
            })
            .collect();
        let mut ups: Vec<Value> = table
            .upstreams
            .values()
            .map(|u| {
                let kinds: std::collections::BTreeSet<&str> =
                    u.endpoints.iter().map(|e| e.source).collect();
                let staleness = self
                    .state
                    .sources
                    .iter()
                    .filter(|s| kinds.contains(s.kind))
                    .map(|s| s.staleness(started))
                    .fold(0.0, f64::max);
                let held = u.service.as_deref().and_then(|s| held.get(s));
                json!({
                    "id": &*u.id,
                    "service": u.service.as_deref(),
                    "source": kinds.into_iter().collect::<Vec<_>>(),
                    "balancer": u.settings().balancer.name(),
                    // The configured protocol; "registry" when the endpoints' metadata decides.
                    "protocol": match u.settings().protocol {
                        Some(p) => p.as_str(),
                        None if u.endpoints.iter().any(|e| e.protocol.is_some()) => "registry",
                        None => "http1",
                    },
                    "panic": u.runtime.panic.load(std::sync::atomic::Ordering::Relaxed),
                    "retries": u.settings().retries,
                    "connect_timeout_ms": u.settings().connect_timeout.as_millis() as u64,
                    "read_timeout_ms": u.settings().read_timeout.as_millis() as u64,
                    "in_flight": u.runtime.requests_in_flight.taken(),
                    "max_requests": u.settings().breakers.max_requests,
                    "max_retries": u.settings().breakers.max_retries,
                    "last_update_unix": u.updated_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                    "staleness_seconds": round3(staleness),
                    "subset": subset_json(&u.subsets),
                    // A registry update the removal guard holds: the endpoints it would remove
                    // keep serving (`held` below) until it is confirmed or its window ends.
                    "guard": held.map(|h| json!({
                        "held_for_ms": now.saturating_sub(h.since_ms),
                        "applies_in_ms": h.applies_at_ms.saturating_sub(now),
                        "answers": h.answers,
                        "removed": h.removed.len(),
                    })),
                    "stats": u.runtime.stats.summary(),
                    "endpoints": u.endpoints.iter().map(|e| endpoint_json(u, e, held, now)).collect::<Vec<_>>(),
                })
            })
            .collect();
        ups.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        json!({ "ready": self.state.ready(), "sources": sources, "upstreams": ups })
    }
}

/// One endpoint of upstream `u` in `/upstreams`; `held`: what the removal guard holds of its
/// service.
fn endpoint_json(u: &Upstream, e: &Endpoint, held: Option<&HeldView>, now: u64) -> Value {
    json!({
        "in_subset": u.subsets.contains(e),
        "id": &*e.id,
        "address": e.authority.as_str(),
        "weight": e.weight,
        "available": e.available(),
        "registry_healthy": e.healthy,
        "held": held.is_some_and(|h| h.removed.contains(&*e.id)),
        "draining": e.state.drain.is_draining(),
        "zone": e.zone.as_deref(),
        "in_flight": e.state.in_flight(),
        "protocol": u.settings().protocol.or(e.protocol).map_or("http1", |p| p.as_str()),
        // HTTP/2 connections, plus HTTP/1 ones: idle, and one per request in
        // flight that is not an HTTP/2 stream.
        "connections": e.state.h2.connections() + e.state.pool.idle_count()
            + (e.state.in_flight() as usize).saturating_sub(e.state.h2.streams()),
        "streams": e.state.h2.streams(),
        "ejected": e.state.health.ejected(),
        "ejected_for_ms": e.state.health.ejected_for_ms(now),
        "backoff_ms": e.state.health.backoff_left_ms(now),
        "ejections": e.state.health.ejections(),
        "consecutive_failures": e.state.health.consecutive_failures(),
        "active_check_up": e.state.health.active_up(),
        "ewma_ms": round3(e.state.ewma.value_ns(now, u.settings().ewma_decay) / 1e6),
        "slow_start_factor": round3(e.state.health.slow_start_factor(now, u.settings().slow_start)),
        "requests": e.state.requests(),
        "failures": e.state.failures(),
    })
}

/// An upstream's subset and zone settings, and its zone shares now (`subset.rs`).
fn subset_json(s: &Subsets) -> Value {
    let set = &s.settings;
    let shares: Vec<Value> = s
        .zone_shares()
        .into_iter()
        .map(|(zone, share)| json!({ "zone": zone.as_deref(), "share": round3(share) }))
        .collect();
    json!({
        "selector": (!set.selector.is_empty()).then_some(&set.selector.0),
        "fallback": set.fallback.describe(),
        "zone_aware": set.zone.mode.name(),
        "local_zone": set.zone.local.as_deref(),
        "zone_min_share": set.zone.min_share,
        "zone_shares": shares,
    })
}

/// The status page: one self-contained HTML file (`status.html`) that renders `/upstreams`.
pub const STATUS_PAGE: &str = include_str!("status.html");

fn status_page() -> Response<Full<Bytes>> {
    let mut r = reply(
        StatusCode::OK,
        "text/html; charset=utf-8",
        STATUS_PAGE.into(),
    );
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Inline script and style only; it fetches only this origin.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
        ),
    );
    r
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
