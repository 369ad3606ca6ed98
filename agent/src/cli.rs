//! The `sinew` command-line tool: talks to the local agent's API, and runs
//! the simulated lab cluster (`sinew lab`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use sinew_proto::v1;
use sinew_testvms::lab::{Binaries, Lab, LabSpec, Routing, UpOptions};

#[derive(Parser)]
#[command(name = "sinew", version, about = "Sinew: CNI and sidecarless service mesh")]
pub struct Cli {
    /// The agent's API socket.
    #[arg(long, global = true, env = "SINEW_SOCKET")]
    socket: Option<PathBuf>,
    /// Talk to the agent of this lab node (e.g. node1) instead of the local one.
    #[arg(long, global = true)]
    node: Option<String>,
    /// Lab name prefix, for --node and `sinew lab`.
    #[arg(long, global = true, default_value = "sinew-lab")]
    lab: String,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Agent health, datapath mode, kernel features, counts.
    Status(OutputArg),
    /// Pod endpoints on this node.
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// A simulated multi-node cluster on this machine.
    #[command(subcommand)]
    Lab(LabCmd),
    /// Network policies: apply, get, delete, trace.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Security identities.
    #[command(subcommand)]
    Identity(IdentityCmd),
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate and apply policies from a YAML file (several documents allowed).
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// The policies in force and the endpoints of this node they select.
    Get(OutputArg),
    /// Delete a policy.
    Delete {
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// NetworkPolicy, SinewNetworkPolicy or SinewClusterwideNetworkPolicy
        /// (default: whichever kind has this name).
        #[arg(long)]
        kind: Option<String>,
    },
    /// Explain the verdict for a flow: which policy and rule decide.
    Trace {
        /// A pod ([namespace/]name), an identity number, or an IP/CIDR.
        #[arg(long)]
        from: String,
        /// A pod ([namespace/]name).
        #[arg(long)]
        to: String,
        /// PORT/PROTO, e.g. 80/tcp, 53/udp, 8/icmp.
        #[arg(long, default_value = "80/tcp")]
        port: String,
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: Format,
    },
}

#[derive(Subcommand)]
enum IdentityCmd {
    /// Every identity: reserved, pods (by labels), CIDRs.
    List(OutputArg),
}

#[derive(Subcommand)]
enum EndpointCmd {
    /// List endpoints.
    List(OutputArg),
}

#[derive(Args)]
struct OutputArg {
    /// Output format.
    #[arg(short = 'o', long = "output", default_value = "table")]
    output: Format,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum LabCmd {
    /// Create nodes (network namespaces with their own agent) and pods.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: u32,
        #[arg(long, default_value_t = 2)]
        pods_per_node: u32,
        /// Cross-node routing: vxlan or native.
        #[arg(long, default_value = "vxlan")]
        routing: String,
    },
    /// Remove everything the lab made.
    Down,
    /// Nodes, pods and each agent's state.
    Status,
    /// Run a command in a pod's network namespace.
    Exec {
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn lab_dir(prefix: &str) -> PathBuf {
    sinew_testvms::lab::default_state_dir(prefix)
}

impl Cli {
    fn socket(&self) -> anyhow::Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        if let Some(node) = &self.node {
            let lab = Lab::load(&lab_dir(&self.lab))
                .with_context(|| format!("no lab {:?} is up (run `sinew lab up`)", self.lab))?;
            return Ok(lab.node(node)?.socket.clone());
        }
        Ok(PathBuf::from(sinew_proto::DEFAULT_SOCKET))
    }
}

async fn client(socket: &Path) -> anyhow::Result<sinew_proto::AgentClient<tonic::transport::Channel>> {
    sinew_proto::connect(socket, Duration::from_secs(5)).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach sinew-agent at {} ({e}); is it running? check `systemctl status sinew-agent` or its log, or pass --socket / --node",
            socket.display()
        )
    })
}

pub fn main(cli: Cli) -> anyhow::Result<()> {
    match &cli.cmd {
        Command::Status(o) => {
            let socket = cli.socket()?;
            let st = runtime()?.block_on(async {
                anyhow::Ok(client(&socket).await?.status(v1::StatusRequest {}).await?.into_inner())
            })?;
            print_status(&st, o.output);
        }
        Command::Endpoint(EndpointCmd::List(o)) => {
            let socket = cli.socket()?;
            let eps = runtime()?
                .block_on(async {
                    anyhow::Ok(
                        client(&socket)
                            .await?
                            .list_endpoints(v1::ListEndpointsRequest {})
                            .await?
                            .into_inner(),
                    )
                })?
                .endpoints;
            print_endpoints(&eps, o.output);
        }
        Command::Lab(cmd) => lab(&cli, cmd)?,
        Command::Policy(cmd) => policy(&cli, cmd)?,
        Command::Identity(IdentityCmd::List(o)) => {
            let socket = cli.socket()?;
            let ids = runtime()?
                .block_on(async {
                    anyhow::Ok(
                        client(&socket)
                            .await?
                            .list_identities(v1::ListIdentitiesRequest {})
                            .await?
                            .into_inner(),
                    )
                })?
                .identities;
            if o.output == Format::Json {
                let v: Vec<_> = ids
                    .iter()
                    .map(|i| serde_json::json!({"id": i.id, "kind": i.kind, "labels": i.labels, "endpoints": i.endpoints}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<10} {:<9} {:<9} LABELS", "ID", "KIND", "ENDPOINTS");
                for i in ids {
                    let mut labels: Vec<String> = i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    labels.sort();
                    println!("{:<10} {:<9} {:<9} {}", i.id, i.kind, i.endpoints, labels.join(","));
                }
            }
        }
    }
    Ok(())
}

fn rpc_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message())
}

fn policy(cli: &Cli, cmd: &PolicyCmd) -> anyhow::Result<()> {
    let socket = cli.socket()?;
    let rt = runtime()?;
    match cmd {
        PolicyCmd::Apply { file } => {
            let yaml = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
            let r = rt.block_on(async {
                let mut c = client(&socket).await?;
                c.apply_policy(v1::ApplyPolicyRequest {
                    yaml,
                    source: file.display().to_string(),
                })
                .await
                .map_err(rpc_error)
            })?;
            for p in r.into_inner().applied {
                let ns = if p.namespace.is_empty() {
                    String::new()
                } else {
                    format!("{}/", p.namespace)
                };
                println!("{} {ns}{} applied", p.kind, p.name);
            }
        }
        PolicyCmd::Get(o) => {
            let r = rt.block_on(async {
                anyhow::Ok(
                    client(&socket)
                        .await?
                        .list_policies(v1::ListPoliciesRequest {})
                        .await?
                        .into_inner(),
                )
            })?;
            if o.output == Format::Json {
                let v: Vec<_> = r
                    .policies
                    .iter()
                    .map(|p| {
                        let rf = p.r#ref.clone().unwrap_or_default();
                        serde_json::json!({"kind": rf.kind, "namespace": rf.namespace, "name": rf.name, "selects": p.selects, "yaml": p.yaml})
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"policies": v, "errors": r.errors, "mapEntries": r.map_entries, "mapOverflows": r.map_overflows})
                    )?
                );
                return Ok(());
            }
            println!("{:<32} {:<12} {:<24} SELECTS (this node)", "KIND", "NAMESPACE", "NAME");
            for p in &r.policies {
                let rf = p.r#ref.clone().unwrap_or_default();
                println!(
                    "{:<32} {:<12} {:<24} {}",
                    rf.kind,
                    if rf.namespace.is_empty() { "-" } else { &rf.namespace },
                    rf.name,
                    p.selects.join(",")
                );
            }
            println!(
                "\npolicy map: {} entries, {} refused writes (map full)",
                r.map_entries, r.map_overflows
            );
            for e in &r.errors {
                println!("invalid (not applied): {e}");
            }
        }
        PolicyCmd::Delete { name, namespace, kind } => {
            let r = rt.block_on(async {
                let mut c = client(&socket).await?;
                let list = c.list_policies(v1::ListPoliciesRequest {}).await?.into_inner();
                let matches: Vec<v1::PolicyRef> = list
                    .policies
                    .into_iter()
                    .filter_map(|p| p.r#ref)
                    .filter(|r| r.name == *name && (r.namespace == *namespace || r.namespace.is_empty()))
                    .filter(|r| kind.as_ref().is_none_or(|k| r.kind.eq_ignore_ascii_case(k)))
                    .collect();
                match matches.as_slice() {
                    [] => anyhow::bail!("no policy {namespace}/{name}; see `sinew policy get`"),
                    [one] => {
                        c.delete_policy(v1::DeletePolicyRequest {
                            r#ref: Some(one.clone()),
                        })
                        .await
                        .map_err(rpc_error)?;
                        Ok(one.clone())
                    }
                    many => anyhow::bail!(
                        "{} policies are named {name}: pass --kind ({})",
                        many.len(),
                        many.iter().map(|r| r.kind.clone()).collect::<Vec<_>>().join(", ")
                    ),
                }
            })?;
            println!("{} {} deleted", r.kind, r.name);
        }
        PolicyCmd::Trace { from, to, port, output } => {
            let r = rt.block_on(async {
                let mut c = client(&socket).await?;
                c.trace_policy(v1::TracePolicyRequest {
                    from: from.clone(),
                    to: to.clone(),
                    port: port.clone(),
                })
                .await
                .map_err(rpc_error)
            })?;
            let r = r.into_inner();
            if *output == Format::Json {
                let steps: Vec<_> = r
                    .steps
                    .iter()
                    .map(|s| serde_json::json!({"endpoint": s.endpoint, "direction": s.direction, "allowed": s.allowed, "explanation": s.explanation}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"allowed": r.allowed, "fromIdentity": r.from_identity, "toIdentity": r.to_identity, "steps": steps})
                    )?
                );
                return Ok(());
            }
            println!(
                "{from} (identity {}) -> {to} (identity {}) {port}",
                r.from_identity, r.to_identity
            );
            for s in &r.steps {
                println!(
                    "  {:<8} {:<24} {:<8} {}",
                    s.direction,
                    s.endpoint,
                    if s.allowed { "allowed" } else { "DENIED" },
                    s.explanation
                );
            }
            println!("verdict: {}", if r.allowed { "ALLOWED" } else { "DENIED" });
        }
    }
    Ok(())
}

fn agent_ready(socket: &Path) -> bool {
    let Ok(rt) = runtime() else { return false };
    rt.block_on(async {
        match sinew_proto::connect(socket, Duration::from_secs(1)).await {
            Ok(mut c) => c
                .status(v1::StatusRequest {})
                .await
                .is_ok_and(|s| s.into_inner().healthy),
            Err(_) => false,
        }
    })
}

fn lab(cli: &Cli, cmd: &LabCmd) -> anyhow::Result<()> {
    let dir = lab_dir(&cli.lab);
    match cmd {
        LabCmd::Up {
            nodes,
            pods_per_node,
            routing,
        } => {
            let routing: Routing = routing.parse().map_err(|e| anyhow::anyhow!("--routing: {e}"))?;
            let spec = LabSpec {
                name_prefix: cli.lab.clone(),
                nodes: *nodes,
                pods_per_node: *pods_per_node,
                routing,
                state_dir: None,
                agent_args: Vec::new(),
            };
            spec.validate()?;
            let bins = Binaries::from_current_exe()?;
            let opts = UpOptions {
                ready: Some(&agent_ready),
                ..Default::default()
            };
            let started = std::time::Instant::now();
            let lab = Lab::up_with(&spec, &bins, &opts, &mut |line| eprintln!("  {line}")).map_err(|e| {
                anyhow::anyhow!("{e}\nthe partial lab is left for inspection; remove it with `sinew lab down`")
            })?;
            eprintln!(
                "lab {:?} up in {:.1}s ({} routing)",
                cli.lab,
                started.elapsed().as_secs_f64(),
                spec.routing.as_str()
            );
            print_lab(&lab);
            println!();
            println!(
                "try:  sinew lab exec {} -- ip addr",
                lab.pods().first().map(|p| p.name.as_str()).unwrap_or("POD")
            );
            println!("      sinew --node node1 endpoint list");
            println!("      sinew lab down");
        }
        LabCmd::Down => {
            let s = Lab::down(&dir)?;
            for r in &s.removed {
                eprintln!("  removed {r}");
            }
            for w in &s.warnings {
                eprintln!("  warning: {w}");
            }
            if !s.is_clean() {
                bail!("left behind: {}", s.left_behind.join(", "));
            }
            println!("lab {:?} is down; nothing left behind", cli.lab);
        }
        LabCmd::Status => {
            let lab = Lab::load(&dir).with_context(|| format!("no lab {:?} is up (run `sinew lab up`)", cli.lab))?;
            print_lab(&lab);
        }
        LabCmd::Exec { pod, command } => {
            let lab = Lab::load(&dir).with_context(|| format!("no lab {:?} is up (run `sinew lab up`)", cli.lab))?;
            let status = lab.exec(pod, command)?;
            std::process::exit(status.code().unwrap_or(1));
        }
    }
    Ok(())
}

fn print_lab(lab: &Lab) {
    println!("{:<8} {:<14} {:<16} {:<8} AGENT", "NODE", "ADDRESS", "POD CIDR", "PODS");
    for n in lab.nodes() {
        let pods = lab.pods().iter().filter(|p| p.node == n.name).count();
        let agent = if agent_ready(&n.socket) {
            "ready"
        } else {
            "not reachable"
        };
        println!(
            "{:<8} {:<14} {:<16} {:<8} {agent}",
            n.name,
            n.address.to_string(),
            n.pod_cidr.to_string(),
            pods
        );
    }
    println!();
    println!("{:<16} {:<8} {:<18} NETNS", "POD", "NODE", "IP");
    for p in lab.pods() {
        let ip = p.ip.map(|i| i.addr().to_string()).unwrap_or_else(|| "-".into());
        println!("{:<16} {:<8} {:<18} {}", p.name, p.node, ip, p.netns.name());
    }
}

fn print_status(s: &v1::StatusResponse, f: Format) {
    if f == Format::Json {
        let features: Vec<_> = s
            .features
            .iter()
            .map(|x| serde_json::json!({"name": x.name, "available": x.available, "used": x.used, "detail": x.detail}))
            .collect();
        let v = serde_json::json!({
            "healthy": s.healthy, "reason": s.reason, "node": s.node_name, "version": s.version,
            "attachMode": s.attach_mode, "podAttachMode": s.pod_attach_mode, "podAttachMode": s.pod_attach_mode, "routingMode": s.routing_mode, "podCIDR": s.pod_cidr, "nodeIP": s.node_ip,
            "endpoints": s.endpoints, "ipsAllocated": s.ips_allocated, "ipsCapacity": s.ips_capacity,
            "remoteNodes": s.remote_nodes, "bpfPinPath": s.bpf_pin_path, "uptimeSeconds": s.uptime_seconds,
            "mapsReused": s.maps_reused, "features": features,
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return;
    }
    println!(
        "Agent:        {} ({})",
        if s.healthy { "ok" } else { "NOT READY" },
        s.version
    );
    if !s.reason.is_empty() {
        println!("Warning:      {}", s.reason);
    }
    println!("Node:         {} ({})", s.node_name, s.node_ip);
    println!(
        "Pod CIDR:     {}  {}/{} addresses allocated",
        s.pod_cidr, s.ips_allocated, s.ips_capacity
    );
    println!("Endpoints:    {}", s.endpoints);
    println!("Remote nodes: {}", s.remote_nodes);
    println!(
        "Datapath:     {} routing, {} on devices, {} on pods, pins {}{}",
        s.routing_mode,
        s.attach_mode,
        s.pod_attach_mode,
        s.bpf_pin_path,
        if s.maps_reused { " (re-adopted)" } else { "" }
    );
    println!("Uptime:       {}s", s.uptime_seconds);
    println!("Kernel features:");
    for f in &s.features {
        let state = match (f.available, f.used) {
            (true, true) => "in use",
            (true, false) => "available",
            (false, _) => "missing",
        };
        println!("  {:<20} {:<10} {}", f.name, state, f.detail);
    }
}

fn print_endpoints(eps: &[v1::Endpoint], f: Format) {
    if f == Format::Json {
        let v: Vec<_> = eps
            .iter()
            .map(|e| {
                serde_json::json!({
                    "id": e.id, "namespace": e.pod_namespace, "pod": e.pod_name, "ip": e.ip,
                    "identity": e.identity, "interface": e.host_ifname, "ifindex": e.host_ifindex,
                    "podMAC": e.pod_mac, "hostMAC": e.host_mac, "netns": e.netns, "state": e.state, "node": e.node_name,
                    "containerID": e.attachment.as_ref().map(|a| a.container_id.clone()),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return;
    }
    println!(
        "{:<5} {:<28} {:<15} {:<9} {:<15} {:<10}",
        "ID", "POD", "IP", "IDENTITY", "INTERFACE", "STATE"
    );
    for e in eps {
        let pod = format!("{}/{}", e.pod_namespace, e.pod_name);
        println!(
            "{:<5} {:<28} {:<15} {:<9} {:<15} {:<10}",
            e.id, pod, e.ip, e.identity, e.host_ifname, e.state
        );
    }
}
