//! sinew-proxy's own HTTP/2 path.
//!
//! One task per client connection owns that connection and the upstream
//! HTTP/2 connection(s) its allowed streams go to, and moves frames between
//! them: no task, channel, message object or header map per stream. A
//! request's header block is decoded once (HPACK), checked as RFC 9113
//! section 8 asks, judged with the same [`judge`] as HTTP/1, and written
//! to the upstream as a new block whose `:path` is the path that was
//! judged. DATA is copied from one connection's read buffer into the
//! other's write buffer as the peer's flow-control windows allow; what does
//! not fit waits in the stream, and the window the proxy gives the sender
//! is given back only once the bytes have moved on, so a stream never holds
//! more than the window the proxy announced.
//!
//! Upstream connections are per client connection and keyed by
//! (destination, mark): a client's streams share one, and a connection's
//! destination is the one the datapath redirected from. Per-request
//! routing can later pick other keys without changing the driver.
//!
//! Protection: frames over 16,384 octets, bad lengths and stream ids are
//! connection errors with the code RFC 9113 names; malformed requests are
//! stream errors; streams past the concurrency limit are refused; a client
//! that resets streams faster than `h2_max_pending_accept_reset_streams`
//! per second, or causes more than `h2_max_local_error_reset_streams`
//! stream errors, gets GOAWAY ENHANCE_YOUR_CALM; a client whose write
//! buffer holds more than [`WBUF_HIGH`] is not read until it drains (a
//! PING or SETTINGS flood stalls itself), and one that does not answer the
//! keep-alive PING in time is closed.

pub mod frame;
pub mod hpack;
mod huffman;

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::inbound::{judge, record, Answer, Ask, Conn, Ctx, Decision, Judged, Outcome};
use crate::metrics::{DropReason, UpstreamError, Verdict};
use frame::*;
use hpack::{Decoder, Fields};

/// Initial stream window the proxy announces on both sides.
const STREAM_WINDOW: i64 = 256 * 1024;
/// Connection window the proxy announces on both sides.
const CONN_WINDOW: i64 = 1024 * 1024;
/// A side whose unsent bytes pass this is not read until they drain.
pub const WBUF_HIGH: usize = 256 * 1024;
/// Bytes read from one socket before the other gets a turn.
const READ_BUDGET: usize = 64 * 1024;
/// Header blocks from an upstream may be this large.
const UPSTREAM_HEADER_LIST: usize = 256 * 1024;

type Connecting = Pin<Box<dyn std::future::Future<Output = Result<TcpStream, UpstreamError>> + Send>>;

/// One end of an HTTP/2 connection: its socket, buffers, HPACK decoder,
/// and the peer's settings and windows.
struct Wire {
    sock: TcpStream,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    wpos: usize,
    eof: bool,
    dec: Decoder,
    peer_max_frame: usize,
    peer_initial_window: i64,
    peer_max_streams: u32,
    /// What this side may still send on the connection.
    send_conn: i64,
    /// What the peer may still send on the connection.
    recv_conn: i64,
    /// Received bytes that have moved on and are not yet given back.
    credit_conn: i64,
    /// A header block waiting for its CONTINUATION frames: stream, flags
    /// of the HEADERS frame, the fragments so far.
    cont: Option<(u32, u8, Vec<u8>)>,
}

impl Wire {
    fn new(sock: TcpStream, rbuf: BytesMut) -> Self {
        Wire {
            sock,
            rbuf,
            wbuf: Vec::with_capacity(16 * 1024),
            wpos: 0,
            eof: false,
            dec: Decoder::default(),
            peer_max_frame: MAX_FRAME,
            peer_initial_window: DEFAULT_WINDOW,
            peer_max_streams: u32::MAX,
            send_conn: DEFAULT_WINDOW,
            recv_conn: DEFAULT_WINDOW,
            credit_conn: 0,
            cont: None,
        }
    }

    fn unsent(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Our settings and the connection window beyond the default.
    fn start(&mut self, client_side: bool, max_streams: u32, max_list: u32) {
        let mut s = vec![(SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW as u32)];
        if client_side {
            s.push((SETTINGS_MAX_CONCURRENT_STREAMS, max_streams));
            s.push((SETTINGS_MAX_HEADER_LIST_SIZE, max_list));
        } else {
            self.wbuf.extend_from_slice(PREFACE);
            s.push((SETTINGS_ENABLE_PUSH, 0));
        }
        put_settings(&mut self.wbuf, &s);
        put_window_update(&mut self.wbuf, 0, (CONN_WINDOW - DEFAULT_WINDOW) as u32);
        self.recv_conn = CONN_WINDOW;
    }

    /// Writes what it can; Ready(Err) when the socket failed.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            match self.sock.try_write(&self.wbuf[self.wpos..]) {
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match self.sock.poll_write_ready(cx) {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                },
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads up to [`READ_BUDGET`]; Ready(true) when bytes came or EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut got = 0;
        loop {
            if self.rbuf.capacity() - self.rbuf.len() < 16 * 1024 {
                self.rbuf.reserve(32 * 1024);
            }
            match self.sock.try_read_buf(&mut self.rbuf) {
                Ok(0) => {
                    self.eof = true;
                    return Poll::Ready(Ok(true));
                }
                Ok(n) => {
                    got += n;
                    if got >= READ_BUDGET {
                        return Poll::Ready(Ok(true));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if got > 0 {
                        return Poll::Ready(Ok(true));
                    }
                    match self.sock.poll_read_ready(cx) {
                        Poll::Ready(Ok(())) => continue,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Gives back connection window once half of it has moved on.
    fn give_back_conn(&mut self, n: usize) {
        self.credit_conn += n as i64;
        if self.credit_conn >= CONN_WINDOW / 2 {
            put_window_update(&mut self.wbuf, 0, self.credit_conn as u32);
            self.recv_conn += self.credit_conn;
            self.credit_conn = 0;
        }
    }
}

enum UpState {
    Connecting(Connecting),
    Ready(Box<Wire>),
}

struct Up {
    dst: SocketAddr,
    mark: u32,
    state: UpState,
    next_sid: u32,
    active: u32,
    /// Client stream ids whose HEADERS wait for the connection or for
    /// room under the upstream's concurrency limit, in order.
    waiting: std::collections::VecDeque<u32>,
    /// The upstream sent GOAWAY: no new stream goes on it.
    closing: bool,
}

/// One direction of a stream.
#[derive(Default)]
struct Half {
    /// DATA received and not yet sent on (flow control or no stream yet).
    pending: BytesMut,
    /// A trailer block to send once `pending` is out.
    trailers: Option<Vec<u8>>,
    /// The sender ended this direction (END_STREAM received).
    end: bool,
    /// END_STREAM sent on.
    end_sent: bool,
    /// What the sender may still send on this stream.
    recv: i64,
    /// Received bytes that moved on and are not yet given back.
    credit: i64,
    /// What the proxy may still send to the receiver on this stream.
    send: i64,
}

struct Stream {
    cid: u32,
    /// The upstream slot and stream id; uid 0 until its HEADERS are sent.
    up: Option<usize>,
    uid: u32,
    req_head: Option<Vec<u8>>,
    req: Half,
    resp: Half,
    /// The final response head was sent to the client.
    resp_started: bool,
    /// Answered by the proxy: the request's DATA is dropped.
    local: bool,
    content_length: Option<u64>,
    req_bytes: u64,
    judged: Option<Judged>,
    rule: Option<Arc<str>>,
    grpc: bool,
}

/// Why the connection ends.
struct ConnError {
    code: u32,
    why: &'static str,
}

fn conn_err(code: u32, why: &'static str) -> ConnError {
    ConnError { code, why }
}

/// The request's fields as the rules see them (names are lowercase).
struct FieldView<'a>(&'a Fields);

impl sinew_l7::Headers for FieldView<'_> {
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.0
            .iter()
            .filter(|(n, _, _)| n.first() != Some(&b':') && n.eq_ignore_ascii_case(name.as_bytes()))
            .any(|(_, v, _)| f(v))
    }
}

/// Connection-specific fields (RFC 9113 8.2.2).
fn connection_specific(name: &[u8]) -> bool {
    matches!(
        name,
        b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding" | b"upgrade"
    )
}

fn valid_value(v: &[u8]) -> bool {
    !v.iter().any(|&c| c == 0 || c == b'\r' || c == b'\n')
        && !matches!(v.first(), Some(b' ' | b'\t'))
        && !matches!(v.last(), Some(b' ' | b'\t'))
}

fn valid_name(n: &[u8]) -> bool {
    !n.is_empty()
        && n.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&c))
}

/// A request head checked as RFC 9113 8.3.1 asks.
struct ReqHead<'a> {
    method: &'a [u8],
    scheme: Option<&'a [u8]>,
    authority: Option<&'a [u8]>,
    path: Option<&'a [u8]>,
    content_length: Option<u64>,
}

fn check_request(f: &Fields) -> Option<ReqHead<'_>> {
    let mut h = ReqHead {
        method: b"",
        scheme: None,
        authority: None,
        path: None,
        content_length: None,
    };
    let mut method = None;
    let mut regular = false;
    for (n, v, _) in f.iter() {
        if let Some(p) = n.strip_prefix(b":") {
            if regular {
                return None;
            }
            let slot = match p {
                b"method" => &mut method,
                b"scheme" => &mut h.scheme,
                b"authority" => &mut h.authority,
                b"path" => &mut h.path,
                _ => return None,
            };
            if slot.replace(v).is_some() {
                return None;
            }
            continue;
        }
        regular = true;
        if !valid_name(n) || connection_specific(n) || !valid_value(v) {
            return None;
        }
        if n == b"te" && v != b"trailers" {
            return None;
        }
        if n == b"content-length" {
            let cl = std::str::from_utf8(v).ok()?.parse::<u64>().ok()?;
            if h.content_length.replace(cl).is_some_and(|old| old != cl) {
                return None;
            }
        }
    }
    h.method = method?;
    if h.method == b"CONNECT" {
        if h.scheme.is_some() || h.path.is_some() || h.authority.is_none() {
            return None;
        }
    } else if h.scheme.is_none() || h.path.is_none_or(|p| p.is_empty()) {
        return None;
    }
    Some(h)
}

pub(crate) struct H2 {
    ctx: Arc<Ctx>,
    conn: Arc<Conn>,
    client: Wire,
    ups: Vec<Option<Up>>,
    streams: Vec<Stream>,
    last_cid: u32,
    fields: Fields,
    block: Vec<u8>,
    /// GOAWAY sent: the last stream id it named.
    goaway: Option<u32>,
    /// The connection ends once the write buffer is out.
    closing: bool,
    /// The client sent GOAWAY: it opens no more streams.
    client_goaway: bool,
    reset_tokens: f64,
    reset_refill: Instant,
    local_errors: usize,
    last_frame: Instant,
    ping_sent: Option<Instant>,
    idle_since: Option<Instant>,
    timer: Pin<Box<tokio::time::Sleep>>,
    dropped: bool,
}

/// Serves one HTTP/2 connection whose first bytes (the preface and maybe
/// more) are in `first`.
pub(crate) async fn serve(
    ctx: &Arc<Ctx>,
    conn: &Arc<Conn>,
    sock: TcpStream,
    mut first: BytesMut,
    mut drain: watch::Receiver<bool>,
) {
    first.advance(PREFACE.len());
    let l = &ctx.limits;
    let mut client = Wire::new(sock, first);
    client.start(true, l.h2_max_concurrent_streams, l.h2_max_header_list_size);
    let now = Instant::now();
    let mut h = H2 {
        ctx: ctx.clone(),
        conn: conn.clone(),
        client,
        ups: Vec::new(),
        streams: Vec::new(),
        last_cid: 0,
        fields: Fields::default(),
        block: Vec::with_capacity(1024),
        goaway: None,
        closing: false,
        client_goaway: false,
        reset_tokens: l.h2_max_pending_accept_reset_streams as f64,
        reset_refill: now,
        local_errors: 0,
        last_frame: now,
        ping_sent: None,
        idle_since: Some(now),
        timer: Box::pin(tokio::time::sleep(l.h2_keepalive_interval)),
        dropped: false,
    };
    // The bytes that came with the preface.
    if let Err(e) = h.client_frames() {
        h.fail(e);
    }
    let mut draining = false;
    loop {
        let drained = tokio::select! {
            _ = poll_fn(|cx| h.poll(cx)) => break,
            r = drain.changed(), if !draining => r.is_err() || *drain.borrow(),
        };
        if drained {
            draining = true;
            h.start_goaway(NO_ERROR);
        }
    }
    h.linger().await;
}

impl H2 {
    fn drop_once(&mut self) {
        if !self.dropped {
            self.dropped = true;
            self.ctx.metrics.dropped(DropReason::H2Protocol);
        }
    }

    fn start_goaway(&mut self, code: u32) {
        if self.goaway.is_none() {
            put_goaway(&mut self.client.wbuf, self.last_cid, code);
            self.goaway = Some(self.last_cid);
        }
    }

    /// Ends the connection for a connection error: GOAWAY with the code,
    /// then close once it is written.
    fn fail(&mut self, e: ConnError) {
        tracing::debug!(peer = %self.conn.peer, orig = %self.conn.orig, code = e.code, why = e.why, "HTTP/2 connection error, GOAWAY sent");
        if self.goaway.is_none() {
            put_goaway(&mut self.client.wbuf, self.last_cid, e.code);
            self.goaway = Some(self.last_cid);
        }
        self.drop_once();
        self.closing = true;
        self.streams.clear();
        self.ups.clear();
    }

    /// After the last write: shut down and read (and drop) what the client
    /// still sends for up to a second, so a reset cannot destroy the
    /// GOAWAY it has not read yet.
    async fn linger(mut self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = poll_fn(|cx| self.client.poll_flush(cx)).await;
        let _ = self.client.sock.shutdown().await;
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(n) = self.client.sock.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut progress = false;
            if self.closing {
                return match self.client.poll_flush(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(_) => Poll::Ready(()),
                };
            }
            // Upstream connections being made.
            for i in 0..self.ups.len() {
                let done = match self.ups[i].as_mut().map(|u| &mut u.state) {
                    Some(UpState::Connecting(f)) => match f.as_mut().poll(cx) {
                        Poll::Ready(r) => Some(r),
                        Poll::Pending => None,
                    },
                    _ => None,
                };
                if let Some(r) = done {
                    progress = true;
                    self.connected(i, r);
                }
            }
            // The client.
            let backlog = self.client.unsent() >= WBUF_HIGH
                || self.ups.iter().flatten().any(|u| match &u.state {
                    UpState::Ready(w) => w.unsent() >= WBUF_HIGH,
                    _ => false,
                });
            if !backlog && !self.client.eof {
                match self.client.poll_fill(cx) {
                    Poll::Ready(Ok(_)) => {
                        progress = true;
                        self.last_frame = Instant::now();
                        self.ping_sent = None;
                        if let Err(e) = self.client_frames() {
                            self.fail(e);
                            continue;
                        }
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => {}
                }
            }
            // The upstreams.
            if self.client.unsent() < WBUF_HIGH {
                for i in 0..self.ups.len() {
                    let r = match self.ups[i].as_mut().map(|u| &mut u.state) {
                        Some(UpState::Ready(w)) if !w.eof => w.poll_fill(cx),
                        _ => continue,
                    };
                    match r {
                        Poll::Ready(Ok(_)) => {
                            progress = true;
                            if let Err(e) = self.upstream_frames(i) {
                                self.upstream_failed(i, e.why);
                            }
                        }
                        Poll::Ready(Err(_)) => {
                            progress = true;
                            self.upstream_failed(i, "read error");
                        }
                        Poll::Pending => {}
                    }
                }
            }
            // Writes.
            for i in 0..self.ups.len() {
                let r = match self.ups[i].as_mut().map(|u| &mut u.state) {
                    Some(UpState::Ready(w)) if w.unsent() > 0 => {
                        let before = w.unsent();
                        let r = w.poll_flush(cx);
                        progress |= w.unsent() != before;
                        r
                    }
                    _ => continue,
                };
                if let Poll::Ready(Err(_)) = r {
                    progress = true;
                    self.upstream_failed(i, "write error");
                }
            }
            if self.client.unsent() > 0 {
                let before = self.client.unsent();
                match self.client.poll_flush(cx) {
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    _ => progress |= self.client.unsent() != before,
                }
            }
            // The end: the client is gone, or it (or a drain) said GOAWAY
            // and every stream is done.
            if self.streams.is_empty() && self.client.unsent() == 0 {
                if self.client.eof {
                    return Poll::Ready(());
                }
                if self.client_goaway || self.goaway.is_some() {
                    if self.goaway.is_none() {
                        self.start_goaway(NO_ERROR);
                        continue;
                    }
                    return Poll::Ready(());
                }
            }
            if self.client.eof {
                // A request the client can no longer finish is cancelled.
                let mut i = 0;
                while i < self.streams.len() {
                    if !self.streams[i].req.end {
                        self.cancel_upstream(i, CANCEL);
                        self.remove(i);
                    } else {
                        i += 1;
                    }
                }
            }
            if self.client.eof && self.client.unsent() == 0 && !progress {
                // Half-closed client: answers still go out, then it ends.
                let pending_out = self.streams.iter().any(|s| !s.resp.end_sent);
                if !pending_out {
                    return Poll::Ready(());
                }
            }
            if !progress {
                return self.poll_timer(cx);
            }
        }
    }

    /// Keep-alive PING, its deadline, and the idle close.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let l = &self.ctx.limits;
        let now = Instant::now();
        if self.streams.is_empty() {
            self.idle_since.get_or_insert(now);
        } else {
            self.idle_since = None;
        }
        if let Some(sent) = self.ping_sent {
            if now >= sent + l.h2_keepalive_timeout {
                tracing::debug!(peer = %self.conn.peer, "HTTP/2 keep-alive PING not answered, closing");
                self.drop_once();
                self.closing = true;
                self.streams.clear();
                return Poll::Ready(());
            }
        } else if now >= self.last_frame + l.h2_keepalive_interval {
            put_ping(&mut self.client.wbuf, 0, b"sinew-ka");
            self.ping_sent = Some(now);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if let Some(idle) = self.idle_since {
            if now >= idle + l.keepalive_timeout && self.goaway.is_none() {
                self.start_goaway(NO_ERROR);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        let mut next = match self.ping_sent {
            Some(sent) => sent + l.h2_keepalive_timeout,
            None => self.last_frame + l.h2_keepalive_interval,
        };
        if let Some(idle) = self.idle_since {
            next = next.min(idle + l.keepalive_timeout);
        }
        let deadline = tokio::time::Instant::from_std(next);
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }

    // ----- the client side -----

    fn client_frames(&mut self) -> Result<(), ConnError> {
        let buf = std::mem::take(&mut self.client.rbuf);
        let mut pos = 0;
        let mut r = Ok(());
        while let Some(h) = head(&buf[pos..]) {
            if h.len > MAX_FRAME {
                r = Err(conn_err(FRAME_SIZE_ERROR, "frame over SETTINGS_MAX_FRAME_SIZE"));
                break;
            }
            if buf.len() - pos < HEAD_LEN + h.len {
                break;
            }
            let p = &buf[pos + HEAD_LEN..pos + HEAD_LEN + h.len];
            pos += HEAD_LEN + h.len;
            r = self.client_frame(h, p);
            if r.is_err() || self.closing {
                break;
            }
        }
        let mut buf = buf;
        buf.advance(pos);
        self.client.rbuf = buf;
        r
    }

    fn client_frame(&mut self, h: Head, p: &[u8]) -> Result<(), ConnError> {
        if let Some((sid, _, _)) = &self.client.cont {
            if h.kind != CONTINUATION || h.stream != *sid {
                return Err(conn_err(PROTOCOL_ERROR, "a CONTINUATION was expected"));
            }
        }
        match h.kind {
            DATA => self.client_data(h, p),
            HEADERS => {
                if h.stream == 0 {
                    return Err(conn_err(PROTOCOL_ERROR, "HEADERS on stream 0"));
                }
                let (s, e) = unpad(&h, p).ok_or(conn_err(PROTOCOL_ERROR, "bad padding"))?;
                if h.flags & END_HEADERS == 0 {
                    self.client.cont = Some((h.stream, h.flags, p[s..e].to_vec()));
                    return Ok(());
                }
                let mut block = std::mem::take(&mut self.block);
                block.clear();
                block.extend_from_slice(&p[s..e]);
                let r = self.client_headers(h.stream, h.flags, &block);
                self.block = block;
                r
            }
            CONTINUATION => {
                let Some((sid, flags, mut frag)) = self.client.cont.take() else {
                    return Err(conn_err(PROTOCOL_ERROR, "CONTINUATION without HEADERS"));
                };
                frag.extend_from_slice(p);
                if frag.len() > self.ctx.limits.h2_max_header_list_size as usize * 2 + MAX_FRAME {
                    return Err(conn_err(ENHANCE_YOUR_CALM, "header block too long"));
                }
                if h.flags & END_HEADERS == 0 {
                    self.client.cont = Some((sid, flags, frag));
                    return Ok(());
                }
                self.client_headers(sid, flags, &frag)
            }
            PRIORITY => {
                if h.stream == 0 {
                    return Err(conn_err(PROTOCOL_ERROR, "PRIORITY on stream 0"));
                }
                if h.len != 5 {
                    return Err(conn_err(FRAME_SIZE_ERROR, "PRIORITY not 5 octets"));
                }
                Ok(())
            }
            RST_STREAM => {
                if h.len != 4 {
                    return Err(conn_err(FRAME_SIZE_ERROR, "RST_STREAM not 4 octets"));
                }
                if h.stream == 0 {
                    return Err(conn_err(PROTOCOL_ERROR, "RST_STREAM on stream 0"));
                }
                if h.stream > self.last_cid {
                    return Err(conn_err(PROTOCOL_ERROR, "RST_STREAM on an idle stream"));
                }
                self.client_reset(h.stream)
            }
            SETTINGS => self.client_settings(h, p),
            PUSH_PROMISE => Err(conn_err(PROTOCOL_ERROR, "PUSH_PROMISE from a client")),
            PING => {
                if h.stream != 0 {
                    return Err(conn_err(PROTOCOL_ERROR, "PING on a stream"));
                }
                if h.len != 8 {
                    return Err(conn_err(FRAME_SIZE_ERROR, "PING not 8 octets"));
                }
                if h.flags & ACK == 0 {
                    put_ping(&mut self.client.wbuf, ACK, p);
                }
                Ok(())
            }
            GOAWAY => {
                if h.stream != 0 {
                    return Err(conn_err(PROTOCOL_ERROR, "GOAWAY on a stream"));
                }
                if h.len < 8 {
                    return Err(conn_err(FRAME_SIZE_ERROR, "GOAWAY under 8 octets"));
                }
                self.client_goaway = true;
                Ok(())
            }
            WINDOW_UPDATE => {
                if h.len != 4 {
                    return Err(conn_err(FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 octets"));
                }
                let inc = (u32_at(p, 0) & 0x7fff_ffff) as i64;
                if h.stream == 0 {
                    if inc == 0 {
                        return Err(conn_err(PROTOCOL_ERROR, "zero WINDOW_UPDATE on the connection"));
                    }
                    self.client.send_conn += inc;
                    if self.client.send_conn > MAX_WINDOW {
                        return Err(conn_err(FLOW_CONTROL_ERROR, "connection window over 2^31-1"));
                    }
                    for i in 0..self.streams.len() {
                        self.pump_resp(i);
                    }
                    self.reap();
                    return Ok(());
                }
                let Some(i) = self.find(h.stream) else {
                    if h.stream > self.last_cid {
                        return Err(conn_err(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream"));
                    }
                    return Ok(());
                };
                if inc == 0 {
                    self.stream_error(i, PROTOCOL_ERROR);
                    return Ok(());
                }
                self.streams[i].resp.send += inc;
                if self.streams[i].resp.send > MAX_WINDOW {
                    self.stream_error(i, FLOW_CONTROL_ERROR);
                    return Ok(());
                }
                self.pump_resp(i);
                self.reap();
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn client_settings(&mut self, h: Head, p: &[u8]) -> Result<(), ConnError> {
        if h.stream != 0 {
            return Err(conn_err(PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if h.flags & ACK != 0 {
            if h.len != 0 {
                return Err(conn_err(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload"));
            }
            return Ok(());
        }
        if !h.len.is_multiple_of(6) {
            return Err(conn_err(FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 octets"));
        }
        for s in p.chunks(6) {
            let id = u16::from_be_bytes([s[0], s[1]]);
            let v = u32_at(s, 2);
            match id {
                SETTINGS_ENABLE_PUSH if v > 1 => return Err(conn_err(PROTOCOL_ERROR, "ENABLE_PUSH over 1")),
                SETTINGS_INITIAL_WINDOW_SIZE => {
                    if v as i64 > MAX_WINDOW {
                        return Err(conn_err(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE over 2^31-1"));
                    }
                    let delta = v as i64 - self.client.peer_initial_window;
                    self.client.peer_initial_window = v as i64;
                    for s in &mut self.streams {
                        s.resp.send += delta;
                        if s.resp.send > MAX_WINDOW {
                            return Err(conn_err(FLOW_CONTROL_ERROR, "a stream window over 2^31-1"));
                        }
                    }
                }
                SETTINGS_MAX_FRAME_SIZE => {
                    if !(MAX_FRAME as u32..=(1 << 24) - 1).contains(&v) {
                        return Err(conn_err(PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range"));
                    }
                    self.client.peer_max_frame = v as usize;
                }
                SETTINGS_MAX_CONCURRENT_STREAMS => self.client.peer_max_streams = v,
                _ => {}
            }
        }
        put_head(&mut self.client.wbuf, 0, SETTINGS, ACK, 0);
        for i in 0..self.streams.len() {
            self.pump_resp(i);
        }
        self.reap();
        Ok(())
    }

    fn find(&self, cid: u32) -> Option<usize> {
        self.streams.iter().position(|s| s.cid == cid)
    }

    fn client_data(&mut self, h: Head, p: &[u8]) -> Result<(), ConnError> {
        if h.stream == 0 {
            return Err(conn_err(PROTOCOL_ERROR, "DATA on stream 0"));
        }
        let (s, e) = unpad(&h, p).ok_or(conn_err(PROTOCOL_ERROR, "bad padding"))?;
        let n = h.len as i64;
        self.client.recv_conn -= n;
        if self.client.recv_conn < 0 {
            return Err(conn_err(FLOW_CONTROL_ERROR, "connection window exceeded"));
        }
        let Some(i) = self.find(h.stream) else {
            if h.stream > self.last_cid {
                return Err(conn_err(PROTOCOL_ERROR, "DATA on an idle stream"));
            }
            // A stream that is closed or was reset: its window comes back.
            self.client.give_back_conn(h.len);
            return Ok(());
        };
        // Padding is never sent on.
        self.client.give_back_conn(h.len - (e - s));
        let st = &mut self.streams[i];
        if st.req.end {
            self.client.give_back_conn(e - s);
            self.stream_error(i, STREAM_CLOSED);
            return Ok(());
        }
        st.req.recv -= n;
        if st.req.recv < 0 {
            self.client.give_back_conn(e - s);
            self.stream_error(i, FLOW_CONTROL_ERROR);
            return Ok(());
        }
        st.req.credit += n - (e - s) as i64;
        st.req_bytes += (e - s) as u64;
        let end = h.flags & END_STREAM != 0;
        if let Some(cl) = st.content_length {
            if st.req_bytes > cl || (end && st.req_bytes != cl) {
                self.client.give_back_conn(e - s);
                self.stream_error(i, PROTOCOL_ERROR);
                return Ok(());
            }
        }
        if st.local {
            st.req.end |= end;
            self.client.give_back_conn(e - s);
            self.reap();
            return Ok(());
        }
        st.req.end |= end;
        self.pump_req_with(i, &p[s..e]);
        self.reap();
        Ok(())
    }

    fn client_reset(&mut self, cid: u32) -> Result<(), ConnError> {
        let Some(i) = self.find(cid) else {
            return Ok(());
        };
        let unanswered = !self.streams[i].resp.end_sent;
        self.cancel_upstream(i, CANCEL);
        self.remove(i);
        if unanswered {
            let l = &self.ctx.limits;
            let cap = l.h2_max_pending_accept_reset_streams as f64;
            let now = Instant::now();
            let refill = now.duration_since(self.reset_refill).as_secs_f64() * cap;
            self.reset_refill = now;
            self.reset_tokens = (self.reset_tokens + refill).min(cap) - 1.0;
            if self.reset_tokens < 0.0 {
                return Err(conn_err(
                    ENHANCE_YOUR_CALM,
                    "streams reset faster than the limit (rapid reset)",
                ));
            }
        }
        Ok(())
    }

    /// A stream error: RST_STREAM to the client, the upstream stream
    /// cancelled, counted.
    fn stream_error(&mut self, i: usize, code: u32) {
        let cid = self.streams[i].cid;
        put_rst(&mut self.client.wbuf, cid, code);
        self.cancel_upstream(i, CANCEL);
        self.remove(i);
        self.refused(1);
    }

    fn refused(&mut self, n: usize) {
        self.ctx.metrics.dropped(DropReason::H2Protocol);
        self.local_errors += n;
        if self.local_errors > self.ctx.limits.h2_max_local_error_reset_streams {
            self.fail(conn_err(ENHANCE_YOUR_CALM, "too many stream errors"));
        }
    }

    fn client_headers(&mut self, sid: u32, flags: u8, block: &[u8]) -> Result<(), ConnError> {
        let max_list = self.ctx.limits.h2_max_header_list_size as usize;
        let mut fields = std::mem::take(&mut self.fields);
        let r = self.client.dec.decode(block, &mut fields, max_list);
        let out = match r {
            Err(_) => Err(conn_err(COMPRESSION_ERROR, "HPACK decoding failed")),
            Ok(()) => self.client_head(sid, flags, &fields),
        };
        self.fields = fields;
        out
    }

    fn client_head(&mut self, sid: u32, flags: u8, f: &Fields) -> Result<(), ConnError> {
        let end = flags & END_STREAM != 0;
        if let Some(i) = self.find(sid) {
            // Trailers: they end the stream and carry no pseudo-fields.
            let st = &mut self.streams[i];
            if st.req.end {
                self.stream_error(i, STREAM_CLOSED);
                return Ok(());
            }
            let bad = !end
                || f.iter()
                    .any(|(n, v, _)| n.first() == Some(&b':') || !valid_name(n) || !valid_value(v))
                || st.content_length.is_some_and(|cl| cl != st.req_bytes);
            if bad {
                self.stream_error(i, PROTOCOL_ERROR);
                return Ok(());
            }
            st.req.end = true;
            if !st.local {
                let mut t = Vec::with_capacity(64);
                for (n, v, x) in f.iter() {
                    hpack::encode(&mut t, n, v, x.sensitive);
                }
                st.req.trailers = Some(t);
                self.pump_req(i);
            }
            self.reap();
            return Ok(());
        }
        if sid.is_multiple_of(2) {
            return Err(conn_err(PROTOCOL_ERROR, "a client stream with an even id"));
        }
        if sid <= self.last_cid {
            return Err(conn_err(PROTOCOL_ERROR, "a stream id not above the last one"));
        }
        self.last_cid = sid;
        if self.goaway.is_some() || self.client_goaway {
            put_rst(&mut self.client.wbuf, sid, REFUSED_STREAM);
            return Ok(());
        }
        if self.streams.len() >= self.ctx.limits.h2_max_concurrent_streams as usize {
            put_rst(&mut self.client.wbuf, sid, REFUSED_STREAM);
            self.refused(1);
            return Ok(());
        }
        let Some(rh) = check_request(f) else {
            put_rst(&mut self.client.wbuf, sid, PROTOCOL_ERROR);
            self.refused(1);
            return Ok(());
        };
        if end && rh.content_length.is_some_and(|cl| cl != 0) {
            put_rst(&mut self.client.wbuf, sid, PROTOCOL_ERROR);
            self.refused(1);
            return Ok(());
        }
        let Ok(method) = http::Method::from_bytes(rh.method) else {
            put_rst(&mut self.client.wbuf, sid, PROTOCOL_ERROR);
            self.refused(1);
            return Ok(());
        };
        let grpc = f
            .get(b"content-type")
            .is_some_and(|v| v.starts_with(b"application/grpc"));
        let (raw_path, query) = match rh.path {
            Some(p) => match p.iter().position(|&c| c == b'?') {
                Some(q) => (Some(&p[..q]), Some(&p[q..])),
                None => (Some(p), None),
            },
            None => (None, None),
        };
        let path = raw_path.and_then(|p| std::str::from_utf8(p).ok());
        let targets_path = rh.method != b"CONNECT"
            && matches!(rh.scheme, Some(b"http" | b"https"))
            && path.is_some_and(|p| p.starts_with('/'));
        let host_raw = rh.authority.or_else(|| f.get(b"host")).unwrap_or_default();
        let host = crate::h1::codec::host_name(std::str::from_utf8(host_raw).unwrap_or_default());
        let mut st = Stream {
            cid: sid,
            up: None,
            uid: 0,
            req_head: None,
            req: Half {
                recv: STREAM_WINDOW,
                send: DEFAULT_WINDOW,
                end,
                ..Half::default()
            },
            resp: Half {
                recv: STREAM_WINDOW,
                send: self.client.peer_initial_window,
                ..Half::default()
            },
            resp_started: false,
            local: false,
            content_length: rh.content_length,
            req_bytes: 0,
            judged: None,
            rule: None,
            grpc,
        };
        let too_large = f.too_large;
        let ask = Ask {
            protocol: if grpc { "gRPC" } else { "HTTP/2" },
            method,
            host,
            path: if targets_path { path } else { None },
            headers: &FieldView(f),
            grpc,
        };
        if too_large {
            // Never judged, as HTTP/1 does with a 431.
            self.streams.push(st);
            let i = self.streams.len() - 1;
            let a = Answer::refuse_plain(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
            self.ctx.metrics.dropped(DropReason::HeaderTooLarge);
            self.answer(i, None, a);
            self.reap();
            return Ok(());
        }
        let (judged, decision) = judge(&self.ctx, &self.conn, ask);
        match decision {
            Decision::Answer(a) => {
                self.streams.push(st);
                let i = self.streams.len() - 1;
                self.answer(i, Some(judged), a);
            }
            Decision::Forward { mark, rule } => {
                let mut b = Vec::with_capacity(256);
                hpack::encode(&mut b, b":method", rh.method, false);
                hpack::encode(&mut b, b":scheme", rh.scheme.unwrap_or(b"http"), false);
                if let Some(a) = rh.authority {
                    hpack::encode(&mut b, b":authority", a, false);
                }
                let mut pq = Vec::with_capacity(judged.flow.path.len() + query.map_or(0, |q| q.len()));
                pq.extend_from_slice(judged.flow.path.as_bytes());
                if let Some(q) = query {
                    pq.extend_from_slice(q);
                }
                hpack::encode(&mut b, b":path", &pq, false);
                for (n, v, x) in f.iter() {
                    if n.first() != Some(&b':') {
                        hpack::encode(&mut b, n, v, x.sensitive);
                    }
                }
                st.req_head = Some(b);
                st.judged = Some(judged);
                st.rule = Some(rule);
                let u = self.upstream_for(self.conn.orig, mark);
                st.up = Some(u);
                self.streams.push(st);
                if let Some(Up { waiting, .. }) = self.ups[u].as_mut() {
                    waiting.push_back(sid);
                }
                self.start_waiting(u);
            }
        }
        self.reap();
        Ok(())
    }

    /// The proxy's own answer on stream `i`, recorded now.
    fn answer(&mut self, i: usize, judged: Option<Judged>, a: Answer) {
        let st = &mut self.streams[i];
        st.local = true;
        st.resp_started = true;
        let mut b = Vec::with_capacity(96);
        let status = a.status.as_u16().to_string();
        hpack::encode(&mut b, b":status", status.as_bytes(), false);
        match a.grpc {
            Some((code, message)) => {
                hpack::encode(&mut b, b"content-type", b"application/grpc", false);
                hpack::encode(&mut b, b"grpc-status", code.to_string().as_bytes(), false);
                hpack::encode(&mut b, b"grpc-message", message.as_bytes(), false);
                put_headers(&mut self.client.wbuf, st.cid, &b, true, self.client.peer_max_frame);
                st.resp.end = true;
                st.resp.end_sent = true;
            }
            None => {
                hpack::encode(&mut b, b"content-type", b"text/plain", false);
                hpack::encode(&mut b, b"content-length", a.body.len().to_string().as_bytes(), false);
                put_headers(&mut self.client.wbuf, st.cid, &b, false, self.client.peer_max_frame);
                st.resp.pending.extend_from_slice(a.body.as_bytes());
                st.resp.end = true;
            }
        }
        if let Some(j) = judged {
            record(&self.ctx, self.conn.dir, j, a.outcome);
        }
        self.pump_resp(i);
    }

    /// Moves request DATA (then trailers or END_STREAM) to the upstream
    /// as its windows allow.
    fn pump_req(&mut self, i: usize) {
        self.pump_req_with(i, &[]);
    }

    /// As [`Self::pump_req`], with `fresh` bytes just received after what
    /// the stream holds: they go straight to the upstream's write buffer
    /// when nothing waits before them and the windows allow.
    fn pump_req_with(&mut self, i: usize, fresh: &[u8]) {
        let st = &mut self.streams[i];
        let w = match (st.up, st.uid) {
            (Some(u), uid) if uid != 0 => match self.ups[u].as_mut() {
                Some(Up {
                    state: UpState::Ready(w),
                    ..
                }) => Some(w),
                _ => None,
            },
            _ => None,
        };
        let Some(w) = w else {
            st.req.pending.extend_from_slice(fresh);
            return;
        };
        let moved = pump(&mut st.req, w, st.uid, fresh);
        if moved > 0 {
            self.client.give_back_conn(moved);
            give_back_stream(&mut st.req, moved, &mut self.client.wbuf, st.cid);
        }
    }

    /// Moves response DATA (then trailers or END_STREAM) to the client.
    fn pump_resp(&mut self, i: usize) {
        self.pump_resp_with(i, &[]);
    }

    fn pump_resp_with(&mut self, i: usize, fresh: &[u8]) {
        let st = &mut self.streams[i];
        if !st.resp_started {
            st.resp.pending.extend_from_slice(fresh);
            return;
        }
        let moved = pump(&mut st.resp, &mut self.client, st.cid, fresh);
        if moved > 0 && !st.local {
            if let Some(Up {
                state: UpState::Ready(w),
                ..
            }) = st.up.and_then(|u| self.ups[u].as_mut())
            {
                w.give_back_conn(moved);
                give_back_stream(&mut st.resp, moved, &mut w.wbuf, st.uid);
            }
        }
    }

    /// Removes streams that are done both ways.
    fn reap(&mut self) {
        let mut i = 0;
        while i < self.streams.len() {
            let st = &self.streams[i];
            let req_done = if st.local { st.req.end } else { st.req.end_sent };
            if st.resp.end_sent && req_done {
                self.remove(i);
                continue;
            }
            if st.resp.end_sent && st.local && !st.req.end {
                // Answered before the request ended: it may stop sending.
                put_rst(&mut self.client.wbuf, st.cid, NO_ERROR);
                self.remove(i);
                continue;
            }
            i += 1;
        }
    }

    fn remove(&mut self, i: usize) {
        let st = self.streams.swap_remove(i);
        if let (Some(u), true) = (st.up, st.uid != 0) {
            if let Some(up) = self.ups[u].as_mut() {
                up.active = up.active.saturating_sub(1);
            }
            self.start_waiting(u);
        } else if let Some(u) = st.up {
            if let Some(up) = self.ups[u].as_mut() {
                up.waiting.retain(|&c| c != st.cid);
            }
        }
        // The client's share of the window comes back with the stream.
        let unread = st.req.pending.len();
        if unread > 0 {
            self.client.give_back_conn(unread);
        }
        if let (Some(u), false) = (st.up, st.resp.pending.is_empty()) {
            if let Some(Up {
                state: UpState::Ready(w),
                ..
            }) = self.ups[u].as_mut()
            {
                w.give_back_conn(st.resp.pending.len());
            }
        }
    }

    fn cancel_upstream(&mut self, i: usize, code: u32) {
        let st = &self.streams[i];
        if st.uid == 0 || (st.req.end_sent && st.resp.end) {
            return;
        }
        if let Some(Up {
            state: UpState::Ready(w),
            ..
        }) = st.up.and_then(|u| self.ups[u].as_mut())
        {
            put_rst(&mut w.wbuf, st.uid, code);
        }
    }

    // ----- the upstream side -----

    /// The slot of a usable upstream connection for (dst, mark), made if
    /// there is none.
    fn upstream_for(&mut self, dst: SocketAddr, mark: u32) -> usize {
        if let Some(i) = self
            .ups
            .iter()
            .position(|u| u.as_ref().is_some_and(|u| u.dst == dst && u.mark == mark && !u.closing))
        {
            return i;
        }
        let pool = self.ctx.pool.clone();
        let up = Up {
            dst,
            mark,
            state: UpState::Connecting(Box::pin(async move { pool.connect(dst, mark).await })),
            next_sid: 1,
            active: 0,
            waiting: Default::default(),
            closing: false,
        };
        match self.ups.iter().position(Option::is_none) {
            Some(i) => {
                self.ups[i] = Some(up);
                i
            }
            None => {
                self.ups.push(Some(up));
                self.ups.len() - 1
            }
        }
    }

    fn connected(&mut self, u: usize, r: Result<TcpStream, UpstreamError>) {
        match r {
            Ok(sock) => {
                let mut w = Wire::new(sock, BytesMut::with_capacity(32 * 1024));
                w.start(false, 0, 0);
                if let Some(up) = self.ups[u].as_mut() {
                    up.state = UpState::Ready(Box::new(w));
                }
                self.start_waiting(u);
            }
            Err(e) => {
                tracing::debug!(orig = %self.conn.orig, error = ?e, "upstream HTTP/2 connect failed");
                self.drop_upstream(u, Some(e));
            }
        }
        self.reap();
    }

    /// Sends the HEADERS of waiting streams while the upstream has room.
    fn start_waiting(&mut self, u: usize) {
        loop {
            let Some(up) = self.ups[u].as_mut() else {
                return;
            };
            let UpState::Ready(w) = &mut up.state else {
                return;
            };
            if up.active >= w.peer_max_streams || up.closing {
                return;
            }
            let Some(cid) = up.waiting.pop_front() else {
                return;
            };
            let Some(i) = self.streams.iter().position(|s| s.cid == cid) else {
                continue;
            };
            let st = &mut self.streams[i];
            let Some(block) = st.req_head.take() else {
                continue;
            };
            st.uid = up.next_sid;
            up.next_sid += 2;
            up.active += 1;
            st.req.send = w.peer_initial_window;
            let end = st.req.end && st.req.pending.is_empty() && st.req.trailers.is_none();
            put_headers(&mut w.wbuf, st.uid, &block, end, w.peer_max_frame);
            if end {
                st.req.end_sent = true;
            }
            self.pump_req(i);
        }
    }

    /// The upstream connection in slot `u` is gone: streams that got no
    /// response head are answered 502 (gRPC 14), the others reset.
    fn drop_upstream(&mut self, u: usize, err: Option<UpstreamError>) {
        self.ups[u] = None;
        let e = err.unwrap_or(UpstreamError::Request);
        let mut i = 0;
        while i < self.streams.len() {
            if self.streams[i].up != Some(u) {
                i += 1;
                continue;
            }
            self.streams[i].up = None;
            self.streams[i].uid = 0;
            self.fail_stream(i, e);
            i += 1;
        }
        self.reap();
    }

    /// Stream `i` lost its upstream.
    fn fail_stream(&mut self, i: usize, e: UpstreamError) {
        let st = &mut self.streams[i];
        if st.resp_started {
            if !st.resp.end_sent {
                put_rst(&mut self.client.wbuf, st.cid, INTERNAL_ERROR);
                st.resp.end_sent = true;
                st.req.end = true;
                st.req.end_sent = true;
                st.local = true;
            }
            return;
        }
        let rule = st.rule.clone().unwrap_or_else(|| Arc::from(""));
        let grpc = st.grpc;
        let judged = st.judged.take();
        st.req.pending.clear();
        let a = Answer::upstream(&self.ctx.metrics, e, grpc, rule);
        match judged {
            Some(j) => self.answer(i, Some(j), a),
            None => {
                self.streams[i].resp.end_sent = true;
                put_rst(&mut self.client.wbuf, self.streams[i].cid, INTERNAL_ERROR);
            }
        }
    }

    fn upstream_failed(&mut self, u: usize, why: &'static str) {
        tracing::debug!(orig = %self.conn.orig, why, "upstream HTTP/2 connection ended");
        self.drop_upstream(u, None);
    }

    fn upstream_frames(&mut self, u: usize) -> Result<(), ConnError> {
        let Some(Up {
            state: UpState::Ready(w),
            ..
        }) = self.ups[u].as_mut()
        else {
            return Ok(());
        };
        let eof = w.eof;
        let buf = std::mem::take(&mut w.rbuf);
        let mut pos = 0;
        let mut r = Ok(());
        while let Some(h) = head(&buf[pos..]) {
            if h.len > MAX_FRAME {
                r = Err(conn_err(FRAME_SIZE_ERROR, "upstream frame too long"));
                break;
            }
            if buf.len() - pos < HEAD_LEN + h.len {
                break;
            }
            let p = &buf[pos + HEAD_LEN..pos + HEAD_LEN + h.len];
            pos += HEAD_LEN + h.len;
            r = self.upstream_frame(u, h, p);
            if r.is_err() || self.ups[u].is_none() {
                break;
            }
        }
        if let Some(Up {
            state: UpState::Ready(w),
            ..
        }) = self.ups[u].as_mut()
        {
            let mut buf = buf;
            buf.advance(pos);
            w.rbuf = buf;
        }
        self.reap();
        if r.is_ok() && eof && self.ups[u].is_some() {
            return Err(conn_err(NO_ERROR, "upstream closed"));
        }
        r
    }

    fn up_wire(&mut self, u: usize) -> Option<&mut Wire> {
        match self.ups[u].as_mut() {
            Some(Up {
                state: UpState::Ready(w),
                ..
            }) => Some(w),
            _ => None,
        }
    }

    fn find_up(&self, u: usize, uid: u32) -> Option<usize> {
        self.streams.iter().position(|s| s.uid == uid && s.up == Some(u))
    }

    fn upstream_frame(&mut self, u: usize, h: Head, p: &[u8]) -> Result<(), ConnError> {
        let Some(w) = self.up_wire(u) else {
            return Ok(());
        };
        if let Some((sid, _, _)) = &w.cont {
            if h.kind != CONTINUATION || h.stream != *sid {
                return Err(conn_err(PROTOCOL_ERROR, "upstream: a CONTINUATION was expected"));
            }
        }
        match h.kind {
            DATA => {
                let (s, e) = unpad(&h, p).ok_or(conn_err(PROTOCOL_ERROR, "upstream: bad padding"))?;
                w.recv_conn -= h.len as i64;
                if w.recv_conn < 0 {
                    return Err(conn_err(FLOW_CONTROL_ERROR, "upstream: connection window exceeded"));
                }
                w.give_back_conn(h.len - (e - s));
                let Some(i) = self.find_up(u, h.stream) else {
                    if let Some(w) = self.up_wire(u) {
                        w.give_back_conn(e - s);
                    }
                    return Ok(());
                };
                let st = &mut self.streams[i];
                st.resp.recv -= h.len as i64;
                if st.resp.recv < 0 || !st.resp_started || st.resp.end {
                    return Err(conn_err(PROTOCOL_ERROR, "upstream: DATA out of place"));
                }
                st.resp.credit += (h.len - (e - s)) as i64;
                st.resp.end |= h.flags & END_STREAM != 0;
                self.pump_resp_with(i, &p[s..e]);
                Ok(())
            }
            HEADERS => {
                let (s, e) = unpad(&h, p).ok_or(conn_err(PROTOCOL_ERROR, "upstream: bad padding"))?;
                if h.flags & END_HEADERS == 0 {
                    w.cont = Some((h.stream, h.flags, p[s..e].to_vec()));
                    return Ok(());
                }
                let frag = p[s..e].to_vec();
                self.upstream_headers(u, h.stream, h.flags, &frag)
            }
            CONTINUATION => {
                let Some((sid, flags, mut frag)) = w.cont.take() else {
                    return Err(conn_err(PROTOCOL_ERROR, "upstream: CONTINUATION without HEADERS"));
                };
                frag.extend_from_slice(p);
                if frag.len() > UPSTREAM_HEADER_LIST * 2 {
                    return Err(conn_err(ENHANCE_YOUR_CALM, "upstream: header block too long"));
                }
                if h.flags & END_HEADERS == 0 {
                    w.cont = Some((sid, flags, frag));
                    return Ok(());
                }
                self.upstream_headers(u, sid, flags, &frag)
            }
            RST_STREAM => {
                if h.len != 4 {
                    return Err(conn_err(FRAME_SIZE_ERROR, "upstream: RST_STREAM length"));
                }
                let code = u32_at(p, 0);
                let Some(i) = self.find_up(u, h.stream) else {
                    return Ok(());
                };
                let st = &mut self.streams[i];
                if code == NO_ERROR && st.resp.end {
                    // A whole response: the upstream wants no more of the
                    // request body.
                    st.req.end_sent = true;
                    st.req.pending.clear();
                    st.uid = 0;
                    if let Some(up) = self.ups[u].as_mut() {
                        up.active = up.active.saturating_sub(1);
                    }
                    self.streams[i].up = None;
                    return Ok(());
                }
                if let Some(up) = self.ups[u].as_mut() {
                    up.active = up.active.saturating_sub(1);
                }
                st.uid = 0;
                st.up = None;
                self.fail_stream(i, UpstreamError::Request);
                Ok(())
            }
            SETTINGS => {
                if h.flags & ACK != 0 {
                    return Ok(());
                }
                if !h.len.is_multiple_of(6) || h.stream != 0 {
                    return Err(conn_err(FRAME_SIZE_ERROR, "upstream: bad SETTINGS"));
                }
                let mut delta = 0;
                for s in p.chunks(6) {
                    let id = u16::from_be_bytes([s[0], s[1]]);
                    let v = u32_at(s, 2);
                    match id {
                        SETTINGS_INITIAL_WINDOW_SIZE if v as i64 <= MAX_WINDOW => {
                            delta = v as i64 - w.peer_initial_window;
                            w.peer_initial_window = v as i64;
                        }
                        SETTINGS_MAX_FRAME_SIZE if (MAX_FRAME as u32..1 << 24).contains(&v) => {
                            w.peer_max_frame = v as usize
                        }
                        SETTINGS_MAX_CONCURRENT_STREAMS => w.peer_max_streams = v,
                        SETTINGS_INITIAL_WINDOW_SIZE | SETTINGS_MAX_FRAME_SIZE => {
                            return Err(conn_err(PROTOCOL_ERROR, "upstream: SETTINGS value out of range"))
                        }
                        _ => {}
                    }
                }
                put_head(&mut w.wbuf, 0, SETTINGS, ACK, 0);
                for i in 0..self.streams.len() {
                    if self.streams[i].up == Some(u) && self.streams[i].uid != 0 {
                        self.streams[i].req.send += delta;
                        self.pump_req(i);
                    }
                }
                self.start_waiting(u);
                Ok(())
            }
            PING => {
                if h.len != 8 {
                    return Err(conn_err(FRAME_SIZE_ERROR, "upstream: PING length"));
                }
                if h.flags & ACK == 0 {
                    put_ping(&mut w.wbuf, ACK, p);
                }
                Ok(())
            }
            GOAWAY => {
                if h.len < 8 {
                    return Err(conn_err(FRAME_SIZE_ERROR, "upstream: GOAWAY length"));
                }
                let last = u32_at(p, 0) & 0x7fff_ffff;
                if let Some(up) = self.ups[u].as_mut() {
                    up.closing = true;
                }
                // Streams the upstream never saw go on a new connection.
                let mut moved = Vec::new();
                for st in self.streams.iter_mut() {
                    if st.up == Some(u) && st.uid > last {
                        st.uid = 0;
                        moved.push(st.cid);
                    }
                }
                for cid in moved {
                    if let Some(i) = self.find(cid) {
                        self.fail_stream(i, UpstreamError::Request);
                    }
                }
                Ok(())
            }
            WINDOW_UPDATE => {
                if h.len != 4 {
                    return Err(conn_err(FRAME_SIZE_ERROR, "upstream: WINDOW_UPDATE length"));
                }
                let inc = (u32_at(p, 0) & 0x7fff_ffff) as i64;
                if h.stream == 0 {
                    w.send_conn += inc;
                    for i in 0..self.streams.len() {
                        if self.streams[i].up == Some(u) {
                            self.pump_req(i);
                        }
                    }
                } else if let Some(i) = self.find_up(u, h.stream) {
                    self.streams[i].req.send += inc;
                    self.pump_req(i);
                }
                Ok(())
            }
            PUSH_PROMISE => Err(conn_err(PROTOCOL_ERROR, "upstream: PUSH_PROMISE with push disabled")),
            _ => Ok(()),
        }
    }

    fn upstream_headers(&mut self, u: usize, uid: u32, flags: u8, block: &[u8]) -> Result<(), ConnError> {
        let mut fields = std::mem::take(&mut self.fields);
        let r = match self.up_wire(u) {
            Some(w) => w.dec.decode(block, &mut fields, UPSTREAM_HEADER_LIST),
            None => Ok(()),
        };
        let out = match r {
            Err(_) => Err(conn_err(COMPRESSION_ERROR, "upstream: HPACK decoding failed")),
            Ok(()) => {
                self.upstream_head(u, uid, flags, &fields);
                Ok(())
            }
        };
        self.fields = fields;
        out
    }

    fn upstream_head(&mut self, u: usize, uid: u32, flags: u8, f: &Fields) {
        let Some(i) = self.find_up(u, uid) else {
            return;
        };
        let end = flags & END_STREAM != 0;
        let max_frame = self.client.peer_max_frame;
        let st = &mut self.streams[i];
        if st.resp_started {
            // Trailers.
            let mut t = Vec::with_capacity(64);
            for (n, v, x) in f.iter() {
                if n.first() != Some(&b':') && !connection_specific(n) {
                    hpack::encode(&mut t, n, v, x.sensitive);
                }
            }
            st.resp.trailers = Some(t);
            st.resp.end = true;
            self.pump_resp(i);
            return;
        }
        let status = f
            .get(b":status")
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse::<u16>().ok())
            .filter(|s| (100..=599).contains(s) && *s != 101);
        let Some(status) = status else {
            self.cancel_upstream(i, PROTOCOL_ERROR);
            let st = &mut self.streams[i];
            st.uid = 0;
            st.up = None;
            if let Some(up) = self.ups[u].as_mut() {
                up.active = up.active.saturating_sub(1);
            }
            self.fail_stream(i, UpstreamError::Request);
            return;
        };
        let mut b = Vec::with_capacity(128);
        for (n, v, x) in f.iter() {
            if n == b":status" || (n.first() != Some(&b':') && !connection_specific(n)) {
                hpack::encode(&mut b, n, v, x.sensitive);
            }
        }
        if status < 200 {
            // Interim: passed on, the final head is still to come.
            put_headers(&mut self.client.wbuf, st.cid, &b, false, max_frame);
            return;
        }
        st.resp_started = true;
        st.resp.end = end;
        let send_end = end;
        put_headers(&mut self.client.wbuf, st.cid, &b, send_end, max_frame);
        if send_end {
            st.resp.end_sent = true;
        }
        if let Some(j) = st.judged.take() {
            let outcome = Outcome {
                status,
                verdict: Verdict::Forwarded,
                rule: st.rule.clone(),
                reason: None,
                grpc_status: 0,
            };
            record(&self.ctx, self.conn.dir, j, outcome);
        }
    }
}

/// Sends what `half` holds, then `fresh`, to `w` on stream `sid` as both
/// windows allow, then its trailers or END_STREAM once all is out; what
/// does not fit stays in `half`. Returns the DATA bytes moved.
fn pump(half: &mut Half, w: &mut Wire, sid: u32, fresh: &[u8]) -> usize {
    let mut moved = 0;
    let mut rest = fresh;
    loop {
        let from_pending = !half.pending.is_empty();
        let avail = if from_pending { half.pending.len() } else { rest.len() };
        if avail == 0 {
            break;
        }
        let room = half.send.min(w.send_conn).min(w.peer_max_frame as i64);
        if room <= 0 {
            break;
        }
        let n = (room as usize).min(avail);
        let last = n == avail
            && (from_pending && rest.is_empty() || !from_pending && n == rest.len())
            && half.end
            && half.trailers.is_none();
        if from_pending {
            put_data(&mut w.wbuf, sid, &half.pending[..n], last);
            half.pending.advance(n);
        } else {
            put_data(&mut w.wbuf, sid, &rest[..n], last);
            rest = &rest[n..];
        }
        half.send -= n as i64;
        w.send_conn -= n as i64;
        moved += n;
        if last {
            half.end_sent = true;
        }
    }
    if !rest.is_empty() {
        half.pending.extend_from_slice(rest);
        return moved;
    }
    if half.end && !half.end_sent && half.pending.is_empty() {
        match half.trailers.take() {
            Some(t) => put_headers(&mut w.wbuf, sid, &t, true, w.peer_max_frame),
            None => put_data(&mut w.wbuf, sid, &[], true),
        }
        half.end_sent = true;
    }
    moved
}

/// Gives the sender back stream window for bytes that moved on, once half
/// of the window has.
fn give_back_stream(half: &mut Half, moved: usize, wbuf: &mut Vec<u8>, sid: u32) {
    half.credit += moved as i64;
    if !half.end && half.credit >= STREAM_WINDOW / 2 {
        put_window_update(wbuf, sid, half.credit as u32);
        half.recv += half.credit;
        half.credit = 0;
    }
}
