//! The request/response client and server over loopback inside a fresh
//! network namespace. Needs root (it creates a namespace) and fails loudly
//! without it.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use sinew_bench::rr::{self, RrConfig, Server};
use sinew_testvms::NetNs;

struct DeleteOnDrop(NetNs);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        let _ = self.0.delete();
    }
}

fn netns(tag: &str) -> DeleteOnDrop {
    let name = format!("bench-test-{}-{tag}", std::process::id());
    let ns = NetNs::create(&name).unwrap_or_else(|e| panic!("creating netns {name} (run as root): {e}"));
    DeleteOnDrop(ns)
}

const CFG: RrConfig = RrConfig {
    message_size: 1,
    duration: Duration::from_millis(300),
};

fn check(name: &str, r: &rr::RrResult) {
    assert!(r.rate > 0.0, "{name}: rate {}", r.rate);
    assert!(r.transactions > 0, "{name}: no transactions");
    assert!(r.p50_us > 0.0, "{name}: p50 {}", r.p50_us);
    assert!(r.p50_us <= r.p99_us, "{name}: p50 {} > p99 {}", r.p50_us, r.p99_us);
    assert!(
        r.elapsed_secs >= CFG.duration.as_secs_f64(),
        "{name}: ran {} s, asked for {:?}",
        r.elapsed_secs,
        CFG.duration
    );
}

#[test]
fn rr_and_crr_over_loopback_in_a_netns() {
    let ns = netns("lo");
    let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let (rr_res, crr_res) =
        ns.0.run(|| {
            let server = Server::bind(any, 1).expect("server binds on loopback");
            let addr = server.addr();
            assert_ne!(addr.port(), 0);
            (rr::tcp_rr(addr, CFG), rr::tcp_crr(addr, CFG))
        })
        .expect("entering the namespace");
    let rr_res = rr_res.expect("TCP_RR over loopback");
    let crr_res = crr_res.expect("TCP_CRR over loopback");
    check("TCP_RR", &rr_res);
    check("TCP_CRR", &crr_res);
    // A connection per transaction costs a handshake and a teardown more.
    assert!(
        crr_res.p50_us > rr_res.p50_us,
        "CRR p50 {} us should exceed RR p50 {} us",
        crr_res.p50_us,
        rr_res.p50_us
    );
}

#[test]
fn larger_messages_are_echoed_whole() {
    let ns = netns("big");
    let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let r =
        ns.0.run(|| {
            let server = Server::bind(any, 64 * 1024).expect("server binds");
            rr::tcp_rr(
                server.addr(),
                RrConfig {
                    message_size: 64 * 1024,
                    duration: Duration::from_millis(100),
                },
            )
        })
        .expect("entering the namespace")
        .expect("64 KiB TCP_RR");
    assert!(r.transactions > 0);
}

#[test]
fn client_fails_when_nothing_listens() {
    let ns = netns("none");
    let r =
        ns.0.run(|| {
            // Bind and drop to find a port that is free now.
            let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|l| l.local_addr())
                .expect("probe bind")
                .port();
            rr::tcp_rr(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), CFG)
        })
        .expect("entering the namespace");
    let err = r.expect_err("nothing listens, so TCP_RR must fail").to_string();
    assert!(err.contains("TCP_RR"), "{err}");
}
