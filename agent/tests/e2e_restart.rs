//! An agent restart never interrupts traffic: a TCP stream between pods on
//! two nodes runs while both agents stop and come back; new connections
//! work while they are down; the restarted agents re-adopt the pinned maps
//! and their endpoints.

mod e2e;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::*;
use sinew_testvms::lab::Routing;

#[test]
fn tcp_stream_survives_agent_restart() {
    let mut g = lab("e2e-rst", 2, 1, Routing::Vxlan);
    let (a, c) = ("node1-pod1", "node2-pod1");
    let (ns_a, ns_c) = (pod_ns(&g.lab, a), pod_ns(&g.lab, c));
    let ip_c = pod_ip(&g.lab, c);
    let addr = SocketAddr::new(IpAddr::V4(ip_c), 9000);

    // Echo server in pod c, for as many connections as come.
    let listener = ns_c.run(move || TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });

    // A client in pod a that keeps a request/response stream going and
    // counts every round trip; any error ends it.
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let stream = ns_a
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
        .unwrap()
        .unwrap();
    let client = std::thread::spawn(move || -> Result<(u64, Duration), String> {
        let mut s = stream;
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let (mut n, mut worst) = (0u64, Duration::ZERO);
        let msg = [7u8; 1024];
        let mut buf = [0u8; 1024];
        while !stop2.load(Ordering::Relaxed) {
            let t = Instant::now();
            s.write_all(&msg)
                .map_err(|e| format!("write after {n} round trips: {e}"))?;
            s.read_exact(&mut buf)
                .map_err(|e| format!("read after {n} round trips: {e}"))?;
            worst = worst.max(t.elapsed());
            n += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok((n, worst))
    });
    std::thread::sleep(Duration::from_millis(500));

    for node in ["node1", "node2"] {
        assert!(g.lab.stop_agent(node).unwrap(), "{node}'s agent was running");
    }
    // While no agent runs: the pinned programs still forward, also for new
    // connections (conntrack-free datapath: nothing needs the agent).
    std::thread::sleep(Duration::from_millis(500));
    tcp_roundtrip(&ns_c, ip_c, 9001, &ns_a).expect("a new connection works while the agents are down");
    for node in ["node1", "node2"] {
        g.lab.start_agent(node).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for node in ["node1", "node2"] {
        let sock = g.lab.node(node).unwrap().socket.clone();
        loop {
            if let Ok(s) = status(&sock) {
                assert!(s.maps_reused, "{node}: the restarted agent re-adopted the pinned maps");
                assert_eq!(s.endpoints, 1, "{node}: endpoint restored");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{node}'s agent did not come back:\n{}",
                agent_log_tail(&g.lab, node)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (round_trips, worst) = client.join().unwrap().expect("the stream never broke");
    eprintln!("{round_trips} round trips, worst {worst:?}");
    assert!(round_trips > 100, "the stream kept going ({round_trips} round trips)");
    assert!(
        worst < Duration::from_millis(1000),
        "no stall across the restart: worst round trip {worst:?}"
    );
    // And after the restart, everything still works both ways.
    tcp_roundtrip(&ns_a, pod_ip(&g.lab, a), 9002, &ns_c).unwrap();
    let ep = &endpoints(&g.lab.node("node1").unwrap().socket)[0];
    assert_eq!(ep.state, "ready");
}
