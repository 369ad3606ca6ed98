//! HTTP/1.1 on the proxy's own forwarding path.
//!
//! A request head is parsed in place, judged, and sent on from the bytes
//! it came in: the request line carries the target that was judged, the
//! header lines go as the client wrote them (less the hop-by-hop ones),
//! and the body is copied as it arrives, its framing followed only to find
//! where it ends. The response comes back the same way. Nothing is
//! rebuilt into a message object and nothing is spawned per request; one
//! task owns the client connection and the upstream connection it holds,
//! so a keep-alive exchange costs one read and one write on each side.
//!
//! What the proxy refuses on its own (smuggling, oversized heads, bad
//! targets, slow headers) is decided here with the codec's pure functions
//! ([`codec`]); what the rules say is decided by [`crate::inbound::judge`],
//! the same for HTTP/2.

pub mod codec;

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::inbound::{judge, record, Answer, Ask, Conn, Ctx, Decision, Outcome};
use crate::metrics::{DropReason, UpstreamError, Verdict};
use crate::netio::Client;
use crate::upstream::{H1Conn, Pool};
use codec::{BodyKind, ChunkError, Chunked, HeadError, HeadFields, ResponseHead, Target};

/// Reads more of `s` into `buf`; 0 at its end.
async fn fill(s: &mut TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    crate::netio::fill(s, buf).await
}

/// Where a body being copied ends.
enum Framer {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

impl Framer {
    fn new(kind: BodyKind, max_line: usize) -> Self {
        match kind {
            BodyKind::None | BodyKind::Length(0) => Framer::Done,
            BodyKind::Length(n) => Framer::Length(n),
            BodyKind::Chunked => Framer::Chunked(Chunked::new(max_line)),
            BodyKind::UntilClose => Framer::UntilClose,
        }
    }

    fn done(&self) -> bool {
        match self {
            Framer::Done => true,
            Framer::Chunked(c) => c.done(),
            _ => false,
        }
    }

    /// How many of `b`'s bytes belong to the body.
    fn take(&mut self, b: &[u8]) -> Result<usize, ChunkError> {
        match self {
            Framer::Length(n) => {
                let k = (b.len() as u64).min(*n);
                *n -= k;
                if *n == 0 {
                    *self = Framer::Done;
                }
                Ok(k as usize)
            }
            Framer::Chunked(c) => c.advance(b),
            Framer::UntilClose => Ok(b.len()),
            Framer::Done => Ok(0),
        }
    }
}

enum RelayError {
    /// The sending side ended before the body did.
    SrcClosed,
    Src,
    Dst,
    Malformed,
}

/// Copies the rest of a body from `src` to `dst`: what `pending` holds
/// first, then what `src` sends, until the framing says it ended. What
/// follows the body stays in `pending`.
async fn relay(
    src: &mut TcpStream,
    pending: &mut BytesMut,
    dst: &mut TcpStream,
    framer: &mut Framer,
) -> Result<(), RelayError> {
    loop {
        if !pending.is_empty() {
            let k = framer.take(pending).map_err(|_| RelayError::Malformed)?;
            if k > 0 {
                dst.write_all(&pending[..k]).await.map_err(|_| RelayError::Dst)?;
                pending.advance(k);
            }
        }
        if framer.done() {
            return Ok(());
        }
        match fill(src, pending).await {
            Ok(0) if matches!(framer, Framer::UntilClose) => {
                *framer = Framer::Done;
                return Ok(());
            }
            Ok(0) => return Err(RelayError::SrcClosed),
            Ok(_) => {}
            Err(_) => return Err(RelayError::Src),
        }
    }
}

thread_local! {
    static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
}

/// The current time as an HTTP-date (RFC 9110 5.6.7), formatted once a
/// second per thread.
fn http_date(out: &mut Vec<u8>) {
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs || d.1.is_empty() {
            *d = (secs, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(d.1.as_bytes());
    });
}

/// Writes an answer the proxy gives itself.
fn write_answer(out: &mut Vec<u8>, a: &Answer, minor: u8, close: bool) {
    use std::io::Write as _;
    let _ = write!(
        out,
        "HTTP/1.{minor} {} {}\r\ndate: ",
        a.status.as_u16(),
        a.status.canonical_reason().unwrap_or("")
    );
    http_date(out);
    match a.grpc {
        Some((code, message)) => {
            let _ = write!(
                out,
                "\r\ncontent-type: application/grpc\r\ngrpc-status: {code}\r\ngrpc-message: {message}\r\ncontent-length: 0\r\n"
            );
        }
        None => {
            let _ = write!(
                out,
                "\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n",
                a.body.len()
            );
        }
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if minor == 0 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if a.grpc.is_none() {
        out.extend_from_slice(a.body.as_bytes());
    }
}

/// Ends a client connection the proxy closes first. Bytes the client sent
/// that were not read would turn the close into a reset, which can destroy
/// the answer just written before the client reads it: the sending side is
/// shut first and what still comes is read and dropped, for a moment.
async fn close_client(mut s: Client, unread: bool) {
    if unread {
        let _ = s.shutdown_write();
        let Ok(s) = s.registered() else {
            return;
        };
        // On the heap: an array here would sit in every connection's
        // future (this one is inlined in it) for a rare path.
        let mut sink = vec![0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(n) = s.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}

/// The upstream connection a client connection keeps between its requests
/// (a client sends one request at a time), back to the pool when it ends.
/// Held only while [`Pool::hold`] allows; otherwise given back after each
/// exchange, so a thousand idle clients do not hold a thousand upstream
/// connections.
struct Held<'a> {
    pool: &'a Pool,
    dst: std::net::SocketAddr,
    conn: Option<H1Conn>,
}

impl Held<'_> {
    fn take(&mut self, mark: u32) -> Option<H1Conn> {
        let c = self.conn.take()?;
        self.pool.unhold();
        if c.mark != mark {
            // The client's identity changed: another key's connection.
            self.pool.give_back_h1(self.dst, c);
            None
        } else if c.usable() {
            Some(c)
        } else {
            // Closed by the upstream (or misbehaving): dropped here, never
            // pooled, where it would look fresh again.
            None
        }
    }

    /// Keeps (or pools) a connection whose exchange just ended cleanly.
    fn keep(&mut self, mut c: H1Conn) {
        c.idle_since = Instant::now();
        c.reused = true;
        if self.conn.is_none() && self.pool.hold() {
            self.conn = Some(c);
        } else {
            self.pool.give_back_h1(self.dst, c);
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            self.pool.unhold();
            self.pool.give_back_h1(self.dst, c);
        }
    }
}

/// RFC 9110 9.2.2: methods a proxy may send again after a connection
/// failed under them.
fn idempotent(method: &[u8]) -> bool {
    [&b"GET"[..], b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"].contains(&method)
}

/// How an exchange with the upstream went, for the client connection.
enum Exchange {
    /// Answered; the client connection goes on unless told to close.
    Done { close: bool },
    /// The client connection ends now (its answer, if any, is written).
    End { unread: bool },
    /// The connection was handed over to a WebSocket tunnel, or is gone.
    Gone,
}

/// Serves one HTTP/1 client connection until it closes, idles out or the
/// drain ends it. `buf` holds what was read of it so far.
pub(crate) async fn serve(
    ctx: &Ctx,
    conn: &Conn,
    mut client: Client,
    mut buf: BytesMut,
    accepted: Instant,
    mut drain: watch::Receiver<bool>,
) {
    let l = &ctx.limits;
    let mut out: Vec<u8> = Vec::with_capacity(2 * 1024);
    let mut held = Held {
        pool: &ctx.pool,
        dst: conn.orig,
        conn: None,
    };
    // One timer for the connection: moved only when it fires early, or
    // when a head is seen to be slow, never per request.
    let mut head_deadline = accepted + l.header_read_timeout;
    let mut idle_since = accepted;
    let timer = tokio::time::sleep_until(head_deadline.into());
    tokio::pin!(timer);
    let mut draining = *drain.borrow();
    loop {
        // A complete request head.
        let head = loop {
            if !buf.is_empty() {
                match codec::parse_request(&buf, l.max_headers) {
                    Ok(Some(h)) => break Ok(h),
                    Ok(None) if buf.len() >= l.max_header_bytes => break Err(HeadError::TooLarge),
                    Ok(None) => {}
                    Err(e) => break Err(e),
                }
            }
            let served = conn.served.load(Relaxed) > 0;
            let idle = buf.is_empty() && served;
            if idle && draining {
                return close_client(client, false).await;
            }
            let due = if idle {
                idle_since + l.keepalive_timeout
            } else {
                head_deadline
            };
            if timer.deadline() > due.into() {
                timer.as_mut().reset(due.into());
            }
            tokio::select! {
                biased;
                r = client.fill(&mut buf) => match r {
                    Ok(n) if n > 0 => {
                        if idle {
                            head_deadline = Instant::now() + l.header_read_timeout;
                        }
                    }
                    // The client closed, or closed in the middle of a
                    // head: not a request, nothing to answer.
                    _ => return,
                },
                () = &mut timer => {
                    let now = Instant::now();
                    if now < due {
                        timer.as_mut().reset(due.into());
                    } else if idle {
                        return close_client(client, false).await;
                    } else {
                        ctx.metrics.dropped(DropReason::HeaderTimeout);
                        return close_client(client, !buf.is_empty()).await;
                    }
                }
                r = drain.changed(), if !draining => {
                    // A connection accepted just before the drain may have
                    // its first request on the way: it is served (until
                    // the header timeout), and made the last.
                    draining = r.is_err() || *drain.borrow();
                }
            }
        };
        let head = match head {
            Ok(h) => h,
            Err(e) => {
                let (status, reason) = match e {
                    HeadError::TooLarge => (
                        http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        DropReason::HeaderTooLarge,
                    ),
                    HeadError::Smuggling(f) => {
                        tracing::debug!(peer = %conn.peer, orig = %conn.orig, finding = f.name(), "request smuggling refused");
                        (http::StatusCode::BAD_REQUEST, DropReason::Smuggling)
                    }
                    HeadError::Malformed | HeadError::BadTransferEncoding => {
                        (http::StatusCode::BAD_REQUEST, DropReason::MalformedRequest)
                    }
                    HeadError::Version => (
                        http::StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                        DropReason::MalformedRequest,
                    ),
                    HeadError::NotHttp => {
                        tracing::debug!(peer = %conn.peer, orig = %conn.orig, "not HTTP on an L7 port, closing");
                        ctx.metrics.dropped(DropReason::NotHttp);
                        return close_client(client, false).await;
                    }
                };
                refuse_head(ctx, &mut client, &mut out, status, reason, 1).await;
                return close_client(client, true).await;
            }
        };

        // Judge it.
        let raw_target = &buf[head.target.clone()];
        let method = match http::Method::from_bytes(&buf[head.method.clone()]) {
            Ok(m) => m,
            Err(_) => {
                ctx.metrics.dropped(DropReason::MalformedRequest);
                return close_client(client, true).await;
            }
        };
        let target = if method == http::Method::CONNECT {
            None
        } else {
            codec::parse_target(raw_target)
        };
        let (path, query, authority) = match &target {
            Some(Target::Origin { path, query }) => (Some(*path), *query, None),
            Some(Target::Absolute { authority, path, query }) => (Some(*path), *query, Some(*authority)),
            None => (None, None, None),
        };
        let host = authority
            .or_else(|| head.host.clone().and_then(|r| std::str::from_utf8(&buf[r]).ok()))
            .map(codec::host_name)
            .unwrap_or_default();
        let fields = HeadFields {
            buf: &buf,
            headers: &head.headers,
        };
        let protocol = if head.grpc {
            "gRPC"
        } else if head.minor == 0 {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        };
        let (judged, decision) = judge(
            ctx,
            conn,
            Ask {
                protocol,
                method,
                host,
                path,
                headers: &fields,
                grpc: head.grpc,
            },
        );
        match decision {
            Decision::Answer(a) => {
                // The answer goes without reading the body: a body already
                // here in full is skipped and the connection goes on; one
                // still on its way ends the connection.
                let mut framer = Framer::new(head.body, l.max_header_bytes);
                let body_here = framer.take(&buf[head.len..]).ok().filter(|_| framer.done());
                let close = a.close || head.closes() || body_here.is_none() || draining;
                out.clear();
                write_answer(&mut out, &a, head.minor, close);
                // Counted before the client can read the answer.
                record(ctx, conn.dir, judged, a.outcome);
                let written = client.write_all(&out).await;
                if close || written.is_err() {
                    return close_client(client, true).await;
                }
                buf.advance(head.len + body_here.unwrap_or(0));
            }
            Decision::Forward { mark, rule } => {
                let judged_path = &judged.flow.path;
                // What was judged is what goes: the origin form of the
                // normalised path, or the target as it came when that is
                // already exactly it.
                let rebuilt = if authority.is_none() && path == Some(judged_path.as_str()) {
                    None
                } else {
                    Some(match query {
                        Some(q) => format!("{judged_path}?{q}"),
                        None => judged_path.clone(),
                    })
                };
                let ex = exchange(
                    ctx,
                    conn,
                    &mut client,
                    &mut buf,
                    &mut out,
                    &mut held,
                    &head,
                    rebuilt,
                    mark,
                    rule,
                    judged,
                    draining,
                )
                .await;
                match ex {
                    Exchange::Done { close: false } => {}
                    Exchange::Done { close: true } => return close_client(client, !buf.is_empty()).await,
                    Exchange::End { unread } => return close_client(client, unread).await,
                    Exchange::Gone => return,
                }
            }
        }
        idle_since = Instant::now();
        head_deadline = idle_since + l.header_read_timeout;
    }
}

/// Forwards one allowed request and its response. `buf` holds the
/// request head at its start; on return it holds what the client sent
/// after the request.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    ctx: &Ctx,
    conn: &Conn,
    client: &mut Client,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    held: &mut Held<'_>,
    head: &codec::RequestHead,
    rebuilt: Option<String>,
    mark: u32,
    rule: std::sync::Arc<str>,
    judged: crate::inbound::Judged,
    draining: bool,
) -> Exchange {
    let l = &ctx.limits;
    let grpc = head.grpc;
    let minor = head.minor;
    let method_is_head = &buf[head.method.clone()] == b"HEAD";
    let retryable = idempotent(&buf[head.method.clone()]);
    // The head as it goes upstream, with as much of the body as is here.
    out.clear();
    let target = match &rebuilt {
        Some(t) => t.as_bytes(),
        None => &buf[head.target.clone()],
    };
    codec::write_request(out, buf, head, target, head.expect_continue);
    let mut framer = Framer::new(head.body, l.max_header_bytes);
    let k = match framer.take(&buf[head.len..]) {
        Ok(k) => k,
        Err(_) => {
            refuse_malformed(ctx, client, out, minor).await;
            return Exchange::End { unread: true };
        }
    };
    out.extend_from_slice(&buf[head.len..head.len + k]);
    buf.advance(head.len + k);
    // The whole request is in `out`: it can be sent again on a new
    // connection if the one it went on turns out closed.
    let whole = framer.done();

    let mut up = if head.websocket {
        // An upgraded connection is never pooled.
        ctx.pool.connect_h1(conn.orig, mark).await
    } else {
        match held.take(mark) {
            Some(c) => Ok(c),
            None => ctx.pool.checkout_h1(conn.orig, mark).await,
        }
    };
    if head.expect_continue && !whole {
        // The client waits for this before it sends the body.
        if client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
            return Exchange::Gone;
        }
    }
    let mut attempt = 0;
    let (mut upc, resp) = loop {
        let mut c = match up {
            Ok(c) => c,
            Err(e) => {
                fail(ctx, conn, client, out, e, grpc, minor, judged, rule).await;
                return Exchange::End { unread: !whole };
            }
        };
        let sent = c.stream.write_all(out).await.is_ok();
        if sent && !whole {
            let relayed = match client.registered() {
                Ok(cs) => relay(cs, buf, &mut c.stream, &mut framer).await,
                Err(_) => Err(RelayError::Src),
            };
            match relayed {
                Ok(()) => {}
                Err(RelayError::Malformed) => {
                    refuse_malformed(ctx, client, out, minor).await;
                    return Exchange::End { unread: true };
                }
                Err(RelayError::SrcClosed | RelayError::Src) => return Exchange::Gone,
                Err(RelayError::Dst) => {
                    fail(
                        ctx,
                        conn,
                        client,
                        out,
                        UpstreamError::Request,
                        grpc,
                        minor,
                        judged,
                        rule,
                    )
                    .await;
                    return Exchange::End { unread: true };
                }
            }
        }
        let resp = if sent {
            read_response(
                &mut c,
                l.max_header_bytes * 4,
                l.max_headers,
                method_is_head,
                client,
                minor,
            )
            .await
        } else {
            Err(true)
        };
        match resp {
            Ok(r) => break (c, r),
            // Nothing came back on a connection that had served before:
            // the upstream closed it while it sat idle. Once more on a new
            // one, when the request may be sent twice.
            Err(true) if c.reused && whole && retryable && attempt == 0 => {
                attempt += 1;
                up = ctx.pool.connect_h1(conn.orig, mark).await;
            }
            Err(_) => {
                tracing::debug!(orig = %conn.orig, "upstream request failed");
                fail(
                    ctx,
                    conn,
                    client,
                    out,
                    UpstreamError::Request,
                    grpc,
                    minor,
                    judged,
                    rule,
                )
                .await;
                return Exchange::End { unread: !whole };
            }
        }
    };

    let status = resp.status;
    if status == 101 {
        if !head.websocket {
            fail(
                ctx,
                conn,
                client,
                out,
                UpstreamError::Request,
                grpc,
                minor,
                judged,
                rule,
            )
            .await;
            return Exchange::End { unread: true };
        }
        out.clear();
        codec::write_response(out, &upc.buf, &resp, minor, false);
        out.extend_from_slice(&upc.buf[resp.len..]);
        upc.buf.clear();
        record(
            ctx,
            conn.dir,
            judged,
            Outcome {
                status,
                verdict: Verdict::Forwarded,
                rule: Some(rule),
                reason: None,
                grpc_status: 0,
            },
        );
        let ok = client.write_all(out).await.is_ok() && upc.stream.write_all(buf).await.is_ok();
        buf.clear();
        if let (true, Ok(cs)) = (ok, client.registered()) {
            let _ = tokio::io::copy_bidirectional(cs, &mut upc.stream).await;
        }
        return Exchange::Gone;
    }

    let close = head.closes() || resp.body == BodyKind::UntilClose || draining;
    out.clear();
    codec::write_response(out, &upc.buf, &resp, minor, close);
    let mut rframer = Framer::new(resp.body, l.max_header_bytes);
    let rk = match rframer.take(&upc.buf[resp.len..]) {
        Ok(k) => k,
        Err(_) => {
            fail(
                ctx,
                conn,
                client,
                out,
                UpstreamError::Request,
                grpc,
                minor,
                judged,
                rule,
            )
            .await;
            return Exchange::End { unread: false };
        }
    };
    out.extend_from_slice(&upc.buf[resp.len..resp.len + rk]);
    upc.buf.advance(resp.len + rk);
    record(
        ctx,
        conn.dir,
        judged,
        Outcome {
            status,
            verdict: Verdict::Forwarded,
            rule: Some(rule),
            reason: None,
            grpc_status: 0,
        },
    );
    let written = client.write_all(out).await;
    if written.is_err() {
        return Exchange::Gone;
    }
    if !rframer.done() {
        let relayed = match client.registered() {
            Ok(cs) => relay(&mut upc.stream, &mut upc.buf, cs, &mut rframer).await,
            Err(_) => Err(RelayError::Dst),
        };
        match relayed {
            Ok(()) => {}
            Err(RelayError::Dst) => return Exchange::Gone,
            Err(_) => {
                // The response was cut off (or misframed) after its head
                // went out: the client can only learn it from the close.
                ctx.metrics.upstream_error(UpstreamError::Request);
                return Exchange::End { unread: false };
            }
        }
    }
    if resp.reusable() && upc.buf.is_empty() && !head.websocket {
        held.keep(upc);
    }
    Exchange::Done { close }
}

/// Refuses a request before or without judging it (400 or 431, then the
/// connection closes), counted as `reason`.
async fn refuse_head(
    ctx: &Ctx,
    client: &mut Client,
    out: &mut Vec<u8>,
    status: http::StatusCode,
    reason: DropReason,
    minor: u8,
) {
    ctx.metrics.dropped(reason);
    out.clear();
    write_answer(out, &Answer::refuse_plain(status), minor, true);
    let _ = client.write_all(out).await;
}

/// A body whose framing broke after the head was judged: 400.
async fn refuse_malformed(ctx: &Ctx, client: &mut Client, out: &mut Vec<u8>, minor: u8) {
    refuse_head(
        ctx,
        client,
        out,
        http::StatusCode::BAD_REQUEST,
        DropReason::MalformedRequest,
        minor,
    )
    .await;
}

/// Answers an allowed request that could not be forwarded (502, 504 on a
/// connect timeout, gRPC UNAVAILABLE), counts it and records its flow.
#[allow(clippy::too_many_arguments)]
async fn fail(
    ctx: &Ctx,
    conn: &Conn,
    client: &mut Client,
    out: &mut Vec<u8>,
    e: UpstreamError,
    grpc: bool,
    minor: u8,
    judged: crate::inbound::Judged,
    rule: std::sync::Arc<str>,
) {
    let a = Answer::upstream(&ctx.metrics, e, grpc, rule);
    out.clear();
    write_answer(out, &a, minor, true);
    record(ctx, conn.dir, judged, a.outcome);
    let _ = client.write_all(out).await;
}

/// Reads the final response head from the upstream, passing interim (1xx)
/// responses on to an HTTP/1.1 client. `Err(true)`: the upstream closed
/// (or reset) before sending a byte; `Err(false)`: anything else wrong.
async fn read_response(
    c: &mut H1Conn,
    max_bytes: usize,
    max_headers: usize,
    method_is_head: bool,
    client: &mut Client,
    client_minor: u8,
) -> Result<ResponseHead, bool> {
    let method: &[u8] = if method_is_head { b"HEAD" } else { b"GET" };
    let mut any = false;
    loop {
        if !c.buf.is_empty() {
            any = true;
            match codec::parse_response(&c.buf, max_headers, method) {
                Ok(Some(r)) if (100..200).contains(&r.status) && r.status != 101 => {
                    if client_minor == 1 {
                        let mut interim = Vec::with_capacity(r.len);
                        codec::write_response(&mut interim, &c.buf, &r, 1, false);
                        client.write_all(&interim).await.map_err(|_| false)?;
                    }
                    c.buf.advance(r.len);
                    continue;
                }
                Ok(Some(r)) => return Ok(r),
                Ok(None) if c.buf.len() >= max_bytes => return Err(false),
                Ok(None) => {}
                Err(_) => return Err(false),
            }
        }
        match fill(&mut c.stream, &mut c.buf).await {
            Ok(n) if n > 0 => {}
            _ => return Err(!any),
        }
    }
}
