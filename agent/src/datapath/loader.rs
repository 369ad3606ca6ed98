//! Loading the objects with the node's constants and shared, pinned maps,
//! and the typed map operations the rest of the agent uses.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::{MapData, PerCpuArray};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, SkLookup, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfLoader};
use sinew_abi::{
    config, maps, CtEntry, CtKey, EndpointInfo, IpcacheKey, IpcacheValue, LbBackend, LbMaglevKey, LbSlotKey, LbSvcKey,
    LbSvcValue, MetricsValue, PolicyKey, PolicyValue,
};

use super::attach::{self, detach_pinned, AttachMode, Hook};
pub use super::error::DatapathError;
use super::pinned::{map_err, take, PinnedHash, PinnedLpm};

/// How pods on different nodes reach each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingMode {
    /// VXLAN in external mode, the source identity in the VNI.
    Vxlan,
    /// The underlay routes pod CIDRs (node routes to each other's CIDRs).
    Native,
}

impl RoutingMode {
    pub fn name(self) -> &'static str {
        match self {
            RoutingMode::Vxlan => "vxlan",
            RoutingMode::Native => "native",
        }
    }
}

impl std::str::FromStr for RoutingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vxlan" => Ok(Self::Vxlan),
            "native" => Ok(Self::Native),
            other => Err(format!("unknown routing mode {other:?}: use vxlan or native")),
        }
    }
}

/// Node-wide, load-time settings.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// Root of this node's pins, e.g. /sys/fs/bpf/sinew; the ABI version is
    /// appended so that a new layout never reuses an old map.
    pub bpf_root: PathBuf,
    pub node_ip: Ipv4Addr,
    pub routing: RoutingMode,
    pub vxlan_ifindex: u32,
    /// The uplink's ifindex: native routing redirects pod traffic for
    /// other nodes to it (0: the stack routes it).
    pub uplink_ifindex: u32,
    pub masquerade: bool,
    pub nat_ports: (u16, u16),
    /// How programs attach to the uplink and the VXLAN device.
    pub attach_mode: AttachMode,
    /// How programs attach to pod veths (see `AgentConfig::pod_attach_mode`).
    pub pod_attach_mode: AttachMode,
    /// Let new connections through untracked when conntrack is full.
    pub ct_fail_open: bool,
    /// Capacity of the policy map (all endpoints together) and of the
    /// conntrack table. A pinned map keeps the size it was created with.
    pub policy_map_size: u32,
    pub ct_map_size: u32,
    /// Flow events on or off, their ring size in bytes (a power of two,
    /// at least a page), and how often a flow reports its counters.
    pub events: bool,
    pub event_ring_bytes: u32,
    pub event_report_interval_ns: u64,
    /// Entries of each Maglev table (a prime), and how many Maglev
    /// services the shared table map holds.
    pub maglev_table_size: u32,
    pub maglev_services: u32,
    /// The WireGuard device (0: encryption off), whether the node's own
    /// traffic to other nodes goes through it too, and WireGuard's port.
    pub encrypt_ifindex: u32,
    pub encrypt_node: bool,
    pub wireguard_port: u16,
    /// IPsec: VXLAN leaves through the VXLAN device (the stack's XFRM
    /// policies encrypt it), and the uplink lets nothing for another node
    /// out in clear.
    pub encrypt_ipsec: bool,
}

impl DatapathConfig {
    pub fn pin_dir(&self) -> PathBuf {
        self.bpf_root.join(format!("v{}", sinew_abi::ABI_VERSION))
    }
    pub fn map_dir(&self) -> PathBuf {
        self.pin_dir().join("maps")
    }
    pub fn link_dir(&self) -> PathBuf {
        self.pin_dir().join("links")
    }
}

pub struct Datapath {
    cfg: DatapathConfig,
    lxc: Ebpf,
    host: Ebpf,
    overlay: Ebpf,
    sock: Ebpf,
    proxy: Ebpf,
    lb: LbMaps,
    ipcache: PinnedLpm<IpcacheKey, IpcacheValue>,
    endpoints: PinnedHash<u32, EndpointInfo>,
    metrics: PerCpuArray<MapData, MetricsValue>,
    policy: PinnedLpm<PolicyKey, PolicyValue>,
    cidr_class: PinnedLpm<IpcacheKey, u32>,
    ct: PinnedHash<CtKey, CtEntry>,
    events: Option<aya::maps::RingBuf<MapData>>,
    events_lost: PerCpuArray<MapData, u64>,
    flusher: Option<FlowFlusher>,
    maps_reused: bool,
}

const FLUSH_PROGRAM: &str = "flush_flows";

/// The flow flush (`bpf_flush.c`), attached nowhere: whoever owns it runs
/// it every so often, and it reports the counts of flows whose packets
/// stopped and retires their entries. A separate object so that the
/// observer's thread can own it.
pub struct FlowFlusher {
    obj: Ebpf,
}

/// What one run of the flow flush did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flushed {
    /// Reports it wrote to the event ring.
    pub reports: u32,
    /// It stopped with flows still due because half of the ring was
    /// waiting: drain the ring and run it again.
    pub more: bool,
}

impl FlowFlusher {
    /// Runs the flush once (BPF_PROG_TEST_RUN).
    pub fn run(&self) -> Result<Flushed, DatapathError> {
        let err = |source| DatapathError::Program {
            program: FLUSH_PROGRAM,
            source: Box::new(source),
        };
        let prog: &SchedClassifier = self
            .obj
            .program(FLUSH_PROGRAM)
            .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
            .and_then(|p| p.try_into())
            .map_err(err)?;
        // The program never reads its frame; the kernel wants one at
        // least an Ethernet header long.
        let frame = [0u8; 64];
        let mut out = [0u8; 64];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .map_err(err)?;
        Ok(Flushed {
            reports: r.return_value & !sinew_abi::FLUSH_MORE,
            more: r.return_value & sinew_abi::FLUSH_MORE != 0,
        })
    }
}

/// Unpins the flow event ring an agent before pinned with another size
/// (`--event-ring-size`, or its default, changed across a restart), so that
/// the load creates one of the size asked. Re-adopted, the old ring would
/// be read with the new size's mask: the reader maps only part of it and
/// finds records at the wrong offsets. The records still in it are lost
/// to `sinew observe`; the programs that still write to it are replaced
/// by this load.
fn drop_resized_ring(pin: &Path, bytes: u32) {
    let Ok(ring) = MapData::from_pin(pin) else { return };
    let pinned = match ring.info() {
        Ok(info) => info.max_entries(),
        Err(e) => {
            tracing::warn!(pin = %pin.display(), error = %e, "cannot read the size of the pinned flow event ring; keeping it");
            return;
        }
    };
    if pinned == bytes {
        return;
    }
    match std::fs::remove_file(pin) {
        Ok(()) => tracing::info!(
            pinned,
            bytes,
            "the pinned flow event ring has another size than --event-ring-size: replacing it (events still in it are not read)"
        ),
        Err(e) => tracing::warn!(pin = %pin.display(), error = %e, "cannot unpin the flow event ring of another size"),
    }
}

impl Datapath {
    /// Loads every program, creating or re-adopting the pinned maps.
    pub fn load(cfg: DatapathConfig) -> Result<Self, DatapathError> {
        let map_dir = cfg.map_dir();
        for dir in [map_dir.clone(), cfg.link_dir()] {
            std::fs::create_dir_all(&dir).map_err(|source| DatapathError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        let maps_reused = map_dir.join(maps::IPCACHE).exists();
        drop_resized_ring(&map_dir.join(maps::EVENTS), cfg.event_ring_bytes);
        let node_ip = u32::from_ne_bytes(cfg.node_ip.octets());
        let routing = match cfg.routing {
            RoutingMode::Vxlan => sinew_abi::ROUTING_VXLAN,
            RoutingMode::Native => sinew_abi::ROUTING_NATIVE,
        };
        let masq = u32::from(cfg.masquerade);
        let (pmin, pmax) = (u32::from(cfg.nat_ports.0), u32::from(cfg.nat_ports.1));
        let ct_fail_open = u32::from(cfg.ct_fail_open);
        let events = u32::from(cfg.events);
        let encrypt_node = u32::from(cfg.encrypt_node);
        let wg_port = u32::from(cfg.wireguard_port);
        let encrypt_ipsec = u32::from(cfg.encrypt_ipsec);
        let maglev_entries = cfg.maglev_table_size.saturating_mul(cfg.maglev_services.max(1));
        let load = |object: &'static str, bytes: &[u8]| -> Result<Ebpf, DatapathError> {
            EbpfLoader::new()
                .default_map_pin_directory(&map_dir)
                .map_max_entries(maps::POLICY, cfg.policy_map_size)
                .map_max_entries(maps::CT, cfg.ct_map_size)
                .map_max_entries(maps::EVENTS, cfg.event_ring_bytes)
                .map_max_entries(maps::LB_MAGLEV, maglev_entries)
                .override_global(config::NODE_IP, &node_ip, true)
                .override_global(config::ROUTING_MODE, &routing, true)
                .override_global(config::VXLAN_IFINDEX, &cfg.vxlan_ifindex, true)
                .override_global(config::UPLINK_IFINDEX, &cfg.uplink_ifindex, true)
                .override_global(config::ENABLE_MASQ, &masq, true)
                .override_global(config::NAT_PORT_MIN, &pmin, true)
                .override_global(config::NAT_PORT_MAX, &pmax, true)
                .override_global(config::CT_FAIL_OPEN, &ct_fail_open, true)
                .override_global(config::EVENTS_ENABLED, &events, true)
                .override_global(config::EVENT_REPORT_INTERVAL_NS, &cfg.event_report_interval_ns, true)
                .override_global(config::MAGLEV_TABLE_SIZE, &cfg.maglev_table_size, true)
                .override_global(config::ENCRYPT_IFINDEX, &cfg.encrypt_ifindex, true)
                .override_global(config::ENCRYPT_NODE, &encrypt_node, true)
                .override_global(config::WIREGUARD_PORT, &wg_port, true)
                .override_global(config::ENCRYPT_IPSEC, &encrypt_ipsec, true)
                .load(bytes)
                .map_err(|source| DatapathError::Load {
                    object,
                    source: Box::new(source),
                })
        };
        let mut lxc = load("bpf_lxc.o", sinew_abi::BPF_LXC)?;
        let mut host = load("bpf_host.o", sinew_abi::BPF_HOST)?;
        let mut overlay = load("bpf_overlay.o", sinew_abi::BPF_OVERLAY)?;
        let mut sock = load("bpf_sock.o", sinew_abi::BPF_SOCK)?;
        let mut flush = load("bpf_flush.o", sinew_abi::BPF_FLUSH)?;
        let mut proxy = load("bpf_proxy.o", sinew_abi::BPF_PROXY)?;
        {
            let program = PROXY_LOOKUP;
            let prog: &mut SkLookup = proxy
                .program_mut(program)
                .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
                .and_then(|p| p.try_into())
                .map_err(|source| DatapathError::Program {
                    program,
                    source: Box::new(source),
                })?;
            prog.load().map_err(|source| DatapathError::Program {
                program,
                source: Box::new(source),
            })?;
        }
        for &program in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = sock
                .program_mut(program)
                .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
                .and_then(|p| p.try_into())
                .map_err(|source| DatapathError::Program {
                    program,
                    source: Box::new(source),
                })?;
            prog.load().map_err(|source| DatapathError::Program {
                program,
                source: Box::new(source),
            })?;
        }
        for (obj, names) in [
            (&mut lxc, &["from_container", "to_container"][..]),
            (&mut host, &["from_netdev", "to_netdev"][..]),
            (&mut overlay, &["from_overlay", "to_overlay"][..]),
            (&mut flush, &[FLUSH_PROGRAM][..]),
        ] {
            for &program in names {
                let prog: &mut SchedClassifier = obj
                    .program_mut(program)
                    .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
                    .and_then(|p| p.try_into())
                    .map_err(|source| DatapathError::Program {
                        program,
                        source: Box::new(source),
                    })?;
                prog.load().map_err(|source| DatapathError::Program {
                    program,
                    source: Box::new(source),
                })?;
            }
        }
        let ipcache = PinnedLpm::take(&mut lxc, maps::IPCACHE)?;
        let endpoints = PinnedHash::take(&mut lxc, maps::ENDPOINTS)?;
        let metrics = PerCpuArray::try_from(take(&mut lxc, maps::METRICS)?).map_err(map_err(maps::METRICS))?;
        let policy = PinnedLpm::take(&mut lxc, maps::POLICY)?;
        let cidr_class = PinnedLpm::take(&mut lxc, maps::CIDR_CLASS)?;
        let ct = PinnedHash::take(&mut lxc, maps::CT)?;
        let events = Some(aya::maps::RingBuf::try_from(take(&mut lxc, maps::EVENTS)?).map_err(map_err(maps::EVENTS))?);
        let events_lost =
            PerCpuArray::try_from(take(&mut lxc, maps::EVENTS_LOST)?).map_err(map_err(maps::EVENTS_LOST))?;
        let lb = LbMaps {
            services: PinnedHash::take(&mut sock, maps::LB_SERVICES)?,
            slots: PinnedHash::take(&mut sock, maps::LB_SLOTS)?,
            backends: PinnedHash::take(&mut sock, maps::LB_BACKENDS)?,
            maglev: PinnedHash::take(&mut sock, maps::LB_MAGLEV)?,
        };
        Ok(Self {
            cfg,
            lxc,
            host,
            overlay,
            sock,
            proxy,
            lb,
            ipcache,
            endpoints,
            metrics,
            policy,
            cidr_class,
            ct,
            events,
            events_lost,
            flusher: Some(FlowFlusher { obj: flush }),
            maps_reused,
        })
    }

    pub fn config(&self) -> &DatapathConfig {
        &self.cfg
    }

    /// True when this agent found the maps of an earlier one and kept them.
    pub fn maps_reused(&self) -> bool {
        self.maps_reused
    }

    fn link_pin(&self, ifname: &str, hook: Hook) -> PathBuf {
        self.cfg.link_dir().join(format!("{ifname}-{}", hook.name()))
    }

    fn attach(&mut self, object: Object, program: &'static str, ifname: &str, hook: Hook) -> Result<(), DatapathError> {
        let pin = self.link_pin(ifname, hook);
        let mode = match object {
            Object::Lxc => self.cfg.pod_attach_mode,
            Object::Host | Object::Overlay => self.cfg.attach_mode,
        };
        let obj = match object {
            Object::Lxc => &mut self.lxc,
            Object::Host => &mut self.host,
            Object::Overlay => &mut self.overlay,
        };
        let prog: &mut SchedClassifier = obj
            .program_mut(program)
            .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
            .and_then(|p| p.try_into())
            .map_err(|source| DatapathError::Program {
                program,
                source: Box::new(source),
            })?;
        attach::attach(prog, mode, ifname, hook, &pin)
    }

    /// Attaches the pod programs to a pod's host-side veth.
    pub fn attach_endpoint(&mut self, host_ifname: &str) -> Result<(), DatapathError> {
        self.attach(Object::Lxc, "from_container", host_ifname, Hook::Ingress)?;
        self.attach(Object::Lxc, "to_container", host_ifname, Hook::Egress)
    }

    pub fn detach_endpoint(&mut self, host_ifname: &str) {
        for p in self.endpoint_link_pins(host_ifname) {
            attach::detach_pinned(&p);
        }
    }

    /// Where an endpoint's links are pinned.
    pub fn endpoint_link_pins(&self, host_ifname: &str) -> Vec<PathBuf> {
        [Hook::Ingress, Hook::Egress]
            .into_iter()
            .map(|h| self.link_pin(host_ifname, h))
            .collect()
    }

    pub fn attach_uplink(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.attach(Object::Host, "from_netdev", ifname, Hook::Ingress)?;
        self.attach(Object::Host, "to_netdev", ifname, Hook::Egress)
    }

    pub fn attach_overlay(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.attach(Object::Overlay, "from_overlay", ifname, Hook::Ingress)?;
        self.attach(Object::Overlay, "to_overlay", ifname, Hook::Egress)
    }

    pub fn upsert_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), DatapathError> {
        self.endpoints.upsert(ifindex, info)
    }

    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        self.endpoints.remove(&ifindex)
    }

    pub fn endpoint_ifindexes(&self) -> Vec<u32> {
        self.endpoints.keys()
    }

    pub fn upsert_ipcache(&mut self, key: IpcacheKey, value: IpcacheValue) -> Result<(), DatapathError> {
        self.ipcache.upsert(key, value)
    }

    pub fn remove_ipcache(&mut self, key: IpcacheKey) -> Result<(), DatapathError> {
        self.ipcache.remove(&key)
    }

    /// Every ipcache entry, for reconciliation after a restart.
    pub fn ipcache_entries(&self) -> Vec<(IpcacheKey, IpcacheValue)> {
        self.ipcache.entries()
    }

    pub fn upsert_policy(&mut self, key: PolicyKey, value: PolicyValue) -> Result<(), DatapathError> {
        self.policy.upsert(key, value)
    }

    pub fn remove_policy(&mut self, key: PolicyKey) -> Result<(), DatapathError> {
        self.policy.remove(&key)
    }

    /// Every policy entry, for reconciliation after a restart.
    pub fn policy_entries(&self) -> Vec<(PolicyKey, PolicyValue)> {
        self.policy.entries()
    }

    pub fn upsert_cidr_class(&mut self, key: IpcacheKey, class: u32) -> Result<(), DatapathError> {
        self.cidr_class.upsert(key, class)
    }

    pub fn remove_cidr_class(&mut self, key: IpcacheKey) -> Result<(), DatapathError> {
        self.cidr_class.remove(&key)
    }

    /// Every CIDR class entry: an earlier agent's numbering, to keep.
    pub fn cidr_class_entries(&self) -> Vec<(IpcacheKey, u32)> {
        self.cidr_class.entries()
    }

    pub fn ct_entries(&self) -> Vec<(CtKey, CtEntry)> {
        self.ct.entries()
    }

    pub fn remove_ct(&mut self, key: &CtKey) {
        let _ = self.ct.remove(key);
    }

    /// The flow event ring, once: the observer owns it.
    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<MapData>> {
        self.events.take()
    }

    /// The flow flush, once: the observer owns it.
    pub fn take_flusher(&mut self) -> Option<FlowFlusher> {
        self.flusher.take()
    }

    /// Events the datapath could not write, per type (index EVENT_*),
    /// summed over CPUs.
    pub fn events_lost(&self) -> Vec<u64> {
        (0..sinew_abi::EVENT_TYPE_MAX)
            .map(|t| self.events_lost.get(&t, 0).map(|v| v.iter().sum()).unwrap_or(0))
            .collect()
    }

    /// Entries in the conntrack table now.
    pub fn ct_len(&self) -> usize {
        self.ct.len()
    }

    pub fn endpoint(&self, ifindex: u32) -> Option<EndpointInfo> {
        self.endpoints.get(&ifindex)
    }

    /// Packets and bytes per metrics index, summed over CPUs.
    pub fn metrics(&self) -> Vec<(u32, MetricsValue)> {
        let mut out = Vec::new();
        for idx in 0..sinew_abi::METRICS_MAX_ENTRIES {
            if let Ok(per_cpu) = self.metrics.get(&idx, 0) {
                let mut sum = MetricsValue::default();
                for v in per_cpu.iter() {
                    sum.packets += v.packets;
                    sum.bytes += v.bytes;
                }
                if sum.packets > 0 {
                    out.push((idx, sum));
                }
            }
        }
        out
    }

    /// The program fd of one program, for BPF_PROG_TEST_RUN in tests.
    pub fn program(&self, name: &str) -> Option<&SchedClassifier> {
        [&self.lxc, &self.host, &self.overlay]
            .into_iter()
            .find_map(|o| o.program(name))
            .and_then(|p| p.try_into().ok())
    }

    /// Attaches the socket programs to the cgroup at `cgroup` (every
    /// process below it gets service translation). Links are pinned; a
    /// restarted agent attaches its new programs first and then detaches
    /// the earlier agent's, so no connect goes untranslated in between
    /// (while both run, the second sees a backend address and passes).
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let dir = std::fs::File::open(cgroup).map_err(|source| DatapathError::Io {
            path: cgroup.to_path_buf(),
            source,
        })?;
        for &program in SOCK_PROGRAMS {
            let pin = self.cfg.link_dir().join(format!("cgroup-{program}"));
            let err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::Attach {
                ifname: cgroup.display().to_string(),
                hook: program,
                source,
            };
            let prog: &mut CgroupSockAddr = self
                .sock
                .program_mut(program)
                .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
                .and_then(|p| p.try_into())
                .map_err(|source| DatapathError::Program {
                    program,
                    source: Box::new(source),
                })?;
            // A cgroup bpf_link always attaches as one of many programs
            // (the kernel requires flags 0 and implies BPF_F_ALLOW_MULTI),
            // so it never displaces another program on this cgroup.
            let id = prog.attach(&dir, CgroupAttachMode::Single).map_err(|e| err(e.into()))?;
            let link: aya::programs::links::FdLink = prog
                .take_link(id)
                .map_err(|e| err(e.into()))?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| err(e.into()))?;
            detach_pinned(&pin);
            link.pin(&pin).map_err(|source| DatapathError::Pin {
                path: pin.clone(),
                source: Box::new(source),
            })?;
        }
        Ok(())
    }

    /// Attaches the proxy's listener lookup (`proxy_lookup`) to the
    /// network namespace at `netns` (the node's: where the proxy listens).
    /// The link is pinned; a restarted agent attaches its program before it
    /// detaches the earlier agent's, as with the cgroup programs.
    pub fn attach_netns(&mut self, netns: &Path) -> Result<(), DatapathError> {
        let program = PROXY_LOOKUP;
        let ns = std::fs::File::open(netns).map_err(|source| DatapathError::Io {
            path: netns.to_path_buf(),
            source,
        })?;
        let pin = self.cfg.link_dir().join(format!("netns-{program}"));
        let err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::Attach {
            ifname: netns.display().to_string(),
            hook: program,
            source,
        };
        let prog: &mut SkLookup = self
            .proxy
            .program_mut(program)
            .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
            .and_then(|p| p.try_into())
            .map_err(|source| DatapathError::Program {
                program,
                source: Box::new(source),
            })?;
        let id = prog.attach(&ns).map_err(|e| err(e.into()))?;
        let link: aya::programs::links::FdLink = prog.take_link(id).map_err(|e| err(e.into()))?.into();
        detach_pinned(&pin);
        link.pin(&pin).map_err(|source| DatapathError::Pin {
            path: pin.clone(),
            source: Box::new(source),
        })?;
        Ok(())
    }

    pub fn upsert_lb_backend(&mut self, id: u32, be: LbBackend) -> Result<(), DatapathError> {
        self.lb.backends.upsert(id, be)
    }

    pub fn remove_lb_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        self.lb.backends.remove(&id)
    }

    pub fn upsert_lb_slot(&mut self, key: LbSlotKey, backend: u32) -> Result<(), DatapathError> {
        self.lb.slots.upsert(key, backend)
    }

    pub fn remove_lb_slot(&mut self, key: LbSlotKey) -> Result<(), DatapathError> {
        self.lb.slots.remove(&key)
    }

    pub fn upsert_lb_maglev(&mut self, key: LbMaglevKey, backend: u32) -> Result<(), DatapathError> {
        self.lb.maglev.upsert(key, backend)
    }

    pub fn remove_lb_maglev(&mut self, key: LbMaglevKey) -> Result<(), DatapathError> {
        self.lb.maglev.remove(&key)
    }

    pub fn upsert_lb_service(&mut self, key: LbSvcKey, value: LbSvcValue) -> Result<(), DatapathError> {
        self.lb.services.upsert(key, value)
    }

    pub fn remove_lb_service(&mut self, key: LbSvcKey) -> Result<(), DatapathError> {
        self.lb.services.remove(&key)
    }

    /// Everything in the service maps, for adopting an earlier agent's
    /// state after a restart.
    pub fn lb_entries(&self) -> LbEntries {
        LbEntries {
            services: self.lb.services.entries(),
            slots: self.lb.slots.entries(),
            backends: self.lb.backends.entries(),
            maglev: self.lb.maglev.entries(),
        }
    }

    /// Removes what an agent of an older ABI left under the pin root: its
    /// links first (TCX and cgroup links: the old programs detach; this
    /// agent's are attached by then, so call it after restoring the
    /// endpoints), then its maps. An older version's maps have another
    /// layout and are never adopted (see `pin_dir`), and its programs would
    /// otherwise keep running beside the new ones on the uplink and the
    /// tunnel device. Returns the versions removed.
    pub fn retire_older_abis(&self) -> Vec<u32> {
        let mut retired = Vec::new();
        let Ok(dir) = std::fs::read_dir(&self.cfg.bpf_root) else {
            return retired;
        };
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(version) = name
                .to_str()
                .and_then(|n| n.strip_prefix('v'))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if version >= sinew_abi::ABI_VERSION {
                continue;
            }
            if let Ok(links) = std::fs::read_dir(e.path().join("links")) {
                for l in links.flatten() {
                    detach_pinned(&l.path());
                }
            }
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => retired.push(version),
                Err(error) => tracing::warn!(path = %e.path().display(), %error, "cannot remove an older ABI's pins"),
            }
        }
        retired
    }

    /// Removes every pin of this node (the agent's `--cleanup` and `lab down`).
    pub fn remove_pins(bpf_root: &Path) -> std::io::Result<()> {
        if bpf_root.exists() {
            std::fs::remove_dir_all(bpf_root)?;
        }
        Ok(())
    }
}

/// The proxy's listener lookup, as named in bpf_proxy.c.
const PROXY_LOOKUP: &str = "proxy_lookup";

/// The socket programs, as named in bpf_sock.c.
const SOCK_PROGRAMS: &[&str] = &[
    "sock_connect4",
    "sock_sendmsg4",
    "sock_recvmsg4",
    "sock_getpeername4",
    "sock_connect6",
    "sock_sendmsg6",
    "sock_recvmsg6",
    "sock_getpeername6",
];

struct LbMaps {
    services: PinnedHash<LbSvcKey, LbSvcValue>,
    slots: PinnedHash<LbSlotKey, u32>,
    backends: PinnedHash<u32, LbBackend>,
    maglev: PinnedHash<LbMaglevKey, u32>,
}

/// The service maps' contents.
#[derive(Debug, Default)]
pub struct LbEntries {
    pub services: Vec<(LbSvcKey, LbSvcValue)>,
    pub slots: Vec<(LbSlotKey, u32)>,
    pub backends: Vec<(u32, LbBackend)>,
    pub maglev: Vec<(LbMaglevKey, u32)>,
}

#[derive(Clone, Copy)]
enum Object {
    Lxc,
    Host,
    Overlay,
}
