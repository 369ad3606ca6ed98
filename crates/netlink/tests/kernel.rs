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

/// Whether this kernel has ESP (built in, loaded or as a module): the VM
/// tiers' kernels do, this development host's does not.
fn kernel_has_esp() -> bool {
    if std::path::Path::new("/sys/module/esp4").exists() {
        return true;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    ["modules.builtin", "modules.dep"].iter().any(|f| {
        std::fs::read_to_string(format!("/lib/modules/{}/{f}", release.trim()))
            .is_ok_and(|t| t.lines().any(|l| l.contains("/esp4.ko")))
    })
}

/// XFRM policies and ESP states against the kernel: add, dump, update,
/// delete, in a fresh namespace. Policies need only XFRM_USER; states and
/// the xfrm link need ESP and xfrm_interface, so on a kernel without ESP
/// this asserts the kernel's refusal and the hint instead (never skips).
#[test]
fn xfrm_policies_states_and_interface() {
    use sinew_netlink::xfrm::{Dir, Mode, Policy, Prefix, Sa, Selector, Template};
    use sinew_netlink::Xfrm;
    let has_esp = kernel_has_esp();
    println!("xfrm test: kernel has ESP: {has_esp}");
    in_fresh_netns(|| {
        let mut x = Xfrm::open().unwrap();
        assert_eq!(x.policies().unwrap(), vec![]);
        let (a, b) = (ip("172.30.0.11"), ip("172.30.0.12"));
        let sel = Selector::prefixes(Prefix::any_like(a), Prefix::new(ip("10.244.2.0"), 24));
        let out = Policy {
            sel,
            dir: Dir::Out,
            priority: 100,
            tmpl: Template {
                src: a,
                dst: b,
                mode: Mode::Tunnel,
                spi: 0x100,
                reqid: 1,
            },
            if_id: 0x51,
        };
        x.add_policy(&out).unwrap();
        let err = x.add_policy(&out).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::EEXIST), "{err}");
        // The same selector under another if_id is another policy.
        x.add_policy(&Policy {
            if_id: 0x52,
            ..out.clone()
        })
        .unwrap();
        let inbound = Policy {
            sel: Selector::prefixes(Prefix::new(ip("10.244.2.0"), 24), Prefix::any_like(a)),
            dir: Dir::In,
            tmpl: Template {
                src: b,
                dst: a,
                mode: Mode::Tunnel,
                spi: 0,
                reqid: 0,
            },
            ..out.clone()
        };
        x.add_policy(&inbound).unwrap();
        let got = x.policies().unwrap();
        assert_eq!(got.len(), 3, "{got:?}");
        let o = got
            .iter()
            .find(|p| p.dir == Dir::Out && p.if_id == 0x51)
            .expect("out policy");
        assert_eq!((o.sel, o.priority, o.tmpls.clone()), (sel, 100, vec![out.tmpl]));
        let i = got.iter().find(|p| p.dir == Dir::In).expect("in policy");
        assert_eq!(i.tmpls, vec![inbound.tmpl]);

        // Update in place: a new SPI in the template.
        let moved = Policy {
            tmpl: Template { spi: 0x200, ..out.tmpl },
            ..out.clone()
        };
        x.update_policy(&moved).unwrap();
        let got = x.policies().unwrap();
        assert_eq!(got.len(), 3);
        let o = got.iter().find(|p| p.dir == Dir::Out && p.if_id == 0x51).unwrap();
        assert_eq!(o.tmpls[0].spi, 0x200);

        assert!(x.delete_policy(&sel, Dir::Out, 0x51).unwrap());
        assert!(!x.delete_policy(&sel, Dir::Out, 0x51).unwrap());
        assert!(x.delete_policy(&sel, Dir::Out, 0x52).unwrap());
        assert!(x.delete_policy(&inbound.sel, Dir::In, 0x51).unwrap());
        assert_eq!(x.policies().unwrap(), vec![]);

        // Transport mode between two node addresses, for one UDP port (the
        // agent's IPsec policy for VXLAN): protocol, port and mode survive
        // the kernel's round trip; the same pair on another port is
        // another policy.
        let vxlan = Policy {
            sel: Selector {
                src: Prefix::host(a),
                dst: Prefix::host(b),
                proto: 17,
                dport: 8472,
            },
            dir: Dir::Out,
            priority: 100,
            tmpl: Template {
                src: a,
                dst: b,
                mode: Mode::Transport,
                spi: 0x1234,
                reqid: 9,
            },
            if_id: 0,
        };
        x.add_policy(&vxlan).unwrap();
        let other_port = Policy {
            sel: Selector {
                dport: 4789,
                ..vxlan.sel
            },
            ..vxlan.clone()
        };
        x.add_policy(&other_port).unwrap();
        let got = x.policies().unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        let p = got.iter().find(|p| p.sel.dport == 8472).expect("the VXLAN policy");
        assert_eq!((p.sel, p.tmpls.clone(), p.if_id), (vxlan.sel, vec![vxlan.tmpl], 0));
        assert!(x.delete_policy(&vxlan.sel, Dir::Out, 0).unwrap());
        assert!(x.delete_policy(&other_port.sel, Dir::Out, 0).unwrap());
        assert_eq!(x.policies().unwrap(), vec![]);

        let sa = Sa {
            src: a,
            dst: b,
            mode: Mode::Tunnel,
            spi: 0x100,
            reqid: 1,
            key: (1..=20).collect(),
            if_id: 0x51,
        };
        let mut nl = Rtnl::open().unwrap();
        if !has_esp {
            let err = x.add_sa(&sa).unwrap_err();
            assert!(
                matches!(err.errno(), Some(Errno::EPROTONOSUPPORT | Errno::ENOSYS)),
                "{err}"
            );
            assert!(err.to_string().contains("the kernel lacks"), "{err}");
            assert!(!err.to_string().contains("0102030405"), "no key in errors: {err}");
            let err = nl.create_xfrm("sn-xfrm0", 0x51, None).unwrap_err();
            assert_eq!(err.errno(), Some(Errno::EOPNOTSUPP), "{err}");
            assert_eq!(x.sas().unwrap(), vec![]);
            return;
        }
        x.add_sa(&sa).unwrap();
        assert_eq!(x.add_sa(&sa).unwrap_err().errno(), Some(Errno::EEXIST));
        let back = Sa {
            src: b,
            dst: a,
            key: (1..=36).collect(),
            ..sa.clone()
        };
        x.add_sa(&back).unwrap();
        let got = x.sas().unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        let s = x.get_sa(a, b, 0x100).unwrap().expect("the SA");
        assert_eq!((s.src, s.dst, s.spi, s.proto, s.reqid, s.mode), (a, b, 0x100, 50, 1, 1));
        assert_eq!(s.if_id, 0x51);
        assert_eq!(s.aead.as_deref(), Some("rfc4106(gcm(aes))"));
        assert_eq!((s.bytes, s.packets), (0, 0));
        assert!(s.add_time > 1_600_000_000, "{s:?}");
        // A key of the wrong length is the kernel's EINVAL, not a panic.
        let bad = Sa {
            spi: 0x300,
            key: vec![0; 17],
            ..sa.clone()
        };
        assert_eq!(x.add_sa(&bad).unwrap_err().errno(), Some(Errno::EINVAL));
        assert!(x.delete_sa(a, b, 0x100).unwrap());
        assert!(!x.delete_sa(a, b, 0x100).unwrap());
        assert_eq!(x.get_sa(a, b, 0x100).unwrap(), None);
        assert!(x.delete_sa(b, a, 0x100).unwrap());
        assert_eq!(x.sas().unwrap(), vec![]);
        // Transport mode, as the agent's SAs between nodes.
        let transport = Sa {
            mode: Mode::Transport,
            ..sa.clone()
        };
        x.add_sa(&transport).unwrap();
        assert_eq!(x.get_sa(a, b, 0x100).unwrap().expect("transport SA").mode, 0);
        assert!(x.delete_sa(a, b, 0x100).unwrap());

        nl.create_xfrm("sn-xfrm0", 0x51, None).unwrap();
        let l = nl.link_by_name("sn-xfrm0").unwrap().expect("xfrm link");
        assert_eq!(nl.link_kind("sn-xfrm0").unwrap(), Some(("xfrm".to_string(), 0x51)));
        nl.set_up(l.index, Some(1400)).unwrap();
        assert_eq!(nl.link_by_name("sn-xfrm0").unwrap().unwrap().mtu, 1400);
        assert!(nl.delete_link("sn-xfrm0").unwrap());
        println!("xfrm test: ESP states and the xfrm link round-tripped");
    });
}
