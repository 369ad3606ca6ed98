//! HTTP/1.1 Upgrade and bytes that are not HTTP on an L7 port, through the
//! lab's real redirect and supervised sinew-proxy (issue 12, "Protocols"):
//! an allowed WebSocket upgrade (RFC 6455 section 4, over RFC 9110 section
//! 7.8 Upgrade) gets the server's 101 and then carries bytes both ways; a
//! denied one gets 403 and never reaches the server; a TLS ClientHello or
//! an SSH banner sent to the HTTP port is closed at once, counted as
//! `sinew_proxy_drops_total{reason="not_http"}`, and never hangs. Same node
//! and across nodes.

mod e2e;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::*;
use sinew_testvms::lab::{Lab, Routing};
use sinew_testvms::NetNs;

const POLICY: &str = r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: ws-l7, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: pod1, node: node2}
  ingress:
    - fromEndpoints: [{}]
      toPorts:
        - ports: [{port: "80", protocol: TCP}]
          rules:
            http:
              - {method: GET, path: {exact: /ws}}
"#;

/// An HTTP/1.1 server: a request with `Upgrade: websocket` gets 101 and
/// then every byte echoed; anything else 200. Counts the requests it saw.
fn ws_server(ns: &NetNs, ip: Ipv4Addr, port: u16) -> Arc<AtomicU64> {
    let addr = SocketAddr::new(IpAddr::V4(ip), port);
    let l = ns.run(move || TcpListener::bind(addr)).unwrap().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let seen = s2.clone();
            std::thread::spawn(move || serve(s, &seen));
        }
    });
    seen
}

fn serve(mut s: TcpStream, seen: &AtomicU64) {
    let Ok(r) = s.try_clone() else { return };
    let mut r = BufReader::new(r);
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    seen.fetch_add(1, Ordering::SeqCst);
    let mut upgrade = false;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 {
            return;
        }
        if h == "\r\n" {
            break;
        }
        upgrade |= h.to_ascii_lowercase().starts_with("upgrade: websocket");
    }
    if !upgrade {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        return;
    }
    // RFC 6455 4.2.2: the accept value for the RFC's sample key.
    let _ = s.write_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
    );
    // Bytes already buffered after the head, then the rest.
    let mut buf = [0u8; 4096];
    let pending = r.buffer().to_vec();
    if !pending.is_empty() && s.write_all(&pending).is_err() {
        return;
    }
    let mut inner = r.into_inner();
    loop {
        match inner.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

const UPGRADE: &str = "HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// Sends `bytes` from `ns` to `to` (and `then` once the first answer
/// arrived) and reads until what was read contains `until` (when not
/// empty), the peer closed, or 10 s passed: (what was read, closed, time).
fn exchange(
    ns: &NetNs,
    to: SocketAddr,
    bytes: Vec<u8>,
    then: Option<Vec<u8>>,
    until: &'static str,
) -> (Vec<u8>, bool, Duration) {
    ns.run(move || {
        let t = Instant::now();
        let mut s =
            TcpStream::connect_timeout(&to, Duration::from_secs(3)).unwrap_or_else(|e| panic!("connect {to}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&bytes).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let mut then = then;
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(_) => break false,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            if let Some(more) = then.take() {
                // The head arrived: now the upgraded bytes.
                s.write_all(&more).unwrap();
            }
            if !until.is_empty() && String::from_utf8_lossy(&out).contains(until) {
                break false;
            }
        };
        (out, closed, t.elapsed())
    })
    .unwrap()
}

fn proxy_drops(lab: &Lab, node: &str, reason: &str) -> f64 {
    let n = lab.node(node).unwrap();
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15090);
    let (code, body) = http_get(&n.netns, addr, "/metrics").unwrap_or_else(|e| panic!("{node} proxy /metrics: {e}"));
    assert_eq!(code, 200, "{body}");
    Metrics::parse(&body)
        .unwrap()
        .sum("sinew_proxy_drops_total", &[("reason", reason)])
}

fn upgrade_and_not_http(routing: Routing, prefix: &str) {
    let g = lab(prefix, 2, 2, routing);
    let lab = &g.lab;
    let web = pod_ip(lab, "node2-pod1");
    let seen = ws_server(&pod_ns(lab, "node2-pod1"), web, 80);
    let s2 = lab.node("node2").unwrap().socket.clone();
    let applied = apply_policy(&s2, POLICY).unwrap_or_else(|e| panic!("apply: {e}"));
    wait_policies_everywhere(lab, &applied);
    let to = SocketAddr::new(IpAddr::V4(web), 80);

    for client in ["node2-pod2", "node1-pod1"] {
        let ns = pod_ns(lab, client);
        // Allowed: 101, then bytes both ways on the same connection.
        let head = format!("GET /ws {UPGRADE}");
        let (out, _, _) = exchange(&ns, to, head.into_bytes(), Some(b"frame-bytes".to_vec()), "frame-bytes");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 101"), "{client}: {text}");
        assert!(
            text.ends_with("\r\n\r\nframe-bytes"),
            "{client}: upgraded bytes not echoed: {text:?}"
        );

        // Denied: 403 from the proxy; the server never sees it.
        let before = seen.load(Ordering::SeqCst);
        let (out, _, _) = exchange(&ns, to, format!("GET /chat {UPGRADE}").into_bytes(), None, "\r\n\r\n");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 403"), "{client}: {text}");
        assert_eq!(
            seen.load(Ordering::SeqCst),
            before,
            "{client}: a denied upgrade reached the server"
        );

        // Not HTTP: closed, counted, never a hang.
        for (what, bytes) in [
            (
                "a TLS ClientHello",
                vec![0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03],
            ),
            ("an SSH banner", b"SSH-2.0-OpenSSH_9.2p1\r\n".to_vec()),
        ] {
            let drops = proxy_drops(lab, "node2", "not_http");
            let (out, closed, took) = exchange(&ns, to, bytes, None, "");
            assert!(closed, "{client}: {what} was not closed within 10 s");
            assert!(out.is_empty(), "{client}: {what} got an answer: {out:?}");
            assert!(
                took < Duration::from_secs(2),
                "{client}: {what} closed only after {took:?}"
            );
            assert_eq!(
                seen.load(Ordering::SeqCst),
                before,
                "{client}: {what} reached the server"
            );
            assert_eq!(
                proxy_drops(lab, "node2", "not_http"),
                drops + 1.0,
                "{client}: {what} not counted as not_http"
            );
        }
    }
}

#[test]
fn websocket_upgrade_and_non_http_bytes_vxlan() {
    upgrade_and_not_http(Routing::Vxlan, "e2e-l7ux");
}

#[test]
fn websocket_upgrade_and_non_http_bytes_native() {
    upgrade_and_not_http(Routing::Native, "e2e-l7un");
}
