//! The Prometheus endpoint of real agents in a real lab: scraped over HTTP
//! from inside each node's network namespace (where the agent listens),
//! parsed, and checked against what the lab holds and what the test did.

mod e2e;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use e2e::*;
use sinew_abi::DropReason;
use sinew_testvms::lab::Routing;

/// Families every scrape has, with their OpenMetrics type.
const FAMILIES: &[(&str, &str)] = &[
    ("sinew_drop_packets", "counter"),
    ("sinew_drop_bytes", "counter"),
    ("sinew_forward_packets", "counter"),
    ("sinew_forward_bytes", "counter"),
    ("sinew_events_lost", "counter"),
    ("sinew_policy_map_entries", "gauge"),
    ("sinew_policy_map_capacity", "gauge"),
    ("sinew_policy_map_refused_writes", "counter"),
    ("sinew_policy_endpoints_not_ready", "gauge"),
    ("sinew_conntrack_entries", "gauge"),
    ("sinew_conntrack_capacity", "gauge"),
    ("sinew_endpoints", "gauge"),
    ("sinew_identities", "gauge"),
    ("sinew_bpf_stats_enabled", "gauge"),
    ("sinew_bpf_program_runs", "counter"),
    ("sinew_bpf_program_run_time_ns", "counter"),
    ("sinew_agent_resident_memory_bytes", "gauge"),
    ("sinew_agent_uptime_seconds", "gauge"),
];

fn one(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.get(name, labels)
        .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{}", m.text))
}

/// Waits up to 5 s for a sample to satisfy `ok`.
fn wait_for(lab: &sinew_testvms::lab::Lab, node: &str, name: &str, labels: &[(&str, &str)], ok: impl Fn(f64) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = scrape(lab, node).unwrap();
        if m.get(name, labels).is_some_and(&ok) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} {labels:?} on {node} never got there:\n{}",
            m.text
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Puts kernel.bpf_stats_enabled back as it was when dropped: the agent
/// turns it on for the whole machine and never off.
struct RestoreBpfStats(Option<String>);

impl Drop for RestoreBpfStats {
    fn drop(&mut self) {
        if let Some(v) = &self.0 {
            let _ = std::fs::write(BPF_STATS, v);
        }
    }
}

#[test]
fn metrics_report_the_node_and_count_traffic_and_drops() {
    let _restore = RestoreBpfStats(std::fs::read_to_string(BPF_STATS).ok());
    // Program statistics are opt-in (they cost every program run).
    let g = lab_with_args("met", 2, 2, Routing::Vxlan, &["--bpf-stats", "true"]);
    let lab = &g.lab;
    let m = scrape(lab, "node1").unwrap();
    for (family, ty) in FAMILIES {
        assert_eq!(
            m.types.get(*family).map(String::as_str),
            Some(*ty),
            "{family} missing or of the wrong type in\n{}",
            m.text
        );
    }
    // Every drop reason but "forwarded", in both directions, zeros included.
    for r in DropReason::ALL.iter().filter(|r| **r != DropReason::Forwarded) {
        for d in ["ingress", "egress"] {
            assert!(
                m.get("sinew_drop_packets_total", &[("reason", r.label()), ("direction", d)])
                    .is_some(),
                "{} {d} missing",
                r.label()
            );
        }
    }
    assert_eq!(one(&m, "sinew_endpoints", &[]), 2.0, "two pods on node1");
    // Lab pods carry {app: podJ, node: nodeI}: every pod its own identity.
    assert_eq!(one(&m, "sinew_identities", &[("scope", "local")]), 2.0);
    // node2's pods reach node1 through the datastore: give it a moment.
    wait_for(lab, "node1", "sinew_identities", &[("scope", "cluster")], |v| v >= 4.0);
    assert_eq!(one(&m, "sinew_conntrack_capacity", &[]), 262144.0);
    assert_eq!(one(&m, "sinew_policy_map_capacity", &[]), 65536.0);
    assert_eq!(one(&m, "sinew_policy_map_entries", &[]), 0.0, "no policy yet");
    assert!(one(&m, "sinew_agent_resident_memory_bytes", &[]) > 1e6);
    assert!(one(&m, "sinew_agent_uptime_seconds", &[]) > 0.0);
    for p in [
        "from_container",
        "to_container",
        "from_netdev",
        "to_netdev",
        "from_overlay",
        "to_overlay",
    ] {
        assert!(
            m.get("sinew_bpf_program_runs_total", &[("program", p)]).is_some(),
            "no run count of {p}"
        );
    }
    let stats_on = one(&m, "sinew_bpf_stats_enabled", &[]) == 1.0;
    assert!(stats_on, "--bpf-stats true turns on kernel.bpf_stats_enabled");

    // Traffic: a local and a cross-node echo.
    let fwd_before = one(&m, "sinew_forward_packets_total", &[("direction", "egress")]);
    let runs_before = one(&m, "sinew_bpf_program_runs_total", &[("program", "from_container")]);
    let pod2 = pod_ip(lab, "node1-pod2");
    let remote = pod_ip(lab, "node2-pod1");
    udp_roundtrip(&pod_ns(lab, "node1-pod2"), pod2, 7001, &pod_ns(lab, "node1-pod1")).unwrap();
    tcp_roundtrip(&pod_ns(lab, "node2-pod1"), remote, 7002, &pod_ns(lab, "node1-pod1")).unwrap();
    let m2 = scrape(lab, "node1").unwrap();
    assert!(
        one(&m2, "sinew_forward_packets_total", &[("direction", "egress")]) >= fwd_before + 3.0,
        "forwarded egress packets must grow with the traffic"
    );
    let runs_after = one(&m2, "sinew_bpf_program_runs_total", &[("program", "from_container")]);
    assert!(
        runs_after >= runs_before + 3.0,
        "from_container runs {runs_before} -> {runs_after}"
    );
    assert!(
        one(
            &m2,
            "sinew_bpf_program_run_time_ns_total",
            &[("program", "from_container")]
        ) > 0.0
    );

    // A drop: a packet with a source address that is not the pod's.
    let spoof = [("reason", "spoofed_source"), ("direction", "egress")];
    let (p_before, b_before) = (
        one(&m2, "sinew_drop_packets_total", &spoof),
        one(&m2, "sinew_drop_bytes_total", &spoof),
    );
    let pkt = ipv4_packet(
        Ipv4Addr::new(10, 99, 99, 99),
        pod2,
        17,
        64,
        0,
        &[],
        &udp_datagram(4000, 4001, b"spoofed"),
    );
    let len = pkt.len() as f64;
    send_raw_ipv4(&pod_ns(lab, "node1-pod1"), pkt).unwrap();
    let after = wait_drop_above(
        lab,
        "node1",
        "spoofed_source",
        "egress",
        p_before as u64,
        Duration::from_secs(3),
    );
    assert_eq!(after, Some(p_before as u64 + 1), "exactly one spoofed packet");
    let m3 = scrape(lab, "node1").unwrap();
    // skb->len at TC ingress of the veth includes the Ethernet header.
    assert_eq!(one(&m3, "sinew_drop_bytes_total", &spoof), b_before + len + 14.0);
    // The observer read the drop's flow event.
    wait_for(
        lab,
        "node1",
        "sinew_flows_by_drop_reason_total",
        &[("reason", "spoofed_source")],
        |v| v >= 1.0,
    );
    wait_for(lab, "node1", "sinew_flows_by_type_total", &[("type", "drop")], |v| {
        v >= 1.0
    });
    wait_for(
        lab,
        "node1",
        "sinew_flows_by_verdict_total",
        &[("verdict", "forwarded")],
        |v| v >= 1.0,
    );
    wait_for(
        lab,
        "node1",
        "sinew_flows_by_protocol_total",
        &[("protocol", "tcp")],
        |v| v >= 1.0,
    );

    // Policy: entries appear in the map gauge.
    apply_policy(
        &lab.node("node1").unwrap().socket,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: pod1}}\n  ingress:\n  - ports:\n    - {protocol: TCP, port: 8080}\n",
    )
    .unwrap();
    wait_for(lab, "node1", "sinew_policy_map_entries", &[], |v| v > 0.0);
    // Connections of an endpoint under policy are tracked.
    tcp_roundtrip(
        &pod_ns(lab, "node1-pod1"),
        pod_ip(lab, "node1-pod1"),
        8080,
        &pod_ns(lab, "node1-pod2"),
    )
    .unwrap();
    let m4 = scrape(lab, "node1").unwrap();
    assert!(one(&m4, "sinew_conntrack_entries", &[]) >= 1.0, "{}", m4.text);

    // Each node answers for itself.
    let n2 = scrape(lab, "node2").unwrap();
    assert_eq!(one(&n2, "sinew_endpoints", &[]), 2.0);
    assert_eq!(
        one(&n2, "sinew_drop_packets_total", &spoof),
        0.0,
        "node2 saw no spoofed packet"
    );
}

#[test]
fn metrics_endpoint_serves_only_get_metrics() {
    let g = lab("met404", 1, 0, Routing::Vxlan);
    let ns = node_ns(&g.lab, "node1");
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), METRICS_PORT);
    let (code, _) = http_get(&ns, addr, "/").unwrap();
    assert_eq!(code, 404);
    let (code, _) = http_get(&ns, addr, "/metrics/x").unwrap();
    assert_eq!(code, 404);
    let (code, body) = http_get(&ns, addr, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(body.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
    // The node's own address works too: the default listens on every address.
    let node_addr = SocketAddr::new(IpAddr::V4(g.lab.node("node1").unwrap().address), METRICS_PORT);
    assert_eq!(http_get(&ns, node_addr, "/metrics").unwrap().0, 200);
}

#[test]
fn metrics_addr_off_listens_nowhere() {
    let g = lab_with_args("metoff", 1, 0, Routing::Vxlan, &["--metrics-addr", "off"]);
    let ns = node_ns(&g.lab, "node1");
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), METRICS_PORT);
    let err = http_get(&ns, addr, "/metrics").unwrap_err();
    assert!(
        err.contains("refused"),
        "nothing listens with --metrics-addr off: {err}"
    );
    assert!(status(&g.lab.node("node1").unwrap().socket).unwrap().healthy);
}
