//! sinew-agent: the Sinew node agent.
use std::path::PathBuf;

use clap::Parser;
use sinew_agent::daemon::{self, AgentConfig};
use sinew_agent::datapath::{AttachMode, RoutingMode};

#[derive(Parser)]
#[command(
    name = "sinew-agent",
    version,
    about = "Sinew node agent: BPF datapath, pod IPAM, endpoints, node routes"
)]
struct Args {
    /// This node's name, as in its Node resource.
    #[arg(long, env = "SINEW_NODE_NAME")]
    node_name: String,
    /// Where desired state comes from: local (the --datastore directory)
    /// or kubernetes (the API server).
    #[arg(long, default_value = "local")]
    datastore_kind: daemon::DatastoreKind,
    /// Directory of the local datastore (Kubernetes-shaped YAML).
    #[arg(long, default_value = "/etc/sinew/datastore")]
    datastore: PathBuf,
    /// With --datastore-kind kubernetes: the kubeconfig to reach the API
    /// (default: the pod's ServiceAccount, or $KUBECONFIG).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Unix socket of the agent API.
    #[arg(long, default_value = sinew_proto::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Where IPAM and endpoint state persist across restarts.
    #[arg(long, default_value = "/var/lib/sinew")]
    state_dir: PathBuf,
    /// This node's bpffs directory; the ABI version is appended.
    #[arg(long, default_value = "/sys/fs/bpf/sinew")]
    bpf_root: PathBuf,
    /// Cross-node routing: vxlan or native.
    #[arg(long, default_value = "vxlan")]
    routing: RoutingMode,
    /// The node's interface to the other nodes.
    #[arg(long, default_value = "eth0")]
    uplink: String,
    /// Masquerade pod traffic leaving the cluster to the node address.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    masquerade: bool,
    /// Source ports the masquerade may use (reserved from the node's own).
    #[arg(long, default_value = "61000-65535", value_parser = daemon::parse_port_range)]
    nat_ports: (u16, u16),
    /// How programs attach to the uplink and VXLAN device: auto (TCX on
    /// 6.6+, else clsact), tcx or clsact.
    #[arg(long, default_value = "auto")]
    attach_mode: String,
    /// How programs attach to pod veths: clsact (default: attaching costs no
    /// RCU grace period, unlike TCX) or tcx.
    #[arg(long, default_value = "clsact")]
    pod_attach_mode: String,
    /// Entries of the policy map, for all endpoints together. When full,
    /// the endpoints whose entries do not fit drop everything (fail closed).
    #[arg(long, default_value_t = 65536)]
    policy_map_size: u32,
    /// Entries of the conntrack table (two per connection under policy).
    #[arg(long, default_value_t = 262144)]
    ct_map_size: u32,
    /// When conntrack is full, let new connections through untracked
    /// instead of dropping them (both are counted).
    #[arg(long)]
    ct_fail_open: bool,
    /// When an endpoint's policy does not fit the policy map, run it
    /// without policy instead of dropping all its traffic (both are
    /// counted and logged).
    #[arg(long)]
    policy_fail_open: bool,
    /// Seconds between removals of idle conntrack entries and unused identities.
    #[arg(long, default_value_t = 10)]
    housekeeping_interval: u64,
    /// Seconds an identity no endpoint uses survives before removal.
    #[arg(long, default_value_t = 60)]
    identity_gc_grace: u64,
    /// Flow events from the datapath (`sinew observe`, flow metrics).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    events: bool,
    /// Size of the flow event ring buffer in bytes (power of two). 1 MiB
    /// holds 13,107 events: the reader lost none at 2.3 million events a
    /// second (`sinew-bench observe`), and the flow flush fills at most
    /// half of it at a time. The kernel maps it twice, so the agent's RSS
    /// counts it twice. Events that do not fit are counted as lost.
    #[arg(long, default_value_t = 1 << 20)]
    event_ring_size: u32,
    /// Milliseconds between counter reports of a flow that lasts (TCP and
    /// others alike; TCP also reports SYN, FIN and RST); a flow whose
    /// packets stop is reported about this long after its last packet.
    #[arg(long, default_value_t = 5000)]
    event_report_interval_ms: u64,
    /// Recent flows the agent keeps for `sinew observe` (0: none, only
    /// followers see flows).
    #[arg(long, default_value_t = 8192)]
    flow_buffer_size: usize,
    /// Prometheus endpoint (GET /metrics), HOST:PORT or `off`.
    #[arg(long, default_value = sinew_agent::metrics::DEFAULT_ADDR)]
    metrics_addr: String,
    /// Turn on the kernel's BPF program run statistics
    /// (kernel.bpf_stats_enabled) for sinew_bpf_program_* metrics. Off by
    /// default: it adds two clock reads to every BPF program run on the
    /// node (~80 ns per run measured here, three runs per packet).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    bpf_stats: bool,
    /// Test hook: wait this long before removing a deleted endpoint's veth
    /// in the background, so that a test can stop the agent in between.
    #[arg(long, default_value_t = 0, hide = true)]
    test_link_removal_delay_ms: u64,
    /// The cgroup v2 directory whose processes get socket-level service
    /// load balancing. Default: the whole node, i.e. the cgroup2 mount
    /// (/sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a
    /// hybrid one), found in /proc/self/mounts.
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// Backend selection for services without the
    /// service.sinew.io/lb-algorithm annotation: random or maglev.
    #[arg(long, default_value = "random")]
    lb_algorithm: sinew_model::LbAlgorithm,
    /// Entries of each Maglev table (a prime; ~M/N per backend).
    #[arg(long, default_value_t = 16381)]
    maglev_table_size: u32,
    /// Maglev services the node can hold (sizes the shared table map).
    #[arg(long, default_value_t = 64)]
    maglev_services: u32,
    /// The proxy's transparent listeners on this node, INGRESS,EGRESS:
    /// connections that an ingress (egress) L7 rule covers are handed to
    /// the first (second).
    #[arg(long, default_value = "15006,15001")]
    proxy_ports: sinew_agent::proxy_redirect::ProxyPorts,
    /// Where the agent serves the L7 proxy's control stream
    /// (sinew.proxy.v1.ProxyControl).
    #[arg(long, default_value = sinew_proto::DEFAULT_PROXY_SOCKET)]
    proxy_socket: PathBuf,
    /// The sinew-proxy binary to start and supervise (restarted when it
    /// exits; it outlives agent restarts and is adopted again). Unset: no
    /// proxy, and connections an L7 rule covers fail closed.
    #[arg(long)]
    proxy_binary: Option<PathBuf>,
    /// Encryption of pod traffic between nodes: none, wireguard (the
    /// kernel's where it has one, else the agent's userspace device) or
    /// ipsec (the kernel's ESP, with the cluster keys of the datastore;
    /// refuses to start where the kernel has no ESP). The same on every node.
    #[arg(long, default_value = "none")]
    encryption: sinew_agent::encryption::Mode,
    /// Encrypt the nodes' own traffic to each other too (pod traffic is
    /// always encrypted when --encryption is on).
    #[arg(long)]
    encrypt_node: bool,
    /// WireGuard's UDP port, the same on every node.
    #[arg(long, default_value_t = sinew_wireguard::DEFAULT_PORT)]
    wireguard_port: u16,
    /// Threads (and TUN queues) of the userspace WireGuard device that
    /// encrypt.
    #[arg(long, default_value_t = 2)]
    wireguard_queues: usize,
    /// Which WireGuard device: auto (the kernel's where it has WireGuard,
    /// else the agent's userspace one), kernel (or refuse to start), or
    /// userspace.
    #[arg(long, default_value = "auto")]
    wireguard_implementation: sinew_agent::encryption::Implementation,
    /// IPsec: seconds an older cluster key stays installed after a newer
    /// one appears (every peer has switched to the newer one by then).
    #[arg(long, default_value_t = 60)]
    ipsec_key_grace: u64,
    /// IPsec with --datastore-kind kubernetes: the Secret holding the
    /// cluster keys (data key ipsec-keys.yaml, the SinewIPsecKeys document),
    /// as NAMESPACE/NAME or NAME in the agent's own namespace.
    #[arg(long, default_value = sinew_model::ipsec::SECRET_NAME)]
    ipsec_keys_secret: String,
}

fn parse_mode(flag: &str, v: &str) -> anyhow::Result<Option<AttachMode>> {
    match v {
        "auto" => Ok(None),
        "tcx" => Ok(Some(AttachMode::Tcx)),
        "clsact" => Ok(Some(AttachMode::Clsact)),
        other => anyhow::bail!("{flag} {other:?}: use auto, tcx or clsact"),
    }
}

fn main() -> anyhow::Result<()> {
    sinew_agent::memory::limit_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let cfg = AgentConfig {
        node_name: a.node_name,
        datastore_kind: a.datastore_kind,
        datastore: a.datastore,
        kubeconfig: a.kubeconfig,
        socket: a.socket,
        state_dir: a.state_dir,
        bpf_root: a.bpf_root,
        routing: a.routing,
        uplink: a.uplink,
        masquerade: a.masquerade,
        nat_ports: a.nat_ports,
        attach_mode: parse_mode("--attach-mode", &a.attach_mode)?,
        pod_attach_mode: parse_mode("--pod-attach-mode", &a.pod_attach_mode)?,
        policy_map_size: a.policy_map_size,
        ct_map_size: a.ct_map_size,
        ct_fail_open: a.ct_fail_open,
        policy_fail_open: a.policy_fail_open,
        housekeeping_interval: std::time::Duration::from_secs(a.housekeeping_interval.max(1)),
        identity_gc_grace: std::time::Duration::from_secs(a.identity_gc_grace),
        events: a.events,
        event_ring_bytes: a.event_ring_size,
        event_report_interval: std::time::Duration::from_millis(a.event_report_interval_ms),
        flow_buffer_size: a.flow_buffer_size,
        metrics_addr: sinew_agent::metrics::parse_addr(&a.metrics_addr)?,
        bpf_stats: a.bpf_stats,
        cgroup_root: a.cgroup_root,
        lb_algorithm: a.lb_algorithm,
        maglev_table_size: a.maglev_table_size,
        maglev_services: a.maglev_services,
        proxy_ports: a.proxy_ports,
        proxy_socket: a.proxy_socket,
        proxy_binary: a.proxy_binary,
        test_link_removal_delay: std::time::Duration::from_millis(a.test_link_removal_delay_ms),
        encryption: sinew_agent::encryption::Settings {
            mode: a.encryption,
            encrypt_node: a.encrypt_node,
            port: a.wireguard_port,
            queues: a.wireguard_queues,
            implementation: a.wireguard_implementation,
            ipsec_grace: std::time::Duration::from_secs(a.ipsec_key_grace),
            ipsec_keys_secret: a.ipsec_keys_secret,
        },
    };
    // The control plane is small; two workers keep it off the datapath's CPUs.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(daemon::run(cfg))
}
