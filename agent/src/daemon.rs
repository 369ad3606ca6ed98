//! Agent start-up and main loop: read the node's facts from the datastore,
//! prepare the node (sysctls, tunnel device), load or re-adopt the
//! datapath, restore endpoints, then serve the API and follow the datastore.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipnet::IpNet;
use sinew_model::{local::LocalDatastore, Datastore};
use tokio_stream::wrappers::UnixListenerStream;

use crate::api::AgentApi;
use crate::datapath::{AttachMode, Datapath, DatapathConfig, RoutingMode};
use crate::endpoints::Registry;
use crate::ipam::Ipam;
use crate::netutil;
use crate::nodes::{LocalNode, Reconciler};
use crate::observer::{Observer, ObserverApi, ObserverConfig};
use crate::state::NodeState;

pub const VXLAN_DEV: &str = "sinew_vxlan";
/// Where socket load balancing attaches by default: the cgroup v2 root of
/// a hybrid hierarchy, i.e. the whole node.
pub const VXLAN_PORT: u16 = sinew_abi::VXLAN_PORT;
const VXLAN_OVERHEAD: u32 = 50;

/// `--datastore-kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatastoreKind {
    /// `--datastore DIR`: Kubernetes-shaped YAML files (the lab).
    Local,
    /// The Kubernetes API (`--kubeconfig`, or the ServiceAccount).
    Kubernetes,
}

impl std::str::FromStr for DatastoreKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(Self::Local),
            "kubernetes" => Ok(Self::Kubernetes),
            other => Err(format!("unknown datastore kind {other:?}: use local or kubernetes")),
        }
    }
}

/// How long a datastore call the agent waits for (an identity allocation
/// on CNI ADD, under the state lock) may take on the kubernetes backend
/// before it fails as unavailable.
pub const KUBE_CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Everything the agent is told at start; names are the CLI flags.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    /// Where desired state comes from: a directory of YAML, or the
    /// Kubernetes API.
    pub datastore_kind: DatastoreKind,
    pub datastore: PathBuf,
    /// For `kubernetes`: the kubeconfig; None: the pod's ServiceAccount.
    pub kubeconfig: Option<PathBuf>,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpf_root: PathBuf,
    pub routing: RoutingMode,
    pub uplink: String,
    pub masquerade: bool,
    pub nat_ports: (u16, u16),
    /// Uplink and VXLAN device. None: TCX where the kernel has it, clsact
    /// otherwise.
    pub attach_mode: Option<AttachMode>,
    /// Pod veths. None: clsact. A TCX attach waits for an RCU grace period
    /// per link (10-15 ms each measured here, two links per pod), which
    /// would triple CNI ADD latency; cls_bpf attaches without waiting, runs
    /// the same program, and is replaced in place on restart.
    pub pod_attach_mode: Option<AttachMode>,
    pub policy_map_size: u32,
    pub ct_map_size: u32,
    /// New connections pass untracked when conntrack is full (default: drop).
    pub ct_fail_open: bool,
    /// An endpoint whose policy does not fit the policy map runs without
    /// policy (default: it drops everything).
    pub policy_fail_open: bool,
    /// How often idle conntrack entries and unused identities are removed,
    /// and how long an unused identity lives first.
    pub housekeeping_interval: Duration,
    pub identity_gc_grace: Duration,
    /// Flow events: on/off, ring size in bytes, report interval.
    pub events: bool,
    pub event_ring_bytes: u32,
    pub event_report_interval: Duration,
    /// Flows the observer keeps for `sinew observe` (`--flow-buffer-size`).
    pub flow_buffer_size: usize,
    /// The Prometheus endpoint (None: off), and whether to turn on the
    /// kernel's BPF run-time statistics for it.
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub bpf_stats: bool,
    /// The cgroup v2 directory the socket programs attach to.
    /// None: the cgroup2 mount.
    pub cgroup_root: Option<PathBuf>,
    /// Services: default backend selection, Maglev table size (prime) and
    /// how many Maglev services fit.
    pub lb_algorithm: sinew_model::LbAlgorithm,
    pub maglev_table_size: u32,
    pub maglev_services: u32,
    /// The proxy's transparent listeners for ingress and egress L7 rules
    /// (`--proxy-ports INGRESS,EGRESS`).
    pub proxy_ports: crate::proxy_redirect::ProxyPorts,
    /// Where the agent serves the proxy's control stream (`--proxy-socket`).
    pub proxy_socket: PathBuf,
    /// `--proxy-binary`: the sinew-proxy the agent starts and supervises;
    /// `None`: none (L7-covered connections fail closed unless a proxy
    /// started otherwise connects to `proxy_socket`).
    pub proxy_binary: Option<PathBuf>,
    /// Test hook: delays the background removal of a deleted endpoint's
    /// veth (see `NodeState::link_removal_delay`). Zero in production.
    pub test_link_removal_delay: Duration,
    /// `--encryption`, `--encrypt-node` and WireGuard's port and queues.
    pub encryption: crate::encryption::Settings,
}

impl AgentConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.node_name.is_empty() {
            bail!("--node-name is empty: give this node's Kubernetes name");
        }
        let (lo, hi) = self.nat_ports;
        if lo < 1024 || lo > hi {
            bail!("--nat-ports {lo}-{hi}: need 1024 <= first <= last");
        }
        if !self.event_ring_bytes.is_power_of_two() || self.event_ring_bytes < 4096 {
            bail!(
                "--event-ring-size {}: use a power of two of at least 4096 bytes",
                self.event_ring_bytes
            );
        }
        if self.policy_map_size < 16 || self.ct_map_size < 16 {
            bail!(
                "--policy-map-size {} / --ct-map-size {}: use at least 16",
                self.policy_map_size,
                self.ct_map_size
            );
        }
        if !crate::services::maglev::valid_table_size(self.maglev_table_size) || self.maglev_table_size > 1 << 20 {
            bail!(
                "--maglev-table-size {}: use a prime between 7 and 1048576, e.g. 16381 or 65521",
                self.maglev_table_size
            );
        }
        if self.maglev_services == 0 || u64::from(self.maglev_services) * u64::from(self.maglev_table_size) > 1 << 26 {
            bail!(
                "--maglev-services {}: use 1 or more, and at most {} with --maglev-table-size {}",
                self.maglev_services,
                (1u64 << 26) / u64::from(self.maglev_table_size),
                self.maglev_table_size
            );
        }
        if !self.bpf_root.starts_with("/sys/fs/bpf") {
            bail!(
                "--bpf-root {}: must be under /sys/fs/bpf (a bpffs mount)",
                self.bpf_root.display()
            );
        }
        Ok(())
    }
}

/// Waits until the datastore has this node with a pod CIDR and an address.
async fn local_node(ds: &dyn Datastore, name: &str) -> anyhow::Result<(LocalNode, Arc<sinew_model::Snapshot>)> {
    let mut rx = ds.subscribe();
    let started = Instant::now();
    loop {
        let snap = rx.borrow_and_update().clone();
        if let Some(n) = snap.nodes.get(name) {
            let ip = match n.internal_ip {
                IpAddr::V4(v) => v,
                IpAddr::V6(_) => {
                    bail!("node {name}: an IPv6 InternalIP needs the IPv6 datapath, which is not built yet")
                }
            };
            let cidr = n.pod_cidrs.iter().find_map(|c| match c {
                IpNet::V4(v) => Some(*v),
                IpNet::V6(_) => None,
            });
            let Some(pod_cidr) = cidr else {
                bail!("node {name} has no IPv4 pod CIDR; IPv6-only pods are not supported yet");
            };
            return Ok((
                LocalNode {
                    name: name.to_string(),
                    ip,
                    pod_cidr,
                },
                snap,
            ));
        }
        if started.elapsed() > Duration::from_secs(5) {
            tracing::warn!(node = name, datastore = %ds.describe(), "this node is not in the datastore yet; waiting");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), rx.changed()).await;
    }
}

/// Where cgroup v2 is mounted (the first cgroup2 line of /proc/self/mounts).
fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    cgroup2_in_mounts(&mounts).ok_or_else(|| {
        anyhow::anyhow!(
            "no cgroup v2 mount found (socket-level service load balancing needs one): mount it (`mount -t cgroup2 none /sys/fs/cgroup/unified`) or pass --cgroup-root"
        )
    })
}

fn cgroup2_in_mounts(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    })
}

/// Fails unless `dir` is a cgroup v2 directory, saying what to do.
fn check_cgroup2(dir: &std::path::Path) -> anyhow::Result<()> {
    use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
    match statfs(dir) {
        Ok(s) if s.filesystem_type() == CGROUP2_SUPER_MAGIC => Ok(()),
        Ok(_) => bail!(
            "--cgroup-root {}: not a cgroup v2 directory; pass the cgroup2 mount (often /sys/fs/cgroup or /sys/fs/cgroup/unified, see `mount -t cgroup2`) or a directory in it",
            dir.display()
        ),
        Err(e) => bail!(
            "--cgroup-root {}: {e}; pass an existing cgroup v2 directory (see `mount -t cgroup2`)",
            dir.display()
        ),
    }
}

/// Mounts bpffs at /sys/fs/bpf when nothing is there, as pins need it.
fn ensure_bpffs() -> anyhow::Result<()> {
    use nix::sys::statfs::{statfs, BPF_FS_MAGIC};
    if statfs("/sys/fs/bpf").is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC) {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mount bpffs at /sys/fs/bpf (the agent needs CAP_SYS_ADMIN, or mount it beforehand)")?;
    tracing::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    cfg.validate()?;
    ensure_bpffs()?;
    // What was in force before a restart: a file invalid now keeps it.
    let policies_path = cfg.state_dir.join("policies-in-force.json");
    let before = sinew_model::Snapshot {
        policies: crate::policy::policies_in_force(&policies_path),
        ..Default::default()
    };
    let ds: Arc<dyn Datastore> = match cfg.datastore_kind {
        DatastoreKind::Local => Arc::new(LocalDatastore::start_after(
            &cfg.datastore,
            Duration::from_millis(50),
            Some(&before),
        )?),
        #[cfg(feature = "kubernetes")]
        DatastoreKind::Kubernetes => {
            let source = match &cfg.kubeconfig {
                Some(path) => sinew_kubestore::Source::Kubeconfig(path.clone()),
                None => sinew_kubestore::Source::Infer,
            };
            let mut options = sinew_kubestore::Options::default();
            if cfg.encryption.mode == crate::encryption::Mode::Ipsec {
                // Only an agent that needs the keys reads the Secret (the
                // RBAC `sinew install --encryption ipsec` renders).
                let secret = sinew_kubestore::SecretRef::parse(&cfg.encryption.ipsec_keys_secret)
                    .map_err(|e| anyhow::anyhow!("--ipsec-keys-secret {e}"))?;
                options.ipsec_keys = Some(secret);
            }
            Arc::new(sinew_kubestore::KubeDatastore::start(
                source,
                &cfg.node_name,
                Some(before),
                KUBE_CALL_TIMEOUT,
                options,
            )?)
        }
        #[cfg(not(feature = "kubernetes"))]
        DatastoreKind::Kubernetes => anyhow::bail!(
            "this sinew-agent was built without the Kubernetes backend (cargo feature `kubernetes`): rebuild with it, or pass --datastore-kind local"
        ),
    };
    tracing::info!(datastore = %ds.describe(), "datastore");
    let (local, snapshot) = local_node(ds.as_ref(), &cfg.node_name).await?;
    tracing::info!(node = %local.name, ip = %local.ip, pod_cidr = %local.pod_cidr, "node facts");

    if netutil::ipv4(&cfg.uplink).is_none() {
        tracing::warn!(uplink = %cfg.uplink, "uplink has no IPv4 address");
    }
    let uplink_mtu = netutil::mtu(&cfg.uplink).with_context(|| format!("uplink {} (pass --uplink)", cfg.uplink))?;
    for (k, v) in [
        ("net.ipv4.ip_forward", "1".to_string()),
        // Masquerade ports are ours: keep the node's own sockets off them.
        (
            "net.ipv4.ip_local_reserved_ports",
            format!("{}-{}", cfg.nat_ports.0, cfg.nat_ports.1),
        ),
    ] {
        netutil::sysctl(k, &v)?;
    }
    // Connections an L7 rule covers reach the proxy through this routing.
    crate::proxy_redirect::install_routing()?;
    tracing::info!(
        ingress = cfg.proxy_ports.ingress,
        egress = cfg.proxy_ports.egress,
        "L7 redirect to the proxy's listeners"
    );
    let (vxlan_ifindex, pod_mtu) = match cfg.routing {
        RoutingMode::Vxlan => (
            netutil::ensure_vxlan(VXLAN_DEV, VXLAN_PORT, uplink_mtu - VXLAN_OVERHEAD)?,
            uplink_mtu - VXLAN_OVERHEAD,
        ),
        RoutingMode::Native => (0, uplink_mtu),
    };
    // Before the datapath: its programs send to the device's ifindex.
    let encryption = match cfg.encryption.mode {
        crate::encryption::Mode::Ipsec => Some(crate::encryption::Encryption::start_ipsec(
            &cfg.encryption,
            &cfg.state_dir,
            local.ip,
            cfg.routing == RoutingMode::Vxlan,
        )?),
        _ => crate::encryption::Encryption::start(&cfg.encryption, &cfg.state_dir, uplink_mtu)?,
    };
    let pod_mtu = pod_mtu - encryption.as_ref().map_or(0, |e| e.overhead());
    if let Some(e) = &encryption {
        e.publish(ds.as_ref(), &cfg.node_name)?;
    }
    let attach_mode = cfg.attach_mode.unwrap_or_else(AttachMode::detect);
    let pod_attach_mode = cfg.pod_attach_mode.unwrap_or(AttachMode::Clsact);
    let dp_cfg = DatapathConfig {
        bpf_root: cfg.bpf_root.clone(),
        node_ip: local.ip,
        routing: cfg.routing,
        vxlan_ifindex,
        uplink_ifindex: netutil::ifindex(&cfg.uplink)
            .with_context(|| format!("uplink {} (pass --uplink)", cfg.uplink))?,
        masquerade: cfg.masquerade,
        nat_ports: cfg.nat_ports,
        attach_mode,
        pod_attach_mode,
        ct_fail_open: cfg.ct_fail_open,
        policy_map_size: cfg.policy_map_size,
        ct_map_size: cfg.ct_map_size,
        events: cfg.events,
        event_ring_bytes: cfg.event_ring_bytes,
        event_report_interval_ns: cfg.event_report_interval.as_nanos() as u64,
        maglev_table_size: cfg.maglev_table_size,
        maglev_services: cfg.maglev_services,
        encrypt_ifindex: encryption.as_ref().map_or(0, |e| e.ifindex),
        encrypt_ipsec: encryption.as_ref().is_some_and(|e| e.is_ipsec()),
        encrypt_node: cfg.encryption.encrypt_node,
        wireguard_port: cfg.encryption.port,
    };
    let pin_dir = dp_cfg.pin_dir();
    let mut datapath = Datapath::load(dp_cfg)?;
    datapath.attach_uplink(&cfg.uplink)?;
    if cfg.routing == RoutingMode::Vxlan {
        datapath.attach_overlay(VXLAN_DEV)?;
    }
    let cgroup_root = match &cfg.cgroup_root {
        Some(dir) => dir.clone(),
        None => cgroup2_mount()?,
    };
    check_cgroup2(&cgroup_root)?;
    let services = crate::services::ServiceState::adopt(datapath.lb_entries());
    datapath.attach_cgroup(&cgroup_root)?;
    datapath.attach_netns(Path::new("/proc/self/ns/net"))?;
    let reused = datapath.maps_reused();
    let (ipam, dropped) = Ipam::open(cfg.state_dir.join("ipam.json"), &[IpNet::V4(local.pod_cidr)])?;
    for d in dropped {
        tracing::warn!(container = %d.container_id, "allocation outside the node's pod CIDR dropped");
    }
    let registry = Registry::open(cfg.state_dir.join("endpoints.json"))?;
    let features = crate::features::detect(
        attach_mode,
        pod_attach_mode,
        cfg.routing == RoutingMode::Vxlan,
        cfg.masquerade,
    );
    let reconciler = Reconciler::new(cfg.routing, cfg.uplink.clone(), VXLAN_DEV.to_string(), local.clone());
    let node_ip = local.ip;
    let mut state = NodeState {
        local,
        ipam,
        registry,
        datapath,
        reconciler,
        features,
        pod_mtu,
        started: Instant::now(),
        snapshot,
        remote_nodes: 0,
        ds: ds.clone(),
        policy: Default::default(),
        services,
        service_settings: crate::services::Settings {
            local_node: cfg.node_name.clone(),
            node_ip,
            default_algorithm: cfg.lb_algorithm,
            maglev_table_size: cfg.maglev_table_size,
        },
        health: Default::default(),
        link_removal_delay: cfg.test_link_removal_delay,
        encryption,
    };
    state.policy.fail_open = cfg.policy_fail_open;
    state.policy.proxy_ports = cfg.proxy_ports;
    let proxy = Arc::new(crate::proxy::Publisher::new(&cfg.proxy_socket));
    state.policy.proxy = Some(proxy.clone());
    state.policy.persist = Some(policies_path);
    let adopted: Vec<(u32, u32, u32)> = state
        .registry
        .iter()
        .filter_map(|e| {
            state
                .datapath
                .endpoint(e.host_ifindex)
                .map(|i| (e.id, i.flags, i.policy_rev))
        })
        .collect();
    let entries = state.datapath.policy_entries();
    let classes = state.datapath.cidr_class_entries();
    state.policy.adopt(entries, adopted, classes);
    let (kept, dropped) = state.restore()?;
    state.resync()?;
    // Everything runs on this ABI's programs now: an older agent's go.
    let retired = state.datapath.retire_older_abis();
    if !retired.is_empty() {
        tracing::info!(?retired, "removed the programs and maps of older datapath ABIs");
    }
    tracing::info!(
        maps_reused = reused,
        endpoints_kept = kept,
        endpoints_dropped = dropped,
        mode = attach_mode.name(),
        "datapath ready"
    );

    let ring = state.datapath.take_events();
    let flusher = state.datapath.take_flusher();
    let state = Arc::new(Mutex::new(state));
    let observer = start_observer(&cfg, ring, flusher, &state)?;
    let listener_map = pin_dir.join("maps").join(sinew_abi::maps::PROXY_LISTENERS);
    let launch = crate::proxy::Launch {
        proxy_socket: cfg.proxy_socket.clone(),
        proxy_binary: cfg.proxy_binary.clone(),
        proxy_ports: cfg.proxy_ports,
        state_dir: cfg.state_dir.clone(),
        source_map: Some(pin_dir.join("maps").join(sinew_abi::maps::PROXY_SRC)),
    };
    crate::proxy::start(&launch, proxy, observer.l7_sink(), listener_map).await?;
    if cfg.bpf_stats {
        crate::metrics::enable_bpf_stats();
    }
    if let Some(addr) = cfg.metrics_addr {
        let listener = crate::metrics::bind(addr).await?;
        let source = crate::metrics::Source {
            state: state.clone(),
            flows: Some(crate::metrics::observer_flows(observer.stats())),
        };
        tokio::spawn(crate::metrics::serve(listener, source));
    }
    let trimmer = crate::memory::Trimmer::default();
    tokio::spawn(trimmer.clone().run(TRIM_EVERY));
    tokio::spawn(follow_datastore(ds, state.clone(), trimmer));
    tokio::spawn(housekeeping(
        state.clone(),
        cfg.housekeeping_interval,
        cfg.identity_gc_grace,
    ));
    serve(&cfg, state, observer, (attach_mode, pod_attach_mode), pin_dir).await
}

/// The flow observer on its own thread, or a disabled one that still
/// answers the API when events are off.
fn start_observer(
    cfg: &AgentConfig,
    ring: Option<aya::maps::RingBuf<aya::maps::MapData>>,
    flusher: Option<crate::datapath::FlowFlusher>,
    state: &Arc<Mutex<NodeState>>,
) -> anyhow::Result<Observer> {
    let tick = Duration::from_millis(250);
    let ocfg = ObserverConfig {
        node_name: cfg.node_name.clone(),
        buffer_size: cfg.flow_buffer_size,
        event_ring_bytes: u64::from(cfg.event_ring_bytes),
        tick,
        flush_every: ObserverConfig::flush_period(cfg.event_report_interval, tick),
    };
    match ring {
        Some(ring) if cfg.events => Ok(Observer::start(ring, flusher, state.clone(), ocfg)?),
        _ => Ok(Observer::disabled(ocfg)),
    }
}

/// Periodic work: idle conntrack entries, unused identities.
async fn housekeeping(state: Arc<Mutex<NodeState>>, every: Duration, grace: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let Ok(mut s) = state.lock() else { return };
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
            .unwrap_or(0);
        let expired: Vec<sinew_abi::CtKey> = s
            .datapath
            .ct_entries()
            .into_iter()
            .filter(|(k, e)| crate::policy::ct_expired(k, e, now))
            .map(|(k, _)| k)
            .collect();
        for k in &expired {
            s.datapath.remove_ct(k);
        }
        // IPsec: a rotation's grace period ends, a peer is retried, what
        // the kernel lost is put back.
        if s.encryption.as_mut().is_some_and(|e| e.wants_resync()) {
            let _ = s.resync();
        }
        let gone = s.gc_identities(grace);
        if !gone.is_empty() {
            tracing::info!(?gone, "unused identities removed");
        }
    }
}

/// How often freed heap is handed back after snapshots change
/// ([`crate::memory`]).
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// How soon a failed apply is retried without a new snapshot.
const RESYNC_RETRY: Duration = Duration::from_secs(1);

/// Applies every new snapshot, and retries while an apply is failing;
/// keeps the datastore alive for its lifetime. Failures are logged and
/// counted by [`NodeState::resync`].
async fn follow_datastore(ds: Arc<dyn Datastore>, state: Arc<Mutex<NodeState>>, trimmer: crate::memory::Trimmer) {
    let mut rx = ds.subscribe();
    loop {
        let failing = state.lock().map(|s| s.health.is_failing()).unwrap_or(false);
        let changed = if failing {
            match tokio::time::timeout(RESYNC_RETRY, rx.changed()).await {
                Ok(r) => r.is_ok(),
                Err(_) => true,
            }
        } else {
            rx.changed().await.is_ok()
        };
        if !changed {
            return;
        }
        let snap = rx.borrow_and_update().clone();
        let Ok(mut s) = state.lock() else { return };
        s.snapshot = snap;
        let _ = s.resync();
        // The snapshot replaced, and what resync built from the old one,
        // are freed now.
        trimmer.freed();
    }
}

async fn serve(
    cfg: &AgentConfig,
    state: Arc<Mutex<NodeState>>,
    observer: Observer,
    (mode, pod_mode): (AttachMode, AttachMode),
    pin_dir: PathBuf,
) -> anyhow::Result<()> {
    if let Some(dir) = cfg.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&cfg.socket);
    let listener =
        tokio::net::UnixListener::bind(&cfg.socket).with_context(|| format!("bind {}", cfg.socket.display()))?;
    let api = AgentApi {
        state,
        attach_mode: mode.name(),
        pod_attach_mode: pod_mode.name(),
        routing: cfg.routing.name(),
        bpf_pin_path: pin_dir.display().to_string(),
    };
    tracing::info!(socket = %cfg.socket.display(), "serving");
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        // Programs and maps stay: pods keep their network while we are away.
        tracing::info!("stopping; the datapath stays attached");
    };
    tonic::transport::Server::builder()
        .add_service(sinew_proto::AgentServer::new(api))
        .add_service(sinew_proto::ObserverServer::new(ObserverApi { observer }))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}

/// Parses "61000-65535".
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected FIRST-LAST, e.g. 61000-65535"))?;
    let a: u16 = a.trim().parse().map_err(|_| format!("{a:?} is not a port"))?;
    let b: u16 = b.trim().parse().map_err(|_| format!("{b:?} is not a port"))?;
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_on_unified_and_hybrid_hosts() {
        let unified = "sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        assert_eq!(cgroup2_in_mounts(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs ro 0 0\ncgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_in_mounts(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(cgroup2_in_mounts("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"), None);
    }
}
