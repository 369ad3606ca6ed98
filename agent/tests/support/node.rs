//! One simulated node per test: its own network namespace (on its own
//! thread, since a netns belongs to a thread), real interfaces for the
//! ifindexes the programs look up, and a freshly loaded datapath whose pins
//! live under a directory no other test uses and are removed on drop.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use sinew_abi::{Direction, DropReason, EndpointInfo, IpcacheKey, IpcacheValue};
use sinew_agent::datapath::{AttachMode, Datapath, DatapathConfig, RoutingMode};

use super::packet::Mac;
use super::testrun::{self, Outcome};

const BPFFS: &str = "/sys/fs/bpf";

/// Runs `f` on a new thread inside a new, empty network namespace and
/// returns its result; a panic in `f` fails the calling test.
pub fn in_new_netns<T, F>(name: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("cannot create a network namespace ({e}): these tests must run as root"));
            f()
        })
        .expect("spawn test thread")
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Runs `ip ARGS` in the calling thread's netns (a forked child inherits it).
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("cannot run ip: install iproute2");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// The ifindex of `name` in the calling thread's netns. (Not from /sys,
/// which shows the netns that mounted it.)
pub fn ifindex(name: &str) -> u32 {
    nix::net::if_::if_nametoindex(name).unwrap_or_else(|e| panic!("no interface {name}: {e}"))
}

fn is_bpffs(mount_point: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
        info.lines().any(|line| {
            let mount = line.split_whitespace().nth(4);
            let fstype = line.split(" - ").nth(1).and_then(|r| r.split_whitespace().next());
            mount == Some(mount_point) && fstype == Some("bpf")
        })
    })
}

/// Mounts bpffs at /sys/fs/bpf if it is not there yet, as the agent's
/// hosts do. Panics, failing the test, when that is impossible.
fn ensure_bpffs() {
    static MOUNTED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = MOUNTED.get_or_init(|| {
        if !sinew_testvms::support::is_root() {
            return Err("BPF program tests must run as root (they load programs and pin maps)".into());
        }
        if is_bpffs(BPFFS) {
            return Ok(());
        }
        nix::mount::mount(
            Some("bpf"),
            BPFFS,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            Some("mode=0700"),
        )
        .map_err(|e| format!("cannot mount bpffs at {BPFFS}: {e}; is CONFIG_BPF_SYSCALL set?"))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Removes a test's pin directory when the test ends, pass or fail.
pub struct PinGuard(PathBuf);

impl PinGuard {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self(Path::new(BPFFS).join(format!("sinew-test-{}-{n}", std::process::id())))
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Err(e) = Datapath::remove_pins(&self.0) {
            eprintln!("cannot remove test pins {}: {e}", self.0.display());
        }
    }
}

/// A pod on the test node.
#[derive(Clone, Copy, Debug)]
pub struct Pod {
    pub ip: Ipv4Addr,
    pub mac: Mac,
    pub host_mac: Mac,
    pub identity: u32,
    /// Host-side veth.
    pub ifindex: u32,
}

fn be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 11);
pub const PEER_NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 12);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
pub const REMOTE_POD_CIDR: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 0);
pub const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);
pub const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const NAT_PORTS: (u16, u16) = (61000, 65535);

/// The test node: pods A and B on veths, an uplink, a VXLAN device, the
/// ipcache a real agent would write for them, and the loaded datapath.
pub struct Node {
    pub dp: Datapath,
    pub a: Pod,
    pub b: Pod,
    /// A veth with no endpoint entry.
    pub stray_ifindex: u32,
    pub uplink_ifindex: u32,
    pub vxlan_ifindex: u32,
    pub routing: RoutingMode,
    _pins: PinGuard,
}

impl Node {
    /// Must be called on a thread from [`in_new_netns`].
    pub fn new(routing: RoutingMode) -> Self {
        Self::with_config(routing, |_| {})
    }

    /// [`Self::new`] with the datapath configuration adjusted by `adjust`.
    pub fn with_config(routing: RoutingMode, adjust: impl FnOnce(&mut DatapathConfig)) -> Self {
        ensure_bpffs();
        ip(&["link", "add", "lxca", "type", "veth", "peer", "name", "pa"]);
        ip(&["link", "add", "lxcb", "type", "veth", "peer", "name", "pb"]);
        ip(&["link", "add", "lxcstray", "type", "veth", "peer", "name", "pstray"]);
        // No dummy driver on every kernel: a veth is uplink enough.
        ip(&["link", "add", "uplink0", "type", "veth", "peer", "name", "underlay0"]);
        ip(&["link", "add", "vx0", "type", "vxlan", "external", "dstport", "8472"]);
        let vxlan_ifindex = ifindex("vx0");
        let pins = PinGuard::new();
        let mut cfg = DatapathConfig {
            bpf_root: pins.0.clone(),
            node_ip: NODE_IP,
            routing,
            vxlan_ifindex,
            uplink_ifindex: ifindex("uplink0"),
            masquerade: true,
            nat_ports: NAT_PORTS,
            attach_mode: AttachMode::detect(),
            pod_attach_mode: AttachMode::detect(),
            ct_fail_open: false,
            policy_map_size: 1024,
            ct_map_size: 1024,
            events: true,
            event_ring_bytes: 1 << 16,
            event_report_interval_ns: 5_000_000_000,
            maglev_table_size: 251,
            maglev_services: 4,
            encrypt_ifindex: 0,
            encrypt_node: false,
            wireguard_port: 51871,
            encrypt_ipsec: false,
        };
        adjust(&mut cfg);
        let dp = Datapath::load(cfg).unwrap_or_else(|e| panic!("cannot load the datapath: {e} ({e:?})"));
        let a = Pod {
            ip: Ipv4Addr::new(10, 244, 1, 5),
            mac: [0x0a, 0x58, 10, 244, 1, 5],
            host_mac: [0x02, 0x5e, 0, 0, 1, 5],
            identity: 1000,
            ifindex: ifindex("lxca"),
        };
        let b = Pod {
            ip: Ipv4Addr::new(10, 244, 1, 6),
            mac: [0x0a, 0x58, 10, 244, 1, 6],
            host_mac: [0x02, 0x5e, 0, 0, 1, 6],
            identity: 1001,
            ifindex: ifindex("lxcb"),
        };
        let mut node = Self {
            dp,
            a,
            b,
            stray_ifindex: ifindex("lxcstray"),
            uplink_ifindex: ifindex("uplink0"),
            vxlan_ifindex,
            routing,
            _pins: pins,
        };
        for (i, pod) in [a, b].into_iter().enumerate() {
            node.dp
                .upsert_endpoint(
                    pod.ifindex,
                    EndpointInfo {
                        ipv4: be(pod.ip),
                        identity: pod.identity,
                        id: i as u32 + 1,
                        flags: 0,
                        pod_mac: pod.mac,
                        host_mac: pod.host_mac,
                        policy_rev: 0,
                    },
                )
                .expect("write endpoint");
            node.ipcache(
                pod.ip,
                32,
                IpcacheValue {
                    identity: pod.identity,
                    tunnel_endpoint: 0,
                    ifindex: pod.ifindex,
                    flags: sinew_abi::IPCACHE_F_LOCAL_EP,
                },
            );
        }
        node.ipcache(
            REMOTE_POD_CIDR,
            24,
            IpcacheValue {
                identity: sinew_abi::IDENTITY_UNKNOWN,
                tunnel_endpoint: be(PEER_NODE_IP),
                ifindex: 0,
                flags: sinew_abi::IPCACHE_F_POD_CIDR,
            },
        );
        node.ipcache(
            NODE_IP,
            32,
            IpcacheValue {
                identity: sinew_abi::IDENTITY_HOST,
                flags: sinew_abi::IPCACHE_F_NODE,
                ..IpcacheValue::default()
            },
        );
        node.ipcache(
            PEER_NODE_IP,
            32,
            IpcacheValue {
                identity: sinew_abi::IDENTITY_REMOTE_NODE,
                tunnel_endpoint: be(PEER_NODE_IP),
                flags: sinew_abi::IPCACHE_F_NODE,
                ..IpcacheValue::default()
            },
        );
        node
    }

    fn ipcache(&mut self, ip: Ipv4Addr, len: u8, value: IpcacheValue) {
        self.dp
            .upsert_ipcache(IpcacheKey::v4(ip, len), value)
            .expect("write ipcache");
    }

    /// Packets per metrics index.
    pub fn metrics(&self) -> BTreeMap<u32, (u64, u64)> {
        self.dp
            .metrics()
            .into_iter()
            .map(|(i, v)| (i, (v.packets, v.bytes)))
            .collect()
    }

    /// Runs `program` on `frame` as received on `ifindex`, and checks that
    /// exactly one metrics counter moved: `counted`'s, by one packet of the
    /// frame's length.
    pub fn run(&self, program: &str, frame: &[u8], ifindex: u32, counted: (DropReason, Direction)) -> Outcome {
        let ctx = testrun::SkBuff {
            ifindex,
            ..Default::default()
        };
        self.run_with(program, frame, ctx, counted, frame.len())
    }

    /// [`Self::run`] with more of the skb's context set (`ctx`: ifindex,
    /// mark, ...), for a program that counts `bytes` (a tunnel packet is
    /// counted as the packet inside).
    pub fn run_with(
        &self,
        program: &str,
        frame: &[u8],
        ctx: testrun::SkBuff,
        counted: (DropReason, Direction),
        bytes: usize,
    ) -> Outcome {
        let ifindex = ctx.ifindex;
        let prog = self
            .dp
            .program(program)
            .unwrap_or_else(|| panic!("no program {program}"));
        let fd = prog
            .fd()
            .unwrap_or_else(|e| panic!("program {program} is not loaded: {e}"));
        let before = self.metrics();
        let (out, _) = testrun::run_tc_ctx(fd.as_fd(), frame, ctx, 1)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {program} failed: {e}"));
        let after = self.metrics();
        assert_eq!(
            out.ctx.ifindex, ifindex,
            "{program} did not run on the interface the test named"
        );
        let mut moved = BTreeMap::new();
        for (idx, (p, b)) in &after {
            let (p0, b0) = before.get(idx).copied().unwrap_or((0, 0));
            if (p0, b0) != (*p, *b) {
                moved.insert(*idx, (p - p0, b - b0));
            }
        }
        let (reason, dir) = counted;
        let want = BTreeMap::from([(dir.metrics_index(reason), (1, bytes as u64))]);
        assert_eq!(
            moved,
            want,
            "{program}: metrics moved {}, expected one packet of {bytes} bytes at {reason:?}/{dir:?}",
            describe(&moved),
        );
        out
    }
}

fn describe(moved: &BTreeMap<u32, (u64, u64)>) -> String {
    let parts: Vec<String> = moved
        .iter()
        .map(|(idx, (p, b))| {
            let reason = u8::try_from(idx / 2).ok().and_then(DropReason::from_code);
            let dir = if idx % 2 == 0 { "Ingress" } else { "Egress" };
            format!("{reason:?}/{dir}: +{p} packets +{b} bytes")
        })
        .collect();
    format!("[{}]", parts.join(", "))
}
