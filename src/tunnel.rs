//! HTTP/1.1 Upgrade (WebSocket and the like): the request's `Connection: upgrade` and
//! `Upgrade: <proto>` go to the picked endpoint; when it answers `101`, the client's connection
//! and the endpoint's are joined and bytes copied both ways until either side closes.
//!
//! Layer 5, beside `retry.rs`: it knows an endpoint's in-flight guard (`endpoint.rs`) and the
//! metrics, and `proxy.rs` calls it. The request is routed, balanced and dialled like any
//! other, so an upgrade only ever reaches a discovered endpoint (plain or TLS); `CONNECT` never
//! comes here (the proxy answers it 405 before routing), and `Upgrade: h2c` is the HTTP/2
//! listener's business, never tunnelled.
//!
//! A tunnel holds its endpoint's in-flight count for its whole life, so `least_conn` sees
//! long-lived sockets, and counts in `edge_agent_upgrades_active{upstream}`. [`Tunnels`] counts
//! the open ones for the SIGTERM drain (`server.rs`): the drain waits for them up to the grace
//! period, then closes them. A tunnel to an endpoint the registry removed stays open until the
//! upstream's `drain_timeout`, then closes (`pool::Drain`).
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderMap, HeaderValue};
use http::{request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::sync::{watch, Notify};

use crate::access_log::TunnelBytes;
use crate::endpoint::InFlight;
use crate::metrics as m;

/// The tunnels open now, and the switch that closes them.
pub struct Tunnels {
    open: AtomicUsize,
    changed: Notify,
    close: watch::Sender<bool>,
}

impl Default for Tunnels {
    fn default() -> Self {
        Tunnels {
            open: AtomicUsize::new(0),
            changed: Notify::new(),
            close: watch::channel(false).0,
        }
    }
}

impl Tunnels {
    /// Tunnels open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Returns when no tunnel is open.
    pub async fn all_closed(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            changed.await;
        }
    }

    /// Closes every open tunnel (and any opened later).
    pub fn close_all(&self) {
        self.close.send_replace(true);
    }
}

/// One open tunnel's count in [`Tunnels`] and in the gauge; released on drop.
struct Open {
    tunnels: Arc<Tunnels>,
    gauge: metrics::Gauge,
}

impl Open {
    fn new(tunnels: &Arc<Tunnels>, upstream: &str) -> Open {
        tunnels.open.fetch_add(1, Ordering::AcqRel);
        let gauge = metrics::gauge!(m::UPGRADES_ACTIVE, "upstream" => upstream.to_string());
        gauge.increment(1.0);
        Open {
            tunnels: tunnels.clone(),
            gauge,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
        self.tunnels.open.fetch_sub(1, Ordering::AcqRel);
        self.tunnels.changed.notify_waiters();
    }
}

/// Whether a request asks to switch protocols: HTTP/1.1, `Connection` naming `upgrade`, an
/// `Upgrade` header, and not `h2c`.
pub fn is_upgrade(version: Version, headers: &HeaderMap) -> bool {
    if version != Version::HTTP_11 {
        return false;
    }
    let Some(proto) = headers.get(header::UPGRADE) else {
        return false;
    };
    let h2c = proto
        .to_str()
        .map(|p| p.split(',').any(|t| t.trim().eq_ignore_ascii_case("h2c")))
        .unwrap_or(false);
    !h2c && headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// What an upgrade request keeps for its tunnel: the client side's upgrade and the protocol
/// asked for.
pub struct Upgrade {
    client: OnUpgrade,
    proto: HeaderValue,
}

impl Upgrade {
    /// The upgrade a request asks for, taken out of its parts; `None` for any other request.
    pub fn take(parts: &mut request::Parts) -> Option<Upgrade> {
        if !is_upgrade(parts.version, &parts.headers) {
            return None;
        }
        let proto = parts.headers.get(header::UPGRADE)?.clone();
        let client = parts.extensions.remove::<OnUpgrade>()?;
        Some(Upgrade { client, proto })
    }

    /// Puts the upgrade headers back after the hop-by-hop ones were removed.
    pub fn restore(&self, headers: &mut HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.proto.clone());
    }

    /// Joins the client to the endpoint's `101` answer `resp`: returns the `101` for the client
    /// (the endpoint's headers, hop-by-hop ones but the upgrade's removed by the caller before)
    /// and starts the copy, which holds `in_flight` and counts in `tunnels` until it ends, and
    /// counts its bytes into `bytes` (for the access log), closed when it ends.
    pub fn join(
        self,
        mut resp: Response<Incoming>,
        in_flight: InFlight,
        tunnels: &Arc<Tunnels>,
        upstream: &str,
        bytes: Option<Arc<TunnelBytes>>,
    ) -> http::response::Parts {
        debug_assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        let endpoint = hyper::upgrade::on(&mut resp);
        let (mut parts, _) = resp.into_parts();
        let proto = parts
            .headers
            .get(header::UPGRADE)
            .cloned()
            .unwrap_or(self.proto);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, proto);
        let open = Open::new(tunnels, upstream);
        let mut close = tunnels.close.subscribe();
        let drained = in_flight.drain().closed();
        let upstream = upstream.to_string();
        let client = self.client;
        tokio::spawn(async move {
            let bytes = Ended(bytes.unwrap_or_default());
            let _held = (open, in_flight);
            let (client, endpoint) = match tokio::try_join!(client, endpoint) {
                Ok(both) => both,
                Err(e) => {
                    tracing::debug!(%upstream, error = %e, "upgrade not completed");
                    return;
                }
            };
            let (client_rx, mut client_tx) = tokio::io::split(TokioIo::new(client));
            let (endpoint_rx, mut endpoint_tx) = tokio::io::split(TokioIo::new(endpoint));
            let mut client_rx = Counted(client_rx, &bytes.0.up);
            let mut endpoint_rx = Counted(endpoint_rx, &bytes.0.down);
            // Each way until its reader ends, then the writer is shut down; the tunnel ends when
            // either side has closed (a WebSocket has no use for a half-open connection).
            let up = async {
                let r = tokio::io::copy(&mut client_rx, &mut endpoint_tx).await;
                let _ = endpoint_tx.shutdown().await;
                ("client", r)
            };
            let down = async {
                let r = tokio::io::copy(&mut endpoint_rx, &mut client_tx).await;
                let _ = client_tx.shutdown().await;
                ("endpoint", r)
            };
            tokio::select! {
                (side, r) = up => ended(&upstream, side, r),
                (side, r) = down => ended(&upstream, side, r),
                _ = async { drop(close.wait_for(|c| *c).await) } => {
                    tracing::info!(%upstream, "tunnel closed by shutdown");
                }
                () = drained => {
                    tracing::info!(%upstream, "tunnel closed: its endpoint's drain ran out of time");
                }
            }
        });
        parts
    }
}

/// Closes a tunnel's byte count when the tunnel task ends, however it ends.
struct Ended(Arc<TunnelBytes>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A reader that adds what it reads to a counter.
struct Counted<'a, R>(R, &'a AtomicU64);

impl<R: AsyncRead + Unpin> AsyncRead for Counted<'_, R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.0).poll_read(cx, buf);
        self.1
            .fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        r
    }
}

fn ended(upstream: &str, side: &str, r: std::io::Result<u64>) {
    match r {
        Ok(bytes) => tracing::debug!(upstream, closed_by = side, bytes, "tunnel closed"),
        Err(e) => tracing::debug!(upstream, side, error = %e, "tunnel ended with an error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_counts_as_an_upgrade() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            m
        };
        let ws = h(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(is_upgrade(Version::HTTP_11, &ws));
        assert!(!is_upgrade(Version::HTTP_10, &ws));
        assert!(!is_upgrade(Version::HTTP_2, &ws));
        assert!(!is_upgrade(
            Version::HTTP_11,
            &h(&[("upgrade", "websocket")])
        ));
        assert!(!is_upgrade(
            Version::HTTP_11,
            &h(&[("connection", "upgrade")])
        ));
        assert!(!is_upgrade(
            Version::HTTP_11,
            &h(&[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", "h2c")
            ])
        ));
    }

    #[tokio::test]
    async fn all_closed_waits_for_the_last_tunnel() {
        let t = Arc::new(Tunnels::default());
        t.all_closed().await;
        let open = Open::new(&t, "u");
        assert_eq!(t.open(), 1);
        let waiter = tokio::spawn({
            let t = t.clone();
            async move { t.all_closed().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(open);
        waiter.await.unwrap();
        assert_eq!(t.open(), 0);
    }
}
