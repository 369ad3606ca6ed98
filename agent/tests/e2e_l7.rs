//! L7 policy end to end in the lab (issue 12): real agents with their
//! supervised sinew-proxy, real BPF redirect, real veths. HTTP/1.1 allow
//! and deny from the same node and across nodes; a port of the same pod
//! without L7 rules never touches the proxy; a killed proxy fails closed
//! (`proxy_unavailable`) and the supervisor brings it back; an agent
//! restart during a request loop fails no request (the proxy keeps its
//! rules and is adopted by the new agent).

mod e2e;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::*;
use sinew_proto::observer_v1 as ob;
use sinew_testvms::lab::{Lab, Routing};
use sinew_testvms::NetNs;

/// node2-pod1 serves HTTP on 80 (L7 rules: GET under /public only) and on
/// 81 (no L7 rules: open to every pod, never through the proxy).
const POLICY: &str = r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: web-l7, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: pod1, node: node2}
  ingress:
    - fromEndpoints: [{}]
      toPorts:
        - ports: [{port: "80", protocol: TCP}]
          rules:
            http:
              - {method: GET, path: {prefix: /public}}
    - fromEndpoints: [{}]
      toPorts:
        - ports: [{port: "81", protocol: TCP}]
"#;

/// A small HTTP/1.1 server (keep-alive; answers every request 200 with
/// "served PATH") in `ns`, for as long as the test runs.
fn http_server(ns: &NetNs, ip: Ipv4Addr, port: u16) {
    let addr = SocketAddr::new(IpAddr::V4(ip), port);
    let l = ns.run(move || TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || serve_connection(s));
        }
    });
}

fn serve_connection(mut s: TcpStream) {
    let Ok(r) = s.try_clone() else { return };
    let mut r = BufReader::new(r);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut close = false;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            close |= h.to_ascii_lowercase().starts_with("connection: close");
        }
        let body = format!("served {path}");
        let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        if s.write_all(resp.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// Whether a TCP connect from `ns` succeeds within `timeout`.
fn connects(ns: &NetNs, addr: SocketAddr, timeout: Duration) -> bool {
    ns.run(move || TcpStream::connect_timeout(&addr, timeout).is_ok())
        .unwrap()
}

/// The proxy's Prometheus text, from inside the node.
fn proxy_metrics(lab: &Lab, node: &str) -> Metrics {
    let n = lab.node(node).unwrap();
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15090);
    let (code, body) = http_get(&n.netns, addr, "/metrics").unwrap_or_else(|e| panic!("{node} proxy /metrics: {e}"));
    assert_eq!(code, 200, "{body}");
    Metrics::parse(&body).unwrap()
}

fn proxy_connections(lab: &Lab, node: &str) -> f64 {
    proxy_metrics(lab, node).sum("sinew_proxy_connections_total", &[])
}

fn proxy_pid(lab: &Lab, node: &str) -> u32 {
    let f = lab.node(node).unwrap().state_dir.join("proxy.pid");
    std::fs::read_to_string(&f)
        .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        .trim()
        .parse()
        .unwrap()
}

fn alive(pid: u32) -> bool {
    sinew_model::procfs::running(pid)
}

/// The ingress listener port the lab's proxies use.
const INGRESS_PROXY_PORT: u16 = 15006;

/// Whether a TCP socket listens on `port` in `ns` (/proc/net/tcp, state 0A).
fn listening(ns: &NetNs, port: u16) -> bool {
    let table = ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/tcp"))
        .unwrap()
        .unwrap();
    let local = format!(":{port:04X}");
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&local) && f[3] == "0A"
    })
}

fn l7_flows(socket: &std::path::Path) -> Vec<ob::Flow> {
    get_flows(
        socket,
        ob::GetFlowsRequest {
            filters: vec![ob::FlowFilter {
                event_type: ob::EventType::L7 as i32,
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .unwrap()
}

fn get(lab: &Lab, from: &str, to: SocketAddr, path: &str) -> (u16, String) {
    http_get(&pod_ns(lab, from), to, path).unwrap_or_else(|e| panic!("{from} GET {to}{path}: {e}"))
}

/// Waits until GET /public/ from `from` is 200 again (10 s).
fn wait_served(lab: &Lab, from: &str, to: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match http_get(&pod_ns(lab, from), to, "/public/ok") {
            Ok((200, _)) => return,
            r => assert!(
                Instant::now() < deadline,
                "GET /public/ok from {from} never served again: {r:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn allow_deny_matrix(routing: Routing, prefix: &str) {
    let g = lab(prefix, 2, 2, routing);
    let lab = &g.lab;
    let web = pod_ip(lab, "node2-pod1");
    http_server(&pod_ns(lab, "node2-pod1"), web, 80);
    http_server(&pod_ns(lab, "node2-pod1"), web, 81);
    let s2 = lab.node("node2").unwrap().socket.clone();
    let t = Instant::now();
    let applied = apply_policy(&s2, POLICY).unwrap_or_else(|e| panic!("apply: {e}"));
    eprintln!("policy apply returned after the proxy's ACK in {:?}", t.elapsed());
    wait_policies_everywhere(lab, &applied);
    let l7 = SocketAddr::new(IpAddr::V4(web), 80);
    let plain = SocketAddr::new(IpAddr::V4(web), 81);

    // Same node and across nodes: allowed and denied, judged on node2.
    for client in ["node2-pod2", "node1-pod1"] {
        assert_eq!(
            get(lab, client, l7, "/public/a"),
            (200, "served /public/a".into()),
            "{client}"
        );
        let (code, body) = get(lab, client, l7, "/admin");
        assert_eq!(code, 403, "{client} GET /admin: {body}");
        assert!(
            !body.contains("served"),
            "a denied request never reaches the server: {body}"
        );
        // The path judged is the path forwarded: this is /admin.
        assert_eq!(get(lab, client, l7, "/public/../admin").0, 403, "{client}");
    }
    // The proxy sends its flow events in batches (at most 50 ms late):
    // wait for the six requests' flows.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut flows = l7_flows(&s2);
    while flows.len() < 6 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        flows = l7_flows(&s2);
    }
    let find = |client: &str, path: &str| {
        flows
            .iter()
            .find(|f| {
                f.source.as_ref().is_some_and(|s| s.pod_name == client) && f.l7.as_ref().is_some_and(|l| l.path == path)
            })
            .unwrap_or_else(|| panic!("no L7 flow {client} {path} in {flows:#?}"))
            .clone()
    };
    for client in ["node2-pod2", "node1-pod1"] {
        let ok = find(client, "/public/a");
        assert_eq!(ok.verdict(), ob::Verdict::Forwarded);
        assert_eq!(ok.direction(), ob::TrafficDirection::Ingress);
        assert_eq!(ok.destination.as_ref().unwrap().pod_name, "node2-pod1");
        assert_eq!(ok.destination.as_ref().unwrap().port, 80);
        let l = ok.l7.as_ref().unwrap();
        assert_eq!((l.method.as_str(), l.status), ("GET", 200));
        assert!(
            l.rule.starts_with("SinewNetworkPolicy default/web-l7 ingress[0]"),
            "{l:?}"
        );
        let no = find(client, "/admin");
        assert_eq!(no.verdict(), ob::Verdict::Dropped);
        let l = no.l7.as_ref().unwrap();
        assert_eq!((l.status, l.verdict()), (403, ob::L7Verdict::Denied));
        assert!(l.rule.is_empty());
    }
    // The CLI shows both verdicts.
    let out = std::process::Command::new(sinew_cli())
        .args([
            "--socket",
            s2.to_str().unwrap(),
            "observe",
            "--type",
            "l7",
            "--last",
            "50",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("default/node1-pod1") && text.contains("GET") && text.contains("/admin 403"),
        "{text}"
    );
    assert!(
        text.contains("/public/a 200") && text.contains("by SinewNetworkPolicy default/web-l7"),
        "{text}"
    );

    // Port 81 of the same pod: no L7 rules, never the proxy.
    let before = proxy_connections(lab, "node2");
    let l7_before = l7_flows(&s2).len();
    for client in ["node2-pod2", "node1-pod1"] {
        assert_eq!(
            get(lab, client, plain, "/admin"),
            (200, "served /admin".into()),
            "{client}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        proxy_connections(lab, "node2"),
        before,
        "port 81 went through the proxy"
    );
    let after: Vec<ob::Flow> = l7_flows(&s2);
    assert_eq!(after.len(), l7_before, "no L7 flow for port 81: {after:#?}");
    assert!(after
        .iter()
        .all(|f| f.destination.as_ref().is_some_and(|d| d.port == 80)));
    let status = observer_status(&s2);
    eprintln!("node2 observer: {:?}", status.flows_by_type);
}

#[test]
fn http_allow_and_deny_same_node_and_across_nodes_vxlan() {
    allow_deny_matrix(Routing::Vxlan, "e2e-l7x");
}

/// Native routing: an ingress L7 rule is enforced on the destination's
/// node, whose proxy's upstream stays on that node.
#[test]
fn http_allow_and_deny_same_node_and_across_nodes_native() {
    allow_deny_matrix(Routing::Native, "e2e-l7n");
}

#[test]
fn a_killed_proxy_fails_closed_and_the_supervisor_brings_it_back() {
    let g = lab("e2e-l7k", 2, 2, Routing::Vxlan);
    let lab = &g.lab;
    let web = pod_ip(lab, "node2-pod1");
    http_server(&pod_ns(lab, "node2-pod1"), web, 80);
    http_server(&pod_ns(lab, "node2-pod1"), web, 81);
    let s2 = lab.node("node2").unwrap().socket.clone();
    let applied = apply_policy(&s2, POLICY).unwrap_or_else(|e| panic!("apply: {e}"));
    wait_policies_everywhere(lab, &applied);
    let l7 = SocketAddr::new(IpAddr::V4(web), 80);
    assert_eq!(get(lab, "node2-pod2", l7, "/public/a").0, 200);

    let old = proxy_pid(lab, "node2");
    // Counted by the program that found no listener, whichever direction.
    let unavailable = |lab: &Lab| {
        drop_count(lab, "node2", "proxy_unavailable", "ingress")
            + drop_count(lab, "node2", "proxy_unavailable", "egress")
    };
    let drops = unavailable(lab);
    // The supervisor restarts the proxy 200 ms after it exits, so on a
    // loaded machine a connect made "right after" the kill can meet the
    // new proxy. Holding the agent (SIGSTOP) keeps the node without a
    // proxy for as long as the checks take; the datapath, in the kernel,
    // runs on regardless. The agent's counters are read once it runs again.
    let agent = lab.node("node2").unwrap().agent_pid.expect("node2's agent runs");
    let signal = |pid: u32, sig| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
    signal(agent, nix::sys::signal::Signal::SIGSTOP);
    signal(old, nix::sys::signal::Signal::SIGKILL);
    // Gone means its listener is gone: the thread-group leader turns
    // zombie while the other threads may still hold the socket table, and
    // a listener that lingers completes handshakes without any proxy.
    let node_ns = lab.node("node2").unwrap().netns.clone();
    let deadline = Instant::now() + Duration::from_secs(2);
    while alive(old) || listening(&node_ns, INGRESS_PROXY_PORT) {
        assert!(Instant::now() < deadline, "proxy {old} survived SIGKILL");
        std::thread::sleep(Duration::from_millis(2));
    }
    // No listener: the SYN is dropped (fail closed), never passed to the
    // server; port 81 is not affected.
    let client = pod_ns(lab, "node2-pod2");
    assert!(
        !connects(&client, l7, Duration::from_millis(150)),
        "a covered connection got through without the proxy"
    );
    assert!(connects(
        &client,
        SocketAddr::new(IpAddr::V4(web), 81),
        Duration::from_secs(2)
    ));
    signal(agent, nix::sys::signal::Signal::SIGCONT);
    let now = unavailable(lab);
    assert!(now > drops, "proxy_unavailable {drops} -> {now}");
    // The supervisor starts a new one, which gets the rules again.
    wait_served(lab, "node2-pod2", l7);
    let new = proxy_pid(lab, "node2");
    assert_ne!(new, old);
    assert_eq!(
        get(lab, "node1-pod1", l7, "/admin").0,
        403,
        "the new proxy has the rules"
    );
    let log = std::fs::read_to_string(lab.node("node2").unwrap().agent_log.clone()).unwrap();
    assert!(log.contains("sinew-proxy exited"), "the exit is logged");
}

/// A client that reuses its source port while the node still holds the
/// TIME_WAIT of its previous proxied connection (the proxy closed first:
/// `Connection: close`) reaches the proxy at once. Without help the kernel
/// refuses a connection that TC hands to the listener past that TIME_WAIT,
/// and the client waits for SYN retries; with it, TC gives the SYN to the
/// TIME_WAIT (RFC 9293 3.6.1: a new SYN may reopen a connection in
/// TIME-WAIT), the kernel retires it, and bpf_proxy.c's sk_lookup program
/// names the proxy's listener.
#[test]
fn a_client_reusing_its_port_reaches_the_proxy_past_the_time_wait() {
    let g = lab("e2e-l7t", 2, 2, Routing::Vxlan);
    let lab = &g.lab;
    let web = pod_ip(lab, "node2-pod1");
    http_server(&pod_ns(lab, "node2-pod1"), web, 80);
    let s2 = lab.node("node2").unwrap().socket.clone();
    let applied = apply_policy(&s2, POLICY).unwrap_or_else(|e| panic!("apply: {e}"));
    wait_policies_everywhere(lab, &applied);
    let l7 = SocketAddr::new(IpAddr::V4(web), 80);
    let node_ns = lab.node("node2").unwrap().netns.clone();
    for (client, port) in [("node2-pod2", 40123u16), ("node1-pod1", 40124)] {
        let ns = pod_ns(lab, client);
        let src = SocketAddr::new(IpAddr::V4(pod_ip(lab, client)), port);
        let resets = out_resets(&ns);
        for round in 0..4 {
            let path = if round % 2 == 0 { "/public/a" } else { "/admin" };
            let (code, waited) = ns
                .run(move || get_from(src, l7, path))
                .unwrap()
                .unwrap_or_else(|e| panic!("{client} round {round}: {e}"));
            assert_eq!(code, if round % 2 == 0 { 200 } else { 403 }, "{client} round {round}");
            // The kernel's first SYN retry comes after 1 s: a connect that
            // took that long had its first SYN dropped.
            assert!(
                waited < Duration::from_millis(900),
                "{client} round {round}: connect took {waited:?} (a SYN was lost)"
            );
            // The proxy closed first, so the node holds the TIME_WAIT the
            // next round's SYN must get past.
            assert!(
                time_wait(&node_ns, src, l7),
                "{client} round {round}: no TIME_WAIT for {src} -> {l7} in the node"
            );
        }
        // Answered by the proxy's SYN-ACK every time: had the TIME_WAIT
        // answered (an ACK for the old connection) the client would have
        // reset it and sent its SYN again.
        assert_eq!(
            out_resets(&ns),
            resets,
            "{client} sent resets: a SYN met the TIME_WAIT instead of the proxy"
        );
    }
}

/// One `Connection: close` GET from a fixed source address (SO_REUSEADDR);
/// the status and how long the connect took.
fn get_from(src: SocketAddr, dst: SocketAddr, path: &str) -> Result<(u16, Duration), String> {
    use std::io::Read;
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).map_err(|e| e.to_string())?;
    s.set_reuse_address(true).map_err(|e| e.to_string())?;
    s.bind(&src.into()).map_err(|e| format!("bind {src}: {e}"))?;
    let start = Instant::now();
    s.connect_timeout(&dst.into(), Duration::from_secs(5))
        .map_err(|e| format!("connect {src} -> {dst}: {e}"))?;
    let waited = start.elapsed();
    let mut s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {dst}\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| format!("read: {e}"))?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad response {out:?}"))?;
    Ok((code, waited))
}

/// The TCP resets `ns` has sent (Tcp: OutRsts in /proc/net/snmp).
fn out_resets(ns: &NetNs) -> u64 {
    let snmp = ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))
        .unwrap()
        .unwrap();
    let tcp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let (names, values) = (tcp[0].split_whitespace(), tcp[1].split_whitespace());
    names
        .zip(values)
        .find(|(n, _)| *n == "OutRsts")
        .and_then(|(_, v)| v.parse().ok())
        .expect("Tcp: OutRsts in /proc/net/snmp")
}

/// Whether `ns` holds a TIME_WAIT socket whose local end is `local` and
/// remote end `remote` (/proc/net/tcp, state 06).
fn time_wait(ns: &NetNs, remote: SocketAddr, local: SocketAddr) -> bool {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), v4.port()),
        SocketAddr::V6(_) => unreachable!("IPv4 only"),
    };
    let (l, r) = (hex(local), hex(remote));
    let table = ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/tcp"))
        .unwrap()
        .unwrap();
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() > 3 && f[1] == l && f[2] == r && f[3] == "06"
    })
}

#[test]
fn agent_restart_fails_no_l7_request_and_keeps_the_proxy() {
    let mut g = lab("e2e-l7r", 2, 2, Routing::Vxlan);
    let web = pod_ip(&g.lab, "node2-pod1");
    http_server(&pod_ns(&g.lab, "node2-pod1"), web, 80);
    let s2 = g.lab.node("node2").unwrap().socket.clone();
    let applied = apply_policy(&s2, POLICY).unwrap_or_else(|e| panic!("apply: {e}"));
    wait_policies_everywhere(&g.lab, &applied);
    let l7 = SocketAddr::new(IpAddr::V4(web), 80);
    let pid = proxy_pid(&g.lab, "node2");

    // One new connection per request, from both nodes, the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut loops = Vec::new();
    for client in ["node2-pod2", "node1-pod1"] {
        let ns = pod_ns(&g.lab, client);
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        loops.push(std::thread::spawn(move || {
            let mut errors = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let denied = i.is_multiple_of(5);
                let path = if denied { "/admin" } else { "/public/x" };
                match http_get(&ns, l7, path) {
                    Ok((200, _)) if !denied => ok.fetch_add(1, Ordering::Relaxed),
                    Ok((403, _)) if denied => ok.fetch_add(1, Ordering::Relaxed),
                    r => {
                        errors.push(format!("{path}: {r:?}"));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            errors
        }));
    }
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..2 {
        assert!(g.lab.stop_agent("node2").unwrap());
        std::thread::sleep(Duration::from_millis(700));
        g.lab.start_agent("node2").unwrap();
        std::thread::sleep(Duration::from_millis(700));
    }
    stop.store(true, Ordering::Relaxed);
    let errors: Vec<String> = loops.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("requests through two agent restarts: {ok} as expected, {failed} failed");
    if failed > 0 {
        for node in ["node1", "node2"] {
            let sock = g.lab.node(node).unwrap().socket.clone();
            let drops = get_flows(
                &sock,
                ob::GetFlowsRequest {
                    filters: vec![ob::FlowFilter {
                        event_type: ob::EventType::Drop as i32,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )
            .unwrap_or_default();
            // The kernel's own TCP counters in the node (listen drops,
            // request-queue drops, TIME_WAIT recycling).
            let netstat = g
                .lab
                .node(node)
                .unwrap()
                .netns
                .run(|| std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default())
                .unwrap_or_default();
            let lines: Vec<&str> = netstat.lines().collect();
            for pair in lines.chunks(2) {
                if let [names, values] = pair {
                    for (n, v) in names.split_whitespace().zip(values.split_whitespace()).skip(1) {
                        if v != "0"
                            && (n.contains("Listen") || n.contains("Drop") || n.contains("TW") || n.contains("Req"))
                        {
                            eprintln!("{node} netstat: {n} {v}");
                        }
                    }
                }
            }
            if let Ok(m) = scrape(&g.lab, node) {
                for x in m
                    .samples
                    .iter()
                    .filter(|x| x.name.starts_with("sinew_drop") && x.value > 0.0)
                {
                    eprintln!("{node} counter: {} {:?} {}", x.name, x.labels, x.value);
                }
            }
            for f in drops.iter().rev().take(10) {
                let pod = |e: &Option<ob::Endpoint>| e.as_ref().map(|e| e.pod_name.clone()).unwrap_or_default();
                eprintln!(
                    "{node} drop: {} -> {} {:?} at {} ({})",
                    pod(&f.source),
                    pod(&f.destination),
                    f.drop_reason.as_ref().map(|d| d.name.clone()),
                    f.interface,
                    f.protocol_name
                );
            }
        }
    }
    assert_eq!(failed, 0, "{errors:?}");
    assert!(ok > 50, "only {ok} requests");
    assert_eq!(proxy_pid(&g.lab, "node2"), pid, "the proxy was replaced");
    assert!(alive(pid));
    let log = std::fs::read_to_string(g.lab.node("node2").unwrap().agent_log.clone()).unwrap();
    assert!(
        log.contains("adopted the running sinew-proxy"),
        "the new agent adopts it"
    );
    // The restarted agent's snapshots reach the adopted proxy: a policy
    // change applies (and apply waits for it).
    let wider = POLICY.replace("{method: GET, path: {prefix: /public}}", "{method: GET}");
    apply_policy(&s2, &wider).unwrap_or_else(|e| panic!("apply after restart: {e}"));
    assert_eq!(get(&g.lab, "node1-pod1", l7, "/admin").0, 200);
}
