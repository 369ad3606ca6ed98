//! One client connection: sniff the protocol, serve HTTP/1.1 (the proxy's
//! own forwarding path, [`crate::h1`]) or HTTP/2 (hyper) under the
//! configured limits, judge every request ([`judge`], the same for both),
//! forward the allowed ones and answer the rest.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::Limits;
use crate::events::{Events, Flow};
use crate::h2guard::{GuardVerdict, H2Guard};
use crate::listener::canonical;
use crate::metrics::{DropReason, Metrics, Verdict};
use crate::rules::{normalize_path, PathError, PeerId, RequestView};
use crate::srcmap::SourceMap;
use crate::state::{Direction, SharedState};
use crate::upstream::{Body, Pool};

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

/// One accepted client connection.
pub(crate) struct Conn {
    pub(crate) peer: SocketAddr,
    pub(crate) orig: SocketAddr,
    pub(crate) dir: Direction,
    /// The identity the datapath judged an ingress client as, when its
    /// address names a node (another node's proxy speaking for a pod).
    src_identity: Option<u32>,
    pub(crate) served: AtomicU64,
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

/// Reads the first bytes of a connection into `buf` until they tell which
/// protocol it speaks. The bytes are read, not peeked: they stay in `buf`
/// for the protocol's parser, and a first line that arrives in pieces is
/// read as it comes instead of polled for.
async fn sniff(s: &mut TcpStream, buf: &mut bytes::BytesMut) -> io::Result<Sniff> {
    use tokio::io::AsyncReadExt as _;
    loop {
        if s.read_buf(buf).await? == 0 {
            return Ok(Sniff::Eof);
        }
        let b = &buf[..buf.len().min(PREFACE.len())];
        if b == PREFACE {
            return Ok(Sniff::H2);
        }
        if PREFACE.starts_with(b) {
            continue;
        }
        match b.iter().position(|c| *c == b' ') {
            Some(0) => return Ok(Sniff::NotHttp),
            Some(i) if b[..i].iter().all(|c| is_tchar(*c)) => return Ok(Sniff::H1),
            Some(_) => return Ok(Sniff::NotHttp),
            None if b.len() < PREFACE.len() && b.iter().all(|c| is_tchar(*c)) => {}
            None => return Ok(Sniff::NotHttp),
        }
    }
}

/// A connection whose first bytes were already read: they come first.
struct Prefixed {
    head: bytes::BytesMut,
    inner: TcpStream,
}

impl tokio::io::AsyncRead for Prefixed {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.head.is_empty() {
            let n = this.head.len().min(out.remaining());
            out.put_slice(&this.head.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

impl tokio::io::AsyncWrite for Prefixed {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        b: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, b)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Whether an address's identity is a reserved one (a node's, or world
/// when the snapshot lacks the node): the clients whose datapath identity
/// may differ from their address's. A pod's address names the pod.
fn is_reserved(identity: u32) -> bool {
    identity < sinew_abi::IDENTITY_MIN_CLUSTER
}

/// Serves one accepted connection until it ends or the drain completes.
/// `peer` is the address `accept` returned.
pub async fn serve(
    ctx: Arc<Ctx>,
    mut stream: TcpStream,
    peer: SocketAddr,
    dir: Direction,
    mut drain: watch::Receiver<bool>,
) {
    let Ok(local) = stream.local_addr() else {
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

    let accepted = Instant::now();
    let mut first = bytes::BytesMut::with_capacity(8 * 1024);
    let kind = match tokio::time::timeout(ctx.limits.header_read_timeout, sniff(&mut stream, &mut first)).await {
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
    });
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
            crate::h1::serve(&ctx, &conn, stream, first, accepted, drain).await;
            return;
        }
        Sniff::H2 => {
            let svc = {
                let ctx = ctx.clone();
                let conn = conn.clone();
                service_fn(move |req| handle(ctx.clone(), conn.clone(), req))
            };
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .max_concurrent_streams(l.h2_max_concurrent_streams)
                .max_pending_accept_reset_streams(l.h2_max_pending_accept_reset_streams)
                .max_local_error_reset_streams(l.h2_max_local_error_reset_streams)
                .max_header_list_size(l.h2_max_header_list_size)
                .keep_alive_interval(l.h2_keepalive_interval)
                .keep_alive_timeout(l.h2_keepalive_timeout);
            let io = H2Guard::new(
                Prefixed {
                    head: first,
                    inner: stream,
                },
                h2_verdict.clone(),
                ctx.metrics.clone(),
            );
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
        if let Some(reason) = classify(&e) {
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

fn classify(e: &hyper::Error) -> Option<DropReason> {
    if e.is_canceled() || e.is_closed() || e.is_incomplete_message() || has_io_source(e) {
        None
    } else {
        // GOAWAY for rapid reset or a flood, a client that stopped
        // answering keep-alive PINGs, or a protocol error.
        Some(DropReason::H2Protocol)
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

fn host_of(req: &Request<Incoming>) -> String {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST).and_then(|v| v.to_str().ok()))
        .unwrap_or_default();
    crate::h1::codec::host_name(raw)
}

pub(crate) struct Outcome {
    pub(crate) status: u16,
    pub(crate) verdict: Verdict,
    pub(crate) rule: Option<Arc<str>>,
    pub(crate) reason: Option<DropReason>,
    pub(crate) grpc_status: u32,
}

/// An answer the proxy gives itself: a refusal, a denial, or an upstream
/// that failed.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) body: &'static str,
    /// HTTP/1: the connection ends after it.
    pub(crate) close: bool,
    /// gRPC: a trailers-only answer with this status and message instead.
    pub(crate) grpc: Option<(u32, &'static str)>,
    pub(crate) outcome: Outcome,
}

impl Answer {
    fn refuse(status: StatusCode, reason: DropReason, body: &'static str) -> Self {
        Answer {
            status,
            body,
            close: true,
            grpc: None,
            outcome: Outcome {
                status: status.as_u16(),
                verdict: Verdict::Error,
                rule: None,
                reason: Some(reason),
                grpc_status: 0,
            },
        }
    }

    /// A refusal of a head that was never judged (no flow, no outcome
    /// counted): 400 or 431.
    pub(crate) fn refuse_plain(status: StatusCode) -> Self {
        let body = if status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE {
            "Request Header Fields Too Large\n"
        } else {
            "Bad Request\n"
        };
        let mut a = Answer::refuse(status, DropReason::MalformedRequest, body);
        a.outcome.reason = None;
        a
    }

    fn deny(grpc: bool, reason: DropReason) -> Self {
        Answer {
            status: if grpc { StatusCode::OK } else { StatusCode::FORBIDDEN },
            body: "Access denied\n",
            close: false,
            grpc: grpc.then_some((7, "permission denied")),
            outcome: Outcome {
                status: if grpc { 200 } else { 403 },
                verdict: Verdict::Denied,
                rule: None,
                reason: Some(reason),
                grpc_status: if grpc { 7 } else { 0 },
            },
        }
    }

    /// The allowed request could not be forwarded: 502, 504 on a connect
    /// timeout, gRPC UNAVAILABLE (14). Counted as an upstream error.
    pub(crate) fn upstream(metrics: &Metrics, e: crate::metrics::UpstreamError, grpc: bool, rule: Arc<str>) -> Self {
        metrics.upstream_error(e);
        let status = if grpc {
            StatusCode::OK
        } else if e == crate::metrics::UpstreamError::ConnectTimeout {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        };
        Answer {
            status,
            body: "Bad Gateway\n",
            close: false,
            grpc: grpc.then_some((14, "unavailable")),
            outcome: Outcome {
                status: status.as_u16(),
                verdict: Verdict::Error,
                rule: Some(rule),
                reason: None,
                grpc_status: if grpc { 14 } else { 0 },
            },
        }
    }

    /// As a hyper response (HTTP/2).
    fn response(&self) -> Response<Body> {
        match self.grpc {
            Some((code, message)) => grpc_status(code, message),
            None => full(self.status, self.body),
        }
    }
}

/// What is asked of the rules about one request.
pub(crate) struct Ask<'a> {
    pub(crate) protocol: &'static str,
    pub(crate) method: http::Method,
    /// As rules match it ([`crate::h1::codec::host_name`]).
    pub(crate) host: String,
    /// The target's path as received; None when the target names no path
    /// (authority or asterisk form, CONNECT).
    pub(crate) path: Option<&'a str>,
    pub(crate) headers: &'a dyn sinew_l7::Headers,
    pub(crate) grpc: bool,
}

pub(crate) enum Decision {
    Answer(Answer),
    /// Allowed: forward with the normalised path (the flow's), as the
    /// client's identity.
    Forward {
        mark: u32,
        rule: Arc<str>,
    },
}

/// One request being judged and then answered: its flow event so far.
pub(crate) struct Judged {
    pub(crate) flow: Flow,
    start: Instant,
    /// The destination's own ingress judgement, when this proxy makes it
    /// (egress to a pod of this node): its rule and drop reason.
    local_ingress: Option<(Option<Arc<str>>, Option<DropReason>)>,
}

/// Judges a request against the snapshot in force.
pub(crate) fn judge(ctx: &Ctx, conn: &Conn, ask: Ask<'_>) -> (Judged, Decision) {
    conn.served.fetch_add(1, Relaxed);
    let start = Instant::now();
    let snap = ctx.state.load();
    let (ep_ip, peer_ip) = match conn.dir {
        Direction::Ingress => (conn.orig.ip(), conn.peer.ip()),
        Direction::Egress => (conn.peer.ip(), conn.orig.ip()),
    };
    let peer = match conn.src_identity {
        Some(id) => snap.peer_of_identity(id),
        None => snap.peer(peer_ip),
    };
    let rules = snap.endpoint(ep_ip, conn.dir, conn.orig.port());
    let endpoint = rules.map(|r| r.endpoint.clone()).unwrap_or_else(|| snap.peer(ep_ip));
    let (src_peer, dst_peer) = match conn.dir {
        Direction::Ingress => (peer.clone(), endpoint),
        Direction::Egress => (endpoint, peer.clone()),
    };
    let mut flow = Flow {
        time: SystemTime::now(),
        direction: conn.dir,
        src: conn.peer,
        dst: conn.orig,
        src_peer,
        dst_peer,
        protocol: ask.protocol,
        method: ask.method,
        host: ask.host,
        path: String::new(),
        status: 0,
        latency: Duration::ZERO,
        verdict: Verdict::Error,
        rule: None,
        drop_reason: None,
        grpc_status: 0,
    };
    let src_identity = flow.src_peer.identity;
    let grpc = ask.grpc;
    let mut local_ingress = None;
    let decision = 'judge: {
        let Some(raw) = ask.path else {
            break 'judge Decision::Answer(Answer::refuse(
                StatusCode::BAD_REQUEST,
                DropReason::InvalidTarget,
                "Bad Request\n",
            ));
        };
        let path = match normalize_path(raw) {
            Ok(p) => p,
            Err(PathError::NotAbsolute) => {
                break 'judge Decision::Answer(Answer::refuse(
                    StatusCode::BAD_REQUEST,
                    DropReason::InvalidTarget,
                    "Bad Request\n",
                ))
            }
            Err(_) => {
                break 'judge Decision::Answer(Answer::refuse(
                    StatusCode::BAD_REQUEST,
                    DropReason::AmbiguousPath,
                    "Bad Request\n",
                ))
            }
        };
        flow.path = path;
        let path = flow.path.as_str();
        let Some(rules) = rules else {
            break 'judge Decision::Answer(Answer::deny(grpc, DropReason::NoRules));
        };
        let view = RequestView {
            method: flow.method.as_str(),
            path,
            host: &flow.host,
            headers: ask.headers,
            grpc,
        };
        let who = PeerId {
            identity: peer.identity,
            cidr_class: snap.cidr_class(peer_ip),
        };
        let Some(rule) = rules.judge(who, &view) else {
            break 'judge Decision::Answer(Answer::deny(grpc, DropReason::PolicyDenied));
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
                        let mut a = Answer::deny(grpc, DropReason::PolicyDenied);
                        a.outcome.verdict = Verdict::Forwarded;
                        a.outcome.reason = None;
                        a.outcome.rule = Some(rule);
                        break 'judge Decision::Answer(a);
                    }
                }
            }
        }
        let Some(mark) = sinew_abi::proxy_upstream_mark(src_identity) else {
            let mut a = Answer::refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                DropReason::UnmarkableIdentity,
                "Service Unavailable\n",
            );
            a.outcome.rule = Some(rule);
            break 'judge Decision::Answer(a);
        };
        Decision::Forward { mark, rule }
    };
    (
        Judged {
            flow,
            start,
            local_ingress,
        },
        decision,
    )
}

/// Counts a judged request and emits its flow event(s), once its answer
/// (or the upstream's response head) is known.
pub(crate) fn record(ctx: &Ctx, dir: Direction, j: Judged, outcome: Outcome) {
    let Judged {
        mut flow,
        start,
        local_ingress,
    } = j;
    let latency = start.elapsed();
    if let Some(r) = outcome.reason {
        ctx.metrics.dropped(r);
    }
    ctx.metrics.request(dir, outcome.verdict, outcome.status, latency);
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
        return;
    }
    ctx.events.emit(flow);
}

/// One HTTP/2 request (hyper's server): judged, then forwarded or answered.
async fn handle(ctx: Arc<Ctx>, conn: Arc<Conn>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let grpc = is_grpc(req.headers());
    // The target must be a path: origin form, or the absolute form of
    // HTTP/2 and proxies. Authority and asterisk forms are not ours.
    let uri = req.uri();
    let targets_path = match uri.scheme_str() {
        None => uri.authority().is_none(),
        Some(s) => s == "http" || s == "https",
    } && req.method() != http::Method::CONNECT;
    let host = host_of(&req);
    let ask = Ask {
        protocol: if grpc { "gRPC" } else { "HTTP/2" },
        method: req.method().clone(),
        host,
        path: targets_path.then(|| uri.path()),
        headers: req.headers(),
        grpc,
    };
    let (judged, decision) = judge(&ctx, &conn, ask);
    let (resp, outcome) = match decision {
        Decision::Answer(a) => {
            let r = a.response();
            (r, a.outcome)
        }
        Decision::Forward { mark, rule } => {
            let path = judged.flow.path.clone();
            forward(&ctx, &conn, req, path, mark, rule, grpc).await
        }
    };
    record(&ctx, conn.dir, judged, outcome);
    Ok(resp)
}

/// Forwards an allowed HTTP/2 request on the pooled HTTP/2 connection to
/// its original destination, with the normalised path.
async fn forward(
    ctx: &Ctx,
    conn: &Arc<Conn>,
    req: Request<Incoming>,
    path: String,
    mark: u32,
    rule: Arc<str>,
    grpc: bool,
) -> (Response<Body>, Outcome) {
    let fail = |e, rule| {
        let a = Answer::upstream(&ctx.metrics, e, grpc, rule);
        (a.response(), a.outcome)
    };
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, false, true);
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| conn.orig.to_string());
    let pq = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    match Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(pq)
        .build()
    {
        Ok(u) => parts.uri = u,
        Err(_) => return fail(crate::metrics::UpstreamError::Request, rule),
    }
    let up_req = Request::from_parts(parts, body.boxed());
    let mut sender = match ctx.pool.checkout_h2(conn.orig, mark).await {
        Ok(s) => s,
        Err(e) => return fail(e, rule),
    };
    let mut resp = match sender.send_request(up_req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(orig = %conn.orig, error = %e, "upstream request failed");
            return fail(crate::metrics::UpstreamError::Request, rule);
        }
    };
    let status = resp.status();
    strip_hop_by_hop(resp.headers_mut(), false, false);
    (
        resp.map(|b| b.boxed()),
        Outcome {
            status: status.as_u16(),
            verdict: Verdict::Forwarded,
            rule: Some(rule),
            reason: None,
            grpc_status: 0,
        },
    )
}
