//! Benchmark of ClusterIP service load balancing (issue 5): what a new
//! connection to one service costs with 0, 1,000 and 10,000 other services,
//! through Sinew's socket-level load balancer and through the two shapes of
//! kube-proxy, against connecting to the pod address directly.
//!
//! Arms, all measured alternately within each repetition:
//! - **direct**: a plain routed client pod connects to the backend pod's
//!   address, no NAT (the upper bound of the baseline topology);
//! - **iptables N**: its own routed client pod whose nat OUTPUT chain has
//!   kube-proxy's iptables-mode shape for N other services plus the
//!   measured one, which comes **last** in the services chain (the worst
//!   case: every other service's rule is tried first);
//! - **nftables N**: its own client pod with kube-proxy's nftables-mode
//!   shape, one verdict map keyed by address, protocol and port;
//! - **sinew pod IP** and **sinew N**: a one-node Sinew lab whose client
//!   pod connects to the backend pod's address, and to the ClusterIP with
//!   N other Services and EndpointSlices in the lab's datastore.
//!
//! The client runs as a separate process (this program's hidden
//! `svc-client` command) in every arm: Sinew rewrites `connect()` in a
//! cgroup hook, so the Sinew client must be a process the lab places in the
//! node's cgroup ([`Lab::exec_output`]), and the baselines run theirs the
//! same way so that no arm differs in how its client is started. Timing
//! happens inside the client, so the process start is not measured.
//!
//! The rule and manifest generators are plain functions over
//! [`ServiceSpec`]s, tested without privileges; loading and measuring
//! happen in [`run`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sinew_testvms::datastore;
use sinew_testvms::lab::{Lab, Routing};
use sinew_testvms::netns::{command_in, NetnsError};
use sinew_testvms::NetNs;

use crate::envs::{self, lab_up, BaselineEnv, LabPods};
use crate::idle;
use crate::iperf::{self, IperfServer};
use crate::report::{Better, Report, Row};
use crate::rr::{self, RrConfig, RrError};
use crate::scenarios::{lab_spec, scenario_start, Options, ScenarioError};
use crate::stats::Samples;

/// Default numbers of other services.
pub const DEFAULT_SIZES: [usize; 3] = [0, 1_000, 10_000];
/// The measured service's ClusterIP (inside 10.96.0.0/12).
pub const MEASURED_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Other services get consecutive ClusterIPs from here on (10.97.0.1, ...).
const OTHER_VIP_BASE: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 0);
/// Other services' endpoints: addresses nobody answers on, never reached.
const OTHER_EP_BASE: Ipv4Addr = Ipv4Addr::new(10, 245, 0, 0);
/// Target port of other services' endpoints.
const OTHER_TARGET_PORT: u16 = 8080;
/// The pod network; connections from outside it get the masquerade mark.
const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Service port of the request/response test.
pub const RR_SERVICE_PORT: u16 = 80;
/// Port of the request/response server in the backend pod.
const RR_TARGET_PORT: u16 = 7001;
/// Service port and target port of iperf3.
const IPERF_PORT: u16 = 5201;
/// The mark kube-proxy uses for "masquerade this".
const MASQ_MARK: u32 = 0x4000;
/// Connect timeout of every client connection during measurements.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connect timeout of the probe that checks whether a ClusterIP answers.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// How long the probe keeps trying the measured service before concluding
/// that the agent does not load-balance services (the datastore is polled
/// every 50 ms).
const SUPPORT_WAIT: Duration = Duration::from_secs(5);
/// Longest wait for the agent to take in (or drop) N other services.
const SWITCH_WAIT: Duration = Duration::from_secs(120);
/// Datastore file of the measured service.
const MEASURED_FILE: &str = "services/bench-measured.yaml";
/// Datastore file of the other services (one batch of documents).
const OTHERS_FILE: &str = "services/bench-others.yaml";
/// Kubernetes namespace of every service.
const SVC_NAMESPACE: &str = "default";

/// Errors of the services benchmark.
#[derive(Debug, thiserror::Error)]
pub enum ServicesBenchError {
    /// `--services` was not a list of numbers.
    #[error("--services {value:?}: {reason}")]
    Sizes {
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Loading a ruleset into a client namespace failed.
    #[error("loading the {what} ruleset ({services} services) into {netns}: {reason}")]
    Load {
        /// `iptables` or `nftables`.
        what: &'static str,
        /// Services in the ruleset.
        services: usize,
        /// Namespace.
        netns: String,
        /// The tool's complaint.
        reason: String,
    },
    /// The client process failed or printed nothing usable.
    #[error("{arm}: client {argv}: {reason}")]
    Client {
        /// Which arm.
        arm: String,
        /// The command line.
        argv: String,
        /// Why.
        reason: String,
    },
    /// A datastore file could not be written or removed.
    #[error("sinew datastore: {0}")]
    Datastore(String),
    /// The agent did not take in a change of the service count in time.
    #[error("sinew: {reason}")]
    Switch {
        /// What did not happen.
        reason: String,
    },
}

impl From<ServicesBenchError> for ScenarioError {
    fn from(e: ServicesBenchError) -> Self {
        ScenarioError::Step(Box::new(e))
    }
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name (`rr`, `iperf`, `http`).
    pub name: String,
    /// The service port clients connect to.
    pub port: u16,
    /// The endpoint's port.
    pub target_port: u16,
}

/// A ClusterIP service with one ready endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Service name.
    pub name: String,
    /// ClusterIP.
    pub vip: Ipv4Addr,
    /// Ports (TCP).
    pub ports: Vec<ServicePort>,
    /// The one endpoint's address.
    pub endpoint: Ipv4Addr,
}

fn nth_addr(base: Ipv4Addr, i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + 1 + i as u32)
}

/// `others` other services followed by the measured one, whose endpoint is
/// `backend` and whose ports are the request/response and iperf3 ports.
/// Other services have one port (80) and an endpoint nobody answers on;
/// when `canary` is set, the last other service points at `backend` on the
/// request/response port instead, so that a connection to it shows that
/// the whole batch has been taken in.
pub fn bench_services(others: usize, backend: Ipv4Addr, canary: bool) -> Vec<ServiceSpec> {
    assert!(others < 1 << 20, "other services must fit in 10.97.0.0/12");
    let mut v: Vec<ServiceSpec> = (0..others)
        .map(|i| {
            let is_canary = canary && i + 1 == others;
            ServiceSpec {
                name: format!("other-{i}"),
                vip: nth_addr(OTHER_VIP_BASE, i),
                ports: vec![ServicePort {
                    name: "http".into(),
                    port: RR_SERVICE_PORT,
                    target_port: if is_canary { RR_TARGET_PORT } else { OTHER_TARGET_PORT },
                }],
                endpoint: if is_canary { backend } else { nth_addr(OTHER_EP_BASE, i) },
            }
        })
        .collect();
    v.push(measured_service(backend));
    v
}

/// The measured service alone.
pub fn measured_service(backend: Ipv4Addr) -> ServiceSpec {
    ServiceSpec {
        name: "bench".into(),
        vip: MEASURED_VIP,
        // The request/response port last: it is the one whose lookup is
        // measured, so it is the very last rule of the services chain.
        ports: vec![
            ServicePort {
                name: "iperf".into(),
                port: IPERF_PORT,
                target_port: IPERF_PORT,
            },
            ServicePort {
                name: "rr".into(),
                port: RR_SERVICE_PORT,
                target_port: RR_TARGET_PORT,
            },
        ],
        endpoint: backend,
    }
}

/// The ClusterIP of other service `i` (0-based).
pub fn other_vip(i: usize) -> Ipv4Addr {
    nth_addr(OTHER_VIP_BASE, i)
}

/// Chains of the iptables ruleset: the services chain, the mark chain, and
/// one service chain and one endpoint chain per service port.
pub fn iptables_chain_count(services: &[ServiceSpec]) -> usize {
    2 + 2 * services.iter().map(|s| s.ports.len()).sum::<usize>()
}

/// An `iptables-restore` input for the nat table in kube-proxy's
/// iptables-mode shape: OUTPUT jumps to a services chain holding one
/// `-d VIP/32 -p tcp --dport P` rule per service port, in the order given;
/// each jumps to that port's service chain (masquerade mark for sources
/// outside the pod network, then the endpoint chain), and the endpoint
/// chain DNATs. Services come in the order given, so the last one is found
/// after every other rule has been tried.
pub fn iptables_restore(services: &[ServiceSpec]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    let mut k = 0usize;
    let _ = writeln!(chains, "*nat\n:BENCH-SERVICES - [0:0]\n:BENCH-MARK-MASQ - [0:0]");
    let _ = writeln!(
        rules,
        "-A OUTPUT -m comment --comment \"bench service portals\" -j BENCH-SERVICES\n\
         -A BENCH-MARK-MASQ -j MARK --set-xmark {MASQ_MARK:#x}/{MASQ_MARK:#x}"
    );
    let mut services_chain = String::new();
    for s in services {
        for p in &s.ports {
            let (svc, sep) = (format!("BENCH-SVC-{k:06}"), format!("BENCH-SEP-{k:06}"));
            let what = format!("{SVC_NAMESPACE}/{}:{}", s.name, p.name);
            let _ = writeln!(chains, ":{svc} - [0:0]\n:{sep} - [0:0]");
            let _ = writeln!(
                services_chain,
                "-A BENCH-SERVICES -d {}/32 -p tcp -m comment --comment \"{what} cluster IP\" -m tcp --dport {} -j {svc}",
                s.vip, p.port
            );
            let _ = writeln!(
                rules,
                "-A {svc} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m comment --comment \"{what} cluster IP\" -m tcp --dport {} -j BENCH-MARK-MASQ\n\
                 -A {svc} -m comment --comment \"{what} -> {}:{}\" -j {sep}\n\
                 -A {sep} -s {}/32 -m comment --comment \"{what}\" -j BENCH-MARK-MASQ\n\
                 -A {sep} -p tcp -m comment --comment \"{what}\" -m tcp -j DNAT --to-destination {}:{}",
                s.vip, p.port, s.endpoint, p.target_port, s.endpoint, s.endpoint, p.target_port
            );
            k += 1;
        }
    }
    chains + &rules + &services_chain + "COMMIT\n"
}

/// Name of the nftables table.
pub const NFT_TABLE: &str = "bench-services";

/// Per-port chains of the nftables ruleset (a service chain and an
/// endpoint chain each) plus the three fixed ones (output hook, services
/// lookup, masquerade mark).
pub fn nft_chain_count(services: &[ServiceSpec]) -> usize {
    3 + 2 * services.iter().map(|s| s.ports.len()).sum::<usize>()
}

/// An `nft -f` input in kube-proxy's nftables-mode shape: the nat output
/// hook jumps to a services chain with a single lookup,
/// `ip daddr . meta l4proto . th dport vmap @service-ips`, whose entries
/// go to one chain per service port (masquerade mark for sources outside
/// the pod network, then a random pick among endpoints, here one), and
/// each endpoint chain DNATs. The lookup is a hash, so the order of
/// services does not matter.
pub fn nft_ruleset(services: &[ServiceSpec]) -> String {
    let mut y = String::with_capacity(200 + services.len() * 400);
    let _ = writeln!(y, "table ip {NFT_TABLE} {{");
    let _ = writeln!(
        y,
        "\tchain mark-for-masquerade {{\n\t\tmeta mark set meta mark | {MASQ_MARK:#x}\n\t}}"
    );
    let mut elements = Vec::new();
    let mut k = 0usize;
    for s in services {
        for p in &s.ports {
            let (svc, ep) = (format!("service-{k:06}"), format!("endpoint-{k:06}"));
            let _ = writeln!(
                y,
                "\tchain {ep} {{\n\t\tip saddr {e} jump mark-for-masquerade\n\t\tmeta l4proto tcp dnat to {e}:{t}\n\t}}",
                e = s.endpoint,
                t = p.target_port
            );
            let _ = writeln!(
                y,
                "\tchain {svc} {{\n\t\tip daddr {v} tcp dport {port} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n\t\tnumgen random mod 1 vmap {{ 0 : goto {ep} }}\n\t}}",
                v = s.vip,
                port = p.port
            );
            elements.push(format!("{} . tcp . {} : goto {svc}", s.vip, p.port));
            k += 1;
        }
    }
    let _ = writeln!(
        y,
        "\tmap service-ips {{\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict"
    );
    if !elements.is_empty() {
        let _ = writeln!(y, "\t\telements = {{ {} }}", elements.join(",\n\t\t\t"));
    }
    let _ = writeln!(y, "\t}}");
    let _ = writeln!(
        y,
        "\tchain services {{\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t}}\n\
         \tchain nat-output {{\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}}\n}}"
    );
    y
}

fn q(s: &str) -> String {
    serde_json::to_string(s).expect("strings always serialise")
}

/// Kubernetes manifests for `services`: for each, a core/v1 Service of
/// type ClusterIP and a discovery.k8s.io/v1 EndpointSlice with its one
/// ready endpoint on `node`, as one multi-document YAML text.
pub fn k8s_yaml(services: &[ServiceSpec], node: &str) -> String {
    let mut y = String::with_capacity(services.len() * 700);
    for s in services {
        let name = q(&s.name);
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  type: ClusterIP\n  clusterIP: \"{v}\"\n  clusterIPs: [\"{v}\"]\n  ports:\n",
            ns = q(SVC_NAMESPACE),
            v = s.vip
        );
        for p in &s.ports {
            let _ = write!(
                y,
                "    - name: {}\n      protocol: TCP\n      port: {}\n      targetPort: {}\n",
                q(&p.name),
                p.port,
                p.target_port
            );
        }
        let _ = write!(
            y,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {slice}\n  namespace: {ns}\n  labels:\n    \"kubernetes.io/service-name\": {name}\naddressType: IPv4\nendpoints:\n  - addresses: [\"{e}\"]\n    conditions: {{ready: true, serving: true, terminating: false}}\n    nodeName: {node}\nports:\n",
            slice = q(&format!("{}-bench", s.name)),
            ns = q(SVC_NAMESPACE),
            e = s.endpoint,
            node = q(node),
        );
        // Named like the service port, with the endpoint's port number:
        // the service port's targetPort must resolve to it.
        for p in &s.ports {
            let _ = write!(
                y,
                "  - name: {}\n    port: {}\n    protocol: TCP\n",
                q(&p.name),
                p.target_port
            );
        }
    }
    y
}

/// Parses `--services`: comma-separated counts of other services.
pub fn parse_sizes(value: &str) -> Result<Vec<usize>, ServicesBenchError> {
    let err = |reason: String| ServicesBenchError::Sizes {
        value: value.to_owned(),
        reason,
    };
    let mut v = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let n: usize = part
            .replace('_', "")
            .parse()
            .map_err(|e| err(format!("{part:?} is not a count ({e})")))?;
        if n > 50_000 {
            return Err(err(format!("{n} is more than 50000 services")));
        }
        if v.contains(&n) {
            return Err(err(format!("{n} is given twice")));
        }
        v.push(n);
    }
    if v.is_empty() {
        return Err(err("no counts".into()));
    }
    Ok(v)
}

// ---- the client process ---------------------------------------------------

/// What the hidden `svc-client` command does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientMode {
    /// TCP_CRR with first-byte latency for `--duration` seconds.
    Crr,
    /// Try until a 1-byte exchange succeeds, at most `--duration` seconds.
    WaitAnswer,
    /// Try until a connection fails, at most `--duration` seconds.
    WaitSilent,
}

/// Arguments of the hidden `svc-client` command.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Address to connect to.
    #[arg(long)]
    pub addr: SocketAddr,
    /// What to do.
    #[arg(long, value_enum)]
    pub mode: ClientMode,
    /// Connect timeout in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// One line of JSON the client prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientOutput {
    /// Set in `crr` mode.
    pub crr: Option<rr::CrrFirstByte>,
    /// Whether the wait modes saw what they waited for.
    pub reached: bool,
    /// Milliseconds the wait took.
    pub waited_ms: f64,
    /// The last connection error, if any.
    pub last_error: Option<String>,
}

/// The `svc-client` command: runs in the caller's network namespace and
/// cgroup and prints one [`ClientOutput`] as JSON.
pub fn client_main(args: &ClientArgs, duration: Duration) -> Result<String, RrError> {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let out = match args.mode {
        ClientMode::Crr => {
            let cfg = RrConfig {
                message_size: 1,
                duration,
            };
            ClientOutput {
                crr: Some(rr::tcp_crr_first_byte(args.addr, cfg, timeout)?),
                reached: true,
                waited_ms: 0.0,
                last_error: None,
            }
        }
        ClientMode::WaitAnswer | ClientMode::WaitSilent => {
            let want_answer = args.mode == ClientMode::WaitAnswer;
            let t0 = Instant::now();
            let mut last_error = None;
            let reached = loop {
                let r = exchange(args.addr, timeout);
                let answered = r.is_ok();
                last_error = r.err().map(|e| e.to_string()).or(last_error);
                if answered == want_answer {
                    break true;
                }
                if t0.elapsed() >= duration {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            ClientOutput {
                crr: None,
                reached,
                waited_ms: t0.elapsed().as_secs_f64() * 1e3,
                last_error,
            }
        }
    };
    Ok(serde_json::to_string(&out).expect("plain data serialises"))
}

/// One connection with a 1-byte request and response.
fn exchange(addr: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    use std::io::Read as _;
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(&[1])?;
    let mut b = [0u8; 1];
    match s.read(&mut b)? {
        1 => Ok(()),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without a reply",
        )),
    }
}

// ---- arms and measurements ------------------------------------------------

/// Where an arm's client process runs.
enum Runner<'a> {
    /// A plain namespace (baseline pods).
    Netns(NetNs),
    /// A Sinew lab pod, through the lab's exec helper.
    Pod { lab: &'a Lab, pod: String },
}

impl Runner<'_> {
    /// Runs the client on the client's CPU ([`crate::cpu`]).
    fn output(&self, argv: &[String]) -> Result<Output, String> {
        crate::cpu::on(crate::cpu::Role::Client, || self.output_unpinned(argv))
    }

    fn output_unpinned(&self, argv: &[String]) -> Result<Output, String> {
        match self {
            Runner::Netns(ns) => {
                let mut cmd = command_in(ns, &argv[0]).map_err(|e| e.to_string())?;
                cmd.args(&argv[1..]).stdin(Stdio::null());
                cmd.output().map_err(|e| e.to_string())
            }
            Runner::Pod { lab, pod } => lab.exec_output(pod, argv).map_err(|e| e.to_string()),
        }
    }
}

/// One arm: a client and the addresses it connects to.
struct Arm<'a> {
    label: String,
    runner: Runner<'a>,
    rr: SocketAddr,
    iperf: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Metric {
    CrrRate,
    FirstP50,
    FirstP99,
    Tput1,
}

impl Metric {
    const CRR: [Metric; 3] = [Metric::CrrRate, Metric::FirstP50, Metric::FirstP99];

    fn name(self) -> &'static str {
        match self {
            Metric::CrrRate => "TCP_CRR rate",
            Metric::FirstP50 => "first byte p50",
            Metric::FirstP99 => "first byte p99",
            Metric::Tput1 => "iperf3 -P1",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Metric::CrrRate => "conn/s",
            Metric::Tput1 => "Gbit/s",
            _ => "us",
        }
    }

    fn better(self) -> Better {
        match self {
            Metric::CrrRate | Metric::Tput1 => Better::Higher,
            _ => Better::Lower,
        }
    }
}

type Measured = BTreeMap<Metric, Samples>;

impl Arm<'_> {
    fn client(
        &self,
        exe: &str,
        addr: SocketAddr,
        mode: &str,
        secs: f64,
        timeout: Duration,
    ) -> Result<ClientOutput, ServicesBenchError> {
        let argv: Vec<String> = vec![
            exe.to_owned(),
            "svc-client".into(),
            "--addr".into(),
            addr.to_string(),
            "--mode".into(),
            mode.into(),
            "--duration".into(),
            format!("{secs}"),
            "--timeout-ms".into(),
            timeout.as_millis().to_string(),
        ];
        let err = |reason: String| ServicesBenchError::Client {
            arm: self.label.clone(),
            argv: argv.join(" "),
            reason,
        };
        let out = self.runner.output(&argv).map_err(&err)?;
        if !out.status.success() {
            return Err(err(format!(
                "exit {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            err(format!(
                "unreadable output ({e}): {}",
                String::from_utf8_lossy(&out.stdout).trim()
            ))
        })
    }

    fn crr(&self, exe: &str, duration: Duration, into: &mut Measured) -> Result<(), ScenarioError> {
        let out = self
            .client(exe, self.rr, "crr", duration.as_secs_f64(), CONNECT_TIMEOUT)
            .map_err(or_interrupted)?;
        let c = out.crr.ok_or_else(|| ServicesBenchError::Client {
            arm: self.label.clone(),
            argv: "svc-client --mode crr".into(),
            reason: "no TCP_CRR result".into(),
        })?;
        let mut put = |m: Metric, v: f64| into.entry(m).or_default().push(v);
        put(Metric::CrrRate, c.crr.rate);
        put(Metric::FirstP50, c.first_byte_p50_us);
        put(Metric::FirstP99, c.first_byte_p99_us);
        Ok(())
    }

    fn iperf(&self, duration: Duration, into: &mut Measured) -> Result<(), ScenarioError> {
        let secs = duration.as_secs_f64().round().max(1.0) as u32;
        let argv: Vec<String> = [
            "iperf3",
            "-c",
            &self.iperf.ip().to_string(),
            "-p",
            &self.iperf.port().to_string(),
            "-t",
            &secs.to_string(),
            "-P",
            "1",
            "-J",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let err = |reason: String| ServicesBenchError::Client {
            arm: self.label.clone(),
            argv: argv.join(" "),
            reason,
        };
        let out = self.runner.output(&argv).map_err(&err).map_err(or_interrupted)?;
        let bps = iperf::parse_bits_per_second(&String::from_utf8_lossy(&out.stdout))
            .map_err(|reason| {
                err(format!(
                    "{reason}; exit {}; stderr: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            })
            .map_err(or_interrupted)?;
        into.entry(Metric::Tput1).or_default().push(bps / 1e9);
        Ok(())
    }

    /// Whether the ClusterIP-side address answers within `max`.
    fn wait(
        &self,
        exe: &str,
        addr: SocketAddr,
        answer: bool,
        max: Duration,
    ) -> Result<ClientOutput, ServicesBenchError> {
        let mode = if answer { "wait-answer" } else { "wait-silent" };
        self.client(exe, addr, mode, max.as_secs_f64(), PROBE_TIMEOUT)
    }
}

/// A client killed by Ctrl-C (it shares the terminal's process group) is
/// reported as the interruption, not as a failed measurement.
fn or_interrupted(e: ServicesBenchError) -> ScenarioError {
    match idle::check_interrupted() {
        Err(i) => i.into(),
        Ok(()) => e.into(),
    }
}

/// A request/response server and an iperf3 server in a backend pod.
struct Backend {
    _rr: rr::Server,
    _iperf: IperfServer,
}

impl Backend {
    fn start(label: &str, netns: &NetNs, ip: IpAddr) -> Result<Self, ScenarioError> {
        envs::tune_for_crr(netns)?;
        let addr = SocketAddr::new(ip, RR_TARGET_PORT);
        let rr_err = |source| ScenarioError::Rr {
            label: label.to_owned(),
            source,
        };
        let listener = netns
            .run(|| TcpListener::bind(addr))?
            .map_err(|source| rr_err(RrError::Bind { addr, source }))?;
        let rr = rr::Server::start(listener, 1).map_err(rr_err)?;
        let iperf = IperfServer::start(netns, ip, IPERF_PORT).map_err(|source| ScenarioError::Iperf {
            label: label.to_owned(),
            source,
        })?;
        Ok(Self { _rr: rr, _iperf: iperf })
    }
}

fn load_with_stdin(
    netns: &NetNs,
    argv: &[&str],
    input: &str,
    what: &'static str,
    services: usize,
) -> Result<Duration, ServicesBenchError> {
    let err = |reason: String| ServicesBenchError::Load {
        what,
        services,
        netns: netns.name().to_owned(),
        reason,
    };
    let mut cmd = command_in(netns, argv[0]).map_err(|e: NetnsError| err(e.to_string()))?;
    cmd.args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|e| err(format!("cannot run {}: {e}", argv[0])))?;
    let mut stdin = child.stdin.take().expect("piped");
    // A writer thread: the tool may print before it has read all its input.
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    let took = t0.elapsed();
    let wrote = writer.join().unwrap_or(Ok(()));
    if !out.status.success() {
        return Err(err(format!(
            "{} exited with {}: {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    wrote.map_err(|e| err(format!("writing the ruleset: {e}")))?;
    Ok(took)
}

/// Loads the iptables ruleset for `services` into `netns`'s nat table.
pub fn load_iptables(netns: &NetNs, services: &[ServiceSpec]) -> Result<Duration, ServicesBenchError> {
    load_with_stdin(
        netns,
        &["iptables-restore", "-w", "5"],
        &iptables_restore(services),
        "iptables",
        services.len(),
    )
}

/// Loads the nftables ruleset for `services` into `netns`.
pub fn load_nft(netns: &NetNs, services: &[ServiceSpec]) -> Result<Duration, ServicesBenchError> {
    load_with_stdin(
        netns,
        &["nft", "-f", "-"],
        &nft_ruleset(services),
        "nftables",
        services.len(),
    )
}

/// The Sinew side: one lab, its client and backend, and the service count
/// the agent currently has.
struct SinewSide<'a> {
    datastore: PathBuf,
    node: String,
    backend: Ipv4Addr,
    exe: String,
    /// The ClusterIP arm.
    vip: Arm<'a>,
    current: usize,
}

impl SinewSide<'_> {
    /// Makes the datastore hold `n` other services and waits until the
    /// agent has taken them in: the last of them (the canary) answers, or
    /// for 0, the previous canary stops answering.
    fn set_size(&mut self, n: usize) -> Result<Duration, ScenarioError> {
        if n == self.current {
            return Ok(Duration::ZERO);
        }
        let path = self.datastore.join(OTHERS_FILE);
        let t0 = Instant::now();
        let (addr, answer) = if n == 0 {
            datastore::remove(&path).map_err(|e| ServicesBenchError::Datastore(e.to_string()))?;
            (
                SocketAddr::new(other_vip(self.current - 1).into(), RR_SERVICE_PORT),
                false,
            )
        } else {
            let mut others = bench_services(n, self.backend, true);
            others.pop(); // the measured service has its own file
            datastore::write_atomic(&path, &k8s_yaml(&others, &self.node))
                .map_err(|e| ServicesBenchError::Datastore(e.to_string()))?;
            (SocketAddr::new(other_vip(n - 1).into(), RR_SERVICE_PORT), true)
        };
        let w = self.vip.wait(&self.exe, addr, answer, SWITCH_WAIT)?;
        if !w.reached {
            return Err(ServicesBenchError::Switch {
                reason: format!(
                    "after {} s the agent has not taken in {n} other services (canary {addr} {}; last error: {})",
                    SWITCH_WAIT.as_secs(),
                    if answer { "does not answer" } else { "still answers" },
                    w.last_error.unwrap_or_default()
                ),
            }
            .into());
        }
        self.current = n;
        Ok(t0.elapsed())
    }
}

fn row(scenario: String, m: Metric, baseline: &str, b: Samples, s: Samples) -> Row {
    Row {
        scenario,
        metric: m.name().to_owned(),
        unit: m.unit(),
        better: m.better(),
        baseline: baseline.to_owned(),
        baseline_samples: b,
        sinew_samples: s,
    }
}

fn current_exe() -> Result<String, ScenarioError> {
    std::env::current_exe()
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|e| {
            ServicesBenchError::Client {
                arm: "-".into(),
                argv: "-".into(),
                reason: format!("cannot find this program for the client process: {e}"),
            }
            .into()
        })
}

fn tool_version(argv: &[&str]) -> String {
    std::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{} not found", argv[0]))
}

/// The services benchmark with `sizes` other services.
pub fn run(sizes: &[usize], opts: &Options, report: &mut Report) -> Result<(), ScenarioError> {
    const NAME: &str = "services";
    scenario_start(&format!("{NAME} ({sizes:?} other services)"), opts, report)?;
    let exe = current_exe()?;
    let ipt_version = tool_version(&["iptables", "--version"]);
    report.notes.push(format!(
        "{NAME}: iptables arm: {ipt_version}; the measured service's rule is the last of the services chain (worst case); \
         each service has one endpoint"
    ));

    // Baseline: one node; pod 0 the backend, pod 1 the direct client, then
    // one client pod per size for iptables and one for nftables.
    eprintln!(
        "  building the routed baseline with {} client pods",
        1 + 2 * sizes.len()
    );
    let placement = vec![1u32; 2 + 2 * sizes.len()];
    let base = BaselineEnv::create(&format!("{}-b", opts.prefix), 1, &placement, Routing::Native)?;
    let (b_ns, b_ip) = base.pod(0);
    let IpAddr::V4(b_ip4) = b_ip else {
        unreachable!("baseline pods are IPv4")
    };
    let _base_backend = Backend::start("baseline backend", &b_ns, b_ip)?;
    let direct_rr = SocketAddr::new(b_ip, RR_TARGET_PORT);
    let direct_iperf = SocketAddr::new(b_ip, IPERF_PORT);
    let vip_rr = SocketAddr::V4(SocketAddrV4::new(MEASURED_VIP, RR_SERVICE_PORT));
    let vip_iperf = SocketAddr::V4(SocketAddrV4::new(MEASURED_VIP, IPERF_PORT));
    let client_arm = |label: String, i: usize, rr, iperf| -> Result<(NetNs, Arm<'static>), ScenarioError> {
        let (ns, _) = base.pod(i);
        envs::tune_for_crr(&ns)?;
        let arm = Arm {
            label,
            runner: Runner::Netns(ns.clone()),
            rr,
            iperf,
        };
        Ok((ns, arm))
    };
    let mut loaded = |tool: &str, n: usize, took: Duration| {
        let line = format!("{NAME}: {tool} of {} services took {:.2} s", n + 1, took.as_secs_f64());
        eprintln!("  {line}");
        report.notes.push(line);
    };
    let (_, direct) = client_arm("direct".into(), 1, direct_rr, direct_iperf)?;
    let mut ipt = Vec::new();
    let mut nft = Vec::new();
    for (k, &n) in sizes.iter().enumerate() {
        idle::check_interrupted()?;
        let services = bench_services(n, b_ip4, false);
        let (ns, arm) = client_arm(format!("iptables {n}"), 2 + k, vip_rr, vip_iperf)?;
        loaded("iptables-restore", n, load_iptables(&ns, &services)?);
        ipt.push(arm);
        let (ns, arm) = client_arm(format!("nftables {n}"), 2 + sizes.len() + k, vip_rr, vip_iperf)?;
        loaded("nft -f", n, load_nft(&ns, &services)?);
        nft.push(arm);
    }

    // Sinew: one node, pod 0 the backend, pod 1 the client.
    eprintln!("  bringing up a sinew lab");
    let guard = lab_up(&lab_spec(opts, 1, 2, Routing::Native), &opts.binaries, opts.verbose)?;
    let lab = guard.lab();
    let (s_ns, s_ip) = guard.pod(0)?;
    let (c_ns, _) = guard.pod(1)?;
    envs::tune_for_crr(&c_ns)?;
    let IpAddr::V4(s_ip4) = s_ip else {
        unreachable!("pod() returns IPv4")
    };
    let _sinew_backend = Backend::start("sinew backend", &s_ns, s_ip)?;
    let client_pod = lab.pods()[1].name.clone();
    let node = lab.pods()[0].node.clone();
    let sinew_direct = Arm {
        label: "sinew pod IP".into(),
        runner: Runner::Pod {
            lab,
            pod: client_pod.clone(),
        },
        rr: SocketAddr::new(s_ip, RR_TARGET_PORT),
        iperf: SocketAddr::new(s_ip, IPERF_PORT),
    };
    let datastore_dir = lab.datastore_dir();
    datastore::write_atomic(
        &datastore_dir.join(MEASURED_FILE),
        &k8s_yaml(&[measured_service(s_ip4)], &node),
    )
    .map_err(|e| ServicesBenchError::Datastore(e.to_string()))?;
    let mut sinew = SinewSide {
        datastore: datastore_dir,
        node,
        backend: s_ip4,
        exe: exe.clone(),
        vip: Arm {
            label: "sinew".into(),
            runner: Runner::Pod { lab, pod: client_pod },
            rr: vip_rr,
            iperf: vip_iperf,
        },
        current: 0,
    };
    // Every arm must work before anything is measured.
    for a in [&direct, &sinew_direct].into_iter().chain(&ipt).chain(&nft) {
        let w = a.wait(&exe, a.rr, true, Duration::from_secs(2))?;
        if !w.reached {
            return Err(ServicesBenchError::Client {
                arm: a.label.clone(),
                argv: format!("svc-client --addr {}", a.rr),
                reason: format!("no answer: {}", w.last_error.unwrap_or_default()),
            }
            .into());
        }
    }
    let w = sinew.vip.wait(&exe, vip_rr, true, SUPPORT_WAIT)?;
    let sinew_ok = w.reached;
    if !sinew_ok {
        let n = format!(
            "sinew: services not supported by this agent (ClusterIP {vip_rr} did not answer within {} s: {}); \
             measuring the baselines only",
            SUPPORT_WAIT.as_secs(),
            w.last_error.unwrap_or_default()
        );
        eprintln!("  {n}");
        report.notes.push(n);
    }

    // Per size: [direct, sinew pod IP, iptables N, nftables N, sinew N].
    let mut m: Vec<[Measured; 5]> = vec![Default::default(); sizes.len()];
    let mut iperf_m: [Measured; 5] = Default::default();
    // Seconds from rewriting the datastore to the agent answering with the
    // new set of services, per size switched to.
    let mut switched: BTreeMap<usize, Samples> = BTreeMap::new();
    for rep in 1..=opts.reps {
        for (k, &n) in sizes.iter().enumerate() {
            idle::check_interrupted()?;
            if sinew_ok {
                let from = sinew.current;
                let took = sinew.set_size(n)?;
                if from != n {
                    eprintln!("  sinew took in {n} other services in {:.2} s", took.as_secs_f64());
                    switched.entry(n).or_default().push(took.as_secs_f64());
                }
            }
            let w = idle::wait_for_idle(opts.idle_wait_rep)?;
            if let Some(note) = w.note(&format!("{NAME} {n} rep {rep}")) {
                eprintln!("  {note}");
                report.notes.push(note);
            }
            let arms: [Option<&Arm<'_>>; 5] = [
                Some(&direct),
                Some(&sinew_direct),
                Some(&ipt[k]),
                Some(&nft[k]),
                sinew_ok.then_some(&sinew.vip),
            ];
            // Each repetition starts with the next arm, so that no arm is
            // always the one measured right after a switch or an idle wait.
            let order: Vec<usize> = (0..arms.len()).map(|j| (j + rep as usize - 1) % arms.len()).collect();
            for &i in &order {
                let Some(a) = arms[i] else { continue };
                idle::check_interrupted()?;
                eprintln!("  {NAME} {n}: rep {rep}/{}: TCP_CRR on {}", opts.reps, a.label);
                a.crr(&exe, opts.duration, &mut m[k][i])?;
            }
            if n == 0 {
                for &i in &order {
                    let Some(a) = arms[i] else { continue };
                    idle::check_interrupted()?;
                    eprintln!("  {NAME} {n}: rep {rep}/{}: iperf3 -P1 on {}", opts.reps, a.label);
                    a.iperf(opts.duration, &mut iperf_m[i])?;
                }
            }
        }
    }
    // Leave the datastore as the lab started, so `down` has less to read.
    if sinew_ok && sinew.current != 0 {
        let _ = datastore::remove(&sinew.datastore.join(OTHERS_FILE));
    }

    let get = |x: &Measured, metric: Metric| x.get(&metric).cloned().unwrap_or_default();
    // Rows with Sinew through the ClusterIP against each arm of the same
    // block (without Sinew they still show every arm's median), then Sinew
    // without NAT against plain routing, so that the pod-IP baseline can be
    // placed; kube-proxy's arms against direct go into notes.
    for (k, &n) in sizes.iter().enumerate() {
        let [d, sd, it, nf, sv] = &m[k];
        let sc = format!("{NAME} {n}");
        for metric in Metric::CRR {
            for (label, b) in [("sinew pod IP", sd), ("iptables", it), ("nftables", nf)] {
                report
                    .rows
                    .push(row(sc.clone(), metric, label, get(b, metric), get(sv, metric)));
            }
        }
        for metric in Metric::CRR {
            report.rows.push(row(
                format!("{sc} pod IP"),
                metric,
                "direct (routed)",
                get(d, metric),
                get(sd, metric),
            ));
        }
        let ratio =
            |x: &Measured, y: &Measured, metric: Metric| match (get(x, metric).median(), get(y, metric).median()) {
                (Some(a), Some(b)) if b != 0.0 => format!("{:.3}", a / b),
                _ => "-".into(),
            };
        report.notes.push(format!(
            "{sc}: vs direct (no NAT, same block): TCP_CRR rate iptables {} nftables {}, first byte p50 iptables {} nftables {}; \
             sinew vs its pod IP: rate {}, first byte p50 {}",
            ratio(it, d, Metric::CrrRate),
            ratio(nf, d, Metric::CrrRate),
            ratio(it, d, Metric::FirstP50),
            ratio(nf, d, Metric::FirstP50),
            ratio(sv, sd, Metric::CrrRate),
            ratio(sv, sd, Metric::FirstP50),
        ));
    }
    if let Some(k0) = sizes.iter().position(|&n| n == 0) {
        let largest = sizes.iter().enumerate().filter(|(_, &n)| n > 0).max_by_key(|(_, &n)| n);
        if let (true, Some((kmax, &nmax))) = (sinew_ok, largest) {
            let (s0, smax) = (&m[k0][4], &m[kmax][4]);
            for metric in Metric::CRR {
                report.rows.push(row(
                    format!("{NAME} 0->{nmax}"),
                    metric,
                    "sinew 0 services",
                    get(s0, metric),
                    get(smax, metric),
                ));
            }
        }
        let [d, sd, it, nf, sv] = &iperf_m;
        let sc = format!("{NAME} 0");
        let t = Metric::Tput1;
        for (label, b) in [("sinew pod IP", sd), ("iptables", it), ("nftables", nf)] {
            report.rows.push(row(sc.clone(), t, label, get(b, t), get(sv, t)));
        }
        report
            .rows
            .push(row(format!("{sc} pod IP"), t, "direct (routed)", get(d, t), get(sd, t)));
    }
    for (n, took) in switched {
        report.rows.push(Row {
            scenario: format!("{NAME} {n}"),
            metric: "datastore write -> in force".into(),
            unit: "s",
            better: Better::Lower,
            baseline: String::new(),
            baseline_samples: Samples::default(),
            sinew_samples: took,
        });
    }
    drop(sinew);
    drop(guard);
    drop(base);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 101);

    #[test]
    fn services_are_distinct_and_the_measured_one_is_last() {
        let s = bench_services(3, BACKEND, false);
        assert_eq!(s.len(), 4);
        assert_eq!(s[3].vip, MEASURED_VIP);
        assert_eq!(s[0].vip, Ipv4Addr::new(10, 97, 0, 1));
        assert_eq!(s[2].endpoint, Ipv4Addr::new(10, 245, 0, 3));
        let big = bench_services(10_000, BACKEND, true);
        assert_eq!(big[9_999].vip, other_vip(9_999));
        assert_eq!(other_vip(9_999), Ipv4Addr::new(10, 97, 39, 16));
        // The canary points at the backend.
        assert_eq!(big[9_999].endpoint, BACKEND);
        assert_eq!(big[9_999].ports[0].target_port, RR_TARGET_PORT);
        let mut vips: Vec<_> = big.iter().map(|s| s.vip).collect();
        vips.sort();
        vips.dedup();
        assert_eq!(vips.len(), 10_001);
    }

    #[test]
    fn iptables_ruleset_has_a_chain_pair_per_port_and_the_measured_rule_last() {
        let s = bench_services(3, BACKEND, false);
        let text = iptables_restore(&s);
        let declared = text.lines().filter(|l| l.starts_with(':')).count();
        // 3 services with one port, the measured one with two.
        assert_eq!(declared, 2 + 2 * 5);
        assert_eq!(iptables_chain_count(&s), declared);
        let lookups: Vec<&str> = text.lines().filter(|l| l.starts_with("-A BENCH-SERVICES")).collect();
        assert_eq!(lookups.len(), 5);
        assert!(
            lookups[4].starts_with("-A BENCH-SERVICES -d 10.96.0.10/32 -p tcp") && lookups[4].contains("--dport 80 "),
            "{}",
            lookups[4]
        );
        assert_eq!(text.matches("-j DNAT --to-destination").count(), 5);
        assert!(text.contains("-j DNAT --to-destination 10.244.1.101:7001\n"));
        assert!(text.starts_with("*nat\n") && text.ends_with("COMMIT\n"));
    }

    #[test]
    fn nft_ruleset_has_one_map_entry_and_chain_pair_per_port() {
        let s = bench_services(3, BACKEND, false);
        let text = nft_ruleset(&s);
        assert_eq!(text.matches("\tchain ").count(), nft_chain_count(&s));
        assert_eq!(nft_chain_count(&s), 3 + 2 * 5);
        assert_eq!(text.matches(" : goto service-").count(), 5);
        assert!(text.contains("10.96.0.10 . tcp . 80 : goto service-000004"));
        assert!(text.contains("meta l4proto tcp dnat to 10.244.1.101:7001"));
        assert_eq!(text.matches("vmap @service-ips").count(), 1);
        // No other services: an empty map still parses.
        assert!(!nft_ruleset(&[]).contains("elements"));
    }

    #[test]
    fn manifests_are_kubernetes_services_and_endpoint_slices() {
        use k8s_openapi::api::core::v1::Service;
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        use serde::Deserialize as _;
        let s = bench_services(2, BACKEND, false);
        let y = k8s_yaml(&s, "node1");
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&y)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("{e}\n{y}")))
            .collect();
        assert_eq!(docs.len(), 6);
        let mut services = Vec::new();
        let mut slices = Vec::new();
        for d in docs {
            match d["kind"].as_str() {
                Some("Service") => services.push(serde_yaml::from_value::<Service>(d).unwrap()),
                Some("EndpointSlice") => slices.push(serde_yaml::from_value::<EndpointSlice>(d).unwrap()),
                k => panic!("unexpected kind {k:?}"),
            }
        }
        assert_eq!((services.len(), slices.len()), (3, 3));
        let svc = &services[2];
        let spec = svc.spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        let ports = spec.ports.as_ref().unwrap();
        assert_eq!(ports[1].port, 80);
        assert_eq!(ports[1].protocol.as_deref(), Some("TCP"));
        assert_eq!(
            ports[1].target_port,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(7001))
        );
        let slice = &slices[2];
        assert_eq!(slice.address_type, "IPv4");
        let labels = slice.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["kubernetes.io/service-name"], "bench");
        let ep = &slice.endpoints[0];
        assert_eq!(ep.addresses, vec!["10.244.1.101".to_owned()]);
        assert_eq!(ep.conditions.as_ref().and_then(|c| c.ready), Some(true));
        assert_eq!(ep.node_name.as_deref(), Some("node1"));
        let sp = slice.ports.as_ref().unwrap();
        assert_eq!((sp[1].name.as_deref(), sp[1].port), (Some("rr"), Some(7001)));
    }

    #[test]
    fn client_waits_for_an_answer_and_for_silence() {
        let server = rr::Server::bind("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let run = |addr, mode| {
            let args = ClientArgs {
                addr,
                mode,
                timeout_ms: 200,
            };
            let json = client_main(&args, Duration::from_millis(300)).unwrap();
            serde_json::from_str::<ClientOutput>(&json).unwrap()
        };
        let up = run(server.addr(), ClientMode::WaitAnswer);
        assert!(up.reached && up.last_error.is_none(), "{up:?}");
        assert!(!run(server.addr(), ClientMode::WaitSilent).reached);
        let crr = run(server.addr(), ClientMode::Crr).crr.unwrap();
        assert!(
            crr.crr.transactions > 0 && crr.first_byte_p50_us <= crr.crr.p50_us,
            "{crr:?}"
        );
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let down = run(closed, ClientMode::WaitSilent);
        assert!(down.reached && down.last_error.is_some(), "{down:?}");
        let never = run(closed, ClientMode::WaitAnswer);
        assert!(!never.reached && never.waited_ms >= 300.0, "{never:?}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_sizes("0,1000,10000").unwrap(), vec![0, 1000, 10000]);
        assert_eq!(parse_sizes(" 0, 1_000 ").unwrap(), vec![0, 1000]);
        assert!(parse_sizes("").is_err());
        assert!(parse_sizes("1,1").is_err());
        assert!(parse_sizes("x").is_err());
        assert!(parse_sizes("100000").is_err());
    }
}
