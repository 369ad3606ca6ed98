//! Flow observability with real agents, real BPF and real traffic: flows
//! name both pods, policy drops and verdicts name the reason and the rule,
//! every GetFlows filter selects exactly the flows it should, `sinew
//! observe -o json` prints one object per line, a full datapath ring is
//! counted exactly (flows seen + events lost = drops the datapath made),
//! and forwarded-flow reports sum to exactly the packets sent.

mod e2e;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use e2e::*;
use sinew_abi::DropReason;
use sinew_proto::observer_v1 as pb;
use sinew_testvms::lab::Routing;
use sinew_testvms::NetNs;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Lab with a/client and a/server on node1, b/other on node2.
struct World {
    _servers: EchoServers,
    g: LabGuard,
}

impl World {
    fn new(prefix: &str, agent_args: &[&str]) -> World {
        let mut g = lab_with_args(prefix, 2, 0, Routing::Vxlan, agent_args);
        g.lab.add_namespace("a", &labels(&[("team", "a")])).unwrap();
        g.lab.add_namespace("b", &labels(&[("team", "b")])).unwrap();
        for (node, ns, name, app) in [
            ("node1", "a", "client", "client"),
            ("node1", "a", "server", "server"),
            ("node2", "b", "other", "other"),
        ] {
            g.lab
                .add_pod_full(node, ns, name, labels(&[("app", app)]), Vec::new())
                .unwrap_or_else(|e| panic!("add pod {ns}/{name}: {e}"));
        }
        let mut servers = EchoServers::new();
        for pod in ["server", "other"] {
            let (ns, ip) = (pod_ns(&g.lab, pod), pod_ip(&g.lab, pod));
            servers.tcp(&ns, ip, 8080);
            servers.tcp(&ns, ip, 9090);
            servers.udp(&ns, ip, 5353);
        }
        World { _servers: servers, g }
    }

    fn socket(&self, node: &str) -> PathBuf {
        self.g.lab.node(node).unwrap().socket.clone()
    }

    fn identity(&self, pod: &str) -> u32 {
        let node = &self.g.lab.pod(pod).unwrap().node;
        endpoints(&self.socket(node))
            .into_iter()
            .find(|e| e.pod_name == pod)
            .unwrap_or_else(|| panic!("no endpoint {pod}"))
            .identity
    }
}

const POLICY: &str = r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: server-policy, namespace: a}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: client}
    toPorts:
    - ports:
      - {port: "8080", protocol: TCP}
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {app: client}
    toPorts:
    - ports:
      - {port: "9090", protocol: TCP}
"#;

fn ep(f: &pb::Flow, dst: bool) -> &pb::Endpoint {
    if dst {
        f.destination.as_ref().unwrap()
    } else {
        f.source.as_ref().unwrap()
    }
}

fn is_pod(e: &pb::Endpoint, ns: &str, name: &str) -> bool {
    e.namespace == ns && e.pod_name == name
}

fn all(req_filter: Option<pb::FlowFilter>) -> pb::GetFlowsRequest {
    pb::GetFlowsRequest {
        filters: req_filter.into_iter().collect(),
        ..Default::default()
    }
}

#[test]
fn flows_are_named_explained_and_filtered() {
    let w = World::new("obs", &[]);
    let lab = &w.g.lab;
    let s1 = w.socket("node1");
    let (client, server, other) = (pod_ns(lab, "client"), pod_ip(lab, "server"), pod_ip(lab, "other"));

    // (a) Pod to pod: trace events of the TCP handshake, both pods named,
    // also for the very first connection right after the pods started
    // (flows are named when read, not when the event arrives).
    tcp_echo(&client, server, 8080, Duration::from_secs(3)).expect("client -> server:8080 before any policy");
    let syn = wait_flows(&s1, &all(None), "client -> server:8080 SYN", |f| {
        f.r#type() == pb::EventType::Trace
            && is_pod(ep(f, false), "a", "client")
            && is_pod(ep(f, true), "a", "server")
            && ep(f, true).port == 8080
            && f.tcp_flags.as_ref().is_some_and(|t| t.syn && !t.ack)
    });
    let f = &syn[0];
    assert_eq!(f.verdict(), pb::Verdict::Forwarded);
    assert_eq!(f.node_name, "node1");
    assert_eq!(f.protocol_name, "TCP");
    assert_eq!(ep(f, false).labels.get("app").map(String::as_str), Some("client"));
    assert_eq!(ep(f, true).identity, w.identity("server"));
    assert_eq!(ep(f, false).identity, w.identity("client"));
    assert!(f.time_unix_nanos > 0 && f.sequence > 0);
    // The reply direction (SYN|ACK) is traced too, with the names swapped.
    wait_flows(&s1, &all(None), "server -> client SYN|ACK", |f| {
        is_pod(ep(f, false), "a", "server")
            && is_pod(ep(f, true), "a", "client")
            && f.tcp_flags.as_ref().is_some_and(|t| t.syn && t.ack)
    });

    // (b) A deny rule drops 9090 and names itself; 8080 is allowed by the
    // ingress rule, which the policy verdict names.
    let applied = apply_policy(&s1, POLICY).expect("apply policy");
    wait_policies_everywhere(lab, &applied);
    tcp_echo(&client, server, 8080, Duration::from_secs(3)).expect("8080 is allowed");
    assert!(
        tcp_echo(&client, server, 9090, Duration::from_secs(1)).is_err(),
        "9090 is denied"
    );
    let drops = wait_flows(&s1, &all(None), "DROPPED client -> server:9090", |f| {
        f.verdict() == pb::Verdict::Dropped
            && f.r#type() == pb::EventType::Drop
            && is_pod(ep(f, true), "a", "server")
            && ep(f, true).port == 9090
    });
    let d = &drops[0];
    let reason = d.drop_reason.as_ref().expect("a drop has a reason");
    assert!(reason.description.starts_with("policy denied"), "reason {reason:?}");
    assert_eq!(reason.code, u32::from(DropReason::PolicyDeny.code()));
    let rule = d.policy_rule.as_ref().expect("a deny-rule drop names the rule");
    assert_eq!(
        (
            rule.kind.as_str(),
            rule.namespace.as_str(),
            rule.name.as_str(),
            rule.section.as_str(),
            rule.index
        ),
        ("SinewNetworkPolicy", "a", "server-policy", "ingressDeny", 0)
    );
    let verdicts = wait_flows(&s1, &all(None), "policy verdict allowing client -> server:8080", |f| {
        f.r#type() == pb::EventType::PolicyVerdict
            && f.verdict() == pb::Verdict::Forwarded
            && is_pod(ep(f, true), "a", "server")
            && ep(f, true).port == 8080
    });
    let v = &verdicts[0];
    let rule = v.policy_rule.as_ref().expect("an allowed verdict names the rule");
    assert_eq!(
        (rule.name.as_str(), rule.section.as_str()),
        ("server-policy", "ingress")
    );
    assert_eq!(v.policy_match(), pb::PolicyMatch::L3L4);
    assert_eq!(v.direction(), pb::TrafficDirection::Ingress);
    assert_eq!(ep(v, false).identity, w.identity("client"));
    wait_flows(&s1, &all(None), "policy verdict denying 9090", |f| {
        f.r#type() == pb::EventType::PolicyVerdict && f.verdict() == pb::Verdict::Dropped && ep(f, true).port == 9090
    });

    // (c) Every filter, against the same buffered flows: each must select
    // exactly the flows its meaning selects, and leave some out.
    udp_echo(&client, other, 5353, Duration::from_secs(3)).expect("client -> b/other udp");
    wait_flows(&s1, &all(None), "client -> b/other UDP", |f| {
        is_pod(ep(f, true), "b", "other") && f.protocol == 17
    });
    // Traffic without the client, so that every filter has flows to leave
    // out: the node itself to the server (traced where it is delivered).
    let node1 = node_ns(lab, "node1");
    tcp_echo(&node1, server, 8080, Duration::from_secs(3)).expect("node1 -> server:8080");
    wait_flows(&s1, &all(None), "node1 -> server:8080", |f| {
        is_pod(ep(f, true), "a", "server") && !is_pod(ep(f, false), "a", "client") && ep(f, true).port == 8080
    });
    let everything = get_flows(&s1, all(None)).unwrap();
    let max_seq = everything.iter().map(|f| f.sequence).max().unwrap();
    let min_seq = everything.iter().map(|f| f.sequence).min().unwrap();
    let seqs = |fs: &[pb::Flow]| -> BTreeSet<u64> {
        fs.iter()
            .map(|f| f.sequence)
            .filter(|s| (min_seq..=max_seq).contains(s))
            .collect()
    };
    let (client_id, server_id) = (w.identity("client"), w.identity("server"));
    let either = |f: &pb::Flow, p: &dyn Fn(&pb::Endpoint) -> bool| p(ep(f, false)) || p(ep(f, true));
    type Pred = Box<dyn Fn(&pb::Flow) -> bool>;
    let cases: Vec<(&str, pb::FlowFilter, Pred)> = vec![
        (
            "pod",
            pb::FlowFilter {
                pod: "a/client".into(),
                ..Default::default()
            },
            Box::new(move |f| either(f, &|e| is_pod(e, "a", "client"))),
        ),
        (
            "namespace",
            pb::FlowFilter {
                namespace: "b".into(),
                ..Default::default()
            },
            Box::new(move |f| either(f, &|e| e.namespace == "b")),
        ),
        (
            "from_pod",
            pb::FlowFilter {
                from_pod: "server".into(),
                ..Default::default()
            },
            Box::new(|f| ep(f, false).pod_name == "server"),
        ),
        (
            "to_pod",
            pb::FlowFilter {
                to_pod: "a/server".into(),
                ..Default::default()
            },
            Box::new(|f| is_pod(ep(f, true), "a", "server")),
        ),
        (
            "labels",
            pb::FlowFilter {
                labels: vec!["app=other".into()],
                ..Default::default()
            },
            Box::new(move |f| either(f, &|e| e.labels.get("app").is_some_and(|v| v == "other"))),
        ),
        (
            "identity",
            pb::FlowFilter {
                identity: Some(server_id),
                ..Default::default()
            },
            Box::new(move |f| either(f, &|e| e.identity == server_id)),
        ),
        (
            "verdict",
            pb::FlowFilter {
                verdict: pb::Verdict::Dropped as i32,
                ..Default::default()
            },
            Box::new(|f| f.verdict() == pb::Verdict::Dropped),
        ),
        (
            "drop_reason",
            pb::FlowFilter {
                drop_reason: Some(u32::from(DropReason::PolicyDeny.code())),
                ..Default::default()
            },
            Box::new(|f| {
                f.drop_reason
                    .as_ref()
                    .is_some_and(|r| r.code == u32::from(DropReason::PolicyDeny.code()))
            }),
        ),
        (
            "protocol",
            pb::FlowFilter {
                protocol: Some(17),
                ..Default::default()
            },
            Box::new(|f| f.protocol == 17),
        ),
        (
            "port",
            pb::FlowFilter {
                port: Some(9090),
                ..Default::default()
            },
            Box::new(move |f| either(f, &|e| e.port == 9090)),
        ),
        (
            "direction",
            pb::FlowFilter {
                direction: pb::TrafficDirection::Ingress as i32,
                ..Default::default()
            },
            Box::new(|f| f.direction() == pb::TrafficDirection::Ingress),
        ),
        (
            "event_type",
            pb::FlowFilter {
                event_type: pb::EventType::PolicyVerdict as i32,
                ..Default::default()
            },
            Box::new(|f| f.r#type() == pb::EventType::PolicyVerdict),
        ),
        (
            "two fields at once",
            pb::FlowFilter {
                from_pod: "a/client".into(),
                identity: Some(client_id),
                port: Some(8080),
                ..Default::default()
            },
            Box::new(move |f| is_pod(ep(f, false), "a", "client") && either(f, &|e| e.port == 8080)),
        ),
    ];
    for (name, filter, pred) in &cases {
        let want: BTreeSet<u64> = everything.iter().filter(|f| pred(f)).map(|f| f.sequence).collect();
        assert!(
            !want.is_empty(),
            "filter {name}: the test traffic has no flow it should select"
        );
        assert!(
            want.len() < everything.len(),
            "filter {name}: every flow matches, so exclusion is not tested"
        );
        let got = seqs(&get_flows(&s1, all(Some(filter.clone()))).unwrap());
        assert_eq!(got, want, "filter {name} ({filter:?}) selects the wrong flows");
    }
    // Any of several filters.
    let two = pb::GetFlowsRequest {
        filters: vec![cases[1].1.clone(), cases[11].1.clone()],
        ..Default::default()
    };
    let want: BTreeSet<u64> = everything
        .iter()
        .filter(|f| cases[1].2(f) || cases[11].2(f))
        .map(|f| f.sequence)
        .collect();
    assert_eq!(seqs(&get_flows(&s1, two).unwrap()), want, "filters are alternatives");
    // Last N: the newest N, oldest first.
    let last = get_flows(
        &s1,
        pb::GetFlowsRequest {
            number: 3,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(last.len(), 3);
    assert!(last.windows(2).all(|p| p[0].sequence < p[1].sequence));
    assert!(last[0].sequence >= everything[everything.len() - 3].sequence);
    // Time range: since/until around the middle flow.
    let mid = &everything[everything.len() / 2];
    let t = mid.time_unix_nanos;
    let since = get_flows(
        &s1,
        pb::GetFlowsRequest {
            since_unix_nanos: t,
            ..Default::default()
        },
    )
    .unwrap();
    let until = get_flows(
        &s1,
        pb::GetFlowsRequest {
            until_unix_nanos: t,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(since.iter().all(|f| f.time_unix_nanos >= t) && since.iter().any(|f| f.sequence == mid.sequence));
    assert!(until.iter().all(|f| f.time_unix_nanos <= t) && until.iter().any(|f| f.sequence == mid.sequence));
    assert_eq!(
        seqs(&since).len() + seqs(&until).len(),
        everything.len() + everything.iter().filter(|f| f.time_unix_nanos == t).count(),
        "since and until split the flows at t"
    );
    assert!(
        get_flows(
            &s1,
            pb::GetFlowsRequest {
                since_unix_nanos: u64::MAX / 2,
                ..Default::default()
            }
        )
        .unwrap()
        .is_empty(),
        "no flow from the future"
    );
    assert_eq!(
        get_flows(
            &s1,
            all(Some(pb::FlowFilter {
                labels: vec!["novalue".into()],
                ..Default::default()
            }))
        )
        .unwrap_err()
        .code(),
        tonic::Code::InvalidArgument
    );
    // Follow: a new matching flow arrives on an open stream, a
    // non-matching one does not.
    follow_sees_new_flow(&w, &s1);

    // (d) The CLI's JSON lines parse one by one.
    let out = std::process::Command::new(sinew_cli())
        .args(["--socket", s1.to_str().unwrap(), "observe", "-o", "json", "--last", "5"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?} is not JSON: {e}")))
        .collect();
    assert_eq!(lines.len(), 5);
    for l in &lines {
        assert_eq!(l["node"], "node1");
        assert!(l["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{l}");
        assert!(
            l["source"]["ip"].is_string() && l["destination"]["ip"].is_string(),
            "{l}"
        );
    }
    let out = std::process::Command::new(sinew_cli())
        .args([
            "--socket",
            s1.to_str().unwrap(),
            "observe",
            "-o",
            "json",
            "--verdict",
            "DROPPED",
            "--to-pod",
            "a/server",
            "--port",
            "9090",
            "--last",
            "100",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.is_empty(), "the denied flows are listed");
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["verdict"], "DROPPED", "{l}");
        assert_eq!(v["destination"]["pod"], "server", "{l}");
    }
    // The table names the rule in words.
    let out = std::process::Command::new(sinew_cli())
        .args([
            "--socket",
            s1.to_str().unwrap(),
            "observe",
            "--type",
            "drop",
            "--port",
            "9090",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("policy denied (deny rule), by SinewNetworkPolicy a/server-policy ingressDeny[0]"),
        "{text}"
    );
    // An unreachable agent is reported with a way to check.
    let out = std::process::Command::new(sinew_cli())
        .args(["--socket", "/nonexistent/agent.sock", "observe"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach sinew-agent"));
}

/// Opens a followed stream for flows to b/other, then sends UDP to
/// a/server (not selected) and to b/other (selected).
fn follow_sees_new_flow(w: &World, socket: &std::path::Path) {
    use pb::get_flows_response::Response;
    let lab = &w.g.lab;
    let (client, server, other) = (pod_ns(lab, "client"), pod_ip(lab, "server"), pod_ip(lab, "other"));
    let rt = rt();
    rt.block_on(async {
        let mut c = sinew_proto::connect_observer(socket, Duration::from_secs(2))
            .await
            .unwrap();
        let req = pb::GetFlowsRequest {
            follow: true,
            since_unix_nanos: sinew_agent::observer::now_unix_nanos(),
            filters: vec![pb::FlowFilter {
                to_pod: "b/other".into(),
                protocol: Some(17),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut stream = c.get_flows(req).await.unwrap().into_inner();
        // Traffic from another thread: a setns must never run on the
        // runtime's thread.
        let sender = std::thread::spawn(move || {
            let _ = udp_echo(&client, server, 5353, Duration::from_secs(2));
            std::thread::sleep(Duration::from_millis(200));
            udp_echo(&client, other, 5353, Duration::from_secs(2))
        });
        let msg = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("a followed flow within 5 s")
            .unwrap()
            .expect("stream open");
        let Some(Response::Flow(f)) = msg.response else {
            panic!("{msg:?}")
        };
        assert!(is_pod(ep(&f, true), "b", "other") && f.protocol == 17, "{f:?}");
        sender.join().unwrap().expect("udp to b/other");
        assert_eq!(msg.node_name, "node1");
    });
}

/// (e) A ring of one page and a burst of policy drops: the ring overflows,
/// every event is either seen or counted lost, and the agent keeps serving.
#[test]
fn ring_overflow_is_counted_exactly() {
    let w = World::new("obsring", &["--event-ring-size", "4096"]);
    let lab = &w.g.lab;
    let s1 = w.socket("node1");
    let applied = apply_policy(&s1, POLICY).expect("apply policy");
    wait_policies_everywhere(lab, &applied);
    let datapath_lost = || -> Vec<u64> {
        (0..4)
            .map(|t| pinned_counter(lab, "node1", sinew_abi::maps::EVENTS_LOST, t))
            .collect()
    };
    let lost_of = |st: &pb::ServerStatusResponse, t: &str| {
        st.events_lost
            .iter()
            .find(|c| c.r#type == t)
            .map(|c| c.count)
            .unwrap_or(0)
    };
    let st0 = observer_status(&s1);
    assert_eq!(st0.event_ring_bytes, 4096);
    let lost0 = datapath_lost();

    // UDP to a port no rule allows: once a policy selects the server for
    // ingress, every datagram is a new flow, denied by default
    // (DROP_POLICY), and makes one drop event and one policy verdict.
    let reason = DropReason::Policy;
    let drops_of = |r: DropReason| {
        pinned_counter(
            lab,
            "node1",
            sinew_abi::maps::METRICS,
            sinew_abi::Direction::Ingress.metrics_index(r),
        ) + pinned_counter(
            lab,
            "node1",
            sinew_abi::maps::METRICS,
            sinew_abi::Direction::Egress.metrics_index(r),
        )
    };
    let before = drops_of(reason);
    let seen_before = st0.flows_by_drop_reason.get(reason.label()).copied().unwrap_or(0);
    let client = pod_ns(lab, "client");
    let target = SocketAddr::new(pod_ip(lab, "server").into(), 5353);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            std::thread::spawn(move || {
                client
                    .run(move || {
                        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
                        let mut sent = 0u64;
                        for _ in 0..5000 {
                            if s.send_to(b"flood", target).is_ok() {
                                sent += 1;
                            }
                        }
                        sent
                    })
                    .unwrap()
            })
        })
        .collect();
    let sent: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    // Let the observer drain and read the lost counters (it does every
    // 250 ms); wait until its counts stop moving.
    let mut last = (0, 0);
    let mut st = observer_status(&s1);
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(300));
        st = observer_status(&s1);
        let now = (st.num_flows, st.events_lost_total);
        if now == last {
            break;
        }
        last = now;
    }
    let after = drops_of(reason);
    let generated = after - before;
    assert!(
        generated > 0 && generated <= sent,
        "the flood made {generated} drops of {sent} packets"
    );
    let lost_now = datapath_lost();
    let lost_delta: Vec<u64> = lost_now.iter().zip(&lost0).map(|(a, b)| a - b).collect();
    assert!(
        st.events_lost_total > 0,
        "a 4 KiB ring must overflow under {sent} drops: {st:?}"
    );
    assert_eq!(
        st.events_lost_total,
        lost_now.iter().sum::<u64>(),
        "ServerStatus reports the datapath's lost counters ({lost_now:?})"
    );
    assert_eq!(lost_of(&st, "drop"), lost_now[usize::from(sinew_abi::EVENT_DROP)]);
    assert_eq!(
        lost_of(&st, "policy-verdict"),
        lost_now[usize::from(sinew_abi::EVENT_POLICY)]
    );
    let seen = st.flows_by_drop_reason.get(reason.label()).copied().unwrap_or(0) - seen_before;
    assert_eq!(
        seen + lost_delta[usize::from(sinew_abi::EVENT_DROP)],
        generated,
        "every drop event is either seen or counted lost (seen {seen}, lost {lost_delta:?})"
    );
    // Still alive and serving.
    tcp_echo(&client, pod_ip(lab, "server"), 8080, Duration::from_secs(3)).expect("allowed flow after the burst");
    wait_flows(&s1, &all(None), "a trace after the burst", |f| {
        f.r#type() == pb::EventType::Trace && ep(f, true).port == 8080 && f.sequence > st.num_flows
    });
}

/// A long TCP connection reports its SYN, then one trace per report
/// interval with the packets and bytes since the last one (no flags), and
/// its FIN with the rest: the counts of one direction add up to what was
/// sent, and the connection does not emit an event per packet.
#[test]
fn long_tcp_connections_report_periodic_counters() {
    use std::io::{Read, Write};
    let w = World::new("obs-tcp", &["--event-report-interval-ms", "200"]);
    let lab = &w.g.lab;
    let s1 = w.socket("node1");
    let (client, server) = (pod_ns(lab, "client"), pod_ip(lab, "server"));
    const MESSAGES: usize = 40;
    let port = client
        .run(move || {
            let mut s =
                std::net::TcpStream::connect_timeout(&SocketAddr::new(server.into(), 8080), Duration::from_secs(3))
                    .expect("connect client -> server:8080");
            s.set_nodelay(true).unwrap();
            let port = s.local_addr().unwrap().port();
            let mut b = [0u8; 100];
            for _ in 0..MESSAGES {
                s.write_all(&[7u8; 100]).unwrap();
                s.read_exact(&mut b).unwrap();
                std::thread::sleep(Duration::from_millis(25));
            }
            port
        })
        .unwrap();
    // The connection is closed (FIN) when the stream drops inside run().
    let ours = |f: &pb::Flow| {
        f.r#type() == pb::EventType::Trace
            && f.hook() == pb::Hook::FromContainer
            && ep(f, false).port == u32::from(port)
            && ep(f, true).port == 8080
    };
    let fin = wait_flows(&s1, &all(None), "the client's FIN", |f| {
        ours(f) && f.tcp_flags.as_ref().is_some_and(|t| t.fin)
    });
    assert_eq!(fin.len(), 1, "one FIN event: {fin:?}");
    let flows: Vec<pb::Flow> = get_flows(&s1, all(None))
        .unwrap()
        .into_iter()
        .filter(|f| ours(f))
        .collect();
    let flags = |f: &pb::Flow| f.tcp_flags.unwrap_or_default();
    let syn: Vec<_> = flows.iter().filter(|f| flags(f).syn).collect();
    let periodic: Vec<_> = flows
        .iter()
        .filter(|f| {
            let t = flags(f);
            !t.syn && !t.fin && !t.rst
        })
        .collect();
    assert_eq!(syn.len(), 1, "one SYN event: {flows:#?}");
    assert_eq!(syn[0].packets, 1);
    // ~1 s of traffic with a 200 ms interval: a few reports, not one per
    // packet (the client sent 40 messages plus ACKs).
    assert!(
        (2..=10).contains(&periodic.len()),
        "expected a report per interval, got {}: {flows:#?}",
        periodic.len()
    );
    assert!(
        periodic.iter().all(|f| f.packets > 1),
        "reports aggregate packets: {periodic:#?}"
    );
    let packets: u64 = flows.iter().map(|f| f.packets).sum();
    let bytes: u64 = flows.iter().map(|f| f.bytes).sum();
    // Each message is one packet of 100 bytes of payload (TCP_NODELAY,
    // request/response in lockstep); ACKs and the handshake come on top.
    assert!(
        packets >= MESSAGES as u64 + 2,
        "the reports account for every message: {packets} packets"
    );
    assert!(bytes >= (MESSAGES * 100) as u64, "and its bytes: {bytes}");
}

/// TCP connections from `client` to `ip:port` (the echo server): each
/// sends 100 bytes, reads the echo, half-closes and reads the server's
/// FIN, so the client has sent its last ACK when it reads its counters.
/// Returns the segments (client to server, server to client) the client's
/// kernel counted over all connections.
fn tcp_connections(client: &NetNs, ip: Ipv4Addr, port: u16, n: usize) -> (u64, u64) {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    client
        .run(move || {
            let (mut out, mut inn) = (0u64, 0u64);
            for _ in 0..n {
                let mut s =
                    std::net::TcpStream::connect_timeout(&SocketAddr::new(ip.into(), port), Duration::from_secs(3))
                        .unwrap_or_else(|e| panic!("connect {ip}:{port}: {e}"));
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                s.write_all(&[7u8; 100]).unwrap();
                let mut b = [0u8; 100];
                s.read_exact(&mut b).unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
                assert_eq!(s.read(&mut b).unwrap(), 0, "the server closes after our FIN");
                // SAFETY: tcp_info is plain data, valid when zeroed.
                let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
                // SAFETY: getsockopt writes at most `len` bytes into info,
                // which outlives the call; the fd is the live stream's.
                let rc = unsafe {
                    libc::getsockopt(
                        s.as_raw_fd(),
                        libc::IPPROTO_TCP,
                        libc::TCP_INFO,
                        (&mut info as *mut libc::tcp_info).cast(),
                        &mut len,
                    )
                };
                assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
                out += u64::from(info.tcpi_segs_out);
                inn += u64::from(info.tcpi_segs_in);
            }
            (out, inn)
        })
        .unwrap()
}

/// UDP datagrams of `size` bytes from one socket in `client` to the echo
/// server at `ip:port`, in `bursts` separated by `pause`; every one is
/// echoed. Returns how many were sent (each one answered).
fn udp_bursts(client: &NetNs, ip: Ipv4Addr, port: u16, bursts: usize, per_burst: usize, pause: Duration) -> u64 {
    client
        .run(move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut b = [0u8; 200];
            let mut n = 0;
            for burst in 0..bursts {
                if burst > 0 {
                    std::thread::sleep(pause);
                }
                for _ in 0..per_burst {
                    s.send_to(&[1u8; 60], (ip, port)).unwrap();
                    s.recv_from(&mut b).expect("udp echo");
                    n += 1;
                }
            }
            n
        })
        .unwrap()
}

/// ICMP echoes from `client` to `ip` through a raw socket, `count` with
/// each identifier (two pings, interleaved), each answered before the
/// next; returns how many.
fn icmp_echoes(client: &NetNs, ip: Ipv4Addr, ids: [u16; 2], count: u16) -> u64 {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    client
        .run(move || {
            // SAFETY: plain socket(2); the fd is owned right after.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
            assert!(fd >= 0, "raw ICMP socket: {}", std::io::Error::last_os_error());
            // SAFETY: fd is fresh and nobody else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let tv = libc::timeval { tv_sec: 2, tv_usec: 0 };
            // SAFETY: tv lives across the call and its size is passed.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(ip.octets()),
                },
                sin_zero: [0; 8],
            };
            let mut answered = 0;
            for seq in 0..count {
                for id in ids {
                    let mut rest = id.to_be_bytes().to_vec();
                    rest.extend_from_slice(&seq.to_be_bytes());
                    rest.extend_from_slice(&[0x5a; 32]);
                    let msg = icmp_message(8, 0, &rest);
                    // SAFETY: msg and sin are valid for the call, with their sizes.
                    let n = unsafe {
                        libc::sendto(
                            fd.as_raw_fd(),
                            msg.as_ptr().cast(),
                            msg.len(),
                            0,
                            (&sin as *const libc::sockaddr_in).cast(),
                            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                        )
                    };
                    assert!(n > 0, "send echo: {}", std::io::Error::last_os_error());
                    // A raw socket sees every ICMP message: wait for our reply.
                    loop {
                        let mut b = [0u8; 256];
                        // SAFETY: b is writable for its length.
                        let n = unsafe { libc::recv(fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len(), 0) };
                        assert!(n > 0, "no echo reply for id {id} seq {seq}");
                        let ihl = usize::from(b[0] & 0xf) * 4;
                        let (t, rid, rseq) = (
                            b[ihl],
                            u16::from_be_bytes([b[ihl + 4], b[ihl + 5]]),
                            u16::from_be_bytes([b[ihl + 6], b[ihl + 7]]),
                        );
                        if t == 0 && rid == id && rseq == seq {
                            answered += 1;
                            break;
                        }
                    }
                }
            }
            answered
        })
        .unwrap()
}

/// Sums of forwarded-flow reports per (node, hook, source, destination,
/// protocol), ports left out (a direction of many connections).
type Sums = BTreeMap<(String, i32, String, String, u32), (u64, u64)>;

fn trace_sums(w: &World) -> (Sums, Vec<pb::Flow>) {
    let mut sums = Sums::new();
    let mut flows = Vec::new();
    for node in ["node1", "node2"] {
        for f in get_flows(&w.socket(node), all(None)).unwrap() {
            if f.r#type() != pb::EventType::Trace || f.verdict() != pb::Verdict::Forwarded {
                continue;
            }
            let key = (
                node.to_string(),
                f.hook,
                ep(&f, false).ip.clone(),
                ep(&f, true).ip.clone(),
                f.protocol,
            );
            let s = sums.entry(key).or_default();
            s.0 += f.packets;
            s.1 += f.bytes;
            flows.push(f);
        }
    }
    (sums, flows)
}

/// Every forwarded packet is counted in exactly one trace report: known
/// counts per protocol (TCP connections with handshake and teardown, UDP
/// datagrams in bursts with idle gaps, ICMP echoes of two pings) sum to
/// what was sent, at every hook that reports the flow, once the flows have
/// been idle for a report interval, and stay there.
#[test]
fn forwarded_flow_counters_add_up_exactly() {
    let interval = Duration::from_millis(300);
    let w = World::new("obs-sum", &["--event-report-interval-ms", "300"]);
    let lab = &w.g.lab;
    let client = pod_ns(lab, "client");
    let (c, s, o) = (pod_ip(lab, "client"), pod_ip(lab, "server"), pod_ip(lab, "other"));

    let (tcp_out, tcp_in) = tcp_connections(&client, s, 8080, 10);
    let udp_local = udp_bursts(&client, s, 5353, 4, 100, interval + Duration::from_millis(100));
    let udp_remote = udp_bursts(&client, o, 5353, 2, 100, interval * 2);
    let icmp = icmp_echoes(&client, o, [0x5101, 0x5102], 30);
    assert_eq!((udp_local, udp_remote, icmp), (400, 200, 60));

    let (tcp, udp, icmp_p) = (6, 17, 1);
    // (source, destination, protocol, packets): every direction of every
    // flow. The hooks that report a direction are the sender's
    // from_container and the receiver's delivery hook.
    let want: Vec<(Ipv4Addr, Ipv4Addr, u32, u64)> = vec![
        (c, s, tcp, tcp_out),
        (s, c, tcp, tcp_in),
        (c, s, udp, udp_local),
        (s, c, udp, udp_local),
        (c, o, udp, udp_remote),
        (o, c, udp, udp_remote),
        (c, o, icmp_p, icmp),
        (o, c, icmp_p, icmp),
    ];
    let mismatches = |sums: &Sums| -> Vec<String> {
        let mut bad = Vec::new();
        for (src, dst, proto, n) in &want {
            let at: Vec<_> = sums
                .iter()
                .filter(|((_, _, fs, fd, fp), _)| *fs == src.to_string() && *fd == dst.to_string() && fp == proto)
                .collect();
            if !at.iter().any(|((_, h, ..), _)| *h == pb::Hook::FromContainer as i32) {
                bad.push(format!("{src} -> {dst} proto {proto}: no report at from_container"));
            }
            for ((node, hook, ..), (p, _)) in at {
                if p != n {
                    bad.push(format!(
                        "{src} -> {dst} proto {proto} at {node} hook {hook}: {p} packets reported, {n} sent"
                    ));
                }
            }
        }
        bad
    };
    // Reports of the last packets come once a flow has been idle for an
    // interval and the agent's next flush: wait for them, then make sure
    // nothing more arrives (a packet counted twice).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (mut sums, mut flows) = trace_sums(&w);
    while !mismatches(&sums).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        (sums, flows) = trace_sums(&w);
    }
    let bad = mismatches(&sums);
    assert!(
        bad.is_empty(),
        "forwarded counts do not add up:\n{}\nsums: {sums:#?}\nflows: {flows:#?}",
        bad.join("\n")
    );
    let ours = |sums: Sums| -> Sums {
        sums.into_iter()
            .filter(|((_, _, fs, fd, fp), _)| {
                want.iter()
                    .any(|(src, dst, proto, _)| *fs == src.to_string() && *fd == dst.to_string() && fp == proto)
            })
            .collect()
    };
    // The two pings are two flows: each direction of each identifier sums
    // to its own 30 echoes.
    for id in [0x5101u32, 0x5102] {
        for (src, dst) in [(c, o), (o, c)] {
            let n: u64 = flows
                .iter()
                .filter(|f| {
                    f.protocol == icmp_p
                        && f.hook() == pb::Hook::FromContainer
                        && ep(f, false).ip == src.to_string()
                        && ep(f, true).ip == dst.to_string()
                })
                .map(|f| {
                    assert!(f.icmp_id == 0x5101 || f.icmp_id == 0x5102, "{f:?}");
                    if f.icmp_id == id {
                        f.packets
                    } else {
                        0
                    }
                })
                .sum();
            assert_eq!(n, icmp / 2, "ping {id:#x} {src} -> {dst}");
        }
    }
    std::thread::sleep(interval * 4);
    let (later, _) = trace_sums(&w);
    assert_eq!(ours(later), ours(sums), "no report after the counts added up");
}

/// Runs `sinew` against a node's socket with extra environment; returns
/// (success, stdout, stderr).
fn sinew(socket: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(sinew_cli())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What a user reads, end to end: policy verdicts carry the program that
/// decided, a default-deny drop names the policy that isolates the pod and
/// says each thing once, the table's time has a date and a zone from `TZ`,
/// bad filter arguments fail with a way out, and `endpoint list -o json`
/// has what a runtime's GC list needs. Every failed check is listed before
/// the test fails, so one run shows them all.
#[test]
fn observe_output_says_what_happened_once_and_where() {
    let w = World::new("obs-ux", &[]);
    let lab = &w.g.lab;
    let s1 = w.socket("node1");
    let applied = apply_policy(&s1, POLICY).expect("apply policy");
    wait_policies_everywhere(lab, &applied);
    let (client, server) = (pod_ns(lab, "client"), pod_ip(lab, "server"));
    let other = pod_ns(lab, "other");
    tcp_echo(&client, server, 8080, Duration::from_secs(3)).expect("client -> server:8080 is allowed");
    // b/other is not a client: the server is isolated for ingress and no
    // rule allows it (default deny), decided where node1 decapsulates.
    assert!(tcp_echo(&other, server, 8080, Duration::from_secs(1)).is_err());
    let mut failed: Vec<String> = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            failed.push(what);
        }
    };

    // Policy verdicts name the program that decided: the client's veth
    // (local delivery runs the server's ingress policy there), and the
    // uplink for the pod on node2 (from_netdev decapsulates VXLAN itself
    // and delivers).
    let allowed = wait_flows(&s1, &all(None), "verdict client -> server:8080", |f| {
        f.r#type() == pb::EventType::PolicyVerdict && is_pod(ep(f, false), "a", "client") && ep(f, true).port == 8080
    });
    check(
        allowed.iter().all(|f| f.hook() == pb::Hook::FromContainer),
        format!(
            "verdict client -> server has hook {:?}, want FromContainer",
            allowed.iter().map(|f| f.hook()).collect::<Vec<_>>()
        ),
    );
    let denied = wait_flows(&s1, &all(None), "verdict b/other -> server:8080", |f| {
        f.r#type() == pb::EventType::PolicyVerdict && is_pod(ep(f, false), "b", "other") && ep(f, true).port == 8080
    });
    check(
        denied.iter().all(|f| f.hook() == pb::Hook::FromNetdev),
        format!(
            "verdict b/other -> server has hook {:?}, want FromNetdev",
            denied.iter().map(|f| f.hook()).collect::<Vec<_>>()
        ),
    );

    // The table: one verdict row and one drop row per denied packet, each
    // saying what it is, each saying it once, naming the isolating policy;
    // time with date and the zone of TZ (a POSIX TZ: no zoneinfo needed).
    let (ok, table, err) = sinew(
        &s1,
        &[("TZ", "SNW-5:30")],
        &[
            "observe",
            "--from-pod",
            "b/other",
            "--to-pod",
            "a/server",
            "--last",
            "100",
        ],
    );
    check(ok, format!("observe --from-pod b/other failed: {err}"));
    let rows: Vec<&str> = table.lines().skip(1).collect();
    let isolated = "default deny: a/server isolated for ingress by SinewNetworkPolicy a/server-policy";
    let verdict_rows: Vec<&&str> = rows.iter().filter(|r| r.contains("policy-verdict")).collect();
    let drop_rows: Vec<&&str> = rows.iter().filter(|r| !r.contains("policy-verdict")).collect();
    check(
        !verdict_rows.is_empty() && verdict_rows.len() == drop_rows.len(),
        format!("one verdict row per drop row:\n{table}"),
    );
    for r in &verdict_rows {
        check(
            r.contains("policy-verdict:none INGRESS DENIED") && r.contains(isolated),
            format!("verdict row says what decided and who isolates: {r}"),
        );
    }
    for r in &drop_rows {
        check(
            r.contains("DROPPED") && r.contains("policy denied") && r.contains(isolated),
            format!("drop row says why and who isolates: {r}"),
        );
    }
    for r in &rows {
        check(
            r.matches("no rule allows it").count() <= 1 && r.matches("policy").count() <= 4,
            format!("row repeats itself: {r}"),
        );
        let date = r.get(..10).unwrap_or("");
        check(
            date.len() == 10 && date.as_bytes()[4] == b'-' && date.as_bytes()[7] == b'-' && r.contains("+05:30 "),
            format!("row time has a date and the TZ offset +05:30: {r}"),
        );
    }
    // The drop rows alone: one row per dropped packet.
    let (_, drops, _) = sinew(
        &s1,
        &[],
        &["observe", "--type", "drop", "--from-pod", "b/other", "--last", "100"],
    );
    check(
        drops.lines().skip(1).count() == drop_rows.len(),
        format!("--type drop lists each dropped packet once:\n{drops}"),
    );

    // Filter arguments that cannot name anything fail, saying what to use.
    for args in [
        &["observe", "--pod", "a/b/c"][..],
        &["observe", "--from-pod", "/server"],
        &["observe", "--to-pod", "A_B"],
        &["observe", "--namespace", "a/b"],
        &["observe", "--label", "app=a=b"],
    ] {
        let (ok, out, err) = sinew(&s1, &[], args);
        check(
            !ok && err.contains(args[1]) && out.is_empty(),
            format!("{args:?} is refused with the flag named: ok={ok} out={out:?} err={err:?}"),
        );
    }
    let (_, _, err) = sinew(&s1, &[], &["observe", "--pod", "a/b/c"]);
    check(
        err.contains("NAMESPACE/NAME"),
        format!("--pod a/b/c says the form: {err}"),
    );

    // endpoint list -o json: the pod-side interface, for a GC list.
    let (ok, json, err) = sinew(&s1, &[], &["endpoint", "list", "-o", "json"]);
    check(ok, format!("endpoint list -o json: {err}"));
    let eps: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    check(
        eps.as_array().is_some_and(|a| {
            !a.is_empty()
                && a.iter()
                    .all(|e| e["podInterface"] == "eth0" && e["containerID"].is_string())
        }),
        format!("every endpoint has podInterface eth0 and its containerID: {json}"),
    );
    assert!(
        failed.is_empty(),
        "{} checks failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// A pod the runtime gave no Kubernetes names (podman, cnitool: no
/// K8S_POD_* in CNI_ARGS) is named by its container id in `endpoint list`
/// and in `observe`, never as "/".
#[test]
fn pods_without_kubernetes_names_show_their_container() {
    let g = lab("obs-anon", 1, 0, Routing::Vxlan);
    let lab = &g.lab;
    let s1 = lab.node("node1").unwrap().socket.clone();
    /// Deletes the pod's namespace however the test ends.
    struct Pod(sinew_testvms::NetNs);
    impl Drop for Pod {
        fn drop(&mut self) {
            let _ = self.0.delete();
        }
    }
    let pod = Pod(sinew_testvms::NetNs::create(format!("{}-anon", lab.spec().name_prefix)).unwrap());
    let id = sinew_testvms::cni::container_id(&lab.spec().name_prefix, "anon");
    let cni = |command: &str| {
        let cmd = sinew_testvms::cni::command(&lab.node("node1").unwrap().netns, &lab.binaries().cni).unwrap();
        let netns = pod.0.path();
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", id.as_str()),
            ("CNI_NETNS", netns.to_str().unwrap()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
            ("CNI_ARGS", "IgnoreUnknown=1"),
        ];
        let out = sinew_testvms::support::run_cni(cmd, &env, &lab.cni_config("node1").unwrap());
        assert!(
            out.status.success(),
            "CNI {command}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    cni("ADD");
    let short = &id[..12];
    let (ok, table, err) = sinew(&s1, &[], &["endpoint", "list"]);
    assert!(ok, "{err}");
    assert!(
        table.contains(&format!(" container {short} ")) && !table.contains(" / "),
        "{table}"
    );
    // A datagram out of the pod: traced where it leaves, named by its
    // container.
    pod.0
        .run(|| {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            s.send_to(b"hello", (Ipv4Addr::new(198, 18, 0, 1), 9)).unwrap();
        })
        .unwrap();
    let mut text = String::new();
    for _ in 0..50 {
        text = sinew(&s1, &[], &["observe", "-o", "compact", "--last", "50"]).1;
        if text.contains(&format!("(container {short}):")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(text.contains(&format!("(container {short}):")), "{text}");
    cni("DEL");
}
