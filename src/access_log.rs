//! The access log: one line per proxied request, written off the request path.
//!
//! The request path captures a few cheap fields into a [`Pending`] (reference-counted clones of
//! the URI and header values, no formatting), wraps the response body in a [`Logged`] that
//! counts the bytes sent, and when that body ends (or is dropped: the client went away) hands
//! the finished [`Entry`] to a bounded channel with `try_send`. A writer thread (a plain OS
//! thread, so a write that blocks, on a full pipe or a stuck disk, blocks nobody else) formats
//! and writes lines in batches. When the channel is full the line is dropped and counted in
//! `edge_agent_access_log_dropped_total`: a request never waits for its log line.
//!
//! A file target is reopened on [`AccessLog::reopen`] (SIGUSR1, `reload.rs`), for logrotate's
//! `postrotate`.
//!
//! It sits in layer 1 (beside `metrics`): it knows HTTP types and the metrics facade, nothing
//! of upstreams or endpoints (the proxy hands it the names).
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use metrics::Counter;
use tokio::sync::mpsc;

use crate::metrics as m;

/// Lines queued for the writer before new ones are dropped. An entry is about 300 bytes, so a
/// full queue holds about 1.2 MiB (tokio allocates its blocks only as the queue fills).
pub const QUEUE: usize = 4096;
/// Most entries the writer formats before one `write` call.
pub const BATCH: usize = 256;
/// After a batch that emptied the queue, the writer waits this long before it takes lines
/// again, so that under load it wakes and writes about 200 times a second instead of once per
/// few requests (each wake-up is a futex call on the request path's `try_send` and a context
/// switch). The queue holds 4096 lines: 5 ms of up to ~800k requests/s.
pub const COALESCE: Duration = Duration::from_millis(5);

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Where lines go (`EDGE_AGENT_ACCESS_LOG`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Target {
    /// No access log (the default).
    #[default]
    Off,
    Stdout,
    File(PathBuf),
}

/// Line format (`EDGE_AGENT_ACCESS_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// One JSON object per line (the default).
    #[default]
    Json,
    /// nginx's combined format, then the upstream fields as `key=value`.
    Text,
}

/// The access-log settings (restart to change).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settings {
    pub target: Target,
    pub format: Format,
    /// Keep the query string in `path` (`EDGE_AGENT_ACCESS_LOG_QUERY=on`; default off, since
    /// queries often carry tokens).
    pub query: bool,
}

impl Settings {
    /// Parses the three variables; an error names the variable and the value.
    pub fn parse(
        target: Option<&str>,
        format: Option<&str>,
        query: Option<&str>,
    ) -> Result<Settings, Vec<String>> {
        let mut errs = Vec::new();
        let target = match target.map(str::trim) {
            None | Some("") | Some("off") => Target::Off,
            Some("stdout") | Some("-") => Target::Stdout,
            Some(path) => Target::File(PathBuf::from(path)),
        };
        let format = match format.map(str::trim) {
            None | Some("") | Some("json") => Format::Json,
            Some("text") => Format::Text,
            Some(other) => {
                errs.push(format!(
                    "EDGE_AGENT_ACCESS_LOG_FORMAT={other:?}: expected \"json\" or \"text\""
                ));
                Format::Json
            }
        };
        let query = match on_off("EDGE_AGENT_ACCESS_LOG_QUERY", query) {
            Ok(q) => q,
            Err(e) => {
                errs.push(e);
                false
            }
        };
        if errs.is_empty() {
            Ok(Settings {
                target,
                format,
                query,
            })
        } else {
            Err(errs)
        }
    }
}

/// `on`/`off` (also `true`/`false`, `1`/`0`); unset is off.
pub fn on_off(name: &str, v: Option<&str>) -> Result<bool, String> {
    match v.map(str::trim) {
        None | Some("") | Some("off") | Some("false") | Some("0") => Ok(false),
        Some("on") | Some("true") | Some("1") => Ok(true),
        Some(other) => Err(format!("{name}={other:?}: expected \"on\" or \"off\"")),
    }
}

enum Msg {
    Entry(Entry),
    Reopen,
}

/// The handle the proxy holds: cheap to clone; `None` inside when the log is off.
#[derive(Clone, Default)]
pub struct AccessLog {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    tx: mpsc::Sender<Msg>,
    dropped: Counter,
    query: bool,
    reopen: Arc<AtomicBool>,
}

impl AccessLog {
    /// No access log.
    pub fn off() -> Self {
        AccessLog { inner: None }
    }

    /// Starts the writer thread for `settings` (nothing when the target is off). A file that
    /// cannot be opened is an error naming it.
    pub fn start(settings: &Settings) -> std::io::Result<Self> {
        let out = match &settings.target {
            Target::Off => return Ok(Self::off()),
            Target::Stdout => Output::Stdout,
            Target::File(p) => Output::File(open(p)?, p.clone()),
        };
        Ok(Self::start_with(settings, out))
    }

    fn start_with(settings: &Settings, out: Output) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            rx,
            out,
            format: settings.format,
            reopen: reopen.clone(),
            line: String::with_capacity(512),
            buf: Vec::with_capacity(BATCH * 320),
        };
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run());
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the access-log writer: no access log");
            return Self::off();
        }
        AccessLog {
            inner: Some(Arc::new(Inner {
                tx,
                dropped: metrics::counter!(m::ACCESS_LOG_DROPPED),
                query: settings.query,
                reopen,
            })),
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Asks the writer to reopen its file (a no-op for stdout).
    pub fn reopen(&self) {
        if let Some(i) = &self.inner {
            i.reopen.store(true, Ordering::Release);
            // Wakes an idle writer; when the queue is full it sees the flag on its next line.
            let _ = i.tx.try_send(Msg::Reopen);
        }
    }

    /// Waits (up to `timeout`) until the writer has taken every queued line, at shutdown.
    pub async fn drain(&self, timeout: Duration) {
        let Some(i) = &self.inner else { return };
        let deadline = Instant::now() + timeout;
        while i.tx.capacity() < i.tx.max_capacity() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Captures what the line needs from the request head; `None` when the log is off.
    /// Boxed from the start: the request's future holds one pointer while it runs, not the
    /// whole line (~400 bytes, moved with the future; #13).
    pub fn begin<B>(
        &self,
        req: &Request<B>,
        client: IpAddr,
        start: Instant,
    ) -> Option<Box<Pending>> {
        let inner = self.inner.as_ref()?;
        let h = req.headers();
        Some(Box::new(Pending {
            log: inner.clone(),
            start,
            ts: SystemTime::now(),
            client,
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            host: h.get(http::header::HOST).cloned(),
            // No Content-Length and no Transfer-Encoding: no body. A chunked body's length is
            // not known up front (`null`).
            bytes_in: match h.get(http::header::CONTENT_LENGTH) {
                Some(v) => v.to_str().ok().and_then(|v| v.trim().parse().ok()),
                None if h.contains_key(http::header::TRANSFER_ENCODING) => None,
                None => Some(0),
            },
            traceparent: h.get(&TRACEPARENT).cloned(),
            request_id: h.get(&X_REQUEST_ID).cloned(),
            tried: Tried::default(),
            status: 0,
        }))
    }
}

/// What routing and the tries of one request left for its line, filled by the proxy. With
/// `on` false (no access log) the recording methods do nothing.
#[derive(Debug, Default, Clone)]
pub struct Tried {
    pub on: bool,
    /// The upstream the request was routed to.
    pub upstream: Option<Arc<str>>,
    /// Tries made (0: none reached an endpoint).
    pub tries: u32,
    /// The endpoint tried last.
    pub endpoint: Option<Authority>,
    /// When the first try started and when the last answered (response head).
    pub first: Option<Instant>,
    pub answered: Option<Instant>,
    /// The request became a tunnel (a `101`): its line waits for the tunnel's end.
    pub tunnel: Option<Arc<TunnelBytes>>,
}

/// A tunnel's bytes each way, counted by `tunnel.rs` while it copies, and its end. The line of
/// an upgraded request is written when the tunnel closes, with these as `bytes_in` and
/// `bytes_out` and the tunnel's whole life as `duration_ms` (as nginx logs a WebSocket).
#[derive(Debug, Default)]
pub struct TunnelBytes {
    /// Client to endpoint.
    pub up: std::sync::atomic::AtomicU64,
    /// Endpoint to client.
    pub down: std::sync::atomic::AtomicU64,
    closed: tokio::sync::Notify,
}

impl TunnelBytes {
    /// The tunnel has ended (or never opened).
    pub fn close(&self) {
        self.closed.notify_one();
    }
}

impl Tried {
    pub fn new(on: bool) -> Self {
        Tried {
            on,
            ..Default::default()
        }
    }

    pub fn routed(&mut self, upstream: &Arc<str>) {
        if self.on {
            self.upstream = Some(upstream.clone());
        }
    }

    /// Try number `n` starts, at `endpoint`.
    pub fn start(&mut self, n: u32, endpoint: &Authority) {
        if self.on {
            self.tries = n;
            self.endpoint = Some(endpoint.clone());
            self.first.get_or_insert_with(Instant::now);
        }
    }

    /// The try's response head came.
    pub fn answered(&mut self) {
        if self.on {
            self.answered = Some(Instant::now());
        }
    }
}

/// A request's line in the making (on the request path: no formatting here).
pub struct Pending {
    log: Arc<Inner>,
    start: Instant,
    ts: SystemTime,
    client: IpAddr,
    method: Method,
    uri: Uri,
    version: Version,
    host: Option<HeaderValue>,
    bytes_in: Option<u64>,
    traceparent: Option<HeaderValue>,
    request_id: Option<HeaderValue>,
    tried: Tried,
    status: u16,
}

impl Pending {
    /// Wraps the response body: the line is sent when the body ends or is dropped.
    pub fn finish<B>(
        mut self: Box<Self>,
        resp: http::Response<B>,
        tried: Tried,
    ) -> http::Response<Logged<B>> {
        self.tried = tried;
        self.status = resp.status().as_u16();
        resp.map(|inner| Logged {
            inner,
            sent: 0,
            pending: Some(self),
        })
    }

    /// An upgraded request's line: sent when its tunnel `t` ends, with the tunnel's bytes.
    fn after_tunnel(mut self: Box<Self>, status: u16, tried: Tried, t: Arc<TunnelBytes>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.tried = tried;
        self.status = status;
        tokio::spawn(async move {
            t.closed.notified().await;
            self.bytes_in = Some(t.up.load(Relaxed));
            self.send(t.down.load(Relaxed));
        });
    }

    fn send(self: Box<Self>, bytes_out: u64) {
        let log = self.log.clone();
        let entry = Entry {
            duration: self.start.elapsed(),
            bytes_out,
            p: self,
        };
        if log.tx.try_send(Msg::Entry(entry)).is_err() {
            log.dropped.increment(1);
        }
    }
}

/// A response body that counts the bytes it yields and sends the request's line when it ends.
/// Without a line to send (the log is off) it only passes frames through.
pub struct Logged<B> {
    inner: B,
    sent: u64,
    pending: Option<Box<Pending>>,
}

impl<B> Logged<B> {
    /// A body with no line attached.
    pub fn plain(inner: B) -> Self {
        Logged {
            inner,
            sent: 0,
            pending: None,
        }
    }

    /// Wraps `resp` with `pending`'s line, or plainly when there is none.
    pub fn wrap(
        resp: http::Response<B>,
        pending: Option<Box<Pending>>,
        mut tried: Tried,
    ) -> http::Response<Logged<B>> {
        match (pending, tried.tunnel.take()) {
            (Some(p), Some(t)) => {
                p.after_tunnel(resp.status().as_u16(), tried, t);
                resp.map(Logged::plain)
            }
            (Some(p), None) => p.finish(resp, tried),
            (None, _) => resp.map(Logged::plain),
        }
    }
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.send(self.sent);
        }
    }
}

impl<B> Body for Logged<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if this.pending.is_some() {
            match &polled {
                Poll::Ready(Some(Ok(f))) => {
                    if let Some(d) = f.data_ref() {
                        this.sent += d.len() as u64;
                    }
                }
                Poll::Ready(None) => {
                    if let Some(p) = this.pending.take() {
                        p.send(this.sent);
                    }
                }
                _ => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A finished line, formatted by the writer.
pub struct Entry {
    p: Box<Pending>,
    duration: Duration,
    bytes_out: u64,
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), when well formed and
/// not all zeros.
pub fn trace_id(traceparent: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(traceparent).ok()?.trim();
    let mut parts = s.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |x: &str, n: usize| {
        x.len() == n
            && x.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let ok = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && (version != "00" || parts.next().is_none());
    ok.then_some(trace)
}

/// A new request id: 128 random bits as a UUID (version 4 layout), from `rng`'s two draws.
pub fn new_request_id(hi: u64, lo: u64) -> HeaderValue {
    let hi = (hi & !0xf000) | 0x4000; // version 4
    let lo = (lo & !(0xc << 60)) | (0x8 << 60); // variant 10
    let s = format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    );
    HeaderValue::try_from(s).expect("hex is a valid header value")
}

fn proto(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP",
    }
}

/// A duration in milliseconds, to the microsecond, written as the shortest decimal (`3`, `0.25`,
/// `12.345`: what `f64`'s `Display` prints for the same value) without float formatting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ms(u64);

fn ms(d: Duration) -> Ms {
    Ms(u64::try_from(d.as_nanos().saturating_add(500) / 1000).unwrap_or(u64::MAX))
}

impl std::fmt::Display for Ms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (whole, mut frac) = (self.0 / 1000, self.0 % 1000);
        if frac == 0 {
            return write!(f, "{whole}");
        }
        let mut digits = 3;
        while frac % 10 == 0 {
            frac /= 10;
            digits -= 1;
        }
        write!(f, "{whole}.{frac:0digits$}")
    }
}

impl Entry {
    fn path(&self) -> &str {
        match (self.p.log.query, self.p.uri.path_and_query()) {
            (true, Some(pq)) => pq.as_str(),
            _ => self.p.uri.path(),
        }
    }

    fn host(&self) -> Option<&str> {
        self.p
            .host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .or_else(|| self.p.uri.authority().map(|a| a.as_str()))
    }

    fn upstream_ms(&self) -> Option<Ms> {
        let t = &self.p.tried;
        Some(ms(t.answered?.saturating_duration_since(t.first?)))
    }

    fn trace_id(&self) -> Option<&str> {
        self.p
            .traceparent
            .as_ref()
            .and_then(|v| trace_id(v.as_bytes()))
    }

    fn request_id(&self) -> Option<&str> {
        self.p.request_id.as_ref().and_then(|v| v.to_str().ok())
    }

    /// The JSON line (without the newline).
    pub fn json(&self, out: &mut String) {
        let p = &self.p;
        // The timestamp has nothing to escape: written straight into the line.
        let _ = write!(
            out,
            "{{\"ts\":\"{}\"",
            humantime::format_rfc3339_millis(p.ts)
        );
        let _ = write!(out, ",\"client\":\"{}\",\"method\":", p.client);
        json_str(out, p.method.as_str());
        out.push_str(",\"path\":");
        json_str(out, self.path());
        let _ = write!(out, ",\"proto\":\"{}\",\"host\":", proto(p.version));
        json_opt(out, self.host());
        out.push_str(",\"upstream\":");
        json_opt(out, p.tried.upstream.as_deref());
        out.push_str(",\"endpoint\":");
        json_opt(out, p.tried.endpoint.as_ref().map(|a| a.as_str()));
        let _ = write!(
            out,
            ",\"tries\":{},\"status\":{},\"bytes_in\":",
            p.tried.tries, p.status
        );
        match p.bytes_in {
            Some(n) => {
                let _ = write!(out, "{n}");
            }
            None => out.push_str("null"),
        }
        let _ = write!(
            out,
            ",\"bytes_out\":{},\"duration_ms\":{}",
            self.bytes_out,
            ms(self.duration)
        );
        out.push_str(",\"upstream_ms\":");
        match self.upstream_ms() {
            Some(v) => {
                let _ = write!(out, "{v}");
            }
            None => out.push_str("null"),
        }
        out.push_str(",\"trace_id\":");
        json_opt(out, self.trace_id());
        out.push_str(",\"request_id\":");
        json_opt(out, self.request_id());
        out.push('}');
    }

    /// The text line: nginx's combined format (`client - - [time] "request" status bytes`),
    /// then the other fields as `key=value` (`-` when absent).
    pub fn text(&self, out: &mut String) {
        let p = &self.p;
        let ts = humantime::format_rfc3339_millis(p.ts).to_string();
        let _ = write!(
            out,
            "{} - - [{}] \"{} {} {}\" {} {}",
            p.client,
            nginx_time(&ts),
            p.method,
            text_safe(self.path()),
            proto(p.version),
            p.status,
            self.bytes_out
        );
        let _ = write!(
            out,
            " host={} upstream={} endpoint={} tries={} bytes_in={} duration_ms={} upstream_ms={} trace_id={} request_id={} ts={}",
            text_safe(self.host().unwrap_or("-")),
            p.tried.upstream.as_deref().unwrap_or("-"),
            p.tried.endpoint.as_ref().map_or("-", |a| a.as_str()),
            p.tried.tries,
            p.bytes_in.map_or_else(|| "-".to_string(), |n| n.to_string()),
            ms(self.duration),
            self.upstream_ms().map_or_else(|| "-".to_string(), |v| v.to_string()),
            self.trace_id().unwrap_or("-"),
            text_safe(self.request_id().unwrap_or("-")),
            ts
        );
    }
}

/// `2026-12-01T22:20:00.123Z` → `01/Dec/2026:22:20:00 +0000` (nginx's `$time_local` in UTC).
fn nginx_time(rfc3339: &str) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = rfc3339
        .get(5..7)
        .and_then(|m| m.parse::<usize>().ok())
        .and_then(|m| MONTHS.get(m.wrapping_sub(1)))
        .unwrap_or(&"???");
    match (rfc3339.get(0..4), rfc3339.get(8..10), rfc3339.get(11..19)) {
        (Some(y), Some(d), Some(t)) => format!("{d}/{month}/{y}:{t} +0000"),
        _ => rfc3339.to_string(),
    }
}

/// A value for the text format: spaces, quotes and control characters escaped, so a line
/// stays one line with whitespace-separated fields.
fn text_safe(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        return s.into();
    }
    let mut o = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if c.is_ascii_graphic() => o.push(c),
            c => {
                let _ = write!(o, "\\x{:02x}", c as u32);
            }
        }
    }
    o.into()
}

/// `s` as a JSON string, escaped as serde_json escapes (`"`, `\\`, control characters), straight
/// into the line: no allocation per field.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        // `b` is ASCII, so `i` and `i + 1` are character boundaries.
        out.push_str(&s[plain..i]);
        if esc.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(esc);
        }
        plain = i + 1;
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

fn json_opt(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.push_str("null"),
    }
}

enum Output {
    Stdout,
    File(std::fs::File, PathBuf),
    #[cfg(test)]
    Memory(Arc<std::sync::Mutex<Vec<u8>>>),
}

fn open(path: &PathBuf) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("EDGE_AGENT_ACCESS_LOG={}: {e}", path.display()),
            )
        })
}

struct Writer {
    rx: mpsc::Receiver<Msg>,
    out: Output,
    format: Format,
    reopen: Arc<AtomicBool>,
    line: String,
    buf: Vec<u8>,
}

impl Writer {
    fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            self.buf.clear();
            self.add(first);
            let mut n = 1;
            while n < BATCH {
                match self.rx.try_recv() {
                    Ok(msg) => self.add(msg),
                    Err(_) => break,
                }
                n += 1;
            }
            if self.reopen.swap(false, Ordering::AcqRel) {
                self.reopen_file();
            }
            if !self.buf.is_empty() {
                if let Err(e) = self.write() {
                    tracing::warn!(error = %e, "access log: write failed, lines lost");
                }
            }
            if n < BATCH {
                // The queue was emptied: let lines gather (their senders find no waker to
                // wake) rather than waking for the next one.
                std::thread::sleep(COALESCE);
            }
        }
    }

    fn add(&mut self, msg: Msg) {
        let Msg::Entry(e) = msg else { return };
        self.line.clear();
        match self.format {
            Format::Json => e.json(&mut self.line),
            Format::Text => e.text(&mut self.line),
        }
        self.line.push('\n');
        self.buf.extend_from_slice(self.line.as_bytes());
    }

    fn write(&mut self) -> std::io::Result<()> {
        match &mut self.out {
            Output::Stdout => {
                let mut o = std::io::stdout().lock();
                o.write_all(&self.buf)?;
                o.flush()
            }
            Output::File(f, _) => f.write_all(&self.buf),
            #[cfg(test)]
            Output::Memory(m) => {
                m.lock().unwrap().extend_from_slice(&self.buf);
                Ok(())
            }
        }
    }

    fn reopen_file(&mut self) {
        if let Output::File(f, path) = &mut self.out {
            match open(path) {
                Ok(new) => {
                    *f = new;
                    tracing::info!(path = %path.display(), "access log reopened");
                }
                Err(e) => {
                    tracing::error!(error = %e, "access log: cannot reopen, still writing to the old file")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_from_traceparent() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(
            trace_id(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(
            trace_id(b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id(b"garbage"), None);
        assert_eq!(
            trace_id(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    #[test]
    fn request_ids_are_uuid_v4_shaped() {
        let id = new_request_id(u64::MAX, 0);
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 36, "{s}");
        assert_eq!(&s[14..15], "4", "{s}");
        assert_eq!(&s[19..20], "8", "{s}");
    }

    #[test]
    fn settings_name_the_variable_and_value() {
        let e = Settings::parse(Some("stdout"), Some("xml"), Some("maybe")).unwrap_err();
        assert!(
            e[0].contains("EDGE_AGENT_ACCESS_LOG_FORMAT=\"xml\""),
            "{e:?}"
        );
        assert!(
            e[1].contains("EDGE_AGENT_ACCESS_LOG_QUERY=\"maybe\""),
            "{e:?}"
        );
        let s = Settings::parse(Some("/tmp/x.log"), Some("text"), Some("on")).unwrap();
        assert_eq!(s.target, Target::File("/tmp/x.log".into()));
        assert_eq!(s.format, Format::Text);
        assert!(s.query);
        assert_eq!(
            Settings::parse(None, None, None).unwrap(),
            Settings::default()
        );
    }

    #[test]
    fn json_strings_are_escaped_as_serde_json_does() {
        for s in [
            "",
            "plain /a/b",
            "quote \" and \\ backslash",
            "\n\r\t\u{8}\u{c}\u{0}\u{1f}\u{7f}",
            "ünïcödé ✓ \u{10ffff}",
            "\"",
        ] {
            let mut out = String::from("x");
            json_str(&mut out, s);
            assert_eq!(out[1..], serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn milliseconds_print_as_f64_would() {
        for us in [
            0u64, 1, 10, 100, 999, 1000, 1500, 3000, 12_345, 120_000, 7_654_321,
        ] {
            let want = ((us as f64) / 1e3).to_string();
            assert_eq!(Ms(us).to_string(), want, "{us} µs");
        }
        assert_eq!(ms(Duration::from_nanos(2_499)), Ms(2));
        assert_eq!(ms(Duration::from_nanos(2_500)), Ms(3));
    }

    #[test]
    fn nginx_time_format() {
        assert_eq!(
            nginx_time("2026-12-01T22:20:05.123Z"),
            "01/Dec/2026:22:20:05 +0000"
        );
    }

    fn lines(format: Format, query: bool, req: Request<()>, tried: Tried) -> String {
        let mem = Arc::new(std::sync::Mutex::new(Vec::new()));
        let settings = Settings {
            target: Target::Stdout,
            format,
            query,
        };
        let log = AccessLog::start_with(&settings, Output::Memory(mem.clone()));
        let p = log
            .begin(&req, "127.0.0.1".parse().unwrap(), Instant::now())
            .unwrap();
        let resp = http::Response::builder()
            .status(201)
            .body(http_body_util::Full::new(Bytes::from_static(b"hello")))
            .unwrap();
        let resp = p.finish(resp, tried);
        drop(resp); // never polled: the client went away
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = String::from_utf8(mem.lock().unwrap().clone()).unwrap();
            if text.ends_with('\n') {
                return text;
            }
            assert!(Instant::now() < deadline, "no line written");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn json_and_text_lines_hold_every_field() {
        let t0 = Instant::now();
        let tried = Tried {
            on: true,
            upstream: Some("svc".into()),
            tries: 2,
            endpoint: Some("127.0.0.1:9".parse().unwrap()),
            first: Some(t0),
            answered: Some(t0 + Duration::from_millis(3)),
            tunnel: None,
        };
        let req = Request::builder()
            .method("POST")
            .uri("/a/b?token=secret")
            .header("host", "svc")
            .header("content-length", "7")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .header("x-request-id", "abc \"1\"")
            .body(())
            .unwrap();
        let line = lines(Format::Json, false, req, tried.clone());
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(v["client"], "127.0.0.1");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/a/b");
        assert_eq!(v["proto"], "HTTP/1.1");
        assert_eq!(v["host"], "svc");
        assert_eq!(v["upstream"], "svc");
        assert_eq!(v["endpoint"], "127.0.0.1:9");
        assert_eq!(v["tries"], 2);
        assert_eq!(v["status"], 201);
        assert_eq!(v["bytes_in"], 7);
        assert_eq!(v["bytes_out"], 0);
        assert_eq!(v["upstream_ms"], 3.0);
        assert!(v["duration_ms"].as_f64().unwrap() >= 0.0);
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["request_id"], "abc \"1\"");
        assert!(v["ts"].as_str().unwrap().ends_with('Z'), "{v}");

        let req = Request::builder()
            .uri("/a?q=1")
            .header("host", "svc")
            .body(())
            .unwrap();
        let line = lines(Format::Text, true, req, tried);
        assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
        assert!(line.contains("] \"GET /a?q=1 HTTP/1.1\" 201 0 host=svc upstream=svc endpoint=127.0.0.1:9 tries=2 bytes_in=0 "), "{line}");
        assert!(
            line.contains(" upstream_ms=3 trace_id=- request_id=- ts="),
            "{line}"
        );
    }
}
