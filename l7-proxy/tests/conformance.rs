//! HTTP/2 frame-level conformance of the proxy's own h2c path (RFC 9113),
//! with raw frames a well-behaved client library would never send. Each
//! test names the section that defines the behaviour. Connection errors
//! must end in GOAWAY with the section's error code and be counted as an
//! `h2_protocol` drop; stream errors reset only that stream (RST_STREAM),
//! are counted too, and the connection keeps serving.
//!
//! Each test runs in its own network namespace (needs root) with an
//! upstream that answers "METHOD PATH" and counts what it served.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sinew_proto::proxy_v1 as pb;
use sinew_proxy::metrics::DropReason;
use sinew_proxy::{Config, Proxy, ProxyHandle};

// RFC 9113 section 7 error codes.
const NO_ERROR: u32 = 0x0;
const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const STREAM_CLOSED: u32 = 0x5;
const FRAME_SIZE_ERROR: u32 = 0x6;
const CANCEL: u32 = 0x8;

// Frame types (section 6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PRIORITY_FLAG: u8 = 0x20;

fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET): these tests need root");
        let st = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("run ip");
        assert!(st.success(), "ip link set lo up failed");
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Answers "METHOD PATH" (after reading the whole body) and counts.
async fn upstream() -> (SocketAddr, Arc<AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let h = h.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    h.fetch_add(1, Relaxed);
                    async move {
                        let line = format!("{} {}", req.method(), req.uri().path());
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(line))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

struct World {
    _rt: tokio::runtime::Runtime,
    proxy: ProxyHandle,
    hits: Arc<AtomicU64>,
}

impl World {
    /// A proxy whose rules allow GET and POST under /public only.
    fn new() -> World {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (up, hits) = rt.block_on(upstream());
        let c = Config {
            ingress: vec!["127.0.0.1:0".parse().unwrap()],
            egress: vec![],
            admin: None,
            agent_socket: None,
            original_dst_override: Some(up),
            ..Config::default()
        };
        let proxy = Proxy::start(c).expect("start proxy");
        use pb::string_match::Kind;
        let rule = |m: &str| pb::HttpRule {
            method: Some(pb::StringMatch {
                kind: Some(Kind::Exact(m.into())),
            }),
            path: Some(pb::StringMatch {
                kind: Some(Kind::Prefix("/public".into())),
            }),
            ..Default::default()
        };
        let snap = pb::Snapshot {
            version: 1,
            endpoints: vec![pb::L7Endpoint {
                addresses: vec!["127.0.0.1".into()],
                identity: 1000,
                name: "server".into(),
                direction: pb::Direction::Ingress as i32,
                port: up.port().into(),
                rule_sets: vec![pb::RuleSet {
                    http: vec![rule("GET"), rule("POST")],
                    rule: "SinewNetworkPolicy default/web ingress[0]".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        proxy.state.apply(&snap).unwrap();
        World { _rt: rt, proxy, hits }
    }

    fn h2_drops(&self) -> u64 {
        self.proxy.metrics.drops(DropReason::H2Protocol)
    }

    /// The h2_protocol drops once they pass `before`, or after 2 s. The
    /// proxy counts a reset right after its write returns, so a client
    /// can read the frame a moment before the count moves.
    fn h2_drops_past(&self, before: u64) -> u64 {
        let t = Instant::now();
        while self.h2_drops() <= before && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.h2_drops()
    }

    /// A connection past the preface and the client's SETTINGS.
    fn connect(&self) -> Conn {
        let mut s = TcpStream::connect(self.proxy.ingress[0]).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        s.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
        Conn {
            s,
            buf: Vec::new(),
            frames: Vec::new(),
            eof: false,
        }
    }

    /// Sends `bad` on a fresh connection and expects a connection error:
    /// GOAWAY with `code`, the connection closed, one drop counted.
    fn expect_goaway(&self, bad: &[u8], code: u32, what: &str) {
        let before = self.h2_drops();
        let mut c = self.connect();
        c.send(bad);
        c.read_until(Duration::from_secs(5), |_| false);
        assert!(c.eof, "{what}: the connection stays open; frames {:?}", c.summary());
        let goaways: Vec<u32> = c.of(GOAWAY, 0).iter().map(|f| word(&f.payload, 4)).collect();
        assert_eq!(goaways, vec![code], "{what}: GOAWAY codes; frames {:?}", c.summary());
        // The drop is counted when the connection task ends.
        let t = Instant::now();
        while self.h2_drops() == before && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(self.h2_drops(), before + 1, "{what}: h2_protocol drops");
    }
}

#[derive(Debug, Clone)]
struct Frame {
    ty: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([ty, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

fn word(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
        .unwrap_or(u32::MAX)
}

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    frames: Vec<Frame>,
    eof: bool,
}

impl Conn {
    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Reads frames until `done` holds, EOF or `limit`.
    fn read_until(&mut self, limit: Duration, done: impl Fn(&[Frame]) -> bool) {
        let t = Instant::now();
        let mut tmp = [0u8; 65536];
        while !self.eof && !done(&self.frames) && t.elapsed() < limit {
            match self.s.read(&mut tmp) {
                Ok(0) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => self.eof = true,
                Err(_) => {}
            }
            while self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() < 9 + len {
                    break;
                }
                let f: Vec<u8> = self.buf.drain(..9 + len).collect();
                self.frames.push(Frame {
                    ty: f[3],
                    flags: f[4],
                    stream: word(&f, 5) & 0x7fff_ffff,
                    payload: f[9..].to_vec(),
                });
            }
        }
    }

    fn of(&self, ty: u8, stream: u32) -> Vec<&Frame> {
        self.frames
            .iter()
            .filter(|f| f.ty == ty && f.stream == stream)
            .collect()
    }

    /// The stream ended: END_STREAM from the server, or RST_STREAM.
    fn ended(frames: &[Frame], stream: u32) -> bool {
        frames
            .iter()
            .any(|f| f.stream == stream && (f.ty == RST_STREAM || (f.flags & END_STREAM != 0 && f.ty <= HEADERS)))
    }

    fn wait_stream(&mut self, stream: u32) {
        self.read_until(Duration::from_secs(5), |f| Self::ended(f, stream));
        assert!(
            Self::ended(&self.frames, stream),
            "stream {stream} never ended: {:?}",
            self.summary()
        );
    }

    /// The RST_STREAM code of a stream, if it was reset.
    fn reset_code(&self, stream: u32) -> Option<u32> {
        self.of(RST_STREAM, stream).first().map(|f| word(&f.payload, 0))
    }

    /// The body the server sent on a stream.
    fn body(&self, stream: u32) -> String {
        let b: Vec<u8> = self.of(DATA, stream).iter().flat_map(|f| f.payload.clone()).collect();
        String::from_utf8_lossy(&b).into_owned()
    }

    /// (type, stream, payload length, first word; for GOAWAY the code and
    /// debug data).
    fn summary(&self) -> Vec<(u8, u32, usize, String)> {
        self.frames
            .iter()
            .map(|f| {
                let w = match f.ty {
                    GOAWAY => format!(
                        "code {} {:?}",
                        word(&f.payload, 4),
                        String::from_utf8_lossy(f.payload.get(8..).unwrap_or_default())
                    ),
                    RST_STREAM => format!("code {}", word(&f.payload, 0)),
                    _ => String::new(),
                };
                (f.ty, f.stream, f.payload.len(), w)
            })
            .collect()
    }
}

/// HPACK (RFC 7541) literal header field without indexing, new name.
fn lit(name: &str, value: &str) -> Vec<u8> {
    let mut b = vec![0x00, name.len() as u8];
    b.extend(name.as_bytes());
    b.push(value.len() as u8);
    b.extend(value.as_bytes());
    b
}

/// A request header block: :method (static index 2 GET, 3 POST), :scheme
/// http (6), :path and :authority as literals with indexed names, then
/// `extra` fields.
fn request(method: &str, path: &str, extra: &[u8]) -> Vec<u8> {
    let mut b = vec![if method == "POST" { 0x83 } else { 0x82 }, 0x86];
    b.extend([0x04, path.len() as u8]);
    b.extend(path.as_bytes());
    b.extend([0x01, 3]);
    b.extend(b"web");
    b.extend(extra);
    b
}

fn get(stream: u32, path: &str) -> Vec<u8> {
    frame(HEADERS, END_STREAM | END_HEADERS, stream, &request("GET", path, &[]))
}

/// RFC 9113 section 3.4: an invalid connection preface is a connection
/// error; the GOAWAY may be omitted (the peer does not speak HTTP/2). The
/// proxy never starts HTTP/2 on it (no SETTINGS), nor answers it as
/// HTTP/1 (its first line is HTTP/2's), closes it and counts it as not
/// HTTP.
#[test]
fn an_invalid_preface_is_closed_without_http2_and_counted() {
    in_netns(|| {
        let w = World::new();
        let m = &w.proxy.metrics;
        let mut s = TcpStream::connect(w.proxy.ingress[0]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n").unwrap();
        s.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(out.is_empty(), "an answer to a bad preface: {out:02x?}");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(m.drops(DropReason::NotHttp), 1, "{}", m.render());
        assert_eq!(m.drops(DropReason::MalformedRequest), 0, "{}", m.render());
        assert_eq!(w.hits.load(Relaxed), 0);
    });
}

/// RFC 9113 section 6.5: "A SETTINGS frame with a length other than a
/// multiple of 6 octets MUST be treated as a connection error of type
/// FRAME_SIZE_ERROR"; an ACK with a payload likewise; SETTINGS on a stream
/// is a PROTOCOL_ERROR.
#[test]
fn settings_with_a_bad_length_ack_payload_or_stream_are_connection_errors() {
    in_netns(|| {
        let w = World::new();
        w.expect_goaway(
            &frame(SETTINGS, 0, 0, &[0; 5]),
            FRAME_SIZE_ERROR,
            "SETTINGS of 5 octets",
        );
        w.expect_goaway(
            &frame(SETTINGS, 0, 0, &[0; 13]),
            FRAME_SIZE_ERROR,
            "SETTINGS of 13 octets",
        );
        w.expect_goaway(
            &frame(SETTINGS, ACK, 0, &[0; 6]),
            FRAME_SIZE_ERROR,
            "SETTINGS ACK with a payload",
        );
        w.expect_goaway(&frame(SETTINGS, 0, 1, &[]), PROTOCOL_ERROR, "SETTINGS on stream 1");
    });
}

/// RFC 9113 section 6.5.2: "Values above the maximum flow-control window
/// size of 2^31-1 MUST be treated as a connection error of type
/// FLOW_CONTROL_ERROR" (SETTINGS_INITIAL_WINDOW_SIZE); the maximum itself
/// is fine; SETTINGS_ENABLE_PUSH other than 0 or 1 is a PROTOCOL_ERROR.
#[test]
fn settings_values_out_of_range_are_connection_errors() {
    in_netns(|| {
        let w = World::new();
        w.expect_goaway(
            &frame(SETTINGS, 0, 0, &[0, 4, 0x80, 0, 0, 0]),
            FLOW_CONTROL_ERROR,
            "INITIAL_WINDOW_SIZE 2^31",
        );
        w.expect_goaway(
            &frame(SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 2]),
            PROTOCOL_ERROR,
            "ENABLE_PUSH 2",
        );
        // 2^31-1 is allowed: the next request is served.
        let mut c = w.connect();
        c.send(&frame(SETTINGS, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
        c.send(&get(1, "/public/max-window"));
        c.wait_stream(1);
        assert_eq!(c.body(1), "GET /public/max-window");
    });
}

/// RFC 9113 section 6.7: the server answers a PING with a PING ACK that
/// carries the same payload; "receipt of a PING frame with a length field
/// value other than 8 MUST be treated as a connection error of type
/// FRAME_SIZE_ERROR"; a PING on a stream is a PROTOCOL_ERROR.
#[test]
fn ping_is_acked_and_a_bad_ping_is_a_connection_error() {
    in_netns(|| {
        let w = World::new();
        let mut c = w.connect();
        c.send(&frame(PING, 0, 0, b"sinew-01"));
        c.read_until(Duration::from_secs(5), |f| {
            f.iter().any(|f| f.ty == PING && f.flags & ACK != 0)
        });
        let acks: Vec<_> = c.of(PING, 0).into_iter().filter(|f| f.flags & ACK != 0).collect();
        assert_eq!(acks.len(), 1, "{:?}", c.summary());
        assert_eq!(acks[0].payload, b"sinew-01");
        w.expect_goaway(&frame(PING, 0, 0, &[0; 7]), FRAME_SIZE_ERROR, "PING of 7 octets");
        w.expect_goaway(&frame(PING, 0, 0, &[0; 9]), FRAME_SIZE_ERROR, "PING of 9 octets");
        w.expect_goaway(&frame(PING, 0, 1, &[0; 8]), PROTOCOL_ERROR, "PING on stream 1");
    });
}

/// RFC 9113 section 6.9: "A WINDOW_UPDATE frame with a length other than 4
/// octets MUST be treated as a connection error of type
/// FRAME_SIZE_ERROR"; an increment of 0 on the connection is a connection
/// error PROTOCOL_ERROR. On a stream it is a stream error, which section
/// 5.4.1 lets an endpoint treat as a connection error (h2 does).
#[test]
fn window_update_with_a_bad_length_or_zero_increment_is_refused() {
    in_netns(|| {
        let w = World::new();
        w.expect_goaway(
            &frame(WINDOW_UPDATE, 0, 0, &[0, 0, 1]),
            FRAME_SIZE_ERROR,
            "WINDOW_UPDATE of 3",
        );
        w.expect_goaway(
            &frame(WINDOW_UPDATE, 0, 0, &[0; 4]),
            PROTOCOL_ERROR,
            "zero increment, stream 0",
        );
        let mut open = frame(HEADERS, END_HEADERS, 1, &request("POST", "/public/w", &[]));
        open.extend(frame(WINDOW_UPDATE, 0, 1, &[0; 4]));
        let before = w.h2_drops();
        let mut c = w.connect();
        c.send(&open);
        c.read_until(Duration::from_secs(5), |_| false);
        let refused = c.reset_code(1) == Some(PROTOCOL_ERROR)
            || c.of(GOAWAY, 0).iter().any(|f| word(&f.payload, 4) == PROTOCOL_ERROR);
        assert!(refused, "zero increment on a stream: {:?}", c.summary());
        assert!(w.h2_drops_past(before) > before);
    });
}

/// RFC 9113 section 6.4: "A RST_STREAM frame with a length other than 4
/// octets MUST be treated as a connection error of type FRAME_SIZE_ERROR";
/// one on stream 0 is a PROTOCOL_ERROR.
#[test]
fn rst_stream_with_a_bad_length_or_on_stream_0_is_a_connection_error() {
    in_netns(|| {
        let w = World::new();
        let mut open = frame(HEADERS, END_HEADERS, 1, &request("POST", "/public/r", &[]));
        open.extend(frame(RST_STREAM, 0, 1, &[0, 0, 8]));
        w.expect_goaway(&open, FRAME_SIZE_ERROR, "RST_STREAM of 3 octets");
        w.expect_goaway(
            &frame(RST_STREAM, 0, 0, &[0, 0, 0, 8]),
            PROTOCOL_ERROR,
            "RST_STREAM on stream 0",
        );
    });
}

/// RFC 9113 section 6.3: "A PRIORITY frame with a length other than 5
/// octets MUST be treated as a stream error of type FRAME_SIZE_ERROR". On
/// an open stream that is RST_STREAM FRAME_SIZE_ERROR for that stream
/// alone: it is counted, and the connection and its other streams go on.
/// An idle stream must not get RST_STREAM (section 5.1), so there the
/// proxy makes it a connection error, as section 5.4.1 allows. A
/// well-formed PRIORITY (deprecated, section 5.3.2) is ignored.
#[test]
fn priority_with_a_bad_length_is_refused_and_a_good_one_ignored() {
    in_netns(|| {
        let w = World::new();
        w.expect_goaway(
            &frame(PRIORITY, 0, 1, &[0; 4]),
            FRAME_SIZE_ERROR,
            "PRIORITY of 4 octets on an idle stream",
        );

        let mut c = w.connect();
        // Stream 1 open: its request body has not ended.
        c.send(&frame(HEADERS, END_HEADERS, 1, &request("POST", "/public/open", &[])));
        let drops = w.h2_drops();
        c.send(&frame(PRIORITY, 0, 1, &[0; 4]));
        c.wait_stream(1);
        assert_eq!(c.reset_code(1), Some(FRAME_SIZE_ERROR), "{:?}", c.summary());
        assert!(w.h2_drops_past(drops) > drops, "the stream error is counted");

        c.send(&frame(PRIORITY, 0, 5, &[0, 0, 0, 0, 16]));
        c.send(&get(3, "/public/p"));
        c.wait_stream(3);
        assert_eq!(c.body(3), "GET /public/p");
        assert!(c.of(GOAWAY, 0).is_empty(), "{:?}", c.summary());
    });
}

/// RFC 7540 section 5.3.1: "A stream cannot depend on itself. An endpoint
/// MUST treat this as a stream error (Section 5.4.2) of type
/// PROTOCOL_ERROR" (h2spec http2/5.3.1 #1 and #2; RFC 9113 keeps the
/// fields). On an idle stream, which takes no RST_STREAM (RFC 9113 5.1),
/// it is a connection error. The refused HEADERS' block still updates the
/// HPACK table: the next request may name what it added.
#[test]
fn a_stream_that_depends_on_itself_is_a_stream_error() {
    in_netns(|| {
        let w = World::new();
        w.expect_goaway(
            &frame(PRIORITY, 0, 1, &[0, 0, 0, 1, 16]),
            PROTOCOL_ERROR,
            "PRIORITY: idle stream 1 depends on itself",
        );

        let mut c = w.connect();
        let drops = w.h2_drops();
        // :path with incremental indexing (RFC 7541 6.2.1): dynamic index 62.
        let mut block = vec![0x82, 0x86, 0x44, 13];
        block.extend(b"/public/after");
        block.extend([0x01, 3]);
        block.extend(b"web");
        let mut payload = vec![0, 0, 0, 1, 16];
        payload.extend(&block);
        c.send(&frame(HEADERS, END_STREAM | END_HEADERS | PRIORITY_FLAG, 1, &payload));
        c.wait_stream(1);
        assert_eq!(c.reset_code(1), Some(PROTOCOL_ERROR), "{:?}", c.summary());
        assert!(w.h2_drops_past(drops) > drops, "the stream error is counted");

        // An open stream made to depend on itself by PRIORITY.
        c.send(&frame(HEADERS, END_HEADERS, 3, &request("POST", "/public/open", &[])));
        c.send(&frame(PRIORITY, 0, 3, &[0, 0, 0, 3, 16]));
        c.wait_stream(3);
        assert_eq!(c.reset_code(3), Some(PROTOCOL_ERROR), "{:?}", c.summary());

        // GET, http, :path from the dynamic table, :authority web.
        let mut next = vec![0x82, 0x86, 0x80 | 62, 0x01, 3];
        next.extend(b"web");
        c.send(&frame(HEADERS, END_STREAM | END_HEADERS, 5, &next));
        c.wait_stream(5);
        assert_eq!(c.body(5), "GET /public/after", "{:?}", c.summary());
        assert!(c.of(GOAWAY, 0).is_empty(), "{:?}", c.summary());
    });
}

/// RFC 9113 section 5.1, "closed": "An endpoint that receives any frame
/// other than PRIORITY after receiving a RST_STREAM MUST treat that as a
/// stream error (Section 5.4.2) of type STREAM_CLOSED", and so frames
/// after END_STREAM (h2spec http2/5.1 #8 and #11). But "An endpoint MUST
/// ignore frames that it receives on closed streams after it has sent a
/// RST_STREAM frame": the proxy resets such a stream once, and DATA on a
/// stream it reset itself is let go.
#[test]
fn data_on_a_stream_the_client_closed_is_a_stream_error() {
    in_netns(|| {
        let w = World::new();
        let mut c = w.connect();
        let resets = |c: &Conn, sid: u32| c.of(RST_STREAM, sid).len();

        // Closed by the client's RST_STREAM.
        c.send(&frame(HEADERS, END_HEADERS, 1, &request("POST", "/public/body", &[])));
        c.send(&frame(RST_STREAM, 0, 1, &CANCEL.to_be_bytes()));
        let drops = w.h2_drops();
        c.send(&frame(DATA, END_STREAM, 1, b"test"));
        c.wait_stream(1);
        assert_eq!(c.reset_code(1), Some(STREAM_CLOSED), "{:?}", c.summary());
        assert!(w.h2_drops_past(drops) > drops, "the stream error is counted");

        // Closed both ways: the client's END_STREAM, then the answer.
        c.send(&get(3, "/public/done"));
        c.wait_stream(3);
        assert_eq!(c.body(3), "GET /public/done");
        c.send(&frame(DATA, END_STREAM, 3, b"late"));
        c.read_until(Duration::from_secs(5), |f| {
            f.iter().any(|f| f.ty == RST_STREAM && f.stream == 3)
        });
        assert_eq!(c.reset_code(3), Some(STREAM_CLOSED), "{:?}", c.summary());

        // Reset by the proxy (a stream error): its DATA is ignored, and so
        // is more DATA on streams 1 and 3 after their RST_STREAM.
        c.send(&frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 5, &{
            let mut p = vec![0, 0, 0, 5, 16];
            p.extend(request("POST", "/public/self", &[]));
            p
        }));
        c.wait_stream(5);
        assert_eq!(c.reset_code(5), Some(PROTOCOL_ERROR), "{:?}", c.summary());
        for sid in [5, 1, 3] {
            c.send(&frame(DATA, 0, sid, b"more"));
        }
        c.send(&get(7, "/public/after"));
        c.wait_stream(7);
        c.read_until(Duration::from_millis(300), |_| false);
        assert_eq!(c.body(7), "GET /public/after", "{:?}", c.summary());
        assert_eq!(
            (resets(&c, 1), resets(&c, 3), resets(&c, 5)),
            (1, 1, 1),
            "{:?}",
            c.summary()
        );
        assert!(c.of(GOAWAY, 0).is_empty(), "{:?}", c.summary());
    });
}

/// RFC 9113 section 6.1: "If a DATA frame is received whose Stream
/// Identifier field is 0x00, the recipient MUST respond with a connection
/// error of type PROTOCOL_ERROR".
#[test]
fn data_on_stream_0_is_a_connection_error() {
    in_netns(|| {
        let w = World::new();
        w.expect_goaway(&frame(DATA, 0, 0, b"x"), PROTOCOL_ERROR, "DATA on stream 0");
    });
}

/// RFC 9113 section 5.1.1: "Streams initiated by a client MUST use
/// odd-numbered stream identifiers", and "the identifier of a newly
/// established stream MUST be numerically greater than all streams that
/// the initiating endpoint has opened"; either is a connection error of
/// type PROTOCOL_ERROR.
#[test]
fn even_or_decreasing_stream_ids_are_connection_errors() {
    in_netns(|| {
        let w = World::new();
        w.expect_goaway(&get(2, "/public/even"), PROTOCOL_ERROR, "HEADERS on stream 2");
        let mut two = get(5, "/public/five");
        two.extend(get(3, "/public/three"));
        w.expect_goaway(&two, PROTOCOL_ERROR, "stream 3 after stream 5");
        // Stream 5 may or may not reach the upstream before the GOAWAY ends
        // the connection; 2 and 3 never do.
        assert!(w.hits.load(Relaxed) <= 1, "stream 2 or 3 went upstream");
    });
}

/// RFC 9113 section 6.10: a CONTINUATION must follow a HEADERS without
/// END_HEADERS on the same stream; otherwise "the recipient MUST respond
/// with a connection error of type PROTOCOL_ERROR". A header block split
/// into HEADERS and CONTINUATION is one request.
#[test]
fn continuation_out_of_place_is_a_connection_error() {
    in_netns(|| {
        let w = World::new();
        w.expect_goaway(
            &frame(CONTINUATION, END_HEADERS, 1, &[0x82]),
            PROTOCOL_ERROR,
            "CONTINUATION without HEADERS",
        );
        let block = request("GET", "/public/split", &[]);
        let mut bad = frame(HEADERS, END_STREAM, 1, &block[..3]);
        bad.extend(get(3, "/public/other"));
        w.expect_goaway(&bad, PROTOCOL_ERROR, "HEADERS where a CONTINUATION must be");
        let mut good = frame(HEADERS, END_STREAM, 1, &block[..3]);
        good.extend(frame(CONTINUATION, END_HEADERS, 1, &block[3..]));
        let mut c = w.connect();
        c.send(&good);
        c.wait_stream(1);
        assert_eq!(c.body(1), "GET /public/split");
    });
}

/// RFC 9113 section 4.2: "An endpoint MUST send an error code of
/// FRAME_SIZE_ERROR if a frame exceeds the size defined in
/// SETTINGS_MAX_FRAME_SIZE" (16,384 by default) "or is too small to
/// contain mandatory frame data" (a GOAWAY shorter than 8 octets).
#[test]
fn oversized_and_truncated_frames_are_frame_size_errors() {
    in_netns(|| {
        let w = World::new();
        let mut big = frame(HEADERS, END_HEADERS, 1, &request("POST", "/public/big", &[]));
        big.extend(frame(DATA, 0, 1, &vec![b'x'; 16_385]));
        w.expect_goaway(&big, FRAME_SIZE_ERROR, "DATA of 16,385 octets");
        w.expect_goaway(&frame(GOAWAY, 0, 0, &[0; 4]), FRAME_SIZE_ERROR, "GOAWAY of 4 octets");
    });
}

/// RFC 9113 section 4.1 and 5.5: "Implementations MUST ignore and discard
/// frames of unknown types", whatever their flags and stream.
#[test]
fn unknown_frame_types_are_ignored() {
    in_netns(|| {
        let w = World::new();
        let mut c = w.connect();
        c.send(&frame(0x42, 0xff, 0, b"what is this"));
        c.send(&frame(0xfa, 0x00, 7, &[1; 100]));
        c.send(&get(1, "/public/after-unknown"));
        c.wait_stream(1);
        assert_eq!(c.body(1), "GET /public/after-unknown");
        assert!(c.of(GOAWAY, 0).is_empty(), "{:?}", c.summary());
        assert_eq!(w.h2_drops(), 0);
    });
}

/// Sends one malformed request on stream 1 and a good one on stream 3:
/// stream 1 is reset with PROTOCOL_ERROR and counted, nothing reaches the
/// upstream for it, and stream 3 is served on the same connection. RFC
/// 9113 section 8.1.1: a malformed request is a stream error of type
/// PROTOCOL_ERROR; the proxy's own HTTP/2 path keeps it to the stream even
/// where the field name itself is bad (uppercase, an unknown
/// pseudo-header), since its HPACK decoder stays in step.
fn expect_stream_error(w: &World, bad: Vec<u8>, what: &str) {
    let (hits, drops) = (w.hits.load(Relaxed), w.h2_drops());
    let mut c = w.connect();
    c.send(&bad);
    c.send(&get(3, "/public/next"));
    c.wait_stream(1);
    c.wait_stream(3);
    assert_eq!(c.reset_code(1), Some(PROTOCOL_ERROR), "{what}: {:?}", c.summary());
    assert_eq!(c.body(3), "GET /public/next", "{what}: the connection goes on");
    assert!(c.of(GOAWAY, 0).is_empty(), "{what}: {:?}", c.summary());
    assert_eq!(w.hits.load(Relaxed), hits + 1, "{what}: only stream 3 went upstream");
    assert_eq!(w.h2_drops_past(drops), drops + 1, "{what}: the reset is counted");
}

/// RFC 9113 section 8.3.1: every request "MUST include exactly one valid
/// value for the :method, :scheme, and :path pseudo-header fields" (unless
/// CONNECT); pseudo-header fields come before regular ones; an unknown
/// pseudo-header is malformed. Section 8.1.1: malformed requests are
/// stream errors of type PROTOCOL_ERROR.
#[test]
fn requests_with_bad_pseudo_headers_are_stream_errors() {
    in_netns(|| {
        let w = World::new();
        let no_method = [0x86, 0x04, 8, b'/', b'p', b'u', b'b', b'l', b'i', b'c', b'/'];
        expect_stream_error(
            &w,
            frame(HEADERS, END_STREAM | END_HEADERS, 1, &no_method),
            "no :method",
        );
        expect_stream_error(
            &w,
            frame(
                HEADERS,
                END_STREAM | END_HEADERS,
                1,
                &[0x82, 0x86, 0x01, 3, b'w', b'e', b'b'],
            ),
            "no :path",
        );
        let mut late = vec![0x82, 0x86];
        late.extend(lit("x-early", "1"));
        late.extend([0x04, 8]);
        late.extend(b"/public/");
        expect_stream_error(
            &w,
            frame(HEADERS, END_STREAM | END_HEADERS, 1, &late),
            "pseudo-header after a regular one",
        );
        expect_stream_error(
            &w,
            frame(
                HEADERS,
                END_STREAM | END_HEADERS,
                1,
                &request("GET", "/public/", &lit(":bogus", "1")),
            ),
            "unknown pseudo-header",
        );
    });
}

/// RFC 9113 section 8.2.1: "Field names MUST be converted to lowercase";
/// "a request or response containing uppercase characters in field names
/// MUST be treated as malformed". Section 8.2.2: connection-specific
/// fields (Connection, Keep-Alive, Proxy-Connection, Transfer-Encoding,
/// Upgrade) make it malformed, and TE may only be "trailers".
#[test]
fn uppercase_and_connection_specific_fields_are_stream_errors() {
    in_netns(|| {
        let w = World::new();
        expect_stream_error(
            &w,
            frame(
                HEADERS,
                END_STREAM | END_HEADERS,
                1,
                &request("GET", "/public/", &lit("X-Upper", "1")),
            ),
            "an uppercase field name",
        );
        for (name, value) in [
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
        ] {
            expect_stream_error(
                &w,
                frame(
                    HEADERS,
                    END_STREAM | END_HEADERS,
                    1,
                    &request("GET", "/public/", &lit(name, value)),
                ),
                &format!("{name}: {value}"),
            );
        }
        // TE: trailers is allowed.
        let mut c = w.connect();
        c.send(&frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            1,
            &request("GET", "/public/te", &lit("te", "trailers")),
        ));
        c.wait_stream(1);
        assert_eq!(c.body(1), "GET /public/te");
    });
}

/// RFC 9113 section 8.1.1: "A request or response is also malformed if the
/// value of a content-length header field does not equal the sum of the
/// DATA frame payload lengths that form the content" (stream error
/// PROTOCOL_ERROR). Section 8.1: trailers follow the DATA in a HEADERS
/// frame with END_STREAM, and a request with them is served.
#[test]
fn content_length_mismatch_is_a_stream_error_and_trailers_pass() {
    in_netns(|| {
        let w = World::new();
        let mut short = frame(
            HEADERS,
            END_HEADERS,
            1,
            &request("POST", "/public/cl", &lit("content-length", "5")),
        );
        short.extend(frame(DATA, END_STREAM, 1, b"abc"));
        let (hits, drops) = (w.hits.load(Relaxed), w.h2_drops());
        let mut c = w.connect();
        c.send(&short);
        c.wait_stream(1);
        assert_eq!(c.reset_code(1), Some(PROTOCOL_ERROR), "{:?}", c.summary());
        assert!(
            !c.body(1).contains("POST"),
            "the upstream answer must not reach the client"
        );
        assert!(w.h2_drops_past(drops) > drops);
        let _ = hits;
        let mut long = frame(
            HEADERS,
            END_HEADERS,
            3,
            &request("POST", "/public/cl", &lit("content-length", "2")),
        );
        long.extend(frame(DATA, END_STREAM, 3, b"abc"));
        c.send(&long);
        c.wait_stream(3);
        assert_eq!(c.reset_code(3), Some(PROTOCOL_ERROR), "{:?}", c.summary());

        let mut with_trailers = frame(HEADERS, END_HEADERS, 5, &request("POST", "/public/t", &[]));
        with_trailers.extend(frame(DATA, 0, 5, b"body"));
        with_trailers.extend(frame(HEADERS, END_STREAM | END_HEADERS, 5, &lit("x-checksum", "1")));
        c.send(&with_trailers);
        c.wait_stream(5);
        assert_eq!(c.reset_code(5), None, "{:?}", c.summary());
        assert_eq!(c.body(5), "POST /public/t");
    });
}

/// Policy on one stream never touches its neighbours (RFC 9113 section 5:
/// streams are independent): a denied stream gets 403, an allowed one on
/// the same connection its answer, the connection stays open without a
/// GOAWAY, and the denied request never reaches the upstream.
#[test]
fn a_denied_stream_gets_403_and_its_neighbours_go_on() {
    in_netns(|| {
        let w = World::new();
        let mut c = w.connect();
        let mut b = get(1, "/public/a");
        b.extend(get(3, "/admin"));
        b.extend(get(5, "/public/b"));
        c.send(&b);
        for s in [1, 3, 5] {
            c.wait_stream(s);
        }
        assert_eq!(c.body(1), "GET /public/a");
        assert_eq!(c.body(3), "Access denied\n");
        assert_eq!(c.body(5), "GET /public/b");
        assert_eq!(c.reset_code(3), None, "a denial is an answer, not a reset");
        c.send(&get(7, "/public/c"));
        c.wait_stream(7);
        assert_eq!(c.body(7), "GET /public/c");
        assert!(c.of(GOAWAY, 0).is_empty());
        assert_eq!(w.hits.load(Relaxed), 3);
        assert_eq!(w.proxy.metrics.drops(DropReason::PolicyDenied), 1);
        assert_eq!(w.h2_drops(), 0);
    });
}

/// RFC 9113 section 6.8: a client's GOAWAY (NO_ERROR) ends the connection
/// gracefully: streams already open finish, and it is not a drop.
#[test]
fn a_client_goaway_is_graceful_and_not_a_drop() {
    in_netns(|| {
        let w = World::new();
        let mut c = w.connect();
        let mut b = get(1, "/public/last");
        b.extend(frame(GOAWAY, 0, 0, &[0, 0, 0, 1, 0, 0, 0, NO_ERROR as u8]));
        c.send(&b);
        c.wait_stream(1);
        assert_eq!(c.body(1), "GET /public/last");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(w.h2_drops(), 0);
    });
}
