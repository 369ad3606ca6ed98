//! Namespace primitives against the real kernel. Needs root and iproute2.

mod common;

use common::{prefix, require_root, NsGuard};
use sinew_testvms::netns::{self, command_in, run_in, sh, NetNs, NetnsError};

fn interfaces_here() -> Vec<String> {
    nix::net::if_::if_nameindex()
        .unwrap()
        .iter()
        .map(|i| i.name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn create_and_delete_a_namespace() {
    require_root();
    let ns = NetNs::create(format!("{}-a", prefix("ns"))).unwrap();
    let guard = NsGuard(ns.clone());
    assert!(ns.path().exists());
    assert!(netns::list().contains(&ns.name().to_owned()));
    // A second create with the same name is refused, with iproute2's reason.
    let err = NetNs::create(ns.name()).unwrap_err();
    assert!(matches!(err, NetnsError::Failed { .. }), "{err}");
    assert!(err.to_string().contains("ip netns add"), "{err}");
    ns.delete().unwrap();
    assert!(!ns.path().exists());
    // Deleting again is fine.
    ns.delete().unwrap();
    drop(guard);
}

#[test]
fn closure_runs_inside_the_namespace() {
    require_root();
    let ns = NetNs::create(format!("{}-b", prefix("ns"))).unwrap();
    let _guard = NsGuard(ns.clone());
    // veth, not dummy: some test kernels lack the dummy driver.
    sh(&ns, "ip link add tvdummy0 type veth peer name tvpeer0").unwrap();
    let inside = ns.run(interfaces_here).unwrap();
    let mut sorted = inside.clone();
    sorted.sort();
    assert_eq!(sorted, ["lo", "tvdummy0", "tvpeer0"]);
    // The caller's thread did not move.
    assert!(!interfaces_here().contains(&"tvdummy0".to_owned()));
    // Borrowed data is fine: the thread is scoped.
    let wanted = String::from("tvdummy0");
    assert!(ns.run(|| interfaces_here().contains(&wanted)).unwrap());
}

#[test]
fn sysctls_are_per_namespace() {
    require_root();
    let ns = NetNs::create(format!("{}-c", prefix("ns"))).unwrap();
    let _guard = NsGuard(ns.clone());
    ns.set_sysctl("net.ipv4.ip_forward", "1").unwrap();
    assert_eq!(ns.sysctl("net.ipv4.ip_forward").unwrap(), "1");
    ns.set_sysctl("net.ipv4.ip_forward", "0").unwrap();
    assert_eq!(ns.sysctl("net.ipv4.ip_forward").unwrap(), "0");
    let err = ns.set_sysctl("net.ipv4.no_such_knob", "1").unwrap_err();
    assert!(err.to_string().contains("net.ipv4.no_such_knob"), "{err}");
}

#[test]
fn command_in_sees_the_namespace_but_keeps_the_mounts() {
    require_root();
    sinew_testvms::bpffs::ensure_mounted().unwrap();
    let ns = NetNs::create(format!("{}-d", prefix("ns"))).unwrap();
    let _guard = NsGuard(ns.clone());
    sh(&ns, "ip link add tvdummy1 type veth peer name tvpeer1").unwrap();

    let links = sh(&ns, "ip -o link show").unwrap();
    assert!(links.contains("tvdummy1"), "{links}");
    let names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap())
        .collect();
    assert_eq!(names, ["lo", "tvpeer1", "tvdummy1"]);

    // Same mount namespace as ours, so bpffs is still there. `ip netns exec`
    // would have remounted /sys and hidden it.
    let fstype = run_in(&ns, &["stat", "-f", "-c", "%T", "/sys/fs/bpf"]).unwrap();
    assert_eq!(fstype.trim(), "bpf_fs");
    let mnt_inside = run_in(&ns, &["readlink", "/proc/self/ns/mnt"]).unwrap();
    let mnt_here = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    assert_eq!(mnt_inside.trim(), mnt_here.to_string_lossy());
    let net_inside = run_in(&ns, &["readlink", "/proc/self/ns/net"]).unwrap();
    let net_here = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(net_inside.trim(), net_here.to_string_lossy());

    // A plain Command is returned, so callers choose stdio themselves.
    let status = command_in(&ns, "true").unwrap().status().unwrap();
    assert!(status.success());
}

#[test]
fn failing_commands_report_their_stderr() {
    require_root();
    let ns = NetNs::create(format!("{}-e", prefix("ns"))).unwrap();
    let _guard = NsGuard(ns.clone());
    let err = sh(&ns, "ip link set nosuchdev up").unwrap_err();
    let text = err.to_string();
    assert!(text.contains("ip link set nosuchdev up"), "{text}");
    assert!(text.contains(ns.name()), "{text}");
    assert!(text.to_lowercase().contains("nosuchdev"), "{text}");
    let err = sh(&ns, "/nonexistent/program").unwrap_err();
    assert!(matches!(err, NetnsError::Spawn { .. }), "{err}");
}

#[test]
fn entering_a_missing_namespace_fails_clearly() {
    require_root();
    let ns = NetNs::named(format!("{}-missing", prefix("ns"))).unwrap();
    let err = ns.run(|| ()).unwrap_err();
    assert!(matches!(err, NetnsError::Open { .. }), "{err}");
    assert!(command_in(&ns, "true").is_err());
}
