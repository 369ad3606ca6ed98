//! The netlink crate against the real kernel, in fresh network namespaces
//! (needs root: CAP_SYS_ADMIN to unshare, CAP_NET_ADMIN inside). These
//! tests fail, never skip, when they cannot run.

use std::fs::File;
use std::net::IpAddr;

use nix::errno::Errno;
use nix::sched::{unshare, CloneFlags};
use sinew_netlink::rtnl::links::LinkChange;
use sinew_netlink::{Route, Rtnl};

/// Runs `f` on a thread of its own in a new, empty network namespace.
fn in_fresh_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run the netlink kernel tests as root");
            f()
        })
        .join()
        .expect("test thread panicked")
    })
}

/// A second new network namespace, kept alive by the returned file.
fn new_netns() -> File {
    in_fresh_netns(|| File::open("/proc/thread-self/ns/net").expect("open own netns"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn veth_mtu_address_routes_and_dumps() {
    let peer_ns = new_netns();
    in_fresh_netns(|| {
        let mut nl = Rtnl::open().unwrap();
        let lo = nl.link_by_name("lo").unwrap().expect("every namespace has lo");
        assert!(!lo.up, "lo starts down in a new namespace");
        assert_eq!(nl.link_by_name("sn-none0").unwrap(), None);

        // A veth pair across the two namespaces.
        nl.create_veth("sn-h0", "sn-p0", &peer_ns, Some(1400)).unwrap();
        let host = nl.link_by_name("sn-h0").unwrap().expect("host side exists");
        assert_eq!(host.mtu, 1400);
        assert_eq!(host.mac.len(), 6);
        assert!(!host.up);
        assert_eq!(nl.link_by_index(host.index).unwrap().unwrap().name, "sn-h0");
        let err = nl.create_veth("sn-h0", "sn-p1", &peer_ns, None).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::EEXIST));
        assert!(err.to_string().contains("already exists"), "{err}");

        // The peer was born in the other namespace, not here.
        assert!(nl.links().unwrap().iter().all(|l| l.name != "sn-p0"));
        let mut peer = Rtnl::open_in(&peer_ns, "peer").unwrap();
        let p = peer.link_by_name("sn-p0").unwrap().expect("peer side in its namespace");
        assert_eq!(p.mtu, 1400);

        // Up, MTU, ARP.
        nl.set_link(
            host.index,
            LinkChange {
                up: Some(true),
                mtu: Some(1300),
                arp: Some(false),
            },
        )
        .unwrap();
        let host = nl.link_by_name("sn-h0").unwrap().unwrap();
        assert!(host.up && host.noarp);
        assert_eq!(host.mtu, 1300);
        let err = nl
            .set_link(
                host.index,
                LinkChange {
                    mtu: Some(10),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert_eq!(err.errno(), Some(Errno::EINVAL));

        // Address, then a route through the prefix it brings.
        nl.add_address(host.index, ip("10.9.0.1"), 24).unwrap();
        nl.add_address(host.index, ip("10.9.0.1"), 24).unwrap(); // replace: idempotent
        assert_eq!(nl.addresses(host.index).unwrap(), vec![(ip("10.9.0.1"), 24)]);
        assert!(nl.all_addresses().unwrap().iter().any(|a| a.index == host.index));

        let mut r = Route {
            dst: ip("10.20.0.0"),
            dst_len: 16,
            gateway: Some(ip("10.9.0.2")),
            oif: host.index,
            src: None,
            link_scope: false,
            onlink: false,
        };
        nl.add_route(&r).unwrap();
        r.src = Some(ip("10.9.0.1"));
        nl.add_route(&r).unwrap(); // replace, not a second route
        let mine: Vec<_> = nl
            .routes(ip("0.0.0.0"))
            .unwrap()
            .into_iter()
            .filter(|e| e.dst == Some(ip("10.20.0.0")))
            .collect();
        assert_eq!(mine.len(), 1, "{mine:?}");
        assert!(mine[0].is(ip("10.20.0.0"), 16, Some(ip("10.9.0.2")), host.index));
        assert_eq!(mine[0].src, Some(ip("10.9.0.1")));

        // A link-scope route without a gateway (the VXLAN mode's shape).
        nl.add_route(&Route {
            dst: ip("10.30.0.0"),
            dst_len: 16,
            gateway: None,
            oif: host.index,
            src: Some(ip("10.9.0.1")),
            link_scope: true,
            onlink: false,
        })
        .unwrap();
        assert!(nl
            .routes(ip("0.0.0.0"))
            .unwrap()
            .iter()
            .any(|e| e.is(ip("10.30.0.0"), 16, None, host.index)));

        assert!(nl.delete_route(ip("10.20.0.0"), 16).unwrap());
        assert!(!nl.delete_route(ip("10.20.0.0"), 16).unwrap());
        assert!(nl.delete_route(ip("10.30.0.0"), 16).unwrap());
        assert!(nl
            .routes(ip("0.0.0.0"))
            .unwrap()
            .iter()
            .all(|e| e.dst != Some(ip("10.20.0.0")) && e.dst != Some(ip("10.30.0.0"))));

        // A gateway off every prefix is refused with a hint.
        let err = nl
            .add_route(&Route {
                gateway: Some(ip("172.31.0.1")),
                src: None,
                ..r
            })
            .unwrap_err();
        assert_eq!(err.errno(), Some(Errno::ENETUNREACH));
        assert!(err.to_string().contains("not reachable"), "{err}");

        // Deleting the host side removes the pair; again is not an error.
        assert!(nl.delete_link("sn-h0").unwrap());
        assert!(!nl.delete_link("sn-h0").unwrap());
        assert_eq!(peer.link_by_name("sn-p0").unwrap(), None);
    });
}

#[test]
fn vxlan_external_device() {
    in_fresh_netns(|| {
        let mut nl = Rtnl::open().unwrap();
        nl.create_vxlan_external("sn-vx0", 8472).unwrap();
        let vx = nl.link_by_name("sn-vx0").unwrap().expect("vxlan exists");
        nl.set_link(
            vx.index,
            LinkChange {
                up: Some(true),
                mtu: Some(1450),
                arp: Some(false),
            },
        )
        .unwrap();
        let vx = nl.link_by_name("sn-vx0").unwrap().unwrap();
        assert!(vx.up && vx.noarp);
        assert_eq!(vx.mtu, 1450);
        let err = nl.create_vxlan_external("sn-vx0", 8472).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::EEXIST));
    });
}
