//! Every drop reason the datapath can produce, provoked in a real lab by
//! real packets, and seen by the datapath counter of exactly that reason
//! and direction on exactly that node (through the metrics endpoint), and
//! by the flow observer (`GetFlows` filtered by the reason).
//!
//! Reasons no packet from a pod or node can cause are covered by the
//! BPF_PROG_TEST_RUN cases of `bpf_programs.rs` and not provoked here:
//! - `tunnel_key`: `bpf_skb_set_tunnel_key` fails only on a device that is
//!   not a tunnel, and `bpf_skb_get_tunnel_key` only without tunnel
//!   metadata, which every packet decapsulated by the external-mode VXLAN
//!   device has (bpf_programs.rs runs from_overlay without metadata);
//! - `redirect_failed`: `bpf_redirect`/`bpf_redirect_peer` with flags 0
//!   always return TC_ACT_REDIRECT; a missing device is found later by the
//!   kernel, outside our programs;
//! - `csum_failed`: the checksum helpers fail only for offsets outside the
//!   packet, and every offset is checked before they are called.
//! - `proxy_unavailable`: needs a policy entry with a proxy port, which
//!   policy compilation does not write yet; `bpf_redirect.rs` provokes it
//!   with real sockets on a node whose proxy does not listen.
//! - `no_encryption_key` and `unencrypted_from_peer`: need a lab with
//!   encryption on; `e2e_encryption.rs` provokes both there (a node whose
//!   key is gone; clear traffic forged on the underlay), and
//!   `bpf_programs.rs` has the receive side's packet cases.

mod e2e;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::*;
use sinew_abi::DropReason;
use sinew_testvms::lab::{Lab, Routing};
use sinew_testvms::NetNs;

const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// How long a counter may take to move after the packet was sent.
const COUNTED_WITHIN: Duration = Duration::from_secs(3);

/// One provoked drop: the reason, where it is counted, how to cause it.
struct Case {
    reason: DropReason,
    node: &'static str,
    direction: &'static str,
    how: &'static str,
    provoke: Box<dyn Fn(&Lab)>,
}

/// Runs every case in order; collects failures so that one missing counter
/// does not hide the others, then fails with all of them.
fn run_cases(lab: &Lab, cases: Vec<Case>) {
    let mut failures = Vec::new();
    for c in cases {
        let label = c.reason.label();
        let before = drop_count(lab, c.node, label, c.direction);
        let before_flows = observer_drop_flows(lab, c.node, c.reason);
        (c.provoke)(lab);
        match wait_drop_above(lab, c.node, label, c.direction, before, COUNTED_WITHIN) {
            Some(after) => eprintln!("{label}/{}: {before} -> {after} ({})", c.direction, c.how),
            None => {
                failures.push(format!(
                    "{label}: {} {} counter stayed at {before} after: {}",
                    c.node, c.direction, c.how
                ));
                continue;
            }
        }
        if let Err(e) = check_observer_saw(lab, c.node, c.reason, before_flows) {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}\n--- node1 agent log ---\n{}",
        failures.len(),
        failures.join("\n"),
        agent_log_tail(lab, "node1")
    );
}

// ------------------------------------------------------------ the observer

/// Drop reasons that come with a flow event: the datapath reports IPv4
/// packets only (ARP and IPv6 drops are counted in metrics alone).
fn has_flow_event(r: DropReason) -> bool {
    !matches!(r, DropReason::UnsupportedL3 | DropReason::ArpInvalid)
}

/// The number of flows `GetFlows` returns for one drop reason on one node.
fn observer_drop_flows(lab: &Lab, node: &str, reason: DropReason) -> usize {
    use sinew_proto::observer_v1 as pb;
    let socket = lab.node(node).unwrap().socket.clone();
    rt().block_on(async move {
        let mut c = sinew_proto::connect_observer(&socket, Duration::from_secs(2))
            .await
            .unwrap_or_else(|e| panic!("observer on {}: {e}", socket.display()));
        let mut stream = c
            .get_flows(pb::GetFlowsRequest {
                filters: vec![pb::FlowFilter {
                    drop_reason: Some(u32::from(reason.code())),
                    verdict: pb::Verdict::Dropped as i32,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("GetFlows: {e}"))
            .into_inner();
        let mut n = 0;
        while let Some(r) = stream
            .message()
            .await
            .unwrap_or_else(|e| panic!("GetFlows stream: {e}"))
        {
            if let Some(pb::get_flows_response::Response::Flow(f)) = r.response {
                assert_eq!(
                    f.drop_reason.as_ref().map(|d| d.name.as_str()),
                    Some(reason.label()),
                    "the filter returned another reason"
                );
                n += 1;
            }
        }
        n
    })
}

/// The observer must show a new flow with the reason that was counted.
fn check_observer_saw(lab: &Lab, node: &str, reason: DropReason, before: usize) -> Result<(), String> {
    if !has_flow_event(reason) {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + COUNTED_WITHIN;
    loop {
        let now = observer_drop_flows(lab, node, reason);
        if now > before {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "{}: counted on {node}, but GetFlows with drop_reason={} still shows {now} flow(s)",
                reason.label(),
                reason.code()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ------------------------------------------------------------ provoking

fn udp_from(ns: &NetNs, dst: Ipv4Addr, port: u16, ttl: Option<u32>) {
    let addr = SocketAddr::from((dst, port));
    ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        if let Some(t) = ttl {
            s.set_ttl(t).unwrap();
        }
        s.send_to(b"drop me", addr).unwrap();
    })
    .unwrap();
}

fn raw_from(lab: &Lab, pod: &str, packet: Vec<u8>) {
    send_raw_ipv4(&pod_ns(lab, pod), packet).unwrap_or_else(|e| panic!("raw send from {pod}: {e}"));
}

fn frame_from(lab: &Lab, pod: &str, ethertype: u16, payload: Vec<u8>) {
    send_frame(&pod_ns(lab, pod), sinew_testvms::lab::POD_IFNAME, ethertype, payload)
        .unwrap_or_else(|e| panic!("frame from {pod}: {e}"));
}

fn gratuitous_arp(ip: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
    a.extend_from_slice(&[0x02, 0, 0, 0x5e, 0, 0x01]);
    a.extend_from_slice(&ip.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&ip.octets());
    a
}

fn ipv6_header() -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0, 0, 0, 59, 64]; // no next header
    h.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    h.extend_from_slice(&[0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    h
}

/// Keeps sending UDP from `ns` to `dst` until stopped.
fn flood(ns: NetNs, dst: Ipv4Addr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        ns.run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) {
                if s.send_to(b"flood", (dst, 9)).is_ok() {
                    sent += 1;
                }
            }
            sent
        })
        .unwrap()
    })
}

fn policy_everywhere(lab: &Lab, yaml: &str) {
    let refs = apply_policy(&lab.node("node1").unwrap().socket, yaml).unwrap_or_else(|e| panic!("{e}"));
    let mut all: Vec<_> = list_policies(&lab.node("node1").unwrap().socket)
        .policies
        .into_iter()
        .filter_map(|p| p.r#ref)
        .collect();
    for r in refs {
        if !all
            .iter()
            .any(|a| a.name == r.name && a.namespace == r.namespace && a.kind == r.kind)
        {
            all.push(r);
        }
    }
    wait_policies_everywhere(lab, &all);
}

#[test]
fn every_drop_reason_a_packet_can_cause_is_counted_where_it_happens() {
    // One masquerade port: the second flow to the same destination finds
    // every try taken.
    // The veth of a deleted endpoint goes 1 s after its row (a test
    // delay; zero in production), so the unknown_endpoint case sends into
    // that window however busy the machine is.
    let g = lab_with_args(
        "drops",
        2,
        2,
        Routing::Vxlan,
        &["--nat-ports", "61000-61000", "--test-link-removal-delay-ms", "1000"],
    );
    let lab = &g.lab;
    let ip = |p: &str| pod_ip(lab, p);
    let pod1 = ip("node1-pod1");
    let pod2 = ip("node1-pod2");
    let remote1 = ip("node2-pod1");
    let remote2 = ip("node2-pod2");
    use DropReason::*;
    let cases = vec![
        Case {
            reason: SpoofedSource,
            node: "node1",
            direction: "egress",
            how: "raw UDP from node1-pod1 with source 10.99.99.99",
            provoke: Box::new(move |lab| {
                let udp = udp_datagram(4000, 4001, b"x");
                raw_from(
                    lab,
                    "node1-pod1",
                    ipv4_packet(Ipv4Addr::new(10, 99, 99, 99), pod2, 17, 64, 0, &[], &udp),
                )
            }),
        },
        Case {
            reason: UnsupportedL3,
            node: "node1",
            direction: "egress",
            how: "an IPv6 frame from node1-pod1 (AF_PACKET)",
            provoke: Box::new(|lab| frame_from(lab, "node1-pod1", 0x86dd, ipv6_header())),
        },
        Case {
            reason: InvalidPacket,
            node: "node1",
            direction: "egress",
            how: "an IPv4-typed frame whose header says version 6",
            provoke: Box::new(|lab| {
                let mut h = vec![0u8; 20];
                h[0] = 0x65;
                frame_from(lab, "node1-pod1", 0x0800, h)
            }),
        },
        Case {
            reason: ArpInvalid,
            node: "node1",
            direction: "egress",
            how: "a gratuitous ARP from node1-pod1",
            provoke: Box::new(move |lab| frame_from(lab, "node1-pod1", 0x0806, gratuitous_arp(pod1))),
        },
        Case {
            reason: TtlExceeded,
            node: "node1",
            direction: "egress",
            how: "UDP with IP_TTL=1 from node1-pod1 to node1-pod2",
            provoke: Box::new(move |lab| udp_from(&pod_ns(lab, "node1-pod1"), pod2, 7000, Some(1))),
        },
        Case {
            reason: Fragment,
            node: "node1",
            direction: "egress",
            how: "a non-first UDP fragment from node1-pod1 to 198.18.0.1 (masqueraded)",
            provoke: Box::new(move |lab| {
                raw_from(
                    lab,
                    "node1-pod1",
                    ipv4_packet(pod1, OUTSIDE, 17, 64, 1, &[], &[0u8; 16]),
                )
            }),
        },
        Case {
            reason: IpOptions,
            node: "node1",
            direction: "egress",
            how: "UDP with IP options (NOP NOP NOP EOL) from node1-pod1 to 198.18.0.1",
            provoke: Box::new(move |lab| {
                let udp = udp_datagram(4002, 5353, b"x");
                raw_from(
                    lab,
                    "node1-pod1",
                    ipv4_packet(pod1, OUTSIDE, 17, 64, 0, &[1, 1, 1, 0], &udp),
                )
            }),
        },
        Case {
            reason: UnsupportedL4,
            node: "node1",
            direction: "egress",
            how: "an ICMP timestamp request from node1-pod1 to 198.18.0.1",
            provoke: Box::new(move |lab| {
                let icmp = icmp_message(13, 0, &[0u8; 16]);
                raw_from(lab, "node1-pod1", ipv4_packet(pod1, OUTSIDE, 1, 64, 0, &[], &icmp))
            }),
        },
        Case {
            reason: NatNoPort,
            node: "node1",
            direction: "egress",
            how: "two UDP flows from node1-pod2 to 198.18.0.1:5353 with one masquerade port",
            provoke: Box::new(|lab| {
                let ns = pod_ns(lab, "node1-pod2");
                udp_from(&ns, OUTSIDE, 5353, None);
                udp_from(&ns, OUTSIDE, 5353, None);
            }),
        },
        Case {
            reason: NoTunnelEndpoint,
            node: "node1",
            direction: "egress",
            how: "UDP from node1 into the VXLAN device to an address no node owns",
            provoke: Box::new(|lab| {
                let ns = node_ns(lab, "node1");
                let _ =
                    sinew_testvms::netns::run_in(&ns, &["ip", "route", "add", "10.99.0.0/24", "dev", "sinew_vxlan"]);
                udp_from(&ns, Ipv4Addr::new(10, 99, 0, 1), 9, None);
            }),
        },
        Case {
            reason: Policy,
            node: "node2",
            direction: "ingress",
            how: "UDP from node1-pod1 to node2-pod2, which only admits TCP 8080",
            provoke: Box::new(move |lab| {
                policy_everywhere(
                    lab,
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: only-8080, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: pod2, node: node2}}\n  ingress:\n  - ports:\n    - {protocol: TCP, port: 8080}\n",
                );
                udp_from(&pod_ns(lab, "node1-pod1"), remote2, 5353, None);
            }),
        },
        Case {
            reason: PolicyDeny,
            node: "node1",
            direction: "egress",
            how: "UDP from node1-pod1 to node2-pod1, which an egressDeny rule names",
            provoke: Box::new(move |lab| {
                policy_everywhere(
                    lab,
                    "apiVersion: sinew.io/v1alpha1\nkind: SinewNetworkPolicy\nmetadata: {name: deny-remote, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: pod1, node: node1}}\n  egressDeny:\n  - toEndpoints:\n    - matchLabels: {app: pod1, node: node2}\n",
                );
                udp_from(&pod_ns(lab, "node1-pod1"), remote1, 5353, None);
            }),
        },
        Case {
            reason: UnknownEndpoint,
            node: "node1",
            direction: "egress",
            how: "node1-pod2 sending after DeleteEndpoint removed its row, before its veth goes",
            provoke: Box::new(move |lab| {
                let stop = Arc::new(AtomicBool::new(false));
                let sender = flood(pod_ns(lab, "node1-pod2"), pod1, stop.clone());
                std::thread::sleep(Duration::from_millis(100));
                let pod = lab.pod("node1-pod2").unwrap();
                let r = delete_endpoint(
                    &lab.node("node1").unwrap().socket,
                    &pod.container_id,
                    sinew_testvms::lab::POD_IFNAME,
                );
                assert!(r.existed && r.link_removal_queued, "{r:?}");
                std::thread::sleep(Duration::from_millis(300));
                stop.store(true, Ordering::Relaxed);
                assert!(sender.join().unwrap() > 0, "the pod sent nothing");
            }),
        },
    ];
    run_cases(lab, cases);
}

/// Small tables: conntrack full and a policy that does not fit.
#[test]
fn full_tables_drop_and_count() {
    let g = lab_with_args(
        "dropfull",
        1,
        3,
        Routing::Vxlan,
        &["--ct-map-size", "16", "--policy-map-size", "16"],
    );
    let lab = &g.lab;
    let pod2 = pod_ip(lab, "node1-pod2");
    use DropReason::*;
    let cases = vec![
        Case {
            reason: CtFull,
            node: "node1",
            direction: "egress",
            how: "40 UDP flows from node1-pod1 (under an egress policy) with 16 conntrack entries",
            provoke: Box::new(move |lab| {
                policy_everywhere(
                    lab,
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: pod1-out, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: pod1}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - podSelector: {matchLabels: {app: pod2}}\n",
                );
                let ns = pod_ns(lab, "node1-pod1");
                for port in 0..40 {
                    udp_from(&ns, pod2, 10000 + port, None);
                }
            }),
        },
        Case {
            reason: PolicyNotReady,
            node: "node1",
            direction: "egress",
            how: "UDP from node1-pod3, whose 20-port policy does not fit a 16-entry map",
            provoke: Box::new(move |lab| {
                let ports: String = (0..20)
                    .map(|i| format!("    - {{protocol: TCP, port: {}}}\n", 8080 + 2 * i))
                    .collect();
                policy_everywhere(
                    lab,
                    &format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: big, namespace: default}}\nspec:\n  podSelector: {{matchLabels: {{app: pod3}}}}\n  ingress:\n  - ports:\n{ports}"),
                );
                let m = scrape(lab, "node1").unwrap();
                assert!(
                    m.get("sinew_policy_map_refused_writes_total", &[]).unwrap() > 0.0,
                    "the overflow must be counted"
                );
                assert_eq!(m.get("sinew_policy_endpoints_not_ready", &[]), Some(1.0));
                udp_from(&pod_ns(lab, "node1-pod3"), pod2, 5353, None);
            }),
        },
    ];
    run_cases(lab, cases);
    let m = scrape(lab, "node1").unwrap();
    assert_eq!(m.get("sinew_conntrack_capacity", &[]), Some(16.0));
    assert!(m.get("sinew_conntrack_entries", &[]).unwrap() <= 16.0);
}
