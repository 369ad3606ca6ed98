//! sinew-proxy against real clients and servers over loopback, each test in
//! its own network namespace (needs root; fails when it cannot run). The
//! proxy listens on loopback and the test hook gives every connection the
//! upstream server as its original destination.

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
use sinew_proxy::metrics::{DropReason, Verdict};
use sinew_proxy::{Config, Proxy, ProxyHandle};

pub mod echo {
    tonic::include_proto!("sinew.test.echo");
}

/// Runs `f` on a thread inside a fresh network namespace with lo up.
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

/// An upstream that answers HTTP/1.1 and h2c with "<method> <path?query>",
/// and WebSocket upgrades by echoing bytes.
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
                let svc = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                    h.fetch_add(1, Relaxed);
                    async move {
                        if req.headers().get("upgrade").is_some_and(|v| v == "websocket") {
                            let up = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                if let Ok(u) = up.await {
                                    let mut io = TokioIo::new(u);
                                    let (mut r, mut w) = tokio::io::split(&mut io);
                                    let _ = tokio::io::copy(&mut r, &mut w).await;
                                }
                            });
                            let mut r = http::Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                            r.headers_mut().insert("upgrade", "websocket".parse().unwrap());
                            r.headers_mut().insert("connection", "upgrade".parse().unwrap());
                            return Ok::<_, Infallible>(r);
                        }
                        if req.uri().path().starts_with("/public/slow") {
                            tokio::time::sleep(Duration::from_millis(700)).await;
                        }
                        let line = format!(
                            "{} {}",
                            req.method(),
                            req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("")
                        );
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(line))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

fn snapshot(version: u64, port: u16, http: Vec<pb::HttpRule>, grpc: Vec<pb::GrpcRule>) -> pb::Snapshot {
    pb::Snapshot {
        version,
        endpoints: vec![pb::L7Endpoint {
            addresses: vec!["127.0.0.1".into()],
            identity: 1000,
            namespace: "default".into(),
            name: "server".into(),
            direction: pb::Direction::Ingress as i32,
            port: port.into(),
            rule_sets: vec![pb::RuleSet {
                peers: vec![],
                http,
                grpc,
                rule: "SinewNetworkPolicy default/web ingress[0]".into(),
                ..Default::default()
            }],
        }],
        identities: vec![pb::IdentityEntry {
            prefix: "127.0.0.1/32".into(),
            identity: 1000,
            namespace: "default".into(),
            name: "client".into(),
        }],
        ..Default::default()
    }
}

fn get_prefix(p: &str) -> pb::HttpRule {
    use pb::string_match::Kind;
    pb::HttpRule {
        method: Some(pb::StringMatch {
            kind: Some(Kind::Exact("GET".into())),
        }),
        path: Some(pb::StringMatch {
            kind: Some(Kind::Prefix(p.into())),
        }),
        ..Default::default()
    }
}

fn start(orig: SocketAddr, header_timeout: Duration) -> ProxyHandle {
    start_with(orig, header_timeout, |_| {})
}

fn start_with(orig: SocketAddr, header_timeout: Duration, f: impl FnOnce(&mut Config)) -> ProxyHandle {
    let mut c = Config {
        ingress: vec!["127.0.0.1:0".parse().unwrap()],
        egress: vec![],
        admin: Some("127.0.0.1:0".parse().unwrap()),
        agent_socket: None,
        original_dst_override: Some(orig),
        drain_timeout: Duration::from_secs(5),
        ..Config::default()
    };
    c.limits.header_read_timeout = header_timeout;
    f(&mut c);
    Proxy::start(c).expect("start proxy")
}

/// Sends raw bytes and reads until the server closes or `until` appears
/// `n` times.
fn raw(addr: SocketAddr, req: &[u8], until: &str, n: usize) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(req).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => out.extend_from_slice(&buf[..k]),
        }
        if !until.is_empty() && String::from_utf8_lossy(&out).matches(until).count() >= n {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn http1_allow_deny_keepalive_pipelining_and_events() {
    in_netns(|| {
        let rt = rt();
        let (up, hits) = rt.block_on(upstream());
        let p = start(up, Duration::from_secs(5));
        p.state
            .apply(&snapshot(1, up.port(), vec![get_prefix("/public")], vec![]))
            .unwrap();
        let mut events = p.take_events().unwrap();
        let a = p.ingress[0];

        // Pipelined on one keep-alive connection: allowed, denied, a path
        // that normalises into /public, one that normalises out of it, and
        // a chunked POST that no rule allows.
        let out = raw(
            a,
            b"GET /public/a?x=1 HTTP/1.1\r\nHost: web\r\n\r\n\
              GET /admin HTTP/1.1\r\nHost: web\r\n\r\n\
              GET /x/../public/%62 HTTP/1.1\r\nHost: web\r\n\r\n\
              GET /public/../admin HTTP/1.1\r\nHost: web\r\n\r\n\
              POST /public/p HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "HTTP/1.1 ",
            5,
        );
        let statuses: Vec<&str> = out
            .match_indices("HTTP/1.1 ")
            .map(|(i, _)| &out[i + 9..i + 12])
            .collect();
        assert_eq!(statuses, ["200", "403", "200", "403", "403"], "{out}");
        assert!(out.contains("GET /public/a?x=1"), "{out}");
        assert!(out.contains("GET /public/b"), "forwarded the normalised path: {out}");
        assert!(!out.contains("/admin\r") && !out.contains("GET /admin"), "{out}");
        assert_eq!(hits.load(Relaxed), 2);
        assert_eq!(p.metrics.requests(Verdict::Forwarded), 2);
        assert_eq!(p.metrics.requests(Verdict::Denied), 3);
        assert_eq!(p.metrics.drops(DropReason::PolicyDenied), 3);

        let mut got = Vec::new();
        while let Ok(e) = events.try_recv() {
            got.push(e);
        }
        assert_eq!(got.len(), 5);
        assert_eq!(got[0].verdict, pb::L7Verdict::Forwarded as i32);
        assert_eq!(got[0].path, "/public/a");
        assert_eq!(got[0].rule, "SinewNetworkPolicy default/web ingress[0].rules.http[0]");
        assert_eq!(got[0].src_name, "client");
        assert_eq!(got[0].dst_name, "server");
        assert_eq!(got[1].verdict, pb::L7Verdict::Denied as i32);
        assert_eq!(got[1].status, 403);
        assert_eq!(got[1].drop_reason, "policy_denied");

        // A new snapshot applies to the next request on an open connection.
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let one = |s: &mut TcpStream| {
            s.write_all(b"GET /admin HTTP/1.1\r\nHost: web\r\n\r\n").unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n])[9..12].to_owned()
        };
        assert_eq!(one(&mut s), "403");
        p.state
            .apply(&snapshot(2, up.port(), vec![get_prefix("/")], vec![]))
            .unwrap();
        assert_eq!(one(&mut s), "200");

        // Metrics on the admin port.
        let m = raw(
            p.admin.unwrap(),
            b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            "",
            0,
        );
        assert!(
            m.contains("sinew_proxy_requests_total{direction=\"ingress\",verdict=\"denied\",status_class=\"4xx\"} 4"),
            "{m}"
        );
        assert!(m.contains("sinew_proxy_drops_total{reason=\"policy_denied\"} 4"), "{m}");
        assert!(m.contains("sinew_proxy_request_duration_seconds_count 7"), "{m}");
        p.drain();
        p.join();
    });
}

/// An HTTP/1.1 upstream answering "ok" that counts the connections it
/// accepts.
async fn counting_upstream() -> (SocketAddr, Arc<AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            a.fetch_add(1, Relaxed);
            tokio::spawn(async move {
                let svc = service_fn(|_req: http::Request<hyper::body::Incoming>| async {
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, accepted)
}

/// One request on an open keep-alive connection; its status code.
fn get_on(s: &mut TcpStream, path: &str) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: web\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while !out.ends_with(b"\r\n\r\nok") && !out.ends_with(b"denied\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the proxy closed: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out[9..12]).into_owned()
}

/// An HTTP/1.1 client connection keeps one upstream connection for all its
/// requests (RFC 9112 section 9.3: persistent connections), a second client
/// at the same time gets its own, and a client that leaves gives its
/// upstream connection to the next client rather than closing it.
#[test]
fn http1_clients_keep_one_upstream_connection_each_and_the_pool_reuses_it() {
    in_netns(|| {
        let rt = rt();
        let (up, accepted) = rt.block_on(counting_upstream());
        let p = start(up, Duration::from_secs(5));
        p.state
            .apply(&snapshot(1, up.port(), vec![get_prefix("/public")], vec![]))
            .unwrap();
        let a = p.ingress[0];
        let mut first = TcpStream::connect(a).unwrap();
        first.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for i in 0..5 {
            assert_eq!(get_on(&mut first, &format!("/public/{i}")), "200");
        }
        // A denied request goes nowhere and changes nothing.
        assert_eq!(get_on(&mut first, "/admin"), "403");
        assert_eq!(get_on(&mut first, "/public/again"), "200");
        assert_eq!(accepted.load(Relaxed), 1, "one upstream connection for one client");
        let mut second = TcpStream::connect(a).unwrap();
        second.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for i in 0..3 {
            assert_eq!(get_on(&mut second, &format!("/public/b{i}")), "200");
            assert_eq!(get_on(&mut first, &format!("/public/a{i}")), "200");
        }
        assert_eq!(accepted.load(Relaxed), 2, "a client at the same time has its own");
        drop(first);
        let t = Instant::now();
        while p.metrics.active_connections() > 1 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut third = TcpStream::connect(a).unwrap();
        third.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for i in 0..3 {
            assert_eq!(get_on(&mut third, &format!("/public/c{i}")), "200");
        }
        assert_eq!(
            accepted.load(Relaxed),
            2,
            "the client that left gave its upstream connection to the next"
        );
        p.drain();
        p.join();
    });
}

/// Many idle keep-alive clients do not each hold an upstream connection:
/// past four times the idle pool, a client gives its upstream connection
/// back after each exchange, and the next client reuses it.
#[test]
fn idle_clients_hold_a_bounded_number_of_upstream_connections() {
    in_netns(|| {
        let rt = rt();
        let (up, accepted) = rt.block_on(counting_upstream());
        let p = start_with(up, Duration::from_secs(5), |c| c.limits.upstream_idle_per_key = 2);
        p.state
            .apply(&snapshot(1, up.port(), vec![get_prefix("/public")], vec![]))
            .unwrap();
        let mut clients = Vec::new();
        for i in 0..30 {
            let mut c = TcpStream::connect(p.ingress[0]).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert_eq!(get_on(&mut c, &format!("/public/{i}")), "200");
            clients.push(c);
        }
        // 8 held by their clients, then one shared through the pool.
        let n = accepted.load(Relaxed);
        assert!(n <= 2 * 4 + 2, "{n} upstream connections for 30 idle clients");
        // Every client still works.
        for c in &mut clients {
            assert_eq!(get_on(c, "/public/again"), "200");
        }
        p.drain();
        p.join();
    });
}

#[test]
fn no_snapshot_fails_closed() {
    in_netns(|| {
        let rt = rt();
        let (up, hits) = rt.block_on(upstream());
        let p = start(up, Duration::from_secs(5));
        let out = raw(
            p.ingress[0],
            b"GET /public HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
            "",
            0,
        );
        assert!(out.starts_with("HTTP/1.1 403"), "{out}");
        assert_eq!(hits.load(Relaxed), 0);
        assert_eq!(p.metrics.drops(DropReason::NoRules), 1);
    });
}

#[test]
fn h2c_prior_knowledge_and_upgrade_request() {
    in_netns(|| {
        let rt = rt();
        let (up, hits) = rt.block_on(upstream());
        let p = start(up, Duration::from_secs(5));
        p.state
            .apply(&snapshot(1, up.port(), vec![get_prefix("/public")], vec![]))
            .unwrap();
        let a = p.ingress[0];
        rt.block_on(async {
            let s = tokio::net::TcpStream::connect(a).await.unwrap();
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .unwrap();
            tokio::spawn(conn);
            for (path, want) in [
                ("/public/x", 200),
                ("/admin", 403),
                ("/public/%2e%2e/admin", 403),
                ("/public/%2fx", 400),
            ] {
                let req = http::Request::get(format!("http://web{path}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let r = send.send_request(req).await.unwrap();
                assert_eq!(r.status().as_u16(), want, "{path}");
                if want == 200 {
                    let b = r.into_body().collect().await.unwrap().to_bytes();
                    assert_eq!(&b[..], b"GET /public/x");
                }
            }
        });
        assert_eq!(hits.load(Relaxed), 1);
        assert_eq!(p.metrics.drops(DropReason::AmbiguousPath), 1);
        // An h2c Upgrade request is answered as HTTP/1.1.
        let out = raw(
            a,
            b"GET /public/u HTTP/1.1\r\nHost: web\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
            "GET /public/u",
            1,
        );
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    });
}

struct EchoSvc;

#[tonic::async_trait]
impl echo::echo_server::Echo for EchoSvc {
    async fn say(
        &self,
        r: tonic::Request<echo::EchoRequest>,
    ) -> Result<tonic::Response<echo::EchoReply>, tonic::Status> {
        Ok(tonic::Response::new(echo::EchoReply {
            text: r.into_inner().text,
        }))
    }
    type StreamStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<echo::EchoReply, tonic::Status>> + Send>>;
    async fn stream(
        &self,
        r: tonic::Request<tonic::Streaming<echo::EchoRequest>>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        let mut inb = r.into_inner();
        let out = async_stream_like(move |tx| async move {
            while let Ok(Some(m)) = inb.message().await {
                let _ = tx.send(Ok(echo::EchoReply { text: m.text })).await;
            }
        });
        Ok(tonic::Response::new(Box::pin(out)))
    }
    async fn admin(
        &self,
        _: tonic::Request<echo::EchoRequest>,
    ) -> Result<tonic::Response<echo::EchoReply>, tonic::Status> {
        Ok(tonic::Response::new(echo::EchoReply { text: "admin".into() }))
    }
}

fn async_stream_like<F, Fut>(f: F) -> tokio_stream::wrappers::ReceiverStream<Result<echo::EchoReply, tonic::Status>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<echo::EchoReply, tonic::Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[test]
fn grpc_unary_and_streaming_allow_deny() {
    in_netns(|| {
        let rt = rt();
        let up = rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(echo::echo_server::EchoServer::new(EchoSvc))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
            );
            addr
        });
        let p = start(up, Duration::from_secs(5));
        let g = |m: &str| pb::GrpcRule {
            service: "sinew.test.echo.Echo".into(),
            method: m.into(),
        };
        p.state
            .apply(&snapshot(1, up.port(), vec![], vec![g("Say"), g("Stream")]))
            .unwrap();
        let a = p.ingress[0];
        rt.block_on(async {
            let mut c = echo::echo_client::EchoClient::connect(format!("http://{a}"))
                .await
                .unwrap();
            let r = c.say(echo::EchoRequest { text: "hi".into() }).await.unwrap();
            assert_eq!(r.into_inner().text, "hi");
            let e = c.admin(echo::EchoRequest { text: "x".into() }).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            let reqs = tokio_stream::iter((0..5).map(|i| echo::EchoRequest { text: format!("m{i}") }));
            let mut s = c.stream(reqs).await.unwrap().into_inner();
            let mut n = 0;
            while let Some(m) = s.message().await.unwrap() {
                assert_eq!(m.text, format!("m{n}"));
                n += 1;
            }
            assert_eq!(n, 5, "every streamed message and the trailers came back");
            // Only Say and Stream: after a new snapshot allowing Admin too.
            p.state.apply(&snapshot(2, up.port(), vec![], vec![g("")])).unwrap();
            assert_eq!(
                c.admin(echo::EchoRequest { text: "x".into() })
                    .await
                    .unwrap()
                    .into_inner()
                    .text,
                "admin"
            );
        });
        assert_eq!(p.metrics.requests(Verdict::Denied), 1);
    });
}

#[test]
fn websocket_upgrade_passes_when_allowed() {
    in_netns(|| {
        let rt = rt();
        let (up, _) = rt.block_on(upstream());
        let p = start(up, Duration::from_secs(5));
        p.state
            .apply(&snapshot(1, up.port(), vec![get_prefix("/ws")], vec![]))
            .unwrap();
        let a = p.ingress[0];
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        s.write_all(b"ping-bytes").unwrap();
        let mut got = Vec::new();
        while got.len() < 10 {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(&got, b"ping-bytes");
        let out = raw(
            a,
            b"GET /chat HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "HTTP/1.1",
            1,
        );
        assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    });
}

#[test]
fn bad_input_is_refused_counted_and_never_hangs() {
    in_netns(|| {
        let rt = rt();
        let (up, hits) = rt.block_on(upstream());
        let p = start(up, Duration::from_millis(800));
        p.state
            .apply(&snapshot(1, up.port(), vec![get_prefix("/")], vec![]))
            .unwrap();
        let a = p.ingress[0];
        let t = Instant::now();

        // Not HTTP: TLS ClientHello bytes, closed without an answer.
        let out = raw(a, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "", 0);
        assert_eq!(out, "");
        // Oversized header block: 431.
        let big = format!("GET / HTTP/1.1\r\nHost: web\r\nx-big: {}\r\n\r\n", "a".repeat(40_000));
        let out = raw(a, big.as_bytes(), "", 0);
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
        // Too many headers: 431.
        let many: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
        let out = raw(
            a,
            format!("GET / HTTP/1.1\r\nHost: web\r\n{many}\r\n").as_bytes(),
            "",
            0,
        );
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
        // Invalid method and target.
        let out = raw(a, b"G@T / HTTP/1.1\r\nHost: web\r\n\r\n", "", 0);
        assert!(out.starts_with("HTTP/1.1 400") || out.is_empty(), "{out}");
        let out = raw(a, b"GET web:80 HTTP/1.1\r\nHost: web\r\n\r\n", "", 0);
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        let out = raw(a, b"CONNECT web:443 HTTP/1.1\r\nHost: web\r\n\r\n", "", 0);
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        let out = raw(a, b"GET /a%2fb HTTP/1.1\r\nHost: web\r\n\r\n", "", 0);
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        // Request smuggling: each refused with 400, nothing forwarded, the
        // connection closed (nothing after the first answer), and counted.
        let before = hits.load(Relaxed);
        let smuggling: [&[u8]; 5] = [
            // Two different Content-Lengths.
            b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc",
            // Two equal Content-Lengths.
            b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n",
            // obs-fold.
            b"GET / HTTP/1.1\r\nHost: web\r\nx-a: b\r\n c\r\n\r\n",
            // Content-Length then Transfer-Encoding: a hop that reads the
            // length would see the request after the chunked body.
            b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n",
            // Transfer-Encoding first (hyper drops the Content-Length).
            b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n",
        ];
        for req in smuggling {
            let out = raw(a, req, "", 0);
            assert!(out.starts_with("HTTP/1.1 400"), "{out}");
            assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
            assert!(!out.contains("smuggled"), "{out}");
        }
        // After a good request on the same connection: the second head is
        // the refused one.
        let out = raw(
            a,
            b"GET /first HTTP/1.1\r\nHost: web\r\n\r\nPOST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
            "",
            0,
        );
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("GET /first"), "{out}");
        assert_eq!(out.matches("HTTP/1.1 400").count(), 1, "{out}");
        assert_eq!(hits.load(Relaxed), before + 1, "only GET /first went upstream");
        // A header line without a colon is malformed, not smuggling.
        let out = raw(a, b"GET / HTTP/1.1\r\nHost: web\r\nnocolon\r\n\r\n", "", 0);
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        // An HTTP version other than 1.0 and 1.1: 505 (RFC 9110 15.6.6).
        let out = raw(a, b"GET / HTTP/2.0\r\nHost: web\r\n\r\n", "", 0);
        assert!(out.starts_with("HTTP/1.1 505"), "{out}");
        // A request line that ends in no HTTP version is not HTTP (h2spec
        // 3.5 #2 sends this as an invalid HTTP/2 preface; RFC 9113 3.4
        // wants the connection ended): closed without an answer.
        let out = raw(a, b"INVALID CONNECTION PREFACE\r\n\r\n", "", 0);
        assert_eq!(out, "");
        // Slow headers: the connection is closed after the timeout.
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n").unwrap();
        let t0 = Instant::now();
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf);
        assert!(t0.elapsed() < Duration::from_secs(4), "slow headers were not timed out");
        // Silent client: closed after the timeout too.
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t0 = Instant::now();
        assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
        assert!(t0.elapsed() < Duration::from_secs(4));

        std::thread::sleep(Duration::from_millis(200));
        let m = &p.metrics;
        // The TLS bytes, the method that is not a token and the line
        // without a version.
        assert_eq!(m.drops(DropReason::NotHttp), 3, "{}", m.render());
        assert_eq!(m.drops(DropReason::HeaderTooLarge), 2);
        assert_eq!(m.drops(DropReason::InvalidTarget), 2);
        assert_eq!(m.drops(DropReason::AmbiguousPath), 1, "{}", m.render());
        assert_eq!(m.drops(DropReason::Smuggling), 6, "{}", m.render());
        // The line without a colon, and the HTTP/2.0 request line.
        assert_eq!(m.drops(DropReason::MalformedRequest), 2, "{}", m.render());
        assert_eq!(m.drops(DropReason::HeaderTimeout), 2, "{}", m.render());
        assert!(t.elapsed() < Duration::from_secs(20));
        // Still serving.
        let out = raw(a, b"GET /ok HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n", "", 0);
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    });
}

/// Kills the child proxy when a test fails half-way.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_proxy(admin: u16, orig: SocketAddr, sock: &std::path::Path) -> Child {
    let log = std::fs::File::create(sock.with_file_name(format!("proxy-{admin}.log"))).unwrap();
    Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_sinew-proxy"))
            .args(["--ingress", "127.0.0.1:15006", "--egress", "none", "--admin"])
            .arg(format!("127.0.0.1:{admin}"))
            .arg("--agent-socket")
            .arg(sock)
            .arg("--original-dst")
            .arg(orig.to_string())
            .args(["--drain-timeout", "10"])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sinew-proxy"),
    )
}

fn wait_ready(admin: u16) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", admin)) {
            let _ = s.write_all(b"GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 200") && !out.contains("version=0") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("proxy on admin port {admin} not ready with a snapshot within 10 s");
}

#[test]
fn restart_hands_over_the_listener_without_failing_a_request() {
    in_netns(|| {
        let rt = rt();
        let (up, _) = rt.block_on(upstream());
        let dir = std::env::temp_dir().join(format!("sinew-proxy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("proxy.sock");
        let agent =
            sinew_proto::standin::StandInAgent::new(snapshot(7, up.port(), vec![get_prefix("/public")], vec![]));
        rt.block_on(async { agent.serve(&sock) }).unwrap();
        let acks = agent.acks.clone();
        let mut a = spawn_proxy(15090, up, &sock);
        wait_ready(15090);
        assert!(acks
            .lock()
            .unwrap()
            .iter()
            .any(|a| a.version == 7 && a.error.is_empty()));

        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let mut loops = Vec::new();
        for i in 0..2 {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            loops.push(std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    let out = match TcpStream::connect("127.0.0.1:15006") {
                        Ok(mut s) => {
                            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                            let _ = s.write_all(
                                format!("GET /public/{i} HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
                                    .as_bytes(),
                            );
                            let mut out = String::new();
                            let _ = s.read_to_string(&mut out);
                            out
                        }
                        Err(e) => e.to_string(),
                    };
                    if out.starts_with("HTTP/1.1 200") {
                        ok.fetch_add(1, Relaxed);
                    } else {
                        failed.lock().unwrap().push(out);
                    }
                }
            }));
        }
        // A slow request in flight on the old process while it drains.
        let slow = std::thread::spawn(|| {
            raw(
                "127.0.0.1:15006".parse().unwrap(),
                b"GET /public/slow HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
                "",
                0,
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        let b = spawn_proxy(15091, up, &sock);
        wait_ready(15091);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(a.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let st = a.0.wait().unwrap();
        assert!(st.success(), "old proxy exit: {st:?}");
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Relaxed);
        for l in loops {
            l.join().unwrap();
        }
        let slow = slow.join().unwrap();
        assert!(slow.starts_with("HTTP/1.1 200"), "in-flight request: {slow}");
        let failed = failed.lock().unwrap();
        let n = ok.load(Relaxed);
        eprintln!("restart: {n} requests, {} failed", failed.len());
        assert!(
            failed.is_empty(),
            "{} of {} requests failed: {:?}",
            failed.len(),
            n + failed.len() as u64,
            &failed[..failed.len().min(3)]
        );
        assert!(n > 20, "only {n} requests");
        let m = raw(
            "127.0.0.1:15091".parse().unwrap(),
            b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            "",
            0,
        );
        assert!(
            !m.contains("direction=\"ingress\",verdict=\"forwarded\",status_class=\"2xx\"} 0"),
            "the new proxy served nothing: {m}"
        );
        drop(b);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.push(ty);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

// GET http://web/ in HPACK: static :method GET, :scheme http, :path /, then
// :authority (static name 1) with a literal value.
const GET_ROOT: &[u8] = &[0x82, 0x86, 0x84, 0x01, 0x03, b'w', b'e', b'b'];

fn h2_conn(a: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(a).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    s.write_all(&frame(4, 0, 0, &[])).unwrap();
    s
}

/// Reads frames until EOF; returns (frame types seen with their first
/// payload word, whether EOF came).
fn read_frames(s: &mut TcpStream, limit: Duration) -> (Vec<(u8, u32)>, bool) {
    let t = Instant::now();
    let mut buf = Vec::new();
    let mut tmp = [0u8; 65536];
    let mut eof = false;
    while t.elapsed() < limit {
        match s.read(&mut tmp) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                eof = true;
                break;
            }
            Err(_) => break,
        }
    }
    let mut frames = Vec::new();
    let mut i = 0;
    while i + 9 <= buf.len() {
        let len = u32::from_be_bytes([0, buf[i], buf[i + 1], buf[i + 2]]) as usize;
        let ty = buf[i + 3];
        let word = if len >= 8 && ty == 7 {
            u32::from_be_bytes([buf[i + 13], buf[i + 14], buf[i + 15], buf[i + 16]])
        } else if len >= 4 && i + 13 <= buf.len() {
            u32::from_be_bytes([buf[i + 9], buf[i + 10], buf[i + 11], buf[i + 12]])
        } else {
            0
        };
        frames.push((ty, word));
        i += 9 + len;
    }
    (frames, eof)
}

#[test]
fn http2_abuse_is_limited_counted_and_closed() {
    in_netns(|| {
        let rt = rt();
        let (up, _) = rt.block_on(upstream());
        let p = start_with(up, Duration::from_secs(5), |c| {
            c.limits.h2_keepalive_interval = Duration::from_millis(300);
            c.limits.h2_keepalive_timeout = Duration::from_millis(300);
        });
        p.state
            .apply(&snapshot(1, up.port(), vec![get_prefix("/")], vec![]))
            .unwrap();
        let a = p.ingress[0];

        // Rapid reset: open and cancel streams as fast as possible.
        let mut s = h2_conn(a);
        let mut burst = Vec::new();
        for i in 0..2000u32 {
            let id = 2 * i + 1;
            burst.extend(frame(1, 0x5, id, GET_ROOT));
            burst.extend(frame(3, 0, id, &8u32.to_be_bytes()));
        }
        let _ = s.write_all(&burst);
        let (frames, eof) = read_frames(&mut s, Duration::from_secs(10));
        assert!(eof, "rapid reset did not close the connection");
        assert!(
            frames.iter().any(|(t, code)| *t == 7 && *code == 0xb),
            "no GOAWAY ENHANCE_YOUR_CALM: {:?}",
            &frames[frames.len().saturating_sub(5)..]
        );

        // Too many streams: the ones past the limit are refused.
        let mut s = h2_conn(a);
        let mut burst = Vec::new();
        for i in 0..150u32 {
            // END_HEADERS only: the streams stay open.
            burst.extend(frame(1, 0x4, 2 * i + 1, GET_ROOT));
        }
        s.write_all(&burst).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let (frames, _) = read_frames(&mut s, Duration::from_secs(1));
        let refused = frames.iter().filter(|(t, code)| *t == 3 && *code == 7).count();
        assert!(
            refused >= 50,
            "{refused} streams refused of 150 (limit 100): {:?}",
            &frames[..frames.len().min(10)]
        );
        drop(s);

        // PING and SETTINGS floods from a client that does not read: the
        // proxy stops reading, its keep-alive PING goes unanswered and the
        // connection is closed.
        for (ty, payload) in [(6u8, vec![0u8; 8]), (4u8, vec![])] {
            let mut s = h2_conn(a);
            s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
            let one = frame(ty, 0, 0, &payload);
            let burst: Vec<u8> = one.iter().copied().cycle().take(one.len() * 20_000).collect();
            for _ in 0..20 {
                if s.write_all(&burst).is_err() {
                    break;
                }
            }
            std::thread::sleep(Duration::from_secs(2));
            let (_, eof) = read_frames(&mut s, Duration::from_secs(15));
            assert!(eof, "flood of frame type {ty}: connection not closed");
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(p.metrics.drops(DropReason::H2Protocol) >= 3, "{}", p.metrics.render());
        // Still serving.
        let out = raw(a, b"GET /ok HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n", "", 0);
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    });
}

#[test]
fn a_bad_snapshot_is_refused_and_the_previous_rules_stay() {
    let state = sinew_proxy::state::SharedState::default();
    state
        .apply(&snapshot(1, 80, vec![get_prefix("/public")], vec![]))
        .unwrap();
    let mut bad = snapshot(2, 80, vec![get_prefix("/public")], vec![]);
    bad.endpoints[0].rule_sets[0].http[0].path = Some(pb::StringMatch {
        kind: Some(pb::string_match::Kind::Regex("(".into())),
    });
    let err = state.apply(&bad).unwrap_err().to_string();
    assert!(err.contains("endpoint 0"), "{err}");
    assert_eq!(state.load().version, 1);
    let mut bad = snapshot(3, 80, vec![], vec![]);
    bad.endpoints[0].addresses = vec!["not-an-ip".into()];
    assert!(state.apply(&bad).is_err());
    assert_eq!(state.load().version, 1);
}

/// Sends `req` from source address `src` and reads until the server closes.
fn raw_from(rt: &tokio::runtime::Runtime, src: &str, to: SocketAddr, req: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{src}:0").parse().unwrap()).unwrap();
        let mut c = s.connect(to).await.unwrap();
        c.write_all(req).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    })
}

/// A rule set whose peers are CIDR classes (a policy's fromCIDR with L7
/// rules) judges every client inside the prefix by those rules, by the
/// longest named prefix, and no client outside it.
#[test]
fn cidr_peers_match_clients_inside_the_prefix() {
    in_netns(|| {
        let rt = rt();
        let (up, hits) = rt.block_on(upstream());
        let p = start(up, Duration::from_secs(5));
        let mut snap = snapshot(1, up.port(), vec![], vec![]);
        snap.endpoints[0].rule_sets = vec![pb::RuleSet {
            cidr_classes: vec![0x0100_0007],
            http: vec![get_prefix("/public")],
            rule: "SinewNetworkPolicy default/web ingress[1]".into(),
            ..Default::default()
        }];
        snap.identities = vec![pb::IdentityEntry {
            prefix: "127.0.0.0/28".into(),
            identity: 0x0100_0007,
            ..Default::default()
        }];
        snap.cidr_classes = vec![
            pb::CidrClass {
                prefix: "127.0.0.0/28".into(),
                class: 0x0100_0007,
            },
            // A more specific named prefix is its own class.
            pb::CidrClass {
                prefix: "127.0.0.8/29".into(),
                class: 0x0100_0008,
            },
        ];
        p.state.apply(&snap).unwrap();
        let a = p.ingress[0];
        let get = b"GET /public/x HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n";
        let out = raw_from(&rt, "127.0.0.5", a, get);
        assert!(out.starts_with("HTTP/1.1 200"), "inside the /28: {out}");
        let out = raw_from(
            &rt,
            "127.0.0.5",
            a,
            b"GET /admin HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
        );
        assert!(out.starts_with("HTTP/1.1 403"), "{out}");
        let out = raw_from(&rt, "127.0.0.9", a, get);
        assert!(out.starts_with("HTTP/1.1 403"), "inside the nested /29: {out}");
        let out = raw_from(&rt, "127.0.0.20", a, get);
        assert!(out.starts_with("HTTP/1.1 403"), "outside: {out}");
        assert_eq!(hits.load(Relaxed), 1);
        assert_eq!(p.metrics.drops(DropReason::PolicyDenied), 3, "{}", p.metrics.render());
    });
}

/// Sends `req`, shuts down the write side (a half-close, as `nc -N` and
/// many HTTP/1.0 clients do) and reads the answer until the server closes.
fn raw_half_close(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(req).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// RFC 9112 section 9.6: a client that has sent its request may close its
/// sending side and still wait for the response ("half-close"); HTTP/1.0
/// clients without keep-alive do this. The proxy answers every such
/// request, allowed or denied, HTTP/1.0 and 1.1, and the connection closes
/// after the answer.
#[test]
fn a_half_closed_client_still_gets_its_response() {
    in_netns(|| {
        let rt = rt();
        let (up, hits) = rt.block_on(upstream());
        let p = start(up, Duration::from_secs(5));
        p.state
            .apply(&snapshot(1, up.port(), vec![get_prefix("/public")], vec![]))
            .unwrap();
        let a = p.ingress[0];
        let t = Instant::now();
        let out = raw_half_close(a, b"GET /public/a HTTP/1.0\r\n\r\n");
        assert!(out.starts_with("HTTP/1.0 200"), "HTTP/1.0 allowed: {out:?}");
        assert!(out.ends_with("GET /public/a"), "{out:?}");
        let out = raw_half_close(a, b"GET /admin HTTP/1.0\r\n\r\n");
        assert!(out.starts_with("HTTP/1.0 403"), "HTTP/1.0 denied: {out:?}");
        let out = raw_half_close(a, b"GET /public/b HTTP/1.1\r\nHost: web\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 200"), "HTTP/1.1 allowed: {out:?}");
        // Two pipelined requests, then the half-close: both answered.
        let out = raw_half_close(
            a,
            b"GET /public/c HTTP/1.1\r\nHost: web\r\n\r\nGET /public/d HTTP/1.1\r\nHost: web\r\n\r\n",
        );
        assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out:?}");
        assert!(
            out.contains("GET /public/c") && out.ends_with("GET /public/d"),
            "{out:?}"
        );
        // A POST whose body is complete before the half-close.
        let out = raw_half_close(a, b"POST /public/e HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc");
        assert!(out.starts_with("HTTP/1.0 403"), "POST is not allowed: {out:?}");
        assert_eq!(hits.load(Relaxed), 4);
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "a half-closed client waited for a timeout"
        );
        // A half-close in the middle of a head is not a request: closed
        // without an answer, no hang.
        let out = raw_half_close(a, b"GET /public/f HTTP/1.1\r\nHost: w");
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(hits.load(Relaxed), 4);
    });
}

/// A client with egress L7 rules calls a pod of the same node that has
/// ingress L7 rules on that port. The proxy's upstream is not redirected
/// again (the datapath lets its marked packets pass), so the proxy judges
/// the destination's ingress rules too, as the destination's node would:
/// what egress allows and ingress refuses is 403 and never reaches the
/// server. Each judgement is its own flow event, as on two nodes.
#[test]
fn egress_to_a_local_pod_also_meets_its_ingress_rules() {
    in_netns(|| {
        let rt = rt();
        let (up, hits) = rt.block_on(upstream());
        let p = start_with(up, Duration::from_secs(5), |c| {
            c.ingress = vec![];
            c.egress = vec!["127.0.0.1:0".parse().unwrap()];
        });
        let mut snap = snapshot(1, up.port(), vec![get_prefix("/public")], vec![]);
        let exact = |p: &str| pb::HttpRule {
            path: Some(pb::StringMatch {
                kind: Some(pb::string_match::Kind::Exact(p.into())),
            }),
            ..Default::default()
        };
        snap.endpoints.push(pb::L7Endpoint {
            addresses: vec!["127.0.0.1".into()],
            identity: 1000,
            namespace: "default".into(),
            name: "client".into(),
            direction: pb::Direction::Egress as i32,
            port: up.port().into(),
            rule_sets: vec![pb::RuleSet {
                http: vec![get_prefix("/public"), exact("/admin")],
                rule: "SinewNetworkPolicy default/clients egress[0]".into(),
                ..Default::default()
            }],
        });
        p.state.apply(&snap).unwrap();
        let mut events = p.take_events().unwrap();
        let a = p.egress[0];
        let get = |path: &str| {
            raw(
                a,
                format!("GET {path} HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n").as_bytes(),
                "",
                0,
            )
        };
        let out = get("/public/a");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let out = get("/admin");
        assert!(
            out.starts_with("HTTP/1.1 403"),
            "egress allows /admin, ingress does not: {out}"
        );
        let out = get("/secret");
        assert!(out.starts_with("HTTP/1.1 403"), "{out}");
        assert_eq!(hits.load(Relaxed), 1, "only /public/a reached the server");

        std::thread::sleep(Duration::from_millis(100));
        let mut got = Vec::new();
        while let Ok(e) = events.try_recv() {
            got.push((e.direction, e.path.clone(), e.status, e.verdict, e.rule.clone()));
        }
        let (eg, ing) = (pb::Direction::Egress as i32, pb::Direction::Ingress as i32);
        let (fwd, den) = (pb::L7Verdict::Forwarded as i32, pb::L7Verdict::Denied as i32);
        let web = "SinewNetworkPolicy default/web ingress[0].rules.http[0]".to_string();
        let clients = |i: u32| format!("SinewNetworkPolicy default/clients egress[0].rules.http[{i}]");
        assert_eq!(
            got,
            [
                (eg, "/public/a".into(), 200, fwd, clients(0)),
                (ing, "/public/a".into(), 200, fwd, web.clone()),
                (eg, "/admin".into(), 403, fwd, clients(1)),
                (ing, "/admin".into(), 403, den, String::new()),
                (eg, "/secret".into(), 403, den, String::new()),
            ]
        );
        assert_eq!(p.metrics.drops(DropReason::PolicyDenied), 2, "{}", p.metrics.render());
    });
}

fn any_method_prefix(p: &str) -> pb::HttpRule {
    use pb::string_match::Kind;
    pb::HttpRule {
        path: Some(pb::StringMatch {
            kind: Some(Kind::Prefix(p.into())),
        }),
        ..Default::default()
    }
}

/// A plain-socket HTTP/1.1 upstream for exact control of what it sends:
/// reads each request head and its body (Content-Length or chunked), and
/// answers with `answer(method, path)`: the bytes to write and whether to
/// close after them. Counts the connections it accepts.
fn raw_upstream(answer: fn(&str, &str) -> (Vec<u8>, bool)) -> (SocketAddr, Arc<AtomicU64>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicU64::new(0));
    let c = conns.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            c.fetch_add(1, Relaxed);
            std::thread::spawn(move || {
                let mut r = std::io::BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                loop {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        match std::io::BufRead::read_line(&mut r, &mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        let end = line == "\r\n";
                        head.push_str(&line);
                        if end {
                            break;
                        }
                    }
                    let mut words = head.split_whitespace();
                    let (method, path) = (
                        words.next().unwrap_or("").to_owned(),
                        words.next().unwrap_or("").to_owned(),
                    );
                    let lower = head.to_ascii_lowercase();
                    if let Some(n) = lower
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                    {
                        let mut body = vec![0u8; n];
                        if r.read_exact(&mut body).is_err() {
                            return;
                        }
                    } else if lower.contains("transfer-encoding: chunked") {
                        loop {
                            let mut line = String::new();
                            if std::io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            let size = usize::from_str_radix(line.trim(), 16).unwrap();
                            let mut data = vec![0u8; size + 2];
                            r.read_exact(&mut data).unwrap();
                            if size == 0 {
                                break;
                            }
                        }
                    }
                    let (bytes, close) = answer(&method, &path);
                    if w.write_all(&bytes).is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

/// Reads one response head from `s`, byte by byte (nothing past it).
fn read_head(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut b).unwrap(),
            1,
            "closed in a head: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.push(b[0]);
    }
    String::from_utf8(got).unwrap()
}

/// Reads one response from `s`: its head and, by Content-Length or until
/// the close, its body. Returns (head, body).
fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let head = read_head(s);
    let lower = head.to_ascii_lowercase();
    let body = match lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        Some(n) => {
            let mut body = vec![0u8; n];
            s.read_exact(&mut body).unwrap();
            body
        }
        None => {
            let mut body = Vec::new();
            s.read_to_end(&mut body).unwrap();
            body
        }
    };
    (head, body)
}

/// RFC 9110 15.2 (interim responses are forwarded), 9.3.2 (a response to
/// HEAD has no body whatever its Content-Length says) and RFC 9112 6.3
/// (a response without a length ends at the close, and the proxy then
/// closes the client's connection too): the framing the proxy follows to
/// keep one client connection correct across those responses.
#[test]
fn interim_head_and_close_delimited_responses_keep_the_connection_framed() {
    in_netns(|| {
        let (up, _) = raw_upstream(|method, path| {
            match (method, path) {
            ("HEAD", _) => (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n".to_vec(), false),
            (_, "/public/early") => (
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
                    .to_vec(),
                false,
            ),
            (_, "/public/eof") => (b"HTTP/1.1 200 OK\r\n\r\nuntil the close".to_vec(), true),
            _ => (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(), false),
        }
        });
        let p = start(up, Duration::from_secs(5));
        p.state
            .apply(&snapshot(1, up.port(), vec![any_method_prefix("/public")], vec![]))
            .unwrap();
        let mut s = TcpStream::connect(p.ingress[0]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"HEAD /public/h HTTP/1.1\r\nHost: web\r\n\r\n").unwrap();
        let head = read_head(&mut s);
        assert!(
            head.starts_with("HTTP/1.1 200") && head.contains("Content-Length: 10"),
            "{head}"
        );
        // No body followed the HEAD response: the next bytes are the next
        // response's.
        s.write_all(b"GET /public/early HTTP/1.1\r\nHost: web\r\n\r\n").unwrap();
        let interim = read_head(&mut s);
        assert!(interim.starts_with("HTTP/1.1 103"), "{interim}");
        assert!(interim.contains("Link: </style.css>; rel=preload"), "{interim}");
        let (final_head, body) = read_response(&mut s);
        assert!(final_head.starts_with("HTTP/1.1 200"), "{final_head}");
        assert_eq!(body, b"x");
        s.write_all(b"GET /public/eof HTTP/1.1\r\nHost: web\r\n\r\n").unwrap();
        let (h, body) = read_response(&mut s);
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        assert!(h.to_ascii_lowercase().contains("connection: close"), "{h}");
        assert_eq!(body, b"until the close", "the body ends at the upstream's close");
    });
}

/// RFC 9110 9.2.2 and RFC 9112 9.3.1: a proxy may send a request again on
/// a new connection when the one it used closed under it, only if the
/// method is idempotent. An upstream that closes after every response
/// without saying so: a GET sent on the closed connection gets through on
/// a new one; a POST is answered 502 and counted; a POST after the
/// connection sat idle long enough to be checked goes on a new one.
#[test]
fn a_reused_upstream_closed_while_idle_is_retried_only_for_idempotent_requests() {
    in_netns(|| {
        let (up, conns) = raw_upstream(|_, _| (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(), true));
        let p = start(up, Duration::from_secs(5));
        p.state
            .apply(&snapshot(1, up.port(), vec![any_method_prefix("/public")], vec![]))
            .unwrap();
        let mut s = TcpStream::connect(p.ingress[0]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut ask = |req: &[u8]| {
            s.write_all(req).unwrap();
            read_response(&mut s).0
        };
        assert!(ask(b"GET /public/1 HTTP/1.1\r\nHost: web\r\n\r\n").starts_with("HTTP/1.1 200"));
        std::thread::sleep(Duration::from_millis(20));
        let h = ask(b"GET /public/2 HTTP/1.1\r\nHost: web\r\n\r\n");
        assert!(h.starts_with("HTTP/1.1 200"), "a GET is sent again: {h}");
        assert_eq!(conns.load(Relaxed), 2);
        std::thread::sleep(Duration::from_millis(20));
        let h = ask(b"POST /public/3 HTTP/1.1\r\nHost: web\r\nContent-Length: 1\r\n\r\nz");
        assert!(h.starts_with("HTTP/1.1 502"), "a POST is not sent twice: {h}");
        assert_eq!(
            p.metrics.upstream_errors(sinew_proxy::metrics::UpstreamError::Request),
            1
        );
        // The 502 closed the client's connection; a new one, after the
        // upstream connection sat idle past the check.
        let mut s = TcpStream::connect(p.ingress[0]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /public/4 HTTP/1.1\r\nHost: web\r\n\r\n").unwrap();
        assert!(read_response(&mut s).0.starts_with("HTTP/1.1 200"));
        std::thread::sleep(Duration::from_millis(300));
        s.write_all(b"POST /public/5 HTTP/1.1\r\nHost: web\r\nContent-Length: 1\r\n\r\nz")
            .unwrap();
        let h = read_response(&mut s).0;
        assert!(
            h.starts_with("HTTP/1.1 200"),
            "an idle connection is checked first: {h}"
        );
        assert_eq!(
            p.metrics.upstream_errors(sinew_proxy::metrics::UpstreamError::Request),
            1
        );
    });
}

/// An upstream that echoes request bodies back (hyper: a body of known
/// length goes back with Content-Length, a chunked one chunked).
async fn echo_upstream() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    Ok::<_, Infallible>(http::Response::new(req.into_body()))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().split(';').next().unwrap(), 16).unwrap();
        b = &b[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// Bodies larger than any buffer, both framings, both ways, on one
/// keep-alive connection, and RFC 9110 10.1.1: `Expect: 100-continue` gets
/// its 100 before the client sends the body.
#[test]
fn large_bodies_stream_through_with_their_framing_and_expect_continue() {
    in_netns(|| {
        let rt = rt();
        let up = rt.block_on(echo_upstream());
        let p = start(up, Duration::from_secs(5));
        p.state
            .apply(&snapshot(1, up.port(), vec![any_method_prefix("/public")], vec![]))
            .unwrap();
        let mut s = TcpStream::connect(p.ingress[0]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut req = format!(
            "POST /public/len HTTP/1.1\r\nHost: web\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        let writer = {
            let mut w = s.try_clone().unwrap();
            std::thread::spawn(move || w.write_all(&req).unwrap())
        };
        let (h, got) = read_response(&mut s);
        writer.join().unwrap();
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        assert!(
            got == body,
            "Content-Length body: {} bytes back of {}",
            got.len(),
            body.len()
        );

        // Chunked, in chunks of odd sizes with an extension and a trailer.
        let mut req = b"POST /public/chunked HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for c in body.chunks(70_001) {
            req.extend_from_slice(format!("{:x};n=1\r\n", c.len()).as_bytes());
            req.extend_from_slice(c);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\nX-Sum: 1\r\n\r\n");
        let writer = {
            let mut w = s.try_clone().unwrap();
            std::thread::spawn(move || w.write_all(&req).unwrap())
        };
        let mut raw = Vec::new();
        let mut b = [0u8; 65536];
        while !raw.ends_with(b"\r\n0\r\n\r\n") {
            let n = s.read(&mut b).unwrap();
            assert!(n > 0, "closed before the last chunk");
            raw.extend_from_slice(&b[..n]);
        }
        writer.join().unwrap();
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let h = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
        assert!(
            h.starts_with("http/1.1 200") && h.contains("transfer-encoding: chunked"),
            "{h}"
        );
        assert!(dechunk(&raw[split..]) == body, "chunked body differs");

        // Expect: 100-continue on the same connection.
        s.write_all(b"POST /public/expect HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            .unwrap();
        let mut cont = [0u8; 25];
        s.read_exact(&mut cont).unwrap();
        assert_eq!(&cont, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(b"hello").unwrap();
        let (h, got) = read_response(&mut s);
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        assert_eq!(got, b"hello");
        assert_eq!(p.metrics.requests(Verdict::Forwarded), 3);
    });
}

/// RFC 9112 9.3 and its appendix C.2.2: an HTTP/1.0 client that sends
/// `Connection: keep-alive` keeps its connection only if the answer says
/// `keep-alive`; without it, it waits for the close. Both requests on one
/// connection, allowed and denied.
#[test]
fn an_http_1_0_keep_alive_client_is_told_the_connection_stays_open() {
    in_netns(|| {
        let rt = rt();
        let (up, hits) = rt.block_on(upstream());
        let p = start(up, Duration::from_secs(5));
        p.state
            .apply(&snapshot(1, up.port(), vec![get_prefix("/public")], vec![]))
            .unwrap();
        let mut s = TcpStream::connect(p.ingress[0]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for (path, status) in [("/public/a", "200"), ("/admin", "403"), ("/public/b", "200")] {
            s.write_all(format!("GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").as_bytes())
                .unwrap();
            let (head, body) = read_response(&mut s);
            assert!(head.starts_with(&format!("HTTP/1.0 {status}")), "{head}");
            assert!(head.to_ascii_lowercase().contains("connection: keep-alive"), "{head}");
            if status == "200" {
                assert_eq!(body, format!("GET {path}").as_bytes());
            }
        }
        assert_eq!(hits.load(Relaxed), 2);
    });
}

/// An h2c upstream that streams each request body back as the response
/// body while it arrives, announcing the default 65,535-octet windows
/// (RFC 9113 6.9.2), so the proxy waits for its WINDOW_UPDATEs.
async fn h2_echo_upstream() -> SocketAddr {
    h2_echo_upstream_counted().await.0
}

/// An h2c upstream that echoes request bodies, answers `/public/big/N`
/// with N octets, and counts the connections it accepts.
async fn h2_echo_upstream_counted() -> (SocketAddr, Arc<AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            a.fetch_add(1, Relaxed);
            tokio::spawn(async move {
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    if let Some(n) = req.uri().path().strip_prefix("/public/big/") {
                        let body = vec![b'x'; n.parse().unwrap()];
                        let r = http::Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
                        return Ok::<_, Infallible>(r);
                    }
                    Ok::<_, Infallible>(http::Response::new(req.into_body().boxed()))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .initial_stream_window_size(65_535)
                    .initial_connection_window_size(65_535)
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, accepted)
}

/// HTTP/2 client connections to one destination share the proxy's
/// upstream connections (as haproxy's `http-reuse` and Envoy's connection
/// pools do), and sharing never couples them: eight clients with four
/// streams each reach the upstream over one connection, every body comes
/// back whole on its own stream, and a client in the same hub that asks
/// for 32 MB and never reads, with every window wide open, holds only its
/// own stream while the others go on.
#[test]
fn h2c_clients_share_upstream_connections_and_a_stalled_client_holds_only_itself() {
    in_netns(|| {
        let rt = rt();
        let (up, accepted) = rt.block_on(h2_echo_upstream_counted());
        let p = start(up, Duration::from_secs(5));
        p.state
            .apply(&snapshot(1, up.port(), vec![any_method_prefix("/public")], vec![]))
            .unwrap();
        let a = p.ingress[0];

        // The client that stops reading: windows open to the maximum, a
        // 32 MB answer asked for, nothing read.
        let mut stalled = h2_conn(a);
        let mut settings = Vec::new();
        settings.extend(4u16.to_be_bytes());
        settings.extend(0x7fff_ffffu32.to_be_bytes());
        stalled.write_all(&frame(4, 0, 0, &settings)).unwrap();
        stalled
            .write_all(&frame(8, 0, 0, &(0x7fff_ffffu32 - 65_535).to_be_bytes()))
            .unwrap();
        let path = b"/public/big/33554432";
        let mut head = vec![0x82, 0x86, 0x44, path.len() as u8];
        head.extend_from_slice(path);
        head.extend_from_slice(&[0x41, 3, b'w', b'e', b'b']);
        // HEADERS with END_STREAM and END_HEADERS.
        stalled.write_all(&frame(1, 0x5, 1, &head)).unwrap();
        std::thread::sleep(Duration::from_millis(300));

        rt.block_on(async {
            let mut tasks = Vec::new();
            for c in 0..8u8 {
                let s = tokio::net::TcpStream::connect(a).await.unwrap();
                let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                    .await
                    .unwrap();
                tokio::spawn(conn);
                for k in 0..4u8 {
                    let mut send = send.clone();
                    tasks.push(tokio::spawn(async move {
                        let body: Vec<u8> = (0..100_000u32).map(|i| (i as u8) ^ c ^ (k << 4)).collect();
                        let req = http::Request::post(format!("http://web/public/echo/{c}/{k}"))
                            .body(Full::new(Bytes::from(body.clone())))
                            .unwrap();
                        let r = send.send_request(req).await.unwrap();
                        assert_eq!(r.status(), 200, "client {c} stream {k}");
                        let got = r.into_body().collect().await.unwrap().to_bytes();
                        assert!(
                            got[..] == body[..],
                            "client {c} stream {k}: the body changed on the way"
                        );
                    }));
                }
            }
            let all = async {
                for t in tasks {
                    t.await.unwrap();
                }
            };
            tokio::time::timeout(Duration::from_secs(20), all)
                .await
                .expect("a client that does not read must not hold the others");
        });
        assert_eq!(
            accepted.load(Relaxed),
            1,
            "nine client connections to one destination share one upstream connection"
        );
        drop(stalled);
    });
}

/// HTTP/2 flow control through the proxy (RFC 9113 5.2 and 6.9): four
/// streams of one connection each send 3 MB, far past every window, to an
/// upstream that echoes while it reads. Client and upstream both keep the
/// default 65,535-octet windows, so each byte crosses only as the proxy
/// gives window back on one side and gets it on the other; every body
/// must arrive whole, in order and on its own stream. Then an upstream
/// that refuses connections: the stream gets 502 and the error is counted
/// (RFC 9110 15.6.3), and the client connection goes on.
#[test]
fn h2c_bodies_larger_than_every_window_stream_through_both_ways() {
    in_netns(|| {
        let rt = rt();
        let up = rt.block_on(h2_echo_upstream());
        let p = start(up, Duration::from_secs(5));
        p.state
            .apply(&snapshot(1, up.port(), vec![any_method_prefix("/public")], vec![]))
            .unwrap();
        let a = p.ingress[0];
        rt.block_on(async {
            let s = tokio::net::TcpStream::connect(a).await.unwrap();
            let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(65_535)
                .initial_connection_window_size(65_535)
                .handshake(TokioIo::new(s))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut tasks = Vec::new();
            for k in 0..4u8 {
                let mut send = send.clone();
                tasks.push(tokio::spawn(async move {
                    let body: Vec<u8> = (0..3_000_000u32)
                        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(k))
                        .collect();
                    let req = http::Request::post(format!("http://web/public/echo/{k}"))
                        .body(Full::new(Bytes::from(body.clone())))
                        .unwrap();
                    let r = send.send_request(req).await.unwrap();
                    assert_eq!(r.status(), 200, "stream {k}");
                    let got = r.into_body().collect().await.unwrap().to_bytes();
                    assert_eq!(got.len(), body.len(), "stream {k}: length");
                    assert!(got[..] == body[..], "stream {k}: the body changed on the way");
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });

        // Nothing listens on the original destination.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let p2 = start(closed, Duration::from_secs(5));
        p2.state
            .apply(&snapshot(1, closed.port(), vec![any_method_prefix("/public")], vec![]))
            .unwrap();
        rt.block_on(async {
            let s = tokio::net::TcpStream::connect(p2.ingress[0]).await.unwrap();
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .unwrap();
            tokio::spawn(conn);
            for _ in 0..2 {
                let req = http::Request::get("http://web/public/x")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let r = send.send_request(req).await.unwrap();
                assert_eq!(r.status().as_u16(), 502);
            }
        });
        assert_eq!(
            p2.metrics
                .upstream_errors(sinew_proxy::metrics::UpstreamError::ConnectFailed),
            2
        );
    });
}

/// What one connection of [`scripted_h2_upstream`] does.
#[derive(Clone, Copy)]
enum H2Script {
    /// Holds its answers until it has read `streams` request heads and one
    /// DATA frame, then sends GOAWAY naming `last`, answers the streams up
    /// to `last`, and reads on until the proxy closes.
    GoawayAfter { streams: usize, last: u32 },
    /// Resets its first stream with REFUSED_STREAM, answers the others.
    RefuseFirst,
    /// Resets every stream with REFUSED_STREAM.
    RefuseAll,
}

/// An h2c upstream written frame by frame, for exact control of GOAWAY and
/// RST_STREAM: its n-th connection (from 0) follows `script(n)`. It never
/// decodes HPACK and answers with the static table's `:status: 200` alone
/// (0x88, RFC 7541 Appendix A). Reports every HEADERS and DATA frame it
/// reads, as (type, stream id), on `seen`. Returns its address, the
/// connections it accepted and those the proxy closed.
async fn scripted_h2_upstream(
    script: fn(u64) -> H2Script,
    seen: tokio::sync::mpsc::UnboundedSender<(u8, u32)>,
) -> (SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (accepted, closed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (a, c) = (accepted.clone(), closed.clone());
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let mode = script(a.fetch_add(1, Relaxed));
            let (seen, c) = (seen.clone(), c.clone());
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                s.read_exact(&mut preface).await.unwrap();
                assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
                s.write_all(&frame(4, 0, 0, &[])).await.unwrap();
                let (mut heads, mut data, mut gone_away) = (Vec::new(), false, false);
                loop {
                    let mut h = [0u8; 9];
                    if s.read_exact(&mut h).await.is_err() {
                        c.fetch_add(1, Relaxed);
                        return;
                    }
                    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                    let (ty, flags) = (h[3], h[4]);
                    let sid = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    let mut p = vec![0u8; len];
                    s.read_exact(&mut p).await.unwrap();
                    let mut out = Vec::new();
                    match ty {
                        4 if flags & 1 == 0 => out.extend(frame(4, 1, 0, &[])),
                        1 => {
                            let _ = seen.send((1, sid));
                            heads.push(sid);
                            match mode {
                                H2Script::RefuseAll => out.extend(frame(3, 0, sid, &7u32.to_be_bytes())),
                                H2Script::RefuseFirst if heads.len() == 1 => {
                                    out.extend(frame(3, 0, sid, &7u32.to_be_bytes()))
                                }
                                H2Script::RefuseFirst => out.extend(frame(1, 0x5, sid, &[0x88])),
                                H2Script::GoawayAfter { .. } => {}
                            }
                        }
                        0 => {
                            let _ = seen.send((0, sid));
                            data = true;
                        }
                        _ => {}
                    }
                    if let H2Script::GoawayAfter { streams, last } = mode {
                        if !gone_away && heads.len() == streams && data {
                            gone_away = true;
                            let mut g = last.to_be_bytes().to_vec();
                            g.extend(0u32.to_be_bytes());
                            out.extend(frame(7, 0, 0, &g));
                            for &sid in heads.iter().filter(|&&sid| sid <= last) {
                                out.extend(frame(1, 0x5, sid, &[0x88]));
                            }
                        }
                    }
                    s.write_all(&out).await.unwrap();
                }
            });
        }
    });
    (addr, accepted, closed)
}

/// An upstream's graceful GOAWAY and REFUSED_STREAM fail no request that
/// can go again (RFC 9113 6.8: streams above the GOAWAY's last id "were
/// not processed" and "can be safely retried using a new connection";
/// 8.7: a stream reset with REFUSED_STREAM was not processed, so its
/// request can be retried, whatever its method). nginx sends such a GOAWAY
/// after `keepalive_requests`. Five requests on one client connection,
/// sent in order (upstream ids 1..9); the upstream answers 1 and 3 and
/// sends GOAWAY(last 3). The GETs on 7 and 9 go again on a new connection,
/// which refuses the first of them: it goes once more, and both get 200.
/// The POST on 5 had sent its body, which the proxy no longer holds: 502,
/// counted as refused. The spent connection is closed by the proxy once
/// its last stream ends. Then an upstream that refuses every stream: the
/// request goes three more times and is answered 502, never looping.
#[test]
fn an_upstream_goaway_or_refused_stream_sends_the_unprocessed_requests_again() {
    in_netns(|| {
        let rt = rt();
        use sinew_proxy::metrics::UpstreamError::Refused;
        let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let (up, accepted, closed) = rt.block_on(scripted_h2_upstream(
            |n| match n {
                0 => H2Script::GoawayAfter { streams: 5, last: 3 },
                _ => H2Script::RefuseFirst,
            },
            tx,
        ));
        let p = start(up, Duration::from_secs(5));
        p.state
            .apply(&snapshot(1, up.port(), vec![any_method_prefix("/public")], vec![]))
            .unwrap();
        let a = p.ingress[0];
        let statuses = rt.block_on(async {
            let s = tokio::net::TcpStream::connect(a).await.unwrap();
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut tasks = Vec::new();
            for (k, body) in ["", "", "hello", "", ""].into_iter().enumerate() {
                let mut send = send.clone();
                let method = if body.is_empty() { "GET" } else { "POST" };
                let req = http::Request::builder()
                    .method(method)
                    .uri(format!("http://web/public/{k}"))
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                tasks.push(tokio::spawn(async move {
                    send.send_request(req).await.unwrap().status().as_u16()
                }));
                // The next request only once the upstream has this one
                // (its body too), so that the upstream ids are in order.
                let want = if body.is_empty() { 1 } else { 0 };
                let wait = async { while seen.recv().await.unwrap().0 != want {} };
                tokio::time::timeout(Duration::from_secs(5), wait)
                    .await
                    .unwrap_or_else(|_| panic!("the upstream never saw request {k}"));
            }
            let mut statuses = Vec::new();
            for t in tasks {
                statuses.push(tokio::time::timeout(Duration::from_secs(5), t).await.unwrap().unwrap());
            }
            statuses
        });
        assert_eq!(
            statuses,
            [200, 200, 502, 200, 200],
            "answered below the GOAWAY's last id, the POST whose body left refused, the GETs sent again"
        );
        assert_eq!(
            accepted.load(Relaxed),
            2,
            "one new upstream connection after the GOAWAY"
        );
        assert_eq!(
            p.metrics.upstream_retries.load(Relaxed),
            3,
            "two GETs after the GOAWAY, one after REFUSED_STREAM"
        );
        assert_eq!(p.metrics.upstream_errors(Refused), 1);
        assert_eq!(
            p.metrics.upstream_errors(sinew_proxy::metrics::UpstreamError::Request),
            0
        );
        let t = Instant::now();
        while closed.load(Relaxed) < 1 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the proxy keeps a connection that sent GOAWAY after its last stream ended"
            );
            std::thread::sleep(Duration::from_millis(20));
        }

        // Refused on every try: three retries, then 502 (gRPC would get 14).
        let (tx, _seen) = tokio::sync::mpsc::unbounded_channel();
        let (up, _, _) = rt.block_on(scripted_h2_upstream(|_| H2Script::RefuseAll, tx));
        let p = start(up, Duration::from_secs(5));
        p.state
            .apply(&snapshot(1, up.port(), vec![any_method_prefix("/public")], vec![]))
            .unwrap();
        let status = rt.block_on(async {
            let s = tokio::net::TcpStream::connect(p.ingress[0]).await.unwrap();
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = http::Request::get("http://web/public/x")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let r = tokio::time::timeout(Duration::from_secs(5), send.send_request(req));
            r.await
                .expect("a refused request must not loop")
                .unwrap()
                .status()
                .as_u16()
        });
        assert_eq!(status, 502);
        assert_eq!(p.metrics.upstream_retries.load(Relaxed), 3);
        assert_eq!(p.metrics.upstream_errors(Refused), 1);
    });
}

/// An h2c upstream that answers 200 "ok", counts the connections it
/// accepts, and closes every open one when `close` is notified.
async fn h2_closable_upstream() -> (SocketAddr, Arc<AtomicU64>, Arc<tokio::sync::Notify>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let close = Arc::new(tokio::sync::Notify::new());
    let (a, c) = (accepted.clone(), close.clone());
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            a.fetch_add(1, Relaxed);
            let c = c.clone();
            tokio::spawn(async move {
                let svc = service_fn(|_req: http::Request<hyper::body::Incoming>| async move {
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let serve = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc);
                // Dropping the connection closes its socket.
                tokio::select! {
                    _ = serve => {}
                    _ = c.notified() => {}
                }
            });
        }
    });
    (addr, accepted, close)
}

/// One h2c request on a connection of its own, closed after the answer;
/// returns once the proxy has let the connection go.
async fn h2_one_request(a: SocketAddr, p: &ProxyHandle) -> http::StatusCode {
    let s = tokio::net::TcpStream::connect(a).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    let req = http::Request::get("http://web/public/x")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send.send_request(req).await.unwrap();
    let status = r.status();
    let _ = r.into_body().collect().await;
    drop(send);
    let _ = task.await;
    let t = Instant::now();
    while p.metrics.active_connections() > 0 && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(p.metrics.active_connections(), 0, "the proxy let the client go");
    // The hub ends with its last client, a moment later.
    tokio::time::sleep(Duration::from_millis(100)).await;
    status
}

/// HTTP/2 clients that come and go one after another (each its own hub)
/// reuse the upstream connection the previous one left idle, as Envoy's
/// and haproxy's pools do, instead of a handshake each; and an idle
/// connection the upstream closed meanwhile is never used (RFC 9113 9.1:
/// either end may close an idle connection at any time), so the next
/// request opens a new one and succeeds.
#[test]
fn h2c_clients_one_after_another_reuse_the_idle_upstream_connection() {
    in_netns(|| {
        let rt = rt();
        let (up, accepted, close) = rt.block_on(h2_closable_upstream());
        let p = start(up, Duration::from_secs(5));
        p.state
            .apply(&snapshot(1, up.port(), vec![any_method_prefix("/public")], vec![]))
            .unwrap();
        let a = p.ingress[0];
        rt.block_on(async {
            for n in 0..3 {
                assert_eq!(h2_one_request(a, &p).await, 200, "client {n}");
            }
            assert_eq!(
                accepted.load(Relaxed),
                1,
                "three clients in turn, one upstream connection"
            );

            // The upstream closes its idle connection: the next client
            // must not be sent down it.
            close.notify_waiters();
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(
                h2_one_request(a, &p).await,
                200,
                "after the upstream closed the idle connection"
            );
            assert_eq!(
                accepted.load(Relaxed),
                2,
                "a new upstream connection replaced the closed one"
            );
            assert_eq!(h2_one_request(a, &p).await, 200);
            assert_eq!(accepted.load(Relaxed), 2);
        });
        assert_eq!(
            p.metrics.upstream_errors(sinew_proxy::metrics::UpstreamError::Request),
            0
        );
    });
}
