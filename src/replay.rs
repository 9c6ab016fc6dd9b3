//! Request bodies that can be sent again: a body is kept as it is sent, up to the upstream's
//! `retry_buffer` ([`DEFAULT_RETRY_BUFFER`]), so a failed try can be retried on another endpoint
//! with the same bytes; past the limit the copy is dropped and the body streams as before,
//! never replayed.
//!
//! The body is handed to hyper, which drops it when the exchange ends (or never starts: a
//! refused connection drops the request unsent). On drop, a [`ReplayBody`] that stayed within
//! its limit gives back, through a oneshot channel, what it sent and the part of the client's
//! body not yet read ([`Leftover`]); the next try sends the first again, then goes on with the
//! second. Nothing is read ahead of what the upstream takes, so a streaming body (a gRPC
//! client stream) flows as before.
//!
//! A leaf (layer 1), after `framing.rs` (whose [`ClientBody`] it wraps).
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::framing::InBody;
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

use crate::framing::ClientBody;

/// Default `retry_buffer`: the largest request body kept for a retry (Linkerd's figure).
pub const DEFAULT_RETRY_BUFFER: usize = 64 * 1024;
/// Largest `retry_buffer` accepted (16 MiB): the copy is held in memory per request.
pub const MAX_RETRY_BUFFER: usize = 16 * 1024 * 1024;

/// A client body being sent, with a copy of what was sent kept up to a limit.
pub struct ReplayBody {
    /// Frames of an earlier try to send first.
    again: VecDeque<Bytes>,
    /// The rest of the client's body (`None` once it has ended).
    inner: Option<ClientBody<InBody>>,
    /// Trailers of the client's body, once read.
    trailers: Option<HeaderMap>,
    /// Whether `trailers` still need sending in this try.
    trailers_due: bool,
    kept: Vec<Bytes>,
    kept_len: usize,
    limit: usize,
    /// Where the leftover goes when the body is dropped; `None` once over the limit.
    back: Option<oneshot::Sender<Leftover>>,
}

/// What a dropped [`ReplayBody`] hands back: everything sent so far and what is still unread.
pub struct Leftover {
    sent: Vec<Bytes>,
    inner: Option<ClientBody<InBody>>,
    trailers: Option<HeaderMap>,
}

impl ReplayBody {
    /// Wraps `body`, keeping up to `limit` bytes; the receiver gets the [`Leftover`] when the
    /// body is dropped within the limit (and nothing when it went over).
    pub fn new(body: ClientBody<InBody>, limit: usize) -> (Self, oneshot::Receiver<Leftover>) {
        Self::build(VecDeque::new(), Some(body), None, limit)
    }

    /// Wraps `body` without keeping anything: it cannot be replayed (too big for the buffer).
    pub fn streaming(body: ClientBody<InBody>) -> Self {
        ReplayBody {
            again: VecDeque::new(),
            inner: Some(body),
            trailers: None,
            trailers_due: false,
            kept: Vec::new(),
            kept_len: 0,
            limit: 0,
            back: None,
        }
    }

    fn build(
        again: VecDeque<Bytes>,
        inner: Option<ClientBody<InBody>>,
        trailers: Option<HeaderMap>,
        limit: usize,
    ) -> (Self, oneshot::Receiver<Leftover>) {
        let (tx, rx) = oneshot::channel();
        let body = ReplayBody {
            trailers_due: trailers.is_some(),
            again,
            inner,
            trailers,
            kept: Vec::new(),
            kept_len: 0,
            limit,
            back: Some(tx),
        };
        (body, rx)
    }

    fn keep(&mut self, data: &Bytes) {
        if self.back.is_none() {
            return;
        }
        self.kept_len += data.len();
        if self.kept_len > self.limit {
            // Too big to replay: stop keeping, and say nothing when dropped.
            self.back = None;
            self.kept = Vec::new();
        } else {
            self.kept.push(data.clone());
        }
    }
}

impl Leftover {
    /// The body for the next try: what was sent, then the rest.
    pub fn replay(self, limit: usize) -> (ReplayBody, oneshot::Receiver<Leftover>) {
        ReplayBody::build(self.sent.into(), self.inner, self.trailers, limit)
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        if let Some(tx) = self.back.take() {
            let mut sent = std::mem::take(&mut self.kept);
            sent.extend(self.again.drain(..));
            let _ = tx.send(Leftover {
                sent,
                inner: self.inner.take(),
                trailers: self.trailers.take(),
            });
        }
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(data) = this.again.pop_front() {
            this.keep(&data);
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(inner) = this.inner.as_mut() {
            match Pin::new(inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        let data = data.clone();
                        this.keep(&data);
                    } else if let Some(t) = frame.trailers_ref() {
                        this.trailers = Some(t.clone());
                        this.inner = None;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => this.inner = None,
            }
        }
        if this.trailers_due {
            this.trailers_due = false;
            if let Some(t) = this.trailers.clone() {
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.again.is_empty()
            && !self.trailers_due
            && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let again: u64 = self.again.iter().map(|b| b.len() as u64).sum();
        let mut hint = match &self.inner {
            Some(b) => b.size_hint(),
            None => SizeHint::with_exact(0),
        };
        hint.set_lower(hint.lower() + again);
        if let Some(u) = hint.upper() {
            hint.set_upper(u + again);
        }
        hint
    }
}
