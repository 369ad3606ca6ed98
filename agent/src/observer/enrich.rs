//! From a raw datapath record to the API's `Flow`: pure, so that every
//! field's meaning is unit-tested without a kernel.

use std::net::Ipv4Addr;

use sinew_abi::{DropReason, FlowEvent};
use sinew_proto::observer_v1 as pb;

use sinew_flows::{protocol_name, PROTO_ICMP, PROTO_TCP};

use super::index::{Names, Peer};

/// `flow_event.dir` (METRIC_DIR_* in the ABI header).
const DIR_INGRESS: u8 = sinew_abi::Direction::Ingress as u8;
const DIR_EGRESS: u8 = sinew_abi::Direction::Egress as u8;

pub fn tcp_flags(f: u8) -> pb::TcpFlags {
    pb::TcpFlags {
        fin: f & 0x01 != 0,
        syn: f & 0x02 != 0,
        rst: f & 0x04 != 0,
        psh: f & 0x08 != 0,
        ack: f & 0x10 != 0,
        urg: f & 0x20 != 0,
        ece: f & 0x40 != 0,
        cwr: f & 0x80 != 0,
    }
}

pub fn event_type(t: u8) -> pb::EventType {
    match t {
        sinew_abi::EVENT_TRACE => pb::EventType::Trace,
        sinew_abi::EVENT_DROP => pb::EventType::Drop,
        sinew_abi::EVENT_POLICY => pb::EventType::PolicyVerdict,
        _ => pb::EventType::Unknown,
    }
}

fn reserved_name(identity: u32) -> &'static str {
    match identity {
        sinew_abi::IDENTITY_HOST => "host",
        sinew_abi::IDENTITY_WORLD => "world",
        sinew_abi::IDENTITY_REMOTE_NODE => "remote-node",
        _ => "",
    }
}

fn endpoint(ip: Ipv4Addr, port: u16, peer: Option<&Peer>, fallback_identity: u32) -> pb::Endpoint {
    let mut e = pb::Endpoint {
        ip: ip.to_string(),
        port: u32::from(port),
        ..Default::default()
    };
    match peer {
        Some(p) => {
            e.namespace = p.namespace.clone();
            e.pod_name = p.pod.clone();
            e.labels = p.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            e.identity = p.identity;
            e.node_name = p.node.clone();
            e.endpoint_id = p.endpoint_id;
            e.reserved = p.reserved.into();
            e.container_id = p.container_id.clone();
        }
        None => {
            e.identity = fallback_identity;
            e.reserved = reserved_name(fallback_identity).into();
        }
    }
    e
}

/// A request the L7 proxy judged, as a flow: both sides named from the
/// index (labels, node) where it knows the address, else as the proxy
/// named them; verdict DROPPED for what the proxy did not forward.
pub fn enrich_l7(f: &sinew_proto::proxy_v1::L7Flow, idx: Names<'_>, sequence: u64) -> pb::Flow {
    use sinew_proto::proxy_v1 as px;
    let side = |ip: &str, port: u32, identity: u32, ns: &str, name: &str| {
        // An address that names another identity than the proxy judged
        // (another node's proxy speaking for a pod): named as the proxy
        // named it.
        let peer = ip
            .parse::<Ipv4Addr>()
            .ok()
            .and_then(|a| idx.peer(a))
            .filter(|p| identity == 0 || p.identity == identity);
        let mut e = match (ip.parse::<Ipv4Addr>(), peer) {
            (Ok(a), Some(p)) => endpoint(a, port as u16, Some(p), identity),
            _ => pb::Endpoint {
                ip: ip.to_string(),
                port,
                identity,
                namespace: ns.to_string(),
                pod_name: name.to_string(),
                reserved: if name.is_empty() {
                    reserved_name(identity).into()
                } else {
                    String::new()
                },
                ..Default::default()
            },
        };
        // The proxy judged with this identity: show it.
        if identity != 0 {
            e.identity = identity;
        }
        e
    };
    let l7_verdict = px::L7Verdict::try_from(f.verdict).unwrap_or(px::L7Verdict::Unspecified);
    let (verdict, l7v) = match l7_verdict {
        px::L7Verdict::Forwarded => (pb::Verdict::Forwarded, pb::L7Verdict::Forwarded),
        px::L7Verdict::Denied => (pb::Verdict::Dropped, pb::L7Verdict::Denied),
        px::L7Verdict::Error => (pb::Verdict::Dropped, pb::L7Verdict::Error),
        px::L7Verdict::Unspecified => (pb::Verdict::Unknown, pb::L7Verdict::Unknown),
    };
    let direction = match px::Direction::try_from(f.direction) {
        Ok(px::Direction::Ingress) => pb::TrafficDirection::Ingress,
        Ok(px::Direction::Egress) => pb::TrafficDirection::Egress,
        _ => pb::TrafficDirection::Unknown,
    };
    let drop_reason = (verdict == pb::Verdict::Dropped).then(|| pb::DropReason {
        // Not a datapath drop: no code of drop_reasons.h.
        code: 0,
        name: f.drop_reason.clone(),
        description: match l7_verdict {
            px::L7Verdict::Denied => format!("L7 policy denied ({})", f.drop_reason),
            _ => format!("refused by the L7 proxy ({})", f.drop_reason),
        },
    });
    pb::Flow {
        time_unix_nanos: f.time_unix_nanos,
        node_name: idx.node_name().to_string(),
        sequence,
        verdict: verdict as i32,
        drop_reason,
        r#type: pb::EventType::L7 as i32,
        source: Some(side(
            &f.src_ip,
            f.src_port,
            f.src_identity,
            &f.src_namespace,
            &f.src_name,
        )),
        destination: Some(side(
            &f.dst_ip,
            f.dst_port,
            f.dst_identity,
            &f.dst_namespace,
            &f.dst_name,
        )),
        protocol: u32::from(PROTO_TCP),
        protocol_name: protocol_name(PROTO_TCP),
        direction: direction as i32,
        packets: 1,
        l7: Some(pb::L7 {
            protocol: f.protocol.clone(),
            method: f.method.clone(),
            host: f.host.clone(),
            path: f.path.clone(),
            status: f.status,
            grpc_status: f.grpc_status,
            latency_micros: f.latency_micros,
            verdict: l7v as i32,
            rule: f.rule.clone(),
            reason: f.drop_reason.clone(),
        }),
        ..Default::default()
    }
}

/// Builds the enriched flow. `time_unix_nanos` is the event's time already
/// converted to the wall clock; `interface` its device's name if known.
pub fn enrich(ev: &FlowEvent, idx: Names<'_>, time_unix_nanos: u64, sequence: u64, interface: &str) -> pb::Flow {
    let saddr = Ipv4Addr::from(u32::from_be(ev.saddr));
    let daddr = Ipv4Addr::from(u32::from_be(ev.daddr));
    let (mut sport, mut dport) = (u16::from_be(ev.sport), u16::from_be(ev.dport));
    let (mut icmp_type, mut icmp_code) = (0, 0);
    if ev.proto == PROTO_ICMP {
        // The datapath puts ICMP type and code in the port fields, as
        // single bytes that were never byte-swapped.
        (icmp_type, icmp_code) = (u32::from(ev.sport as u8), u32::from(ev.dport as u8));
        (sport, dport) = (0, 0);
    }
    let ty = event_type(ev.r#type);
    let direction = match ev.dir {
        DIR_INGRESS => pb::TrafficDirection::Ingress,
        DIR_EGRESS => pb::TrafficDirection::Egress,
        _ => pb::TrafficDirection::Unknown,
    };
    // The peer identity the datapath used names whichever side is not the
    // local endpoint: the source on ingress, the destination on egress.
    let local_ip = idx.endpoint_ip(ev.ep_id);
    let peer_is_source = match local_ip {
        Some(ip) => ip != saddr,
        None => direction == pb::TrafficDirection::Ingress,
    };
    let (src_fallback, dst_fallback) = if peer_is_source {
        (ev.peer_identity, 0)
    } else {
        (0, ev.peer_identity)
    };
    let verdict = match ev.verdict {
        sinew_abi::VERDICT_FORWARDED => pb::Verdict::Forwarded,
        sinew_abi::VERDICT_DROPPED => pb::Verdict::Dropped,
        _ => pb::Verdict::Unknown,
    };
    let drop_reason = (verdict == pb::Verdict::Dropped).then(|| match DropReason::from_code(ev.reason) {
        Some(r) => pb::DropReason {
            code: u32::from(ev.reason),
            name: r.label().into(),
            description: r.description().into(),
        },
        None => pb::DropReason {
            code: u32::from(ev.reason),
            name: format!("unknown_{}", ev.reason),
            description: format!("unknown drop reason {} (a newer datapath?)", ev.reason),
        },
    });
    let trace_observation_point = if ty == pb::EventType::Trace {
        match ev.obs {
            sinew_abi::TRACE_TO_STACK => pb::TraceObservationPoint::TraceToStack,
            sinew_abi::TRACE_TO_ENDPOINT => pb::TraceObservationPoint::TraceToEndpoint,
            sinew_abi::TRACE_TO_TUNNEL => pb::TraceObservationPoint::TraceToTunnel,
            sinew_abi::TRACE_TO_PROXY => pb::TraceObservationPoint::TraceToProxy,
            sinew_abi::TRACE_TO_NETWORK => pb::TraceObservationPoint::TraceToNetwork,
            _ => pb::TraceObservationPoint::Unknown,
        }
    } else {
        pb::TraceObservationPoint::Unknown
    };
    let hook = match ev.hook {
        sinew_abi::HOOK_FROM_CONTAINER => pb::Hook::FromContainer,
        sinew_abi::HOOK_TO_CONTAINER => pb::Hook::ToContainer,
        sinew_abi::HOOK_FROM_NETDEV => pb::Hook::FromNetdev,
        sinew_abi::HOOK_TO_NETDEV => pb::Hook::ToNetdev,
        sinew_abi::HOOK_FROM_OVERLAY => pb::Hook::FromOverlay,
        sinew_abi::HOOK_TO_OVERLAY => pb::Hook::ToOverlay,
        _ => pb::Hook::Unknown,
    };
    let policy_match = if ty == pb::EventType::PolicyVerdict {
        match ev.r#match {
            sinew_abi::MATCH_L3_ONLY => pb::PolicyMatch::L3Only,
            sinew_abi::MATCH_L3_L4 => pb::PolicyMatch::L3L4,
            sinew_abi::MATCH_L4_ONLY => pb::PolicyMatch::L4Only,
            sinew_abi::MATCH_ALL => pb::PolicyMatch::All,
            _ => pb::PolicyMatch::None,
        }
    } else {
        pb::PolicyMatch::None
    };
    // A default deny has no rule to name: the policies that isolate the
    // local pod in this direction say why it is denied at all.
    let default_deny = verdict == pb::Verdict::Dropped
        && ev.reason == DropReason::Policy.code()
        && matches!(ty, pb::EventType::Drop | pb::EventType::PolicyVerdict);
    let isolated_by = match direction {
        pb::TrafficDirection::Ingress if default_deny => idx.isolated_by(ev.ep_id, sinew_policy::Direction::Ingress),
        pb::TrafficDirection::Egress if default_deny => idx.isolated_by(ev.ep_id, sinew_policy::Direction::Egress),
        _ => &[],
    }
    .iter()
    .map(|p| pb::Policy {
        kind: p.kind.as_str().into(),
        namespace: p.namespace.clone().unwrap_or_default(),
        name: p.name.clone(),
    })
    .collect();
    let policy_rule = idx.rule(ev.rule_id).map(|r| pb::PolicyRule {
        kind: r.kind.as_str().into(),
        namespace: r.namespace.clone().unwrap_or_default(),
        name: r.name.clone(),
        section: r.section.as_str().into(),
        index: r.index as u32,
    });
    pb::Flow {
        time_unix_nanos,
        node_name: idx.node_name().to_string(),
        sequence,
        verdict: verdict as i32,
        drop_reason,
        r#type: ty as i32,
        trace_observation_point: trace_observation_point as i32,
        hook: hook as i32,
        source: Some(endpoint(saddr, sport, idx.peer(saddr), src_fallback)),
        destination: Some(endpoint(daddr, dport, idx.peer(daddr), dst_fallback)),
        protocol: u32::from(ev.proto),
        protocol_name: protocol_name(ev.proto),
        tcp_flags: (ev.proto == PROTO_TCP).then(|| tcp_flags(ev.tcp_flags)),
        icmp_type,
        icmp_code,
        icmp_id: if ev.proto == PROTO_ICMP {
            u32::from(u16::from_be(ev.icmp_id))
        } else {
            0
        },
        direction: direction as i32,
        interface: interface.to_string(),
        ifindex: ev.ifindex,
        policy_match: policy_match as i32,
        policy_rule,
        packets: ev.packets,
        bytes: ev.bytes,
        length: ev.len,
        is_reply: pb::IsReply::Unknown as i32,
        local_endpoint_id: ev.ep_id,
        isolated_by,
        l7: None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use sinew_policy::{PolicyKind, RuleRef, Section};

    use super::*;
    use crate::observer::index::ObserverIndex;

    fn index() -> ObserverIndex {
        let mut idx = ObserverIndex {
            node_name: "node1".into(),
            ..Default::default()
        };
        let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        idx.by_ip.insert(
            Ipv4Addr::new(10, 0, 1, 5),
            Peer {
                namespace: "a".into(),
                pod: "web".into(),
                labels: Arc::new(labels),
                identity: 300,
                node: "node1".into(),
                endpoint_id: 7,
                reserved: "",
                container_id: "0f1e2d3c4b5a69788796a5b4c3d2e1f0".into(),
            },
        );
        idx.by_endpoint.insert(7, Ipv4Addr::new(10, 0, 1, 5));
        idx.rules.push(RuleRef {
            kind: PolicyKind::SinewNetworkPolicy,
            namespace: Some("a".into()),
            name: "deny-db".into(),
            section: Section::IngressDeny,
            index: 2,
        });
        idx.isolation.insert(
            7,
            crate::observer::index::Isolation {
                ingress: vec![sinew_policy::PolicyName {
                    kind: PolicyKind::NetworkPolicy,
                    namespace: Some("a".into()),
                    name: "web-in".into(),
                }],
                egress: Vec::new(),
            },
        );
        idx
    }

    /// A default-deny drop and its verdict name the policy isolating the
    /// pod in that direction; a deny rule's drop names its rule instead.
    #[test]
    fn default_deny_names_the_isolating_policy() {
        let drop = FlowEvent {
            saddr: ip([10, 0, 2, 9]),
            daddr: ip([10, 0, 1, 5]),
            proto: PROTO_TCP,
            r#type: sinew_abi::EVENT_DROP,
            reason: DropReason::Policy.code(),
            dir: DIR_INGRESS,
            ep_id: 7,
            peer_identity: 400,
            verdict: sinew_abi::VERDICT_DROPPED,
            hook: sinew_abi::HOOK_FROM_OVERLAY,
            ..Default::default()
        };
        let verdict = FlowEvent {
            r#type: sinew_abi::EVENT_POLICY,
            ..drop
        };
        let idx = index();
        for ev in [drop, verdict] {
            let f = enrich(&ev, Names::one(&idx), 0, 1, "");
            let names: Vec<_> = f
                .isolated_by
                .iter()
                .map(|p| (p.kind.as_str(), p.namespace.as_str(), p.name.as_str()))
                .collect();
            assert_eq!(names, [("NetworkPolicy", "a", "web-in")], "{f:?}");
            assert_eq!(f.hook(), pb::Hook::FromOverlay);
        }
        let deny_rule = FlowEvent {
            reason: DropReason::PolicyDeny.code(),
            rule_id: 1,
            ..drop
        };
        assert!(enrich(&deny_rule, Names::one(&idx), 0, 1, "").isolated_by.is_empty());
        // The pod is not isolated for egress: nothing to name.
        let egress = FlowEvent {
            saddr: ip([10, 0, 1, 5]),
            daddr: ip([10, 0, 2, 9]),
            dir: DIR_EGRESS,
            ..drop
        };
        assert!(enrich(&egress, Names::one(&idx), 0, 1, "").isolated_by.is_empty());
        let dst = enrich(&drop, Names::one(&idx), 0, 1, "").destination.unwrap();
        assert_eq!(dst.container_id, "0f1e2d3c4b5a69788796a5b4c3d2e1f0");
    }

    fn ip(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    #[test]
    fn policy_drop_names_pod_rule_and_reason() {
        let ev = FlowEvent {
            saddr: ip([10, 0, 2, 9]),
            daddr: ip([10, 0, 1, 5]),
            sport: 40000u16.to_be(),
            dport: 9090u16.to_be(),
            proto: PROTO_TCP,
            r#type: sinew_abi::EVENT_DROP,
            reason: DropReason::PolicyDeny.code(),
            dir: DIR_INGRESS,
            ep_id: 7,
            peer_identity: 400,
            rule_id: 1,
            tcp_flags: 0x02,
            verdict: sinew_abi::VERDICT_DROPPED,
            packets: 1,
            bytes: 60,
            ..Default::default()
        };
        let f = enrich(&ev, Names::one(&index()), 5, 9, "lxc1");
        assert_eq!(f.verdict(), pb::Verdict::Dropped);
        assert_eq!(f.r#type(), pb::EventType::Drop);
        let r = f.drop_reason.as_ref().unwrap();
        assert_eq!(r.description, "policy denied (deny rule)");
        assert_eq!(r.name, "policy_deny_rule");
        let src = f.source.as_ref().unwrap();
        assert_eq!((src.ip.as_str(), src.port, src.identity), ("10.0.2.9", 40000, 400));
        assert!(src.pod_name.is_empty());
        let dst = f.destination.as_ref().unwrap();
        assert_eq!(
            (dst.namespace.as_str(), dst.pod_name.as_str(), dst.port),
            ("a", "web", 9090)
        );
        assert_eq!(dst.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!((dst.identity, dst.endpoint_id), (300, 7));
        let rule = f.policy_rule.as_ref().unwrap();
        assert_eq!(
            (
                rule.kind.as_str(),
                rule.name.as_str(),
                rule.section.as_str(),
                rule.index
            ),
            ("SinewNetworkPolicy", "deny-db", "ingressDeny", 2)
        );
        assert!(f.tcp_flags.as_ref().unwrap().syn);
        assert!(!f.tcp_flags.as_ref().unwrap().ack);
        assert_eq!((f.sequence, f.time_unix_nanos, f.interface.as_str()), (9, 5, "lxc1"));
    }

    #[test]
    fn egress_peer_identity_goes_to_the_destination_and_world_is_named() {
        let ev = FlowEvent {
            saddr: ip([10, 0, 1, 5]),
            daddr: ip([198, 18, 0, 1]),
            proto: PROTO_ICMP,
            sport: 8,
            dport: 0,
            r#type: sinew_abi::EVENT_POLICY,
            dir: DIR_EGRESS,
            ep_id: 7,
            peer_identity: sinew_abi::IDENTITY_WORLD,
            verdict: sinew_abi::VERDICT_FORWARDED,
            r#match: sinew_abi::MATCH_L3_ONLY,
            ..Default::default()
        };
        let f = enrich(&ev, Names::one(&index()), 0, 1, "");
        assert_eq!(f.destination.as_ref().unwrap().reserved, "world");
        assert_eq!(f.source.as_ref().unwrap().identity, 300);
        assert_eq!((f.icmp_type, f.icmp_code), (8, 0));
        assert_eq!(f.source.as_ref().unwrap().port, 0);
        assert_eq!(f.policy_match(), pb::PolicyMatch::L3Only);
        assert!(f.drop_reason.is_none() && f.tcp_flags.is_none() && f.policy_rule.is_none());
    }

    #[test]
    fn unknown_codes_do_not_panic() {
        let ev = FlowEvent {
            r#type: 99,
            verdict: sinew_abi::VERDICT_DROPPED,
            reason: 250,
            rule_id: 77,
            ..Default::default()
        };
        let f = enrich(&ev, Names::one(&index()), 0, 1, "");
        assert_eq!(f.r#type(), pb::EventType::Unknown);
        assert_eq!(f.drop_reason.unwrap().name, "unknown_250");
        assert!(f.policy_rule.is_none());
    }

    // The rows sinew-flows renders for enriched default-deny records.
    /// A record as the datapath writes it, enriched against an index in
    /// which a/web (endpoint 7) is isolated for ingress by a/web-in.
    fn enriched(ev: sinew_abi::FlowEvent) -> pb::Flow {
        use crate::observer::index::Isolation;
        let mut idx = ObserverIndex::default();
        let web = std::net::Ipv4Addr::new(10, 0, 1, 5);
        idx.by_ip.insert(
            web,
            Peer {
                namespace: "a".into(),
                pod: "web".into(),
                identity: 300,
                endpoint_id: 7,
                ..Default::default()
            },
        );
        idx.by_endpoint.insert(7, web);
        idx.isolation.insert(
            7,
            Isolation {
                ingress: vec![sinew_policy::PolicyName {
                    kind: sinew_policy::PolicyKind::NetworkPolicy,
                    namespace: Some("a".into()),
                    name: "web-in".into(),
                }],
                egress: Vec::new(),
            },
        );
        enrich(&ev, Names::one(&idx), 0, 1, "")
    }

    fn default_deny_event(r#type: u8) -> sinew_abi::FlowEvent {
        sinew_abi::FlowEvent {
            saddr: u32::from_ne_bytes([10, 0, 2, 9]),
            daddr: u32::from_ne_bytes([10, 0, 1, 5]),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            tcp_flags: 0x02,
            r#type,
            reason: sinew_abi::DropReason::Policy.code(),
            verdict: sinew_abi::VERDICT_DROPPED,
            dir: sinew_abi::Direction::Ingress as u8,
            ep_id: 7,
            peer_identity: 400,
            ..Default::default()
        }
    }

    /// A default-deny packet is two rows, as in Hubble: the verdict says
    /// it is the decision and the drop says it is the packet; each names
    /// the isolating policy and says nothing twice.
    #[test]
    fn default_deny_rows_say_what_they_are_once() {
        let verdict = sinew_flows::render::summary(&enriched(default_deny_event(sinew_abi::EVENT_POLICY)));
        let drop = sinew_flows::render::summary(&enriched(default_deny_event(sinew_abi::EVENT_DROP)));
        let why = "default deny: a/web isolated for ingress by NetworkPolicy a/web-in";
        assert_eq!(verdict, format!("policy-verdict:none INGRESS DENIED ({why})"));
        assert_eq!(drop, format!("policy denied ({why})"));
        // Isolating policies unknown (the pod is gone): still said once.
        let mut f = enriched(default_deny_event(sinew_abi::EVENT_POLICY));
        f.isolated_by.clear();
        assert_eq!(
            sinew_flows::render::summary(&f),
            "policy-verdict:none INGRESS DENIED (no rule allows it)"
        );
        f.r#type = pb::EventType::Drop as i32;
        assert_eq!(sinew_flows::render::summary(&f), "policy denied (no rule allows it)");
        // Allowed verdicts name kind and rule.
        let mut ok = default_deny_event(sinew_abi::EVENT_POLICY);
        ok.verdict = sinew_abi::VERDICT_FORWARDED;
        ok.r#match = sinew_abi::MATCH_L3_L4;
        let f = enriched(ok);
        assert_eq!(sinew_flows::render::summary(&f), "policy-verdict:L3-L4 INGRESS ALLOWED");
        let j = sinew_flows::render::json(&enriched(default_deny_event(sinew_abi::EVENT_DROP)));
        assert_eq!(j["isolatedBy"][0]["name"], "web-in", "{j}");
    }
}
