//! One client connection: sniff the protocol, serve HTTP/1.1 or HTTP/2
//! with hyper under the configured limits, judge every request, forward
//! the allowed ones and answer the rest.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::Limits;
use crate::events::{Events, Flow};
use crate::h1guard::{Findings, GuardedIo};
use crate::h2guard::{GuardVerdict, H2Guard};
use crate::listener::canonical;
use crate::metrics::{DropReason, Metrics, Verdict};
use crate::rules::{normalize_path, PathError, PeerId, RequestView};
use crate::srcmap::SourceMap;
use crate::state::{Direction, SharedState};
use crate::upstream::{ready_h1, Body, Pool, Proto, Sender};
use hyper::client::conn::http1;

pub struct Ctx {
    pub state: Arc<SharedState>,
    pub metrics: Arc<Metrics>,
    pub pool: Arc<Pool>,
    pub events: Events,
    pub limits: Limits,
    pub original_dst_override: Option<SocketAddr>,
    /// The datapath's record of ingress clients' identities.
    pub source_map: Option<SourceMap>,
}

struct Conn {
    peer: SocketAddr,
    orig: SocketAddr,
    dir: Direction,
    /// The identity the datapath judged an ingress client as, when its
    /// address names a node (another node's proxy speaking for a pod).
    src_identity: Option<u32>,
    served: AtomicU64,
    /// HTTP/1 heads the smuggling guard found ambiguous.
    findings: Arc<Findings>,
    /// This client connection's own upstream HTTP/1 connection, with the
    /// mark it was opened with. An HTTP/1 client sends one request at a
    /// time, so it keeps one upstream connection for its life instead of
    /// going through the shared pool per request (a lock, a lookup and a
    /// task per request, and connections churned when the pool's idle
    /// list overflowed). Back to the pool when the client leaves, and
    /// after every exchange while too many clients hold one
    /// ([`Pool::hold`]).
    upstream: std::sync::Mutex<Option<(u32, http1::SendRequest<Body>)>>,
    pool: Arc<Pool>,
}

impl Conn {
    /// Keeps `s` for this connection's next request, or gives it to the
    /// pool when this connection already has one.
    fn keep_upstream(&self, mark: u32, s: http1::SendRequest<Body>) {
        let mut slot = self.upstream.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() && self.pool.hold() {
            *slot = Some((mark, s));
        } else {
            drop(slot);
            self.pool.give_back_h1(self.orig, mark, s);
        }
    }

    /// This connection's upstream connection for `mark`, ready for a
    /// request; None when it has none (or it closed, or the client's
    /// identity, hence the mark, changed).
    async fn own_upstream(&self, mark: u32) -> Option<http1::SendRequest<Body>> {
        let (m, mut s) = self.upstream.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        self.pool.unhold();
        if m != mark {
            self.pool.give_back_h1(self.orig, m, s);
            return None;
        }
        ready_h1(&mut s).await.then_some(s)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some((mark, s)) = self.upstream.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            self.pool.unhold();
            self.pool.give_back_h1(self.orig, mark, s);
        }
    }
}

/// An upstream HTTP/1 response body that gives its connection back when
/// it is done with (read to the end, or dropped), to the client
/// connection it served.
struct GiveBack {
    body: Incoming,
    back: Option<(Arc<Conn>, u32, http1::SendRequest<Body>)>,
}

impl hyper::body::Body for GiveBack {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        if let Some((conn, mark, s)) = self.back.take() {
            conn.keep_upstream(mark, s);
        }
    }
}

enum Sniff {
    H1,
    H2,
    NotHttp,
    Eof,
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

async fn sniff(s: &TcpStream) -> io::Result<Sniff> {
    let mut buf = [0u8; 24];
    loop {
        let n = s.peek(&mut buf).await?;
        if n == 0 {
            return Ok(Sniff::Eof);
        }
        let b = &buf[..n];
        if b == PREFACE {
            return Ok(Sniff::H2);
        }
        let partial = if PREFACE.starts_with(b) {
            true
        } else {
            match b.iter().position(|c| *c == b' ') {
                Some(0) => return Ok(Sniff::NotHttp),
                Some(i) if b[..i].iter().all(|c| is_tchar(*c)) => return Ok(Sniff::H1),
                Some(_) => return Ok(Sniff::NotHttp),
                None if n < buf.len() && b.iter().all(|c| is_tchar(*c)) => true,
                None => return Ok(Sniff::NotHttp),
            }
        };
        if partial {
            // More of the first line is on its way; peek returns at once
            // while bytes are queued, so wait a little between looks.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Whether an address's identity is a reserved one (a node's, or world
/// when the snapshot lacks the node): the clients whose datapath identity
/// may differ from their address's. A pod's address names the pod.
fn is_reserved(identity: u32) -> bool {
    identity < sinew_abi::IDENTITY_MIN_CLUSTER
}

/// Serves one accepted connection until it ends or the drain completes.
pub async fn serve(ctx: Arc<Ctx>, stream: TcpStream, dir: Direction, mut drain: watch::Receiver<bool>) {
    let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else {
        return;
    };
    let peer = canonical(peer);
    let orig = ctx.original_dst_override.unwrap_or(canonical(local));
    ctx.metrics.connection_opened(dir);
    struct Guard<'a>(&'a Metrics, Direction);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            self.0.connection_closed(self.1);
        }
    }
    let _guard = Guard(&ctx.metrics, dir);
    let _ = stream.set_nodelay(true);

    let kind = match tokio::time::timeout(ctx.limits.header_read_timeout, sniff(&stream)).await {
        Ok(Ok(k)) => k,
        Ok(Err(_)) => return,
        Err(_) => {
            ctx.metrics.dropped(DropReason::HeaderTimeout);
            return;
        }
    };
    let src_identity = match (dir, &ctx.source_map, peer, orig) {
        (Direction::Ingress, Some(m), SocketAddr::V4(p), SocketAddr::V4(o))
            if is_reserved(ctx.state.load().peer(std::net::IpAddr::V4(*p.ip())).identity) =>
        {
            m.lookup(p, o)
        }
        _ => None,
    };
    let conn = Arc::new(Conn {
        peer,
        orig,
        dir,
        src_identity,
        served: AtomicU64::new(0),
        findings: Arc::new(Findings::default()),
        upstream: std::sync::Mutex::new(None),
        pool: ctx.pool.clone(),
    });
    let svc = {
        let ctx = ctx.clone();
        let conn = conn.clone();
        service_fn(move |req| handle(ctx.clone(), conn.clone(), req))
    };
    let l = &ctx.limits;
    let h2_verdict = Arc::new(GuardVerdict::default());
    let result = match kind {
        Sniff::Eof => return,
        Sniff::NotHttp => {
            tracing::debug!(%peer, %orig, "not HTTP on an L7 port, closing");
            ctx.metrics.dropped(DropReason::NotHttp);
            return;
        }
        Sniff::H1 => {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(l.header_read_timeout)
                .max_buf_size(l.max_header_bytes)
                .max_headers(l.max_headers)
                .keep_alive(true)
                // A client may shut down its sending side once the request
                // is out and wait for the answer (RFC 9112 9.6; HTTP/1.0
                // clients, `nc -N`): an EOF after a complete request is not
                // a reason to drop it.
                .half_close(true);
            // Room for a head hyper still accepts; a longer one is its 431.
            let io = TokioIo::new(GuardedIo::new(stream, l.max_header_bytes, conn.findings.clone()));
            let c = b.serve_connection(io, svc).with_upgrades();
            tokio::pin!(c);
            // A connection accepted just before the drain may have its first
            // request on the way: closing it idle would fail that request,
            // so the shutdown waits for the first request (or the header
            // timeout) and then makes it the last.
            let mut state = 0u8; // 0 serving, 1 drain pending, 2 shut down
            let pending_since = std::cell::Cell::new(None::<Instant>);
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tokio::select! {
                    r = c.as_mut() => break r,
                    r = drain.changed(), if state == 0 => {
                        if r.is_err() || *drain.borrow() {
                            state = 1;
                            pending_since.set(Some(Instant::now()));
                        }
                    }
                    _ = tick.tick(), if state == 1 => {
                        let waited = pending_since.get().map(|t| t.elapsed()).unwrap_or_default();
                        if conn.served.load(Relaxed) > 0 || waited >= l.header_read_timeout {
                            state = 2;
                            c.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
        }
        Sniff::H2 => {
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .max_concurrent_streams(l.h2_max_concurrent_streams)
                .max_pending_accept_reset_streams(l.h2_max_pending_accept_reset_streams)
                .max_local_error_reset_streams(l.h2_max_local_error_reset_streams)
                .max_header_list_size(l.h2_max_header_list_size)
                .keep_alive_interval(l.h2_keepalive_interval)
                .keep_alive_timeout(l.h2_keepalive_timeout);
            let io = H2Guard::new(stream, h2_verdict.clone(), ctx.metrics.clone());
            let c = b.serve_connection(TokioIo::new(io), svc);
            tokio::pin!(c);
            let mut draining = false;
            loop {
                tokio::select! {
                    r = c.as_mut() => break r,
                    r = drain.changed(), if !draining => {
                        if r.is_err() || *drain.borrow() {
                            draining = true;
                            c.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
        }
    };
    if let Some((frame_type, code)) = h2_verdict.get() {
        // The guard answered a frame h2 would have refused with another
        // code (h2guard.rs); the connection ended with an I/O error that
        // `classify` does not count.
        tracing::debug!(%peer, %orig, frame_type, code, "HTTP/2 connection error, GOAWAY sent");
        ctx.metrics.dropped(DropReason::H2Protocol);
        return;
    }
    if let Err(e) = result {
        let smuggling = conn.findings.any().filter(|_| e.is_parse());
        if let Some(f) = smuggling {
            // hyper refused the ambiguous head itself (two different
            // Content-Lengths, obs-fold) and answered 400.
            tracing::debug!(%peer, %orig, finding = f.name(), "request smuggling refused");
            ctx.metrics.dropped(DropReason::Smuggling);
        } else if let Some(reason) = classify(&e, matches!(kind, Sniff::H2)) {
            tracing::debug!(%peer, %orig, reason = reason.name(), error = %e, "connection refused");
            ctx.metrics.dropped(reason);
        }
    }
}

fn has_io_source(e: &hyper::Error) -> bool {
    let mut s: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(x) = s {
        if x.is::<io::Error>() {
            return true;
        }
        s = x.source();
    }
    false
}

fn classify(e: &hyper::Error, h2: bool) -> Option<DropReason> {
    if e.is_canceled() || e.is_closed() || e.is_incomplete_message() || has_io_source(e) {
        None
    } else if h2 {
        // GOAWAY for rapid reset or a flood, a client that stopped
        // answering keep-alive PINGs, or a protocol error.
        Some(DropReason::H2Protocol)
    } else if e.is_parse_too_large() {
        Some(DropReason::HeaderTooLarge)
    } else if e.is_timeout() {
        Some(DropReason::HeaderTimeout)
    } else if e.is_parse() {
        Some(DropReason::MalformedRequest)
    } else {
        None
    }
}

fn full(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|n| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn grpc_status(code: u32, message: &'static str) -> Response<Body> {
    // Trailers-only: the status rides in the only HEADERS frame.
    let mut r = Response::new(Empty::new().map_err(|n| match n {}).boxed());
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code));
    h.insert("grpc-message", HeaderValue::from_static(message));
    r
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "http2-settings",
    "trailer",
];

fn is_hop_by_hop(n: &header::HeaderName) -> bool {
    HOP_BY_HOP.contains(&n.as_str())
}

fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool, keep_te_trailers: bool) {
    // Most messages carry none: one pass over the names finds out, where
    // removing each listed name would hash it whether present or not.
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    let listed: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    let te_trailers = h
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for n in HOP_BY_HOP {
        if keep_upgrade && (n == "connection" || n == "upgrade") {
            continue;
        }
        h.remove(n);
    }
    if !keep_upgrade {
        for n in listed {
            if n != "upgrade" {
                h.remove(n.as_str());
            }
        }
    }
    if keep_te_trailers && te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

fn is_websocket(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

fn host_of(req: &Request<Incoming>) -> String {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let h = match raw.rsplit_once(':') {
        Some((h, p))
            if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(']') || h.starts_with('[') && h.ends_with(']') =>
        {
            h.to_owned()
        }
        _ => raw,
    };
    h.to_ascii_lowercase()
}

struct Outcome {
    status: u16,
    verdict: Verdict,
    rule: Option<Arc<str>>,
    reason: Option<DropReason>,
    grpc_status: u32,
}

async fn handle(ctx: Arc<Ctx>, conn: Arc<Conn>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let ordinal = conn.served.fetch_add(1, Relaxed);
    let start = Instant::now();
    let snap = ctx.state.load();
    let grpc = is_grpc(req.headers());
    let protocol = if grpc {
        "gRPC"
    } else if req.version() == Version::HTTP_2 {
        "HTTP/2"
    } else if req.version() == Version::HTTP_10 {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    };
    let (ep_ip, peer_ip) = match conn.dir {
        Direction::Ingress => (conn.orig.ip(), conn.peer.ip()),
        Direction::Egress => (conn.peer.ip(), conn.orig.ip()),
    };
    let peer = match conn.src_identity {
        Some(id) => snap.peer_of_identity(id),
        None => snap.peer(peer_ip),
    };
    let rules = snap.endpoint(ep_ip, conn.dir, conn.orig.port()).cloned();
    let endpoint = rules
        .as_ref()
        .map(|r| r.endpoint.clone())
        .unwrap_or_else(|| snap.peer(ep_ip));
    let (src_peer, dst_peer) = match conn.dir {
        Direction::Ingress => (peer.clone(), endpoint),
        Direction::Egress => (endpoint, peer.clone()),
    };
    let method = req.method().clone();
    let host = host_of(&req);
    let mut flow = Flow {
        time: SystemTime::now(),
        direction: conn.dir,
        src: conn.peer,
        dst: conn.orig,
        src_peer,
        dst_peer,
        protocol,
        method,
        host,
        path: String::new(),
        status: 0,
        latency: Duration::ZERO,
        verdict: Verdict::Error,
        rule: None,
        drop_reason: None,
        grpc_status: 0,
    };
    let src_identity = flow.src_peer.identity;
    let is_h1 = req.version() != Version::HTTP_2;

    let refuse = |status: StatusCode, reason: DropReason, body: &'static str| {
        let mut r = full(status, body);
        if is_h1 {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        (
            r,
            Outcome {
                status: status.as_u16(),
                verdict: Verdict::Error,
                rule: None,
                reason: Some(reason),
                grpc_status: 0,
            },
        )
    };

    // The destination's own ingress judgement, when this proxy makes it
    // (egress to a pod of this node): its rule and drop reason.
    let mut local_ingress: Option<(Option<Arc<str>>, Option<DropReason>)> = None;
    let (resp, outcome) = 'judge: {
        // Content-Length with Transfer-Encoding, or two Content-Lengths:
        // a hop that frames the body the other way would see another
        // request in it. Refused, and the connection closes.
        if is_h1 && conn.findings.at(ordinal).is_some() {
            break 'judge refuse(StatusCode::BAD_REQUEST, DropReason::Smuggling, "Bad Request\n");
        }
        // The target must be a path: origin form, or the absolute form of
        // HTTP/2 and proxies. Authority and asterisk forms are not ours.
        let uri = req.uri();
        let targets_path = match uri.scheme_str() {
            None => uri.authority().is_none(),
            Some(s) => s == "http" || s == "https",
        };
        if !targets_path || req.method() == http::Method::CONNECT {
            break 'judge refuse(StatusCode::BAD_REQUEST, DropReason::InvalidTarget, "Bad Request\n");
        }
        let path = match normalize_path(uri.path()) {
            Ok(p) => p,
            Err(PathError::NotAbsolute) => {
                break 'judge refuse(StatusCode::BAD_REQUEST, DropReason::InvalidTarget, "Bad Request\n")
            }
            Err(_) => break 'judge refuse(StatusCode::BAD_REQUEST, DropReason::AmbiguousPath, "Bad Request\n"),
        };
        flow.path.clone_from(&path);
        let Some(rules) = rules else {
            break 'judge deny(grpc, DropReason::NoRules);
        };
        let view = RequestView {
            method: flow.method.as_str(),
            path: &path,
            host: &flow.host,
            headers: req.headers(),
            grpc,
        };
        let who = PeerId {
            identity: peer.identity,
            cidr_class: snap.cidr_class(peer_ip),
        };
        let Some(rule) = rules.judge(who, &view) else {
            break 'judge deny(grpc, DropReason::PolicyDenied);
        };
        // Egress to a pod of this node whose ingress rules cover the port:
        // the upstream connection is not redirected again (the datapath
        // passes the proxy's marked packets, bpf_lxc.c to_container), so
        // those rules are judged here, as the destination's node would
        // judge them, with the client as the peer.
        if conn.dir == Direction::Egress {
            if let Some(ingress) = snap.endpoint(conn.orig.ip(), Direction::Ingress, conn.orig.port()) {
                let client = PeerId {
                    identity: src_identity,
                    cidr_class: snap.cidr_class(conn.peer.ip()),
                };
                match ingress.judge(client, &view) {
                    Some(r) => local_ingress = Some((Some(r), None)),
                    None => {
                        local_ingress = Some((None, Some(DropReason::PolicyDenied)));
                        // Egress forwarded it; the destination refused it.
                        let (r, mut o) = deny(grpc, DropReason::PolicyDenied);
                        o.verdict = Verdict::Forwarded;
                        o.reason = None;
                        o.rule = Some(rule);
                        break 'judge (r, o);
                    }
                }
            }
        }
        let Some(mark) = sinew_abi::proxy_upstream_mark(src_identity) else {
            let (r, mut o) = refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                DropReason::UnmarkableIdentity,
                "Service Unavailable\n",
            );
            o.rule = Some(rule);
            break 'judge (r, o);
        };
        forward(&ctx, &conn, req, path, mark, rule).await
    };

    let latency = start.elapsed();
    if let Some(r) = outcome.reason {
        ctx.metrics.dropped(r);
    }
    ctx.metrics.request(conn.dir, outcome.verdict, outcome.status, latency);
    flow.drop_reason = outcome.reason;
    flow.status = outcome.status;
    flow.latency = latency;
    flow.verdict = outcome.verdict;
    flow.rule = outcome.rule;
    flow.grpc_status = outcome.grpc_status;
    if let Some((rule, reason)) = local_ingress {
        let verdict = match (reason, outcome.verdict) {
            (Some(_), _) => Verdict::Denied,
            (None, v) => v,
        };
        if let Some(r) = reason {
            ctx.metrics.dropped(r);
        }
        ctx.metrics
            .request(Direction::Ingress, verdict, outcome.status, latency);
        let mut second = flow.clone();
        second.direction = Direction::Ingress;
        second.verdict = verdict;
        second.rule = rule;
        second.drop_reason = reason;
        ctx.events.emit(flow);
        ctx.events.emit(second);
        return Ok(resp);
    }
    ctx.events.emit(flow);
    Ok(resp)
}

fn deny(grpc: bool, reason: DropReason) -> (Response<Body>, Outcome) {
    if grpc {
        (
            grpc_status(7, "permission denied"),
            Outcome {
                status: 200,
                verdict: Verdict::Denied,
                rule: None,
                reason: Some(reason),
                grpc_status: 7,
            },
        )
    } else {
        (
            full(StatusCode::FORBIDDEN, "Access denied\n"),
            Outcome {
                status: 403,
                verdict: Verdict::Denied,
                rule: None,
                reason: Some(reason),
                grpc_status: 0,
            },
        )
    }
}

async fn forward(
    ctx: &Ctx,
    conn: &Arc<Conn>,
    req: Request<Incoming>,
    path: String,
    mark: u32,
    rule: Arc<str>,
) -> (Response<Body>, Outcome) {
    let grpc = is_grpc(req.headers());
    let h2 = req.version() == Version::HTTP_2;
    let websocket = is_websocket(&req);
    let upstream_err = |e: crate::metrics::UpstreamError, rule: Arc<str>| {
        ctx.metrics.upstream_error(e);
        let timeout = e == crate::metrics::UpstreamError::ConnectTimeout;
        if grpc {
            let r = grpc_status(14, "unavailable");
            (
                r,
                Outcome {
                    status: 200,
                    verdict: Verdict::Error,
                    rule: Some(rule),
                    reason: None,
                    grpc_status: 14,
                },
            )
        } else {
            let s = if timeout {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::BAD_GATEWAY
            };
            (
                full(s, "Bad Gateway\n"),
                Outcome {
                    status: s.as_u16(),
                    verdict: Verdict::Error,
                    rule: Some(rule),
                    reason: None,
                    grpc_status: 0,
                },
            )
        }
    };

    let mut req = req;
    let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, websocket, h2);
    let pq = || match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    if h2 {
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_else(|| conn.orig.to_string());
        match Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(pq())
            .build()
        {
            Ok(u) => parts.uri = u,
            Err(_) => return upstream_err(crate::metrics::UpstreamError::Request, rule),
        }
    } else if parts.uri.authority().is_some() || parts.uri.path() != path {
        // The absolute form, or a path that normalising changed: the
        // upstream gets the origin form of what was judged. Otherwise the
        // target is already exactly that, and is forwarded as it came.
        match pq().parse() {
            Ok(u) => parts.uri = u,
            Err(_) => return upstream_err(crate::metrics::UpstreamError::Request, rule),
        }
    }
    let up_req = Request::from_parts(parts, body.boxed());
    let proto = if h2 { Proto::Http2 } else { Proto::Http1 };
    let sender = if websocket {
        // An upgraded connection is never pooled.
        match ctx.pool.connect(conn.orig, mark).await {
            Ok(s) => match hyper::client::conn::http1::handshake(TokioIo::new(s)).await {
                Ok((send, c)) => {
                    tokio::spawn(async move {
                        let _ = c.with_upgrades().await;
                    });
                    Sender::H1(send)
                }
                Err(_) => return upstream_err(crate::metrics::UpstreamError::Handshake, rule),
            },
            Err(e) => return upstream_err(e, rule),
        }
    } else if let Some(s) = match proto {
        Proto::Http1 => conn.own_upstream(mark).await,
        Proto::Http2 => None,
    } {
        Sender::H1(s)
    } else {
        match ctx.pool.checkout(conn.orig, mark, proto).await {
            Ok(s) => s,
            Err(e) => return upstream_err(e, rule),
        }
    };
    let (res, give_back) = match sender {
        Sender::H1(mut s) => {
            let r = s.send_request(up_req).await;
            (r, (!websocket).then_some(s))
        }
        Sender::H2(mut s) => (s.send_request(up_req).await, None),
    };
    let mut resp = match res {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(orig = %conn.orig, error = %e, "upstream request failed");
            return upstream_err(crate::metrics::UpstreamError::Request, rule);
        }
    };
    let status = resp.status();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(c), Ok(u)) = tokio::join!(client_upgrade, upstream_upgrade) {
                    let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u)).await;
                }
            });
            let (parts, _) = resp.into_parts();
            let r = Response::from_parts(parts, Empty::new().map_err(|n| match n {}).boxed());
            return (
                r,
                Outcome {
                    status: 101,
                    verdict: Verdict::Forwarded,
                    rule: Some(rule),
                    reason: None,
                    grpc_status: 0,
                },
            );
        }
    }
    strip_hop_by_hop(resp.headers_mut(), false, false);
    let r = match give_back {
        Some(s) => resp.map(|body| {
            GiveBack {
                body,
                back: Some((conn.clone(), mark, s)),
            }
            .boxed()
        }),
        None => resp.map(|b| b.boxed()),
    };
    (
        r,
        Outcome {
            status: status.as_u16(),
            verdict: Verdict::Forwarded,
            rule: Some(rule),
            reason: None,
            grpc_status: 0,
        },
    )
}
