//! sinew-proxy's own HTTP/2 path.
//!
//! One task, a hub, owns up to [`HUB_CLIENTS`] client connections with the
//! same original destination and direction, and the upstream HTTP/2
//! connections their allowed streams go to, and moves frames between them:
//! no task, channel, message object or header map per stream. A
//! request's header block is decoded once (HPACK), checked as RFC 9113
//! section 8 asks, judged with the same [`judge`] as HTTP/1, and written
//! to the upstream as a new block whose `:path` is the path that was
//! judged. DATA is copied from one connection's read buffer into the
//! other's write buffer as the peer's flow-control windows allow; what does
//! not fit waits in the stream, and the window the proxy gives the sender
//! is given back only once the bytes have moved on, so a stream never holds
//! more than the window the proxy announced.
//!
//! Upstream connections belong to the hub and are keyed by (destination,
//! mark): the streams of every client in the hub whose source identity
//! gives the same mark share them, a new one is opened when those are at
//! the upstream's concurrency limit, and a connection's destination is the
//! one the datapath redirected from. Per-request routing can later pick
//! other keys without changing the driver. A client connection joins a
//! hub when it is sniffed as HTTP/2: sharing upstream connections is what
//! an upstream server counts, per connection, in its own costs.
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

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use crate::inbound::{judge, record, Answer, Ask, Conn, Counted, Ctx, Decision, Judged, Outcome};
use crate::metrics::{DropReason, UpstreamError, Verdict};
use crate::state::Direction;
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
    /// A short read ends it without another read ([`crate::netio`]).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut got = 0;
        loop {
            if self.rbuf.capacity() - self.rbuf.len() < 16 * 1024 {
                self.rbuf.reserve(32 * 1024);
            }
            match crate::netio::read_now(&self.sock, &mut self.rbuf) {
                Ok(Some(0)) => {
                    self.eof = true;
                    return Poll::Ready(Ok(true));
                }
                Ok(Some(n)) => {
                    got += n;
                    if got >= READ_BUDGET {
                        return Poll::Ready(Ok(true));
                    }
                }
                Ok(None) => {
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
    /// (client slot, stream id) of streams whose HEADERS wait for the
    /// connection or for room under the upstream's concurrency limit, in
    /// order.
    waiting: std::collections::VecDeque<(u32, u32)>,
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

/// A stream; its ids are in its [`Key`].
struct Stream {
    /// The request's header block as the upstream gets it, kept until the
    /// response starts: a stream the upstream refuses unprocessed goes
    /// again with it.
    req_head: Option<Vec<u8>>,
    /// Some of the request's DATA or its trailers went upstream: the
    /// stream can no longer go again.
    body_sent: bool,
    /// Times the stream went again after a refusal.
    retries: u8,
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

/// A hub takes at most this many client connections; the next one with
/// the same key starts a new hub.
const HUB_CLIENTS: usize = 32;
/// Streams a connecting upstream is assumed to take before its SETTINGS
/// say (RFC 9113 6.5.2 recommends no less than 100).
const UPSTREAM_STREAMS_BEFORE_SETTINGS: u32 = 100;
/// No upstream connection (in [`Key::up`]).
const NO_UP: u32 = u32::MAX;
/// Streams the client closed that a client remembers (see
/// [`Client::closed`]).
const CLOSED_KEPT: usize = 8;
/// A HEADERS flag bit that HTTP/2 does not define, used only inside the
/// proxy: the block's priority made its stream depend on itself.
const SELF_DEPENDENT: u8 = 0x40;
/// Times one stream goes again after the upstream refused it unprocessed;
/// past that it is answered 502 (gRPC 14).
const MAX_RETRIES: u8 = 3;

/// The hubs of one proxy, by (original destination, direction): client
/// connections with the same key share a task, and with it its upstream
/// connections.
#[derive(Default)]
pub(crate) struct Hubs {
    map: Mutex<HubMap>,
    /// Upstream connections that a hub left idle when its last client
    /// went, by (destination, mark), newest last: the next hub for that
    /// destination takes one instead of connecting again, so clients that
    /// come and go do not cost the upstream a handshake each.
    idle: Mutex<IdleUps>,
}

type IdleUps = HashMap<(SocketAddr, u32), Vec<(Up, Instant)>>;

type HubMap = HashMap<(SocketAddr, Direction), Vec<Arc<Inbox>>>;

/// Where a hub takes new client connections.
struct Inbox {
    state: Mutex<InboxState>,
    notify: Notify,
}

struct InboxState {
    joining: Vec<Joining>,
    /// Clients in the hub or on their way in.
    members: usize,
    /// False once the hub is ending: it takes no one else.
    open: bool,
}

/// A client connection on its way into a hub.
struct Joining {
    conn: Arc<Conn>,
    sock: TcpStream,
    first: BytesMut,
    counted: Counted,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One client connection in a hub.
struct Client {
    conn: Arc<Conn>,
    wire: Wire,
    counted: Counted,
    last_cid: u32,
    /// GOAWAY sent: the last stream id it named.
    goaway: Option<u32>,
    /// The connection ends once the write buffer is out.
    closing: bool,
    /// The client sent GOAWAY: it opens no more streams.
    peer_goaway: bool,
    reset_tokens: f64,
    reset_refill: Instant,
    local_errors: usize,
    last_frame: Instant,
    ping_sent: Option<Instant>,
    idle_since: Option<Instant>,
    dropped: bool,
    /// Its streams now.
    streams: usize,
    /// Response DATA waits in its streams for its write buffer to drain.
    stalled: bool,
    /// The last streams the client itself closed (its END_STREAM, then
    /// the answer; or its RST_STREAM), 0 for none: a DATA frame on one of
    /// them is a stream error of type STREAM_CLOSED (RFC 9113 5.1). Any
    /// other closed stream's DATA is ignored, as it must be on a stream
    /// the proxy reset (whose DATA may already have been on its way).
    closed: [u32; CLOSED_KEPT],
    closed_next: usize,
}

impl Client {
    fn closed_by_client(&mut self, cid: u32) {
        self.closed[self.closed_next] = cid;
        self.closed_next = (self.closed_next + 1) % CLOSED_KEPT;
    }
}

/// Where stream `i` is, kept apart from [`Stream`] so that finding a
/// stream reads one small array.
#[derive(Clone, Copy)]
struct Key {
    client: u32,
    cid: u32,
    /// The upstream slot, [`NO_UP`] when none.
    up: u32,
    /// The upstream stream id; 0 until its HEADERS are sent.
    uid: u32,
}

pub(crate) struct H2 {
    ctx: Arc<Ctx>,
    key: (SocketAddr, Direction),
    inbox: Arc<Inbox>,
    clients: Vec<Option<Client>>,
    ups: Vec<Option<Up>>,
    streams: Vec<Stream>,
    keys: Vec<Key>,
    fields: Fields,
    block: Vec<u8>,
    timer: Pin<Box<tokio::time::Sleep>>,
    draining: bool,
    /// A frame touched streams other than the one it names: reap them all.
    reap_all: bool,
}

/// Serves one HTTP/2 connection whose first bytes (the preface and maybe
/// more) are in `first`: in a hub that serves others with the same
/// original destination and direction if one has room, else in a new hub
/// that this task runs.
pub(crate) async fn serve(
    ctx: &Arc<Ctx>,
    conn: &Arc<Conn>,
    sock: TcpStream,
    mut first: BytesMut,
    mut drain: watch::Receiver<bool>,
    counted: Counted,
) {
    first.advance(PREFACE.len());
    let key = (conn.orig, conn.dir);
    let joining = Joining {
        conn: conn.clone(),
        sock,
        first,
        counted,
    };
    let inbox = {
        let mut map = lock(&ctx.hubs.map);
        let list = map.entry(key).or_default();
        for ib in list.iter() {
            let mut s = lock(&ib.state);
            if s.open && s.members < HUB_CLIENTS {
                s.members += 1;
                s.joining.push(joining);
                drop(s);
                ib.notify.notify_one();
                return;
            }
        }
        let ib = Arc::new(Inbox {
            state: Mutex::new(InboxState {
                joining: Vec::new(),
                members: 1,
                open: true,
            }),
            notify: Notify::new(),
        });
        list.push(ib.clone());
        ib
    };
    let mut h = H2 {
        ctx: ctx.clone(),
        key,
        inbox: inbox.clone(),
        clients: Vec::new(),
        ups: Vec::new(),
        streams: Vec::new(),
        keys: Vec::new(),
        fields: Fields::default(),
        block: Vec::with_capacity(1024),
        timer: Box::pin(tokio::time::sleep(ctx.limits.h2_keepalive_interval)),
        draining: false,
        reap_all: false,
    };
    h.join(joining);
    enum Wake {
        Done,
        Joining,
        Drain(bool),
    }
    loop {
        let wake = tokio::select! {
            _ = poll_fn(|cx| h.poll(cx)) => Wake::Done,
            _ = inbox.notify.notified() => Wake::Joining,
            r = drain.changed(), if !h.draining => Wake::Drain(r.is_err() || *drain.borrow()),
        };
        match wake {
            Wake::Done => break,
            Wake::Joining => h.take_joining(),
            Wake::Drain(true) => h.drain(),
            Wake::Drain(false) => {}
        }
    }
}

/// After a client connection's last write: shut down and read (and drop)
/// what the client still sends for up to a second, so a reset cannot
/// destroy the GOAWAY it has not read yet.
async fn linger(mut w: Wire, counted: Counted) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = poll_fn(|cx| w.poll_flush(cx)).await;
    let _ = w.sock.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(n) = w.sock.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    drop(counted);
}

impl H2 {
    /// The client in slot `c`. Slots are freed only by [`Self::end_client`],
    /// between frames, so every frame handler finds its client.
    fn cl(&mut self, c: usize) -> &mut Client {
        self.clients[c].as_mut().expect("a client slot in use")
    }

    fn take_joining(&mut self) {
        let joining = std::mem::take(&mut lock(&self.inbox.state).joining);
        for j in joining {
            self.join(j);
        }
    }

    fn join(&mut self, j: Joining) {
        let l = &self.ctx.limits;
        let mut wire = Wire::new(j.sock, j.first);
        wire.start(true, l.h2_max_concurrent_streams, l.h2_max_header_list_size);
        let now = Instant::now();
        let client = Client {
            conn: j.conn,
            wire,
            counted: j.counted,
            last_cid: 0,
            goaway: None,
            closing: false,
            peer_goaway: false,
            reset_tokens: l.h2_max_pending_accept_reset_streams as f64,
            reset_refill: now,
            local_errors: 0,
            last_frame: now,
            ping_sent: None,
            idle_since: Some(now),
            dropped: false,
            streams: 0,
            stalled: false,
            closed: [0; CLOSED_KEPT],
            closed_next: 0,
        };
        let c = match self.clients.iter().position(Option::is_none) {
            Some(c) => {
                self.clients[c] = Some(client);
                c
            }
            None => {
                self.clients.push(Some(client));
                self.clients.len() - 1
            }
        };
        if self.draining {
            self.start_goaway(c, NO_ERROR);
        }
        // The bytes that came with the preface.
        if let Err(e) = self.client_frames(c) {
            self.fail(c, e);
        }
    }

    /// The proxy drains: GOAWAY to every client, and no one else joins.
    fn drain(&mut self) {
        self.draining = true;
        self.close_inbox();
        self.take_joining();
        for c in 0..self.clients.len() {
            if self.clients[c].is_some() {
                self.start_goaway(c, NO_ERROR);
            }
        }
    }

    /// Takes the hub out of the registry. Returns false (and takes them
    /// in) when clients are still waiting to join.
    fn close_inbox(&mut self) -> bool {
        let mut map = lock(&self.ctx.hubs.map);
        let mut s = lock(&self.inbox.state);
        if !s.joining.is_empty() && !self.draining {
            let joining = std::mem::take(&mut s.joining);
            drop(s);
            drop(map);
            for j in joining {
                self.join(j);
            }
            return false;
        }
        s.open = false;
        drop(s);
        if let Some(list) = map.get_mut(&self.key) {
            list.retain(|ib| !Arc::ptr_eq(ib, &self.inbox));
            if list.is_empty() {
                map.remove(&self.key);
            }
        }
        true
    }

    fn drop_once(&mut self, c: usize) {
        let cl = self.cl(c);
        if !cl.dropped {
            cl.dropped = true;
            self.ctx.metrics.dropped(DropReason::H2Protocol);
        }
    }

    fn start_goaway(&mut self, c: usize, code: u32) {
        let cl = self.cl(c);
        if cl.goaway.is_none() {
            put_goaway(&mut cl.wire.wbuf, cl.last_cid, code);
            cl.goaway = Some(cl.last_cid);
        }
    }

    /// Ends client `c` for a connection error: GOAWAY with the code, then
    /// close once it is written.
    fn fail(&mut self, c: usize, e: ConnError) {
        let cl = self.cl(c);
        tracing::debug!(peer = %cl.conn.peer, orig = %cl.conn.orig, code = e.code, why = e.why, "HTTP/2 connection error, GOAWAY sent");
        self.start_goaway(c, e.code);
        self.drop_once(c);
        self.cl(c).closing = true;
        self.drop_streams_of(c, |_| true);
    }

    /// Removes client `c`'s streams that `pick` names, cancelling them
    /// upstream.
    fn drop_streams_of(&mut self, c: usize, pick: impl Fn(&Stream) -> bool) {
        let mut i = 0;
        while i < self.streams.len() {
            if self.keys[i].client == c as u32 && pick(&self.streams[i]) {
                self.cancel_upstream(i, CANCEL);
                self.remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Client `c` is done: its slot is freed and its socket closed (after
    /// a lingering close unless the client closed first).
    fn end_client(&mut self, c: usize) {
        self.drop_streams_of(c, |_| true);
        let Some(cl) = self.clients[c].take() else {
            return;
        };
        lock(&self.inbox.state).members -= 1;
        if !(cl.wire.eof && cl.wire.unsent() == 0) {
            tokio::spawn(linger(cl.wire, cl.counted));
        }
    }

    /// Whether client `c` is finished; it may send GOAWAY on the way.
    fn client_done(&mut self, c: usize) -> bool {
        let cl = self.cl(c);
        if cl.closing {
            return cl.wire.unsent() == 0;
        }
        if cl.streams == 0 && cl.wire.unsent() == 0 {
            if cl.wire.eof {
                return true;
            }
            if cl.peer_goaway || cl.goaway.is_some() {
                if cl.goaway.is_none() {
                    self.start_goaway(c, NO_ERROR);
                    return false;
                }
                return true;
            }
        }
        if cl.wire.eof {
            // A request the client can no longer finish is cancelled.
            self.drop_streams_of(c, |s| !s.req.end);
            // Half-closed: answers still go out, then it ends.
            let unsent = self.cl(c).wire.unsent();
            let pending_out =
                (0..self.streams.len()).any(|i| self.keys[i].client == c as u32 && !self.streams[i].resp.end_sent);
            return unsent == 0 && !pending_out;
        }
        false
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut progress = false;
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
            // The clients, unless an upstream has a backlog to write.
            let up_backlog = self.ups.iter().flatten().any(|u| match &u.state {
                UpState::Ready(w) => w.unsent() >= WBUF_HIGH,
                _ => false,
            });
            for c in 0..self.clients.len() {
                let r = match self.clients[c].as_mut() {
                    Some(cl) if !up_backlog && !cl.closing && !cl.wire.eof && cl.wire.unsent() < WBUF_HIGH => {
                        cl.wire.poll_fill(cx)
                    }
                    _ => continue,
                };
                match r {
                    Poll::Ready(Ok(_)) => {
                        progress = true;
                        let cl = self.cl(c);
                        cl.last_frame = Instant::now();
                        cl.ping_sent = None;
                        if let Err(e) = self.client_frames(c) {
                            self.fail(c, e);
                        }
                    }
                    Poll::Ready(Err(_)) => {
                        progress = true;
                        self.end_client(c);
                    }
                    Poll::Pending => {}
                }
            }
            // The upstreams. A client that does not read holds its
            // streams' DATA, not the upstream's.
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
            for c in 0..self.clients.len() {
                let Some(cl) = self.clients[c].as_mut() else {
                    continue;
                };
                if cl.wire.unsent() > 0 {
                    let before = cl.wire.unsent();
                    match cl.wire.poll_flush(cx) {
                        Poll::Ready(Err(_)) => {
                            progress = true;
                            self.end_client(c);
                            continue;
                        }
                        _ => progress |= cl.wire.unsent() != before,
                    }
                }
                if cl.stalled && cl.wire.unsent() < WBUF_HIGH {
                    cl.stalled = false;
                    progress = true;
                    for i in 0..self.streams.len() {
                        if self.keys[i].client == c as u32 {
                            self.pump_resp(i);
                        }
                    }
                    self.reap();
                }
            }
            // The ends.
            for c in 0..self.clients.len() {
                let Some(cl) = self.clients[c].as_ref() else {
                    continue;
                };
                let before = (cl.wire.unsent(), self.streams.len());
                if self.client_done(c) {
                    progress = true;
                    self.end_client(c);
                } else if before != (self.cl(c).wire.unsent(), self.streams.len()) {
                    // It wrote a GOAWAY or cancelled streams: flush them.
                    progress = true;
                }
            }
            if self.clients.iter().all(Option::is_none) {
                if self.close_inbox() {
                    self.park_upstreams();
                    return Poll::Ready(());
                }
                continue;
            }
            if !progress {
                return self.poll_timer(cx);
            }
        }
    }

    /// Keep-alive PINGs, their deadlines, and the idle close, for every
    /// client; the timer is set for the earliest.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let ctx = self.ctx.clone();
        let l = &ctx.limits;
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut again = false;
        for c in 0..self.clients.len() {
            let Some(cl) = self.clients[c].as_mut() else {
                continue;
            };
            if cl.closing {
                continue;
            }
            if cl.streams == 0 {
                cl.idle_since.get_or_insert(now);
            } else {
                cl.idle_since = None;
            }
            if let Some(sent) = cl.ping_sent {
                if now >= sent + l.h2_keepalive_timeout {
                    tracing::debug!(peer = %cl.conn.peer, "HTTP/2 keep-alive PING not answered, closing");
                    self.drop_once(c);
                    self.cl(c).closing = true;
                    self.drop_streams_of(c, |_| true);
                    again = true;
                    continue;
                }
            } else if now >= cl.last_frame + l.h2_keepalive_interval {
                put_ping(&mut cl.wire.wbuf, 0, b"sinew-ka");
                cl.ping_sent = Some(now);
                again = true;
                continue;
            }
            if let Some(idle) = cl.idle_since {
                if now >= idle + l.keepalive_timeout && cl.goaway.is_none() {
                    self.start_goaway(c, NO_ERROR);
                    again = true;
                    continue;
                }
            }
            let mut n = match cl.ping_sent {
                Some(sent) => sent + l.h2_keepalive_timeout,
                None => cl.last_frame + l.h2_keepalive_interval,
            };
            if let (Some(idle), None) = (cl.idle_since, cl.goaway) {
                n = n.min(idle + l.keepalive_timeout);
            }
            next = Some(next.map_or(n, |m| m.min(n)));
        }
        if again {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let Some(next) = next else {
            return Poll::Pending;
        };
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

    fn client_frames(&mut self, c: usize) -> Result<(), ConnError> {
        let buf = std::mem::take(&mut self.cl(c).wire.rbuf);
        let (pos, r) = each_frame(
            &buf,
            || conn_err(FRAME_SIZE_ERROR, "frame over SETTINGS_MAX_FRAME_SIZE"),
            |h, p| {
                self.client_frame(c, h, p)?;
                Ok(!self.cl(c).closing)
            },
        );
        let mut buf = buf;
        buf.advance(pos);
        self.cl(c).wire.rbuf = buf;
        if self.reap_all {
            self.reap_all = false;
            self.reap();
        }
        r
    }

    fn client_frame(&mut self, c: usize, h: Head, p: &[u8]) -> Result<(), ConnError> {
        if let Some((sid, _, _)) = &self.cl(c).wire.cont {
            if h.kind != CONTINUATION || h.stream != *sid {
                return Err(conn_err(PROTOCOL_ERROR, "a CONTINUATION was expected"));
            }
        }
        match h.kind {
            DATA => self.client_data(c, h, p),
            HEADERS => {
                if h.stream == 0 {
                    return Err(conn_err(PROTOCOL_ERROR, "HEADERS on stream 0"));
                }
                let (s, e) = unpad(&h, p).ok_or(conn_err(PROTOCOL_ERROR, "bad padding"))?;
                let mut flags = h.flags & !SELF_DEPENDENT;
                // The priority's stream dependency sits just before the
                // block (unpad skipped it).
                if h.flags & PRIORITY_FLAG != 0 && u32_at(p, s - 5) & 0x7fff_ffff == h.stream {
                    flags |= SELF_DEPENDENT;
                }
                if h.flags & END_HEADERS == 0 {
                    self.cl(c).wire.cont = Some((h.stream, flags, p[s..e].to_vec()));
                    return Ok(());
                }
                let mut block = std::mem::take(&mut self.block);
                block.clear();
                block.extend_from_slice(&p[s..e]);
                let r = self.client_headers(c, h.stream, flags, &block);
                self.block = block;
                r
            }
            CONTINUATION => {
                let Some((sid, flags, mut frag)) = self.cl(c).wire.cont.take() else {
                    return Err(conn_err(PROTOCOL_ERROR, "CONTINUATION without HEADERS"));
                };
                frag.extend_from_slice(p);
                if frag.len() > self.ctx.limits.h2_max_header_list_size as usize * 2 + MAX_FRAME {
                    return Err(conn_err(ENHANCE_YOUR_CALM, "header block too long"));
                }
                if h.flags & END_HEADERS == 0 {
                    self.cl(c).wire.cont = Some((sid, flags, frag));
                    return Ok(());
                }
                self.client_headers(c, sid, flags, &frag)
            }
            PRIORITY => {
                if h.stream == 0 {
                    return Err(conn_err(PROTOCOL_ERROR, "PRIORITY on stream 0"));
                }
                if h.len != 5 {
                    // A stream error (RFC 9113 6.3), but an idle stream
                    // takes no RST_STREAM (5.1): there it is the connection
                    // error that 5.4.1 allows.
                    if h.stream > self.cl(c).last_cid {
                        return Err(conn_err(FRAME_SIZE_ERROR, "PRIORITY not 5 octets on an idle stream"));
                    }
                    match self.find(c, h.stream) {
                        Some(i) => self.stream_error(i, FRAME_SIZE_ERROR),
                        None => {
                            put_rst(&mut self.cl(c).wire.wbuf, h.stream, FRAME_SIZE_ERROR);
                            self.refused(c, 1);
                        }
                    }
                } else if u32_at(p, 0) & 0x7fff_ffff == h.stream {
                    // A stream cannot depend on itself: a stream error of
                    // type PROTOCOL_ERROR (RFC 7540 5.3.1; RFC 9113 keeps
                    // the frame's format), a connection error on an idle
                    // stream as above. On a closed stream it changes
                    // nothing and is let go.
                    if h.stream > self.cl(c).last_cid {
                        return Err(conn_err(PROTOCOL_ERROR, "PRIORITY: an idle stream depends on itself"));
                    }
                    if let Some(i) = self.find(c, h.stream) {
                        self.stream_error(i, PROTOCOL_ERROR);
                    }
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
                if h.stream > self.cl(c).last_cid {
                    return Err(conn_err(PROTOCOL_ERROR, "RST_STREAM on an idle stream"));
                }
                self.client_reset(c, h.stream)
            }
            SETTINGS => self.client_settings(c, h, p),
            PUSH_PROMISE => Err(conn_err(PROTOCOL_ERROR, "PUSH_PROMISE from a client")),
            PING => {
                if h.stream != 0 {
                    return Err(conn_err(PROTOCOL_ERROR, "PING on a stream"));
                }
                if h.len != 8 {
                    return Err(conn_err(FRAME_SIZE_ERROR, "PING not 8 octets"));
                }
                if h.flags & ACK == 0 {
                    put_ping(&mut self.cl(c).wire.wbuf, ACK, p);
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
                self.cl(c).peer_goaway = true;
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
                    let cl = self.cl(c);
                    cl.wire.send_conn += inc;
                    if cl.wire.send_conn > MAX_WINDOW {
                        return Err(conn_err(FLOW_CONTROL_ERROR, "connection window over 2^31-1"));
                    }
                    self.pump_resp_of(c);
                    return Ok(());
                }
                let Some(i) = self.find(c, h.stream) else {
                    if h.stream > self.cl(c).last_cid {
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
                self.reap_at(i);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Sends on what every stream of client `c` holds for it.
    fn pump_resp_of(&mut self, c: usize) {
        for i in 0..self.streams.len() {
            if self.keys[i].client == c as u32 {
                self.pump_resp(i);
            }
        }
        self.reap_all = true;
    }

    fn client_settings(&mut self, c: usize, h: Head, p: &[u8]) -> Result<(), ConnError> {
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
                    let cl = self.cl(c);
                    let delta = v as i64 - cl.wire.peer_initial_window;
                    cl.wire.peer_initial_window = v as i64;
                    for (s, k) in self.streams.iter_mut().zip(&self.keys) {
                        if k.client != c as u32 {
                            continue;
                        }
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
                    self.cl(c).wire.peer_max_frame = v as usize;
                }
                SETTINGS_MAX_CONCURRENT_STREAMS => self.cl(c).wire.peer_max_streams = v,
                _ => {}
            }
        }
        put_head(&mut self.cl(c).wire.wbuf, 0, SETTINGS, ACK, 0);
        self.pump_resp_of(c);
        Ok(())
    }

    fn find(&self, c: usize, cid: u32) -> Option<usize> {
        let c = c as u32;
        self.keys.iter().position(|k| k.cid == cid && k.client == c)
    }

    fn client_data(&mut self, c: usize, h: Head, p: &[u8]) -> Result<(), ConnError> {
        if h.stream == 0 {
            return Err(conn_err(PROTOCOL_ERROR, "DATA on stream 0"));
        }
        let (s, e) = unpad(&h, p).ok_or(conn_err(PROTOCOL_ERROR, "bad padding"))?;
        let n = h.len as i64;
        let cl = self.cl(c);
        cl.wire.recv_conn -= n;
        if cl.wire.recv_conn < 0 {
            return Err(conn_err(FLOW_CONTROL_ERROR, "connection window exceeded"));
        }
        let Some(i) = self.find(c, h.stream) else {
            let cl = self.cl(c);
            if h.stream > cl.last_cid {
                return Err(conn_err(PROTOCOL_ERROR, "DATA on an idle stream"));
            }
            // A stream that is closed or was reset: its window comes back.
            cl.wire.give_back_conn(h.len);
            // After the client's own END_STREAM or RST_STREAM, DATA is a
            // stream error of type STREAM_CLOSED (RFC 9113 5.1, "closed").
            // It is reset once: what follows comes after our RST_STREAM.
            if let Some(slot) = cl.closed.iter_mut().find(|x| **x == h.stream) {
                *slot = 0;
                put_rst(&mut cl.wire.wbuf, h.stream, STREAM_CLOSED);
                self.refused(c, 1);
            }
            return Ok(());
        };
        let w = &mut self.clients[c].as_mut().expect("a client slot in use").wire;
        // Padding is never sent on.
        w.give_back_conn(h.len - (e - s));
        let st = &mut self.streams[i];
        if st.req.end {
            w.give_back_conn(e - s);
            self.stream_error(i, STREAM_CLOSED);
            return Ok(());
        }
        st.req.recv -= n;
        if st.req.recv < 0 {
            w.give_back_conn(e - s);
            self.stream_error(i, FLOW_CONTROL_ERROR);
            return Ok(());
        }
        st.req.credit += n - (e - s) as i64;
        st.req_bytes += (e - s) as u64;
        let end = h.flags & END_STREAM != 0;
        if let Some(cl) = st.content_length {
            if st.req_bytes > cl || (end && st.req_bytes != cl) {
                w.give_back_conn(e - s);
                self.stream_error(i, PROTOCOL_ERROR);
                return Ok(());
            }
        }
        if st.local {
            st.req.end |= end;
            w.give_back_conn(e - s);
            self.reap_at(i);
            return Ok(());
        }
        st.req.end |= end;
        self.pump_req_with(i, &p[s..e]);
        self.reap_at(i);
        Ok(())
    }

    fn client_reset(&mut self, c: usize, cid: u32) -> Result<(), ConnError> {
        let Some(i) = self.find(c, cid) else {
            return Ok(());
        };
        let unanswered = !self.streams[i].resp.end_sent;
        self.cancel_upstream(i, CANCEL);
        self.remove(i);
        self.cl(c).closed_by_client(cid);
        if unanswered {
            let cap = self.ctx.limits.h2_max_pending_accept_reset_streams as f64;
            let now = Instant::now();
            let cl = self.cl(c);
            let refill = now.duration_since(cl.reset_refill).as_secs_f64() * cap;
            cl.reset_refill = now;
            cl.reset_tokens = (cl.reset_tokens + refill).min(cap) - 1.0;
            if cl.reset_tokens < 0.0 {
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
        let k = self.keys[i];
        let c = k.client as usize;
        put_rst(&mut self.cl(c).wire.wbuf, k.cid, code);
        self.cancel_upstream(i, CANCEL);
        self.remove(i);
        self.refused(c, 1);
    }

    fn refused(&mut self, c: usize, n: usize) {
        self.ctx.metrics.dropped(DropReason::H2Protocol);
        let max = self.ctx.limits.h2_max_local_error_reset_streams;
        let cl = self.cl(c);
        cl.local_errors += n;
        if cl.local_errors > max {
            self.fail(c, conn_err(ENHANCE_YOUR_CALM, "too many stream errors"));
        }
    }

    fn client_headers(&mut self, c: usize, sid: u32, flags: u8, block: &[u8]) -> Result<(), ConnError> {
        let max_list = self.ctx.limits.h2_max_header_list_size as usize;
        let mut fields = std::mem::take(&mut self.fields);
        let r = self.cl(c).wire.dec.decode(block, &mut fields, max_list);
        let out = match r {
            Err(_) => Err(conn_err(COMPRESSION_ERROR, "HPACK decoding failed")),
            Ok(()) => self.client_head(c, sid, flags, &fields),
        };
        self.fields = fields;
        out
    }

    /// Adds a stream of client `c`; returns its index.
    fn push_stream(&mut self, c: usize, cid: u32, st: Stream) -> usize {
        self.cl(c).streams += 1;
        self.streams.push(st);
        self.keys.push(Key {
            client: c as u32,
            cid,
            up: NO_UP,
            uid: 0,
        });
        self.streams.len() - 1
    }

    fn client_head(&mut self, c: usize, sid: u32, flags: u8, f: &Fields) -> Result<(), ConnError> {
        let end = flags & END_STREAM != 0;
        let self_dependent = flags & SELF_DEPENDENT != 0;
        if let Some(i) = self.find(c, sid) {
            if self_dependent {
                self.stream_error(i, PROTOCOL_ERROR);
                return Ok(());
            }
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
            self.reap_at(i);
            return Ok(());
        }
        if sid.is_multiple_of(2) {
            return Err(conn_err(PROTOCOL_ERROR, "a client stream with an even id"));
        }
        let max_streams = self.ctx.limits.h2_max_concurrent_streams as usize;
        let cl = self.cl(c);
        if sid <= cl.last_cid {
            return Err(conn_err(PROTOCOL_ERROR, "a stream id not above the last one"));
        }
        cl.last_cid = sid;
        if cl.goaway.is_some() || cl.peer_goaway {
            put_rst(&mut cl.wire.wbuf, sid, REFUSED_STREAM);
            return Ok(());
        }
        if self_dependent {
            // A stream cannot depend on itself: a stream error of type
            // PROTOCOL_ERROR (RFC 7540 5.3.1). Its block was decoded, so
            // the HPACK state stays in step.
            put_rst(&mut cl.wire.wbuf, sid, PROTOCOL_ERROR);
            self.refused(c, 1);
            return Ok(());
        }
        if cl.streams >= max_streams {
            put_rst(&mut cl.wire.wbuf, sid, REFUSED_STREAM);
            self.refused(c, 1);
            return Ok(());
        }
        let Some(rh) = check_request(f) else {
            put_rst(&mut cl.wire.wbuf, sid, PROTOCOL_ERROR);
            self.refused(c, 1);
            return Ok(());
        };
        if end && rh.content_length.is_some_and(|cl| cl != 0) {
            put_rst(&mut cl.wire.wbuf, sid, PROTOCOL_ERROR);
            self.refused(c, 1);
            return Ok(());
        }
        let Ok(method) = http::Method::from_bytes(rh.method) else {
            put_rst(&mut cl.wire.wbuf, sid, PROTOCOL_ERROR);
            self.refused(c, 1);
            return Ok(());
        };
        let peer_initial_window = cl.wire.peer_initial_window;
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
            req_head: None,
            body_sent: false,
            retries: 0,
            req: Half {
                recv: STREAM_WINDOW,
                send: DEFAULT_WINDOW,
                end,
                ..Half::default()
            },
            resp: Half {
                recv: STREAM_WINDOW,
                send: peer_initial_window,
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
            let i = self.push_stream(c, sid, st);
            let a = Answer::refuse_plain(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
            self.ctx.metrics.dropped(DropReason::HeaderTooLarge);
            self.answer(i, None, a);
            self.reap_at(i);
            return Ok(());
        }
        let conn = &self.clients[c].as_ref().expect("a client slot in use").conn;
        let (judged, decision) = judge(&self.ctx, conn, ask);
        match decision {
            Decision::Answer(a) => {
                let i = self.push_stream(c, sid, st);
                self.answer(i, Some(judged), a);
                self.reap_at(i);
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
                let u = self.upstream_for(self.key.0, mark);
                let i = self.push_stream(c, sid, st);
                self.keys[i].up = u as u32;
                if let Some(Up { waiting, .. }) = self.ups[u].as_mut() {
                    waiting.push_back((c as u32, sid));
                }
                self.start_waiting(u);
            }
        }
        Ok(())
    }

    /// The proxy's own answer on stream `i`, recorded now.
    fn answer(&mut self, i: usize, judged: Option<Judged>, a: Answer) {
        let k = self.keys[i];
        let st = &mut self.streams[i];
        let cl = self.clients[k.client as usize].as_mut().expect("a client slot in use");
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
                put_headers(&mut cl.wire.wbuf, k.cid, &b, true, cl.wire.peer_max_frame);
                st.resp.end = true;
                st.resp.end_sent = true;
            }
            None => {
                hpack::encode(&mut b, b"content-type", b"text/plain", false);
                hpack::encode(&mut b, b"content-length", a.body.len().to_string().as_bytes(), false);
                put_headers(&mut cl.wire.wbuf, k.cid, &b, false, cl.wire.peer_max_frame);
                st.resp.pending.extend_from_slice(a.body.as_bytes());
                st.resp.end = true;
            }
        }
        if let Some(j) = judged {
            record(&self.ctx, self.key.1, j, a.outcome);
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
        let k = self.keys[i];
        let st = &mut self.streams[i];
        let w = match (k.up, k.uid) {
            (u, uid) if u != NO_UP && uid != 0 => match self.ups[u as usize].as_mut() {
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
        let had_trailers = st.req.trailers.is_some();
        let (moved, _) = pump(&mut st.req, w, k.uid, fresh, usize::MAX);
        st.body_sent |= moved > 0 || had_trailers && st.req.trailers.is_none();
        if moved > 0 {
            let cl = self.clients[k.client as usize].as_mut().expect("a client slot in use");
            cl.wire.give_back_conn(moved);
            give_back_stream(&mut st.req, moved, &mut cl.wire.wbuf, k.cid);
        }
    }

    /// Moves response DATA (then trailers or END_STREAM) to the client.
    fn pump_resp(&mut self, i: usize) {
        self.pump_resp_with(i, &[]);
    }

    fn pump_resp_with(&mut self, i: usize, fresh: &[u8]) {
        let k = self.keys[i];
        let st = &mut self.streams[i];
        if !st.resp_started {
            st.resp.pending.extend_from_slice(fresh);
            return;
        }
        let Some(cl) = self.clients[k.client as usize].as_mut() else {
            return;
        };
        let room = WBUF_HIGH.saturating_sub(cl.wire.unsent());
        let (moved, capped) = pump(&mut st.resp, &mut cl.wire, k.cid, fresh, room);
        cl.stalled |= capped;
        if moved > 0 && !st.local && k.up != NO_UP {
            if let Some(Up {
                state: UpState::Ready(w),
                ..
            }) = self.ups[k.up as usize].as_mut()
            {
                w.give_back_conn(moved);
                give_back_stream(&mut st.resp, moved, &mut w.wbuf, k.uid);
            }
        }
    }

    /// Whether stream `i` is done both ways, or was answered by the proxy
    /// before its request ended (it may stop sending: RST_STREAM NO_ERROR).
    fn finished(&mut self, i: usize) -> bool {
        let st = &self.streams[i];
        let req_done = if st.local { st.req.end } else { st.req.end_sent };
        if st.resp.end_sent && req_done {
            // Closed both ways, the client's half by its END_STREAM.
            let k = self.keys[i];
            if let Some(cl) = self.clients[k.client as usize].as_mut() {
                cl.closed_by_client(k.cid);
            }
            return true;
        }
        if st.resp.end_sent && st.local && !st.req.end {
            let k = self.keys[i];
            put_rst(&mut self.cl(k.client as usize).wire.wbuf, k.cid, NO_ERROR);
            return true;
        }
        false
    }

    /// Removes stream `i` if it is done.
    fn reap_at(&mut self, i: usize) {
        if i < self.streams.len() && self.finished(i) {
            self.remove(i);
        }
    }

    /// Removes every stream that is done.
    fn reap(&mut self) {
        let mut i = 0;
        while i < self.streams.len() {
            if self.finished(i) {
                self.remove(i);
            } else {
                i += 1;
            }
        }
    }

    fn remove(&mut self, i: usize) {
        let st = self.streams.swap_remove(i);
        let k = self.keys.swap_remove(i);
        if let Some(cl) = self.clients[k.client as usize].as_mut() {
            cl.streams -= 1;
            // The client's share of the window comes back with the stream.
            if !st.req.pending.is_empty() {
                cl.wire.give_back_conn(st.req.pending.len());
            }
        }
        if k.up == NO_UP {
            return;
        }
        let u = k.up as usize;
        if let Some(up) = self.ups[u].as_mut() {
            if k.uid != 0 {
                up.active = up.active.saturating_sub(1);
            } else {
                up.waiting.retain(|&w| w != (k.client, k.cid));
            }
            if let (UpState::Ready(w), false) = (&mut up.state, st.resp.pending.is_empty()) {
                w.give_back_conn(st.resp.pending.len());
            }
        }
        if k.uid != 0 {
            self.start_waiting(u);
            self.end_if_spent(u);
        }
    }

    /// Closes upstream `u` once it sent GOAWAY and its last stream ended.
    fn end_if_spent(&mut self, u: usize) {
        if self.ups[u].as_ref().is_some_and(|up| up.closing && up.active == 0) {
            tracing::debug!(orig = %self.key.0, "upstream HTTP/2 connection closed after its GOAWAY");
            self.ups[u] = None;
        }
    }

    /// Stream `i` leaves its upstream connection (which counts it down).
    fn detach(&mut self, i: usize) {
        let k = &mut self.keys[i];
        if k.up != NO_UP && k.uid != 0 {
            if let Some(up) = self.ups[k.up as usize].as_mut() {
                up.active = up.active.saturating_sub(1);
            }
        }
        k.up = NO_UP;
        k.uid = 0;
    }

    fn cancel_upstream(&mut self, i: usize, code: u32) {
        let k = self.keys[i];
        let st = &self.streams[i];
        if k.uid == 0 || k.up == NO_UP || (st.req.end_sent && st.resp.end) {
            return;
        }
        if let Some(Up {
            state: UpState::Ready(w),
            ..
        }) = self.ups[k.up as usize].as_mut()
        {
            put_rst(&mut w.wbuf, k.uid, code);
        }
    }

    // ----- the upstream side -----

    /// The slot of an upstream connection for (dst, mark) with room for
    /// one more stream, made if there is none.
    fn upstream_for(&mut self, dst: SocketAddr, mark: u32) -> usize {
        if let Some(i) = self.ups.iter().position(|u| {
            u.as_ref().is_some_and(|u| {
                let limit = match &u.state {
                    UpState::Ready(w) => w.peer_max_streams,
                    UpState::Connecting(_) => UPSTREAM_STREAMS_BEFORE_SETTINGS,
                };
                u.dst == dst && u.mark == mark && !u.closing && (u.active as usize + u.waiting.len()) < limit as usize
            })
        }) {
            return i;
        }
        let up = match self.take_idle(dst, mark) {
            Some(up) => up,
            None => {
                let pool = self.ctx.pool.clone();
                Up {
                    dst,
                    mark,
                    state: UpState::Connecting(Box::pin(async move { pool.connect(dst, mark).await })),
                    next_sid: 1,
                    active: 0,
                    waiting: Default::default(),
                    closing: false,
                }
            }
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

    /// Leaves this ending hub's idle upstream connections to the next hub
    /// (up to `upstream_idle_per_key` per destination, for at most
    /// `upstream_idle_timeout`). Only a connection with nothing in flight
    /// and nothing half-read or unsent qualifies; a draining proxy keeps
    /// none.
    fn park_upstreams(&mut self) {
        if self.draining {
            return;
        }
        let l = &self.ctx.limits;
        let now = Instant::now();
        let mut idle = lock(&self.ctx.hubs.idle);
        // Connections idle too long go, whatever their destination (there
        // is no timer for them; each hub's end sweeps).
        idle.retain(|_, list| {
            list.retain(|(_, t)| now.duration_since(*t) < l.upstream_idle_timeout);
            !list.is_empty()
        });
        for slot in self.ups.iter_mut() {
            let Some(u) = slot.take() else {
                continue;
            };
            let quiet = match &u.state {
                UpState::Ready(w) => !w.eof && w.unsent() == 0 && w.rbuf.is_empty() && w.cont.is_none(),
                UpState::Connecting(_) => false,
            };
            // Stream ids are 31 bits: one near the end is not worth keeping.
            if !quiet || u.closing || u.active > 0 || !u.waiting.is_empty() || u.next_sid > 1 << 30 {
                continue;
            }
            let list = idle.entry((u.dst, u.mark)).or_default();
            if list.len() < l.upstream_idle_per_key {
                list.push((u, now));
            }
        }
    }

    /// An idle upstream connection to (dst, mark) that another hub left,
    /// newest first, if one is still open: a read that does not wait must
    /// find nothing (a FIN, an error, or bytes such as a GOAWAY or PING it
    /// sent while idle, and the connection is dropped instead).
    fn take_idle(&self, dst: SocketAddr, mark: u32) -> Option<Up> {
        let timeout = self.ctx.limits.upstream_idle_timeout;
        let mut idle = lock(&self.ctx.hubs.idle);
        let list = idle.get_mut(&(dst, mark))?;
        let mut found = None;
        while let Some((mut u, since)) = list.pop() {
            if since.elapsed() >= timeout {
                // The rest are older still.
                list.clear();
                break;
            }
            if let UpState::Ready(w) = &mut u.state {
                if w.rbuf.capacity() - w.rbuf.len() < 1024 {
                    w.rbuf.reserve(1024);
                }
                if let Ok(None) = crate::netio::read_now(&w.sock, &mut w.rbuf) {
                    found = Some(u);
                    break;
                }
            }
        }
        if list.is_empty() {
            idle.remove(&(dst, mark));
        }
        found
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
                tracing::debug!(orig = %self.key.0, error = ?e, "upstream HTTP/2 connect failed");
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
            let Some((c, cid)) = up.waiting.pop_front() else {
                return;
            };
            let Some(i) = self.keys.iter().position(|k| k.cid == cid && k.client == c) else {
                continue;
            };
            let st = &mut self.streams[i];
            let (0, Some(block)) = (self.keys[i].uid, st.req_head.as_deref()) else {
                continue;
            };
            let uid = up.next_sid;
            self.keys[i].uid = uid;
            up.next_sid += 2;
            up.active += 1;
            st.req.send = w.peer_initial_window;
            let end = st.req.end && st.req.pending.is_empty() && st.req.trailers.is_none();
            put_headers(&mut w.wbuf, uid, block, end, w.peer_max_frame);
            if end {
                st.req.end_sent = true;
            }
            self.pump_req(i);
        }
    }

    /// The upstream connection in slot `u` is gone. Streams that were
    /// still waiting to be sent on it, on a connection that had been up,
    /// go on another; of the rest, those that got no response head are
    /// answered 502 (gRPC 14), the others reset.
    fn drop_upstream(&mut self, u: usize, err: Option<UpstreamError>) {
        let Some(old) = self.ups[u].take() else {
            return;
        };
        let was_up = matches!(old.state, UpState::Ready(_));
        let e = err.unwrap_or(UpstreamError::Request);
        // (stream, never sent on it): all detached first, while the slot is
        // empty, since a retry may put a new connection in this slot.
        let on_it: Vec<(usize, bool)> = (0..self.streams.len())
            .filter(|&i| self.keys[i].up == u as u32)
            .map(|i| (i, self.keys[i].uid == 0))
            .collect();
        for &(i, _) in &on_it {
            self.detach(i);
        }
        for (i, unsent) in on_it {
            if !(was_up && unsent && self.retry(i, old.dst, old.mark)) {
                self.fail_stream(i, e);
            }
        }
        self.reap();
    }

    /// Sends detached stream `i` again, on a connection to `dst` with
    /// `mark` that is not closing, if the upstream cannot have seen any of
    /// it but its head: RFC 9113 8.7 makes such a request safe to retry
    /// whatever its method (a stream above a GOAWAY's last id, or reset
    /// with REFUSED_STREAM, was not processed). Once DATA or trailers have
    /// left, the proxy no longer holds the whole request, and a stream
    /// refused too often is not tried again: false, and the caller fails it.
    fn retry(&mut self, i: usize, dst: SocketAddr, mark: u32) -> bool {
        let st = &mut self.streams[i];
        if st.body_sent || st.resp_started || st.local || st.req_head.is_none() || st.retries >= MAX_RETRIES {
            return false;
        }
        st.retries += 1;
        st.req.end_sent = false;
        self.ctx.metrics.upstream_retried();
        let k = self.keys[i];
        let u = self.upstream_for(dst, mark);
        self.keys[i].up = u as u32;
        if let Some(up) = self.ups[u].as_mut() {
            up.waiting.push_back((k.client, k.cid));
        }
        self.start_waiting(u);
        true
    }

    /// Stream `i` lost its upstream.
    fn fail_stream(&mut self, i: usize, e: UpstreamError) {
        let k = self.keys[i];
        let st = &mut self.streams[i];
        if st.resp_started {
            if !st.resp.end_sent {
                put_rst(&mut self.cl(k.client as usize).wire.wbuf, k.cid, INTERNAL_ERROR);
                let st = &mut self.streams[i];
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
                put_rst(&mut self.cl(k.client as usize).wire.wbuf, k.cid, INTERNAL_ERROR);
            }
        }
    }

    fn upstream_failed(&mut self, u: usize, why: &'static str) {
        tracing::debug!(orig = %self.key.0, why, "upstream HTTP/2 connection ended");
        self.drop_upstream(u, None);
    }

    fn upstream_frames(&mut self, u: usize) -> Result<(), ConnError> {
        let Some(w) = self.up_wire(u) else {
            return Ok(());
        };
        let eof = w.eof;
        let buf = std::mem::take(&mut w.rbuf);
        let (pos, r) = each_frame(
            &buf,
            || conn_err(FRAME_SIZE_ERROR, "upstream frame too long"),
            |h, p| {
                self.upstream_frame(u, h, p)?;
                Ok(self.ups[u].is_some())
            },
        );
        if let Some(w) = self.up_wire(u) {
            let mut buf = buf;
            buf.advance(pos);
            w.rbuf = buf;
        }
        if self.reap_all {
            self.reap_all = false;
            self.reap();
        }
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
        let u = u as u32;
        self.keys.iter().position(|k| k.uid == uid && k.up == u)
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
                self.reap_at(i);
                Ok(())
            }
            HEADERS => {
                let (s, e) = unpad(&h, p).ok_or(conn_err(PROTOCOL_ERROR, "upstream: bad padding"))?;
                if h.flags & END_HEADERS == 0 {
                    w.cont = Some((h.stream, h.flags, p[s..e].to_vec()));
                    return Ok(());
                }
                let mut block = std::mem::take(&mut self.block);
                block.clear();
                block.extend_from_slice(&p[s..e]);
                let r = self.upstream_headers(u, h.stream, h.flags, &block);
                self.block = block;
                r
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
                self.detach(i);
                let st = &mut self.streams[i];
                if code == NO_ERROR && st.resp.end {
                    // A whole response: the upstream wants no more of the
                    // request body.
                    st.req.end_sent = true;
                    st.req.pending.clear();
                } else if code == REFUSED_STREAM {
                    let (dst, mark) = self.ups[u]
                        .as_ref()
                        .map(|up| (up.dst, up.mark))
                        .expect("the upstream in use");
                    if !self.retry(i, dst, mark) {
                        self.fail_stream(i, UpstreamError::Refused);
                    }
                } else {
                    self.fail_stream(i, UpstreamError::Request);
                }
                // The reset stream's place is free.
                self.start_waiting(u);
                self.end_if_spent(u);
                self.reap_at(i);
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
                    if self.keys[i].up == u as u32 && self.keys[i].uid != 0 {
                        self.streams[i].req.send += delta;
                        self.pump_req(i);
                    }
                }
                self.start_waiting(u);
                self.reap_all = true;
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
                let Some(up) = self.ups[u].as_mut() else {
                    return Ok(());
                };
                up.closing = true;
                up.waiting.clear();
                let (dst, mark) = (up.dst, up.mark);
                // Streams the upstream did not process (above `last`) and
                // those still waiting to be sent go on another connection
                // if they can (RFC 9113 6.8); the rest are answered 502.
                let refused: Vec<usize> = (0..self.streams.len())
                    .filter(|&i| self.keys[i].up == u as u32 && (self.keys[i].uid > last || self.keys[i].uid == 0))
                    .collect();
                for i in refused {
                    self.detach(i);
                    if !self.retry(i, dst, mark) {
                        self.fail_stream(i, UpstreamError::Refused);
                    }
                }
                self.end_if_spent(u);
                self.reap_all = true;
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
                        if self.keys[i].up == u as u32 {
                            self.pump_req(i);
                        }
                    }
                    self.reap_all = true;
                } else if let Some(i) = self.find_up(u, h.stream) {
                    self.streams[i].req.send += inc;
                    self.pump_req(i);
                    self.reap_at(i);
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
        let k = self.keys[i];
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
            self.reap_at(i);
            return;
        }
        let status = f
            .get(b":status")
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse::<u16>().ok())
            .filter(|s| (100..=599).contains(s) && *s != 101);
        let Some(status) = status else {
            self.cancel_upstream(i, PROTOCOL_ERROR);
            self.detach(i);
            self.fail_stream(i, UpstreamError::Request);
            self.reap_at(i);
            return;
        };
        let mut b = Vec::with_capacity(128);
        for (n, v, x) in f.iter() {
            if n == b":status" || (n.first() != Some(&b':') && !connection_specific(n)) {
                hpack::encode(&mut b, n, v, x.sensitive);
            }
        }
        let cl = self.clients[k.client as usize].as_mut().expect("a client slot in use");
        let max_frame = cl.wire.peer_max_frame;
        if status < 200 {
            // Interim: passed on, the final head is still to come.
            put_headers(&mut cl.wire.wbuf, k.cid, &b, false, max_frame);
            return;
        }
        st.resp_started = true;
        st.req_head = None;
        st.resp.end = end;
        put_headers(&mut cl.wire.wbuf, k.cid, &b, end, max_frame);
        if end {
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
            record(&self.ctx, self.key.1, j, outcome);
        }
        if end {
            self.reap_at(i);
        }
    }
}

/// Sends what `half` holds, then `fresh`, to `w` on stream `sid` as both
/// windows allow, then its trailers or END_STREAM once all is out; what
/// does not fit stays in `half`. At most `cap` bytes go into `w`'s write
/// buffer. Returns the DATA bytes moved, and whether `cap` held some back.
fn pump(half: &mut Half, w: &mut Wire, sid: u32, fresh: &[u8], cap: usize) -> (usize, bool) {
    let mut moved = 0;
    let mut capped = false;
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
        let room = room.min(i64::try_from(cap.saturating_sub(moved)).unwrap_or(i64::MAX));
        if room <= 0 {
            capped = true;
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
        return (moved, capped);
    }
    if half.end && !half.end_sent && half.pending.is_empty() {
        match half.trailers.take() {
            Some(t) => put_headers(&mut w.wbuf, sid, &t, true, w.peer_max_frame),
            None => put_data(&mut w.wbuf, sid, &[], true),
        }
        half.end_sent = true;
    }
    (moved, capped)
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
