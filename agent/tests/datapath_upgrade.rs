//! An agent of a newer ABI removes what an older one left: its pinned TCX
//! links (so its programs stop running beside the new ones) and its maps.
//! Needs root.

#[allow(dead_code)] // shared with bpf_programs.rs, which uses the rest
mod support;

use aya::programs::tc::{SchedClassifier, TcAttachType};
use sinew_agent::datapath::{AttachMode, RoutingMode};
use support::node::{in_new_netns, Node};

fn ingress_programs(ifname: &str) -> usize {
    SchedClassifier::query_tcx(ifname, TcAttachType::Ingress)
        .unwrap_or_else(|e| panic!("query the TCX programs of {ifname}: {e}"))
        .1
        .len()
}

#[test]
fn older_abi_links_and_maps_are_retired() {
    in_new_netns("upgrade", || {
        let mut node = Node::with_config(RoutingMode::Vxlan, |c| c.attach_mode = AttachMode::Tcx);
        let dp = &mut node.dp;
        let root = dp.config().bpf_root.clone();
        let current = dp.config().pin_dir();
        // An older agent's uplink link: this agent's link, its pin moved
        // under v1 (an older agent's object would be a second load of the
        // same programs; the pin's place is what retiring goes by).
        dp.attach_uplink("uplink0").expect("attach to the uplink");
        let old_links = root.join("v1").join("links");
        std::fs::create_dir_all(&old_links).unwrap();
        let pin = dp.config().link_dir().join("uplink0-ingress");
        std::fs::rename(&pin, old_links.join("uplink0-ingress")).expect("move the link pin");
        assert_eq!(ingress_programs("uplink0"), 1);
        let retired = dp.retire_older_abis();
        assert_eq!(retired, vec![1]);
        assert!(!root.join("v1").exists(), "the old version's pins are gone");
        assert!(current.exists(), "this version's pins stay");
        assert_eq!(ingress_programs("uplink0"), 0, "the old link's program detached");
        assert!(dp.retire_older_abis().is_empty(), "nothing left to retire");
    });
}
