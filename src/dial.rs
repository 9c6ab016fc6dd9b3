//! Dialling an endpoint: TCP, then TLS when the upstream says so, into one IO type, with the
//! protocol ALPN settled on.
//!
//! Layer 2, beside `pool.rs` (which dials through it): it knows an authority, a timeout and an
//! upstream's [`ClientTls`] (layer 1), nothing of endpoints, balancers or requests. The HTTP
//! handshake on top (HTTP/1 in `pool.rs`, HTTP/2 where ALPN said `h2`) is the caller's.
//!
//! Every failure is a [`ProxyError::Connect`]: nothing of a request was sent, so it is a 502
//! that passive health counts and that may be retried elsewhere. A TLS handshake failure is
//! logged at `warn` with its reason (unknown CA, name mismatch, expired: `tls::handshake_reason`),
//! since it is a configuration fault that no retry fixes.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Authority;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::error::{BoxError, ProxyError};
use crate::tls::{self, ClientTls, ALPN_H2, ALPN_HTTP1};

/// Port dialled when an authority names none: 80 in clear text, 443 with TLS.
pub const DEFAULT_PORT: u16 = 80;
/// Port dialled with TLS when an authority names none.
pub const DEFAULT_TLS_PORT: u16 = 443;

/// A connected stream to an endpoint: plain TCP or TLS over TCP.
#[derive(Debug)]
pub enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// The protocol ALPN settled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// Clear text, or the server chose none: whatever the upstream's protocol says.
    None,
    Http1,
    H2,
    /// Something the agent did not offer (a broken server).
    Other,
}

/// A dialled endpoint.
#[derive(Debug)]
pub struct Dialed {
    pub io: Io,
    pub alpn: Alpn,
}

/// Connects to `authority` within `timeout` (TCP and TLS handshake together); with `tls`,
/// verifies the endpoint's certificate for `tls.server_name` and offers its ALPN list.
pub async fn dial(
    authority: &Authority,
    tls: Option<&ClientTls>,
    timeout: Duration,
) -> Result<Dialed, ProxyError> {
    let failed = |source: BoxError| ProxyError::Connect {
        authority: authority.to_string(),
        source,
    };
    let connecting = async {
        let tcp = match authority.port_u16() {
            Some(_) => TcpStream::connect(authority.as_str()).await,
            None => {
                let port = if tls.is_some() {
                    DEFAULT_TLS_PORT
                } else {
                    DEFAULT_PORT
                };
                let host = authority.host();
                let host = host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host);
                TcpStream::connect((host, port)).await
            }
        }
        .map_err(|e| failed(e.into()))?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = tls else {
            return Ok(Dialed {
                io: Io::Plain(tcp),
                alpn: Alpn::None,
            });
        };
        let connector = TlsConnector::from(tls.config.clone());
        match connector.connect(tls.server_name.clone(), tcp).await {
            Ok(stream) => {
                let alpn = match stream.get_ref().1.alpn_protocol() {
                    None => Alpn::None,
                    Some(p) if p == ALPN_H2 => Alpn::H2,
                    Some(p) if p == ALPN_HTTP1 => Alpn::Http1,
                    Some(_) => Alpn::Other,
                };
                Ok(Dialed {
                    io: Io::Tls(Box::new(stream)),
                    alpn,
                })
            }
            Err(e) => {
                let reason = tls::handshake_reason(&e);
                tracing::warn!(endpoint = %authority, server_name = ?tls.server_name, reason = %reason, "TLS handshake with upstream failed");
                Err(failed(format!("TLS handshake failed: {reason}").into()))
            }
        }
    };
    match tokio::time::timeout(timeout, connecting).await {
        Ok(r) => r,
        Err(_) => Err(failed(format!("no connection within {timeout:?}").into())),
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
