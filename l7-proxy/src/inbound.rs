//! One client connection: sniff the protocol, serve HTTP/1.1
//! ([`crate::h1`]) or HTTP/2 ([`crate::h2`]), both the proxy's own
//! forwarding paths, under the configured limits, judge every request ([`judge`], the same for both),
//! forward the allowed ones and answer the rest.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::StatusCode;
use tokio::sync::watch;

use crate::config::Limits;
use crate::events::{Events, Flow};
use crate::h2::frame::PREFACE;
use crate::listener::canonical;
use crate::metrics::{DropReason, Metrics, Verdict};
use crate::netio::Client;
use crate::rules::{normalize_path, PathError, PeerId, RequestView};
use crate::srcmap::SourceMap;
use crate::state::{Direction, SharedState};
use crate::upstream::Pool;

pub struct Ctx {
    pub state: Arc<SharedState>,
    pub metrics: Arc<Metrics>,
    pub pool: Arc<Pool>,
    pub events: Events,
    pub limits: Limits,
    pub original_dst_override: Option<SocketAddr>,
    /// The datapath's record of ingress clients' identities.
    pub source_map: Option<SourceMap>,
    /// HTTP/2 client connections grouped to share upstream connections.
    pub(crate) hubs: crate::h2::Hubs,
}

/// Counts a client connection as open until it is dropped.
pub(crate) struct Counted {
    metrics: Arc<Metrics>,
    dir: Direction,
}

impl Counted {
    fn new(metrics: &Arc<Metrics>, dir: Direction) -> Self {
        metrics.connection_opened(dir);
        Counted {
            metrics: metrics.clone(),
            dir,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.metrics.connection_closed(self.dir);
    }
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

/// The connection preface's first line: an HTTP/1 server reads it as a
/// request with method PRI and version HTTP/2.0 (RFC 9113 3.4), which no
/// HTTP/1 client sends.
const PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0\r\n";

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// Reads the first bytes of a connection into `buf` until they tell which
/// protocol it speaks. The bytes are read, not peeked: they stay in `buf`
/// for the protocol's parser, and a first line that arrives in pieces is
/// read as it comes instead of polled for.
async fn sniff(s: &mut Client, buf: &mut bytes::BytesMut) -> io::Result<Sniff> {
    loop {
        if s.fill(buf).await? == 0 {
            return Ok(Sniff::Eof);
        }
        let b = &buf[..buf.len().min(PREFACE.len())];
        if b == PREFACE {
            return Ok(Sniff::H2);
        }
        if PREFACE.starts_with(b) {
            continue;
        }
        if b.starts_with(PREFACE_LINE) {
            // An invalid connection preface is a connection error; the
            // GOAWAY may be left out, since the peer does not speak HTTP/2
            // (RFC 9113 3.4). Nor does it speak HTTP/1: not HTTP.
            return Ok(Sniff::NotHttp);
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

fn is_reserved(identity: u32) -> bool {
    identity < sinew_abi::IDENTITY_MIN_CLUSTER
}

/// Serves one accepted connection until it ends or the drain completes.
/// `peer` is the address `accept` returned.
pub async fn serve(ctx: Arc<Ctx>, mut stream: Client, peer: SocketAddr, dir: Direction, drain: watch::Receiver<bool>) {
    // The original destination is the socket's local address (transparent
    // listeners), unless configured.
    let orig = match ctx.original_dst_override {
        Some(o) => o,
        None => match stream.local_addr() {
            Ok(local) => canonical(local),
            Err(_) => return,
        },
    };
    let peer = canonical(peer);
    let counted = Counted::new(&ctx.metrics, dir);

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
    match kind {
        Sniff::Eof => {}
        Sniff::NotHttp => {
            tracing::debug!(%peer, %orig, "not HTTP on an L7 port, closing");
            ctx.metrics.dropped(DropReason::NotHttp);
        }
        Sniff::H1 => crate::h1::serve(&ctx, &conn, stream, first, accepted, drain).await,
        Sniff::H2 => match stream.into_registered() {
            Ok(s) => crate::h2::serve(&ctx, &conn, s, first, drain, counted).await,
            Err(e) => tracing::debug!(%peer, error = %e, "cannot register the connection"),
        },
    }
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
    /// counted): 400, 431 or 505.
    pub(crate) fn refuse_plain(status: StatusCode) -> Self {
        let body = match status {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "Request Header Fields Too Large\n",
            StatusCode::HTTP_VERSION_NOT_SUPPORTED => "HTTP Version Not Supported\n",
            _ => "Bad Request\n",
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
