//! The observer's ring-buffer records, decoded as the agent decodes them:
//! whatever bytes the BPF side (or a newer or broken producer) writes must
//! be counted and decoded or refused, and a decoded record must name its
//! endpoints, filter and render as `sinew observe` shows it, never panic.
//!
//! The index knows one local pod (a/web, 10.0.1.5, endpoint 7, isolated
//! for ingress), one rule and one interface, as the observer's own tests
//! do, so that records naming them take the lookups' hit paths.
#![no_main]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sinew_abi::FlowEvent;
use sinew_agent::observer::{Isolation, Observer, ObserverConfig, ObserverIndex, ObserverStats, Peer, Record};
use sinew_flows::{matches, render};
use sinew_policy::{PolicyKind, PolicyName, RuleRef, Section};
use sinew_proto::observer_v1 as pb;

struct Fixture {
    observer: Observer,
    then: Arc<ObserverIndex>,
    now: ObserverIndex,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let web = Ipv4Addr::new(10, 0, 1, 5);
        let mut then = ObserverIndex {
            node_name: "node1".into(),
            ..Default::default()
        };
        then.by_ip.insert(
            web,
            Peer {
                namespace: "a".into(),
                pod: "web".into(),
                labels: Arc::new(BTreeMap::from([("app".to_owned(), "web".to_owned())])),
                identity: 300,
                node: "node1".into(),
                endpoint_id: 7,
                reserved: "",
                container_id: "0f1e2d3c4b5a69788796a5b4c3d2e1f0".into(),
            },
        );
        then.by_endpoint.insert(7, web);
        then.interfaces.insert(7, "lxc1".into());
        then.rules.push(RuleRef {
            kind: PolicyKind::SinewNetworkPolicy,
            namespace: Some("a".into()),
            name: "deny-db".into(),
            section: Section::IngressDeny,
            index: 2,
        });
        then.isolation.insert(
            7,
            Isolation {
                ingress: vec![PolicyName {
                    kind: PolicyKind::NetworkPolicy,
                    namespace: Some("a".into()),
                    name: "web-in".into(),
                }],
                egress: Vec::new(),
            },
        );
        // The newest index: a node address the older one lacked.
        let mut now = ObserverIndex::default();
        now.by_ip.insert(
            Ipv4Addr::new(172, 30, 0, 12),
            Peer {
                identity: sinew_abi::IDENTITY_REMOTE_NODE,
                node: "node2".into(),
                reserved: "remote-node",
                ..Default::default()
            },
        );
        Fixture {
            observer: Observer::disabled(ObserverConfig {
                node_name: "node1".into(),
                buffer_size: 16,
                event_ring_bytes: 4096,
                tick: Duration::from_millis(250),
                flush_every: Duration::from_millis(250),
            }),
            then: Arc::new(then),
            now,
        }
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let stats = ObserverStats::default();
    let decoded = stats.decode(data);
    let counted = stats.snapshot();
    let Some(ev) = decoded else {
        assert!(data.len() < std::mem::size_of::<FlowEvent>());
        assert_eq!((counted.decode_errors, counted.flows_total()), (1, 0));
        return;
    };
    assert_eq!((counted.decode_errors, counted.flows_total()), (0, 1));
    let record = Record {
        ev,
        time_unix_nanos: ev.ts_ns,
        sequence: 1,
        index: fx.then.clone(),
        l7: None,
    };
    let flow = fx.observer.flow(&record, &fx.now);
    let _ = render::summary(&flow);
    let _ = render::table_row(&flow, &jiff::tz::TimeZone::UTC);
    let _ = render::compact(&flow, &jiff::tz::TimeZone::UTC);
    let _ = render::json(&flow).to_string();
    assert!(
        matches(&flow, &pb::FlowFilter::default()),
        "an empty filter selects every flow"
    );
    let narrow = pb::FlowFilter {
        pod: "a/web".into(),
        labels: vec!["app=web".into()],
        port: Some(80),
        drop_reason: Some(u32::from(ev.reason)),
        ..Default::default()
    };
    let _ = matches(&flow, &narrow);
});
