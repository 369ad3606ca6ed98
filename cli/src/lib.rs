//! The `sinew` command-line tool: talks to the local agent's API, and runs
//! the simulated lab cluster (`sinew lab`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use sinew_lab::manifest::LabelEdit;
use sinew_lab::{Binaries, DatastoreKind, Lab, LabSpec, Routing, UpOptions};
use sinew_proto::v1;

pub mod ipsec_keys;

/// The lab name `--lab` defaults to.
const DEFAULT_LAB: &str = sinew_lab::topology::DEFAULT_PREFIX;

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
    #[arg(long, global = true, default_value = DEFAULT_LAB)]
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
    /// Encryption between nodes: mode, implementation, peers.
    #[command(subcommand)]
    Encryption(EncryptionCmd),
    /// Services this node load-balances.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Flows the datapath saw: forwarded, dropped (with the reason),
    /// policy verdicts. `sinew observe status` shows the observer's counters.
    Observe(Box<ObserveArgs>),
    /// Kubernetes manifests for a cluster (`sinew install --print | kubectl apply -f -`).
    Install(InstallArgs),
}

#[derive(Args)]
struct InstallArgs {
    /// Print the manifests (CRDs, RBAC, the agent DaemonSet, the operator)
    /// to stdout. Required: installing through the API is not built yet.
    #[arg(long)]
    print: bool,
    /// Node-to-node encryption of pod traffic.
    #[arg(long, default_value = "none")]
    encryption: sinew_install::Encryption,
    /// The image holding every Sinew binary (Containerfile).
    #[arg(long, default_value = "sinew:latest")]
    image: String,
    /// Namespace of the agent and operator.
    #[arg(long, default_value = "kube-system")]
    namespace: String,
    /// vxlan or native.
    #[arg(long, default_value = "vxlan")]
    routing: String,
    /// The nodes' uplink device.
    #[arg(long, default_value = "eth0")]
    uplink: String,
    /// The pod CIDR pool the operator carves node blocks from.
    #[arg(long, default_value = "10.244.0.0/16")]
    pool_v4: ipnet::IpNet,
    /// Prefix length of each node's block.
    #[arg(long, default_value_t = 24)]
    node_prefix_v4: u8,
    #[arg(long, default_value_t = 2)]
    operator_replicas: i32,
    /// With --encryption ipsec: also render the Secret with the cluster's
    /// IPsec keys, holding one new random key. For the first install only:
    /// applied again, it replaces every key at once (rotate instead with
    /// `sinew encryption rotate-ipsec-key`).
    #[arg(long)]
    generate_ipsec_key: bool,
}

fn install(a: &InstallArgs) -> anyhow::Result<String> {
    if !a.print {
        anyhow::bail!(
            "pass --print and pipe the manifests to `kubectl apply -f -`; installing through the API is not built yet"
        );
    }
    let s = sinew_install::Settings {
        namespace: a.namespace.clone(),
        image: a.image.clone(),
        encryption: a.encryption,
        routing: a.routing.clone(),
        uplink: a.uplink.clone(),
        pool_v4: a.pool_v4,
        node_prefix_v4: a.node_prefix_v4,
        operator_replicas: a.operator_replicas,
    };
    if a.generate_ipsec_key && a.encryption != sinew_install::Encryption::Ipsec {
        anyhow::bail!("--generate-ipsec-key makes the IPsec keys' Secret: it needs --encryption ipsec");
    }
    let mut out = sinew_install::render(&s)?;
    if a.generate_ipsec_key {
        let (keys, _) = sinew_model::ipsec::with_new_key(&Default::default()).map_err(anyhow::Error::msg)?;
        let secret = sinew_install::ipsec_keys_secret(&s.namespace, &sinew_model::ipsec::render_keys(&keys));
        out.push_str("# ---- the IPsec keys' Secret (a new random key: apply it once) ----\n---\n");
        out.push_str(&serde_yaml::to_string(&secret)?);
    }
    Ok(out)
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct ObserveArgs {
    #[command(subcommand)]
    cmd: Option<ObserveCmd>,
    /// Keep running and print new flows as they come (Ctrl-C stops).
    #[arg(short = 'f', long)]
    follow: bool,
    /// The newest N matching flows (default: 20; with --follow or --since,
    /// none or all of them).
    #[arg(long)]
    last: Option<u64>,
    /// Flows since a duration ago (30s, 5m, 1h) or an RFC 3339 time (a
    /// TIME of the table, quoted, is one).
    #[arg(long)]
    since: Option<String>,
    /// Flows until an RFC 3339 time or a duration ago.
    #[arg(long)]
    until: Option<String>,
    /// A pod on either side ([namespace/]name).
    #[arg(long)]
    pod: Option<String>,
    /// A namespace on either side.
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// The source pod ([namespace/]name).
    #[arg(long)]
    from_pod: Option<String>,
    /// The destination pod ([namespace/]name).
    #[arg(long)]
    to_pod: Option<String>,
    /// FORWARDED or DROPPED.
    #[arg(long, value_parser = ["FORWARDED", "DROPPED", "forwarded", "dropped"])]
    verdict: Option<String>,
    /// drop, trace, policy-verdict or l7 (requests the L7 proxy judged).
    #[arg(long = "type", value_parser = ["drop", "trace", "policy-verdict", "l7"])]
    event_type: Option<String>,
    /// A drop reason: its name (policy_denied) or code.
    #[arg(long)]
    drop_reason: Option<String>,
    /// A port on either side.
    #[arg(long)]
    port: Option<u16>,
    /// tcp, udp, icmp, sctp or a protocol number.
    #[arg(long)]
    protocol: Option<String>,
    /// A security identity on either side.
    #[arg(long)]
    identity: Option<u32>,
    /// ingress or egress.
    #[arg(long, value_parser = ["ingress", "egress"])]
    direction: Option<String>,
    /// key=value labels one side must carry (repeatable).
    #[arg(long = "label", short = 'l')]
    labels: Vec<String>,
    /// Show the observer's counters instead of flows.
    #[arg(long)]
    status: bool,
    /// table, json (one object per line) or compact (one line per flow).
    #[arg(short = 'o', long = "output", default_value = "table")]
    output: FlowFormat,
}

#[derive(Subcommand)]
enum ObserveCmd {
    /// Flows seen, buffer size, events lost per type.
    Status(OutputArg),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum FlowFormat {
    Table,
    Json,
    Compact,
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
        #[command(flatten)]
        l7: L7TraceArgs,
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: Format,
    },
}

/// An HTTP request or gRPC call to trace on the connection: the L7 verdict
/// from the rules the proxy enforces.
#[derive(clap::Args)]
struct L7TraceArgs {
    /// HTTP method of a request to trace, e.g. GET (default GET when
    /// --http-path is given).
    #[arg(long)]
    http_method: Option<String>,
    /// Request target, e.g. /public/a?x=1; judged after the proxy's
    /// normalisation.
    #[arg(long)]
    http_path: Option<String>,
    /// Host (`:authority`) of the request.
    #[arg(long)]
    http_host: Option<String>,
    /// A request header, NAME=VALUE (repeat for more).
    #[arg(long = "http-header", value_name = "NAME=VALUE")]
    http_headers: Vec<String>,
    /// A gRPC call to trace, package.Service/Method.
    #[arg(long, conflicts_with_all = ["http_method", "http_path"])]
    grpc_method: Option<String>,
}

impl L7TraceArgs {
    fn headers(&self) -> anyhow::Result<Vec<v1::HttpHeader>> {
        self.http_headers
            .iter()
            .map(|h| match h.split_once('=') {
                Some((name, value)) if !name.is_empty() => Ok(v1::HttpHeader {
                    name: name.into(),
                    value: value.into(),
                }),
                _ => anyhow::bail!("--http-header {h}: write NAME=VALUE, e.g. x-env=prod"),
            })
            .collect()
    }
}

#[derive(Subcommand)]
enum IdentityCmd {
    /// Every identity: reserved, pods (by labels), CIDRs.
    List(OutputArg),
}

#[derive(Subcommand)]
enum EncryptionCmd {
    /// Mode, implementation (kernel or userspace), this node's public key
    /// and its age, and every peer with its endpoint, last handshake and
    /// bytes.
    Status(OutputArg),
    /// IPsec: add a new random cluster key with the next SPI (the agents
    /// switch to it without loss). Edits the local datastore's
    /// ipsec-keys.yaml, or a file exported from the Kubernetes Secret.
    RotateIpsecKey(IpsecKeysArgs),
    /// IPsec: remove every cluster key but the newest, once every node
    /// receives with it and the grace period has passed.
    RetireIpsecKeys {
        #[command(flatten)]
        keys: IpsecKeysArgs,
        /// The agents' --ipsec-key-grace, in seconds: the key list must be
        /// at least this old.
        #[arg(long, default_value_t = 60)]
        grace: u64,
        /// Skip the checks (required with --keys-file: the CLI cannot see
        /// the cluster's nodes).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
struct IpsecKeysArgs {
    /// The local datastore directory the agents read (its ipsec-keys.yaml).
    /// Default: the datastore of the lab named by --lab, when it is up.
    #[arg(long, conflicts_with = "keys_file")]
    datastore: Option<PathBuf>,
    /// A key file exported from the Kubernetes Secret sinew-ipsec-keys
    /// (this CLI has no Kubernetes client: it prints the kubectl commands).
    #[arg(long)]
    keys_file: Option<PathBuf>,
    /// The Secret's namespace, for the kubectl commands printed with
    /// --keys-file.
    #[arg(long, default_value = "kube-system")]
    namespace: String,
}

impl IpsecKeysArgs {
    fn target(&self, lab: &str) -> anyhow::Result<ipsec_keys::Target> {
        if let Some(path) = &self.keys_file {
            return Ok(ipsec_keys::Target::File {
                path: path.clone(),
                namespace: self.namespace.clone(),
            });
        }
        if let Some(dir) = &self.datastore {
            return Ok(ipsec_keys::Target::Datastore(dir.clone()));
        }
        match Lab::load(&lab_dir(lab)) {
            Ok(l) => Ok(ipsec_keys::Target::Datastore(l.datastore_dir())),
            Err(_) => Err(ipsec_keys::no_target(lab)),
        }
    }
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Every frontend (address:port/protocol, type) with its backends and
    /// their state, and the services that were not applied.
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
        /// An extra sinew-agent argument for every node (repeat for more),
        /// e.g. `--agent-arg=--policy-fail-open`.
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
        /// Encryption between nodes, passed to every agent: none,
        /// wireguard or ipsec.
        #[arg(long, default_value = "none")]
        encryption: String,
        /// Encrypt the nodes' own traffic to each other too.
        #[arg(long)]
        encrypt_node: bool,
        /// Where the agents read the cluster's objects: local (the lab's
        /// datastore directory) or kubernetes (a Kubernetes API server on
        /// the external host, 172.30.0.254:6443, holding what the lab
        /// writes as `kubectl apply` would).
        #[arg(long, default_value = "local")]
        datastore: String,
    },
    /// Remove everything the lab made.
    Down,
    /// Run the Kubernetes API server of a lab on the kubernetes datastore
    /// until SIGTERM (`lab up` starts it in the external host's namespace).
    #[command(name = "api-server", hide = true)]
    ApiServer {
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Nodes, pods and each agent's state and socket.
    Status,
    /// Run a command in a pod's network namespace.
    Exec {
        /// NAMESPACE/NAME, or NAME when only one namespace has it.
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Create or update v1 Namespace and v1 Pod documents (pods through the
    /// CNI plugin, as a runtime would); all or nothing.
    Apply {
        /// The YAML file, or - for stdin.
        #[arg(short = 'f', long = "filename", required = true)]
        file: String,
    },
    /// Delete a pod (NAMESPACE/NAME) or a namespace with its pods, or
    /// everything a file describes.
    Delete {
        #[arg(value_enum, required_unless_present = "file", conflicts_with = "file")]
        kind: Option<LabKind>,
        /// NAMESPACE/NAME for a pod, NAME for a namespace.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        name: Option<String>,
        /// The YAML file, or - for stdin.
        #[arg(short = 'f', long = "filename")]
        file: Option<String>,
    },
    /// Set (k=v) or remove (k-) labels of a pod or namespace, like
    /// `kubectl label`; identities and policy follow.
    Label {
        #[arg(value_enum)]
        kind: LabKind,
        /// NAMESPACE/NAME for a pod, NAME for a namespace.
        name: String,
        /// key=value or key-.
        #[arg(required = true, value_parser = parse_label_edit)]
        labels: Vec<LabelEdit>,
        /// Allow changing the value of an existing label.
        #[arg(long)]
        overwrite: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LabKind {
    #[value(alias = "pods", alias = "po")]
    Pod,
    #[value(alias = "namespaces", alias = "ns")]
    Namespace,
}

fn parse_label_edit(s: &str) -> Result<LabelEdit, String> {
    s.parse()
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn lab_dir(prefix: &str) -> PathBuf {
    sinew_lab::default_state_dir(prefix)
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
    sinew_proto::connect(socket, Duration::from_secs(5))
        .await
        .map_err(|e| unreachable_agent(socket, e))
}

fn unreachable_agent(socket: &Path, e: tonic::transport::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot reach sinew-agent at {} ({e}); is it running? check `systemctl status sinew-agent` or its log, or pass --socket / --node",
        socket.display()
    )
}

async fn observer_client(socket: &Path) -> anyhow::Result<sinew_proto::ObserverClient<tonic::transport::Channel>> {
    sinew_proto::connect_observer(socket, Duration::from_secs(5))
        .await
        .map_err(|e| unreachable_agent(socket, e))
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
        Command::Observe(args) => observe(&cli, args)?,
        Command::Install(a) => print!("{}", install(a)?),
        Command::Encryption(EncryptionCmd::Status(o)) => {
            let socket = cli.socket()?;
            let r = runtime()?.block_on(async {
                anyhow::Ok(
                    client(&socket)
                        .await?
                        .encryption_status(v1::EncryptionStatusRequest {})
                        .await
                        .map_err(rpc_error)?
                        .into_inner(),
                )
            })?;
            print_encryption(&r, o.output);
        }
        Command::Encryption(EncryptionCmd::RotateIpsecKey(k)) => {
            print!("{}", ipsec_keys::rotate(&k.target(&cli.lab)?)?);
        }
        Command::Encryption(EncryptionCmd::RetireIpsecKeys { keys, grace, force }) => {
            let target = keys.target(&cli.lab)?;
            print!("{}", ipsec_keys::retire(&target, Duration::from_secs(*grace), *force)?);
        }
        Command::Service(ServiceCmd::List(o)) => {
            let socket = cli.socket()?;
            let r = runtime()?.block_on(async {
                anyhow::Ok(
                    client(&socket)
                        .await?
                        .list_services(v1::ListServicesRequest {})
                        .await
                        .map_err(rpc_error)?
                        .into_inner(),
                )
            })?;
            print_services(&r, o.output)?;
        }
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

fn print_services(r: &v1::ListServicesResponse, output: Format) -> anyhow::Result<()> {
    if output == Format::Json {
        let v: Vec<_> = r
            .frontends
            .iter()
            .map(|f| {
                serde_json::json!({
                    "namespace": f.namespace, "name": f.name, "portName": f.port_name,
                    "type": f.r#type, "addressKind": f.address_kind,
                    "frontend": f.to_string(),
                    "id": f.id, "algorithm": f.algorithm, "affinityTimeout": f.affinity_timeout,
                    "localOnly": f.local_only,
                    "backends": f.backends.iter().map(|b| serde_json::json!({
                        "address": b.to_string(), "state": b.state,
                        "node": b.node, "active": b.active, "id": b.id,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"frontends": v, "errors": r.errors}))?
        );
        return Ok(());
    }
    println!(
        "{:<5} {:<28} {:<24} {:<13} {:<20} BACKENDS",
        "ID", "SERVICE", "FRONTEND", "TYPE", "LB"
    );
    for f in &r.frontends {
        let svc = if f.port_name.is_empty() {
            format!("{}/{}", f.namespace, f.name)
        } else {
            format!("{}/{}:{}", f.namespace, f.name, f.port_name)
        };
        let mut lb = f.algorithm.clone();
        if f.affinity_timeout > 0 {
            lb.push_str(&format!(",affinity={}s", f.affinity_timeout));
        }
        if f.local_only {
            lb.push_str(",local");
        }
        let kind = if f.address_kind == "ClusterIP" || f.address_kind == f.r#type {
            f.r#type.clone()
        } else {
            format!("{}({})", f.r#type, f.address_kind)
        };
        let frontend = f.to_string();
        let backends: Vec<String> = f
            .backends
            .iter()
            .map(|b| {
                let node = if b.node.is_empty() {
                    String::new()
                } else {
                    format!(" {}", b.node)
                };
                let mark = if b.active { "" } else { " (unused)" };
                format!("{b} {}{node}{mark}", b.state)
            })
            .collect();
        let first = backends
            .first()
            .cloned()
            .unwrap_or_else(|| "(none: connections refused)".into());
        println!(
            "{:<5} {:<28} {:<24} {:<13} {:<20} {first}",
            f.id, svc, frontend, kind, lb
        );
        for b in backends.iter().skip(1) {
            println!("{:<5} {:<28} {:<24} {:<13} {:<20} {b}", "", "", "", "", "");
        }
    }
    for e in &r.errors {
        println!("not applied: {e}");
    }
    Ok(())
}

fn rpc_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message())
}

/// The lab `--node` names, when its agents are on the kubernetes
/// datastore: they may only read policies there, so `policy apply` and
/// `policy delete` go to the lab's API server as `kubectl` would.
fn kube_lab(cli: &Cli) -> Option<Lab> {
    if cli.socket.is_some() || cli.node.is_none() {
        return None;
    }
    Lab::load(&lab_dir(&cli.lab)).ok().filter(|l| l.api_server().is_some())
}

fn policy_line(r: &v1::PolicyRef) -> String {
    let ns = if r.namespace.is_empty() {
        String::new()
    } else {
        format!("{}/", r.namespace)
    };
    format!("{} {ns}{}", r.kind, r.name)
}

/// How long `policy apply` and `delete` on a kubernetes lab wait for the
/// node's agent to read the change from the API.
const KUBE_POLICY_WAIT: Duration = Duration::from_secs(10);

/// Waits until the agent at `socket` lists each of `refs` (or, with
/// `present` false, none of them).
fn wait_listed(socket: &Path, refs: &[v1::PolicyRef], present: bool) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let mut c = client(socket).await?;
        let deadline = std::time::Instant::now() + KUBE_POLICY_WAIT;
        loop {
            let listed: Vec<v1::PolicyRef> = c
                .list_policies(v1::ListPoliciesRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner()
                .policies
                .into_iter()
                .filter_map(|p| p.r#ref)
                .collect();
            if refs.iter().all(|r| listed.contains(r) == present) {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "stored in the lab's Kubernetes API, but after {} s the agent at {} {} it; see its `sinew status` and the API server's log (api-server.log in the lab's state directory)",
                    KUBE_POLICY_WAIT.as_secs(),
                    socket.display(),
                    if present { "does not list" } else { "still lists" }
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// The one policy the agent lists named `name` in `namespace` (or
/// cluster-wide), of `kind` if given.
async fn find_policy(
    c: &mut sinew_proto::AgentClient<tonic::transport::Channel>,
    name: &str,
    namespace: &str,
    kind: Option<&str>,
) -> anyhow::Result<v1::PolicyRef> {
    let list = c.list_policies(v1::ListPoliciesRequest {}).await?.into_inner();
    let matches: Vec<v1::PolicyRef> = list
        .policies
        .into_iter()
        .filter_map(|p| p.r#ref)
        .filter(|r| r.name == name && (r.namespace == namespace || r.namespace.is_empty()))
        .filter(|r| kind.is_none_or(|k| r.kind.eq_ignore_ascii_case(k)))
        .collect();
    match matches.as_slice() {
        [] => anyhow::bail!("no policy {namespace}/{name}; see `sinew policy get`"),
        [one] => Ok(one.clone()),
        many => anyhow::bail!(
            "{} policies are named {name}: pass --kind ({})",
            many.len(),
            many.iter().map(|r| r.kind.clone()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// `policy apply` and `delete` in a lab on the kubernetes datastore: the
/// policies are checked as the agent checks them, stored in the lab's
/// datastore directory, which its API server holds as `kubectl apply`
/// would, and the command returns once the node's agent lists them (or
/// no longer does). `None`: a command that goes to the agent as usual.
fn kube_lab_policy(lab: &Lab, socket: &Path, cmd: &PolicyCmd) -> Option<anyhow::Result<()>> {
    match cmd {
        PolicyCmd::Apply { file } => Some(kube_lab_policy_apply(lab, socket, file)),
        PolicyCmd::Delete { name, namespace, kind } => {
            Some(kube_lab_policy_delete(lab, socket, name, namespace, kind.as_deref()))
        }
        _ => None,
    }
}

fn kube_lab_policy_apply(lab: &Lab, socket: &Path, file: &Path) -> anyhow::Result<()> {
    let yaml = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    let stored = lab.apply_policies(&yaml, &file.display().to_string())?;
    let refs: Vec<v1::PolicyRef> = stored
        .into_iter()
        .map(|(kind, namespace, name)| v1::PolicyRef {
            kind,
            namespace: namespace.unwrap_or_default(),
            name,
        })
        .collect();
    wait_listed(socket, &refs, true)?;
    for r in &refs {
        println!("{} applied", policy_line(r));
    }
    Ok(())
}

fn kube_lab_policy_delete(
    lab: &Lab,
    socket: &Path,
    name: &str,
    namespace: &str,
    kind: Option<&str>,
) -> anyhow::Result<()> {
    let r = runtime()?.block_on(async { find_policy(&mut client(socket).await?, name, namespace, kind).await })?;
    let ns = (!r.namespace.is_empty()).then_some(r.namespace.as_str());
    if !lab.delete_stored_policy(&r.kind, ns, &r.name)? {
        bail!(
            "{} was not stored by `sinew policy apply`: remove its file from {}",
            policy_line(&r),
            lab.datastore_dir().join("policies").display()
        );
    }
    wait_listed(socket, std::slice::from_ref(&r), false)?;
    println!("{} {} deleted", r.kind, r.name);
    Ok(())
}

fn policy(cli: &Cli, cmd: &PolicyCmd) -> anyhow::Result<()> {
    let socket = cli.socket()?;
    if let Some(done) = kube_lab(cli).and_then(|lab| kube_lab_policy(&lab, &socket, cmd)) {
        return done;
    }
    let rt = runtime()?;
    match cmd {
        PolicyCmd::Apply { file } => {
            let yaml = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
            let r = rt.block_on(async {
                // The agent waits up to 10 s for the L7 proxy to have the
                // rules in force before it answers.
                let mut c = sinew_proto::connect(&socket, Duration::from_secs(30))
                    .await
                    .map_err(|e| unreachable_agent(&socket, e))?;
                c.apply_policy(v1::ApplyPolicyRequest {
                    yaml,
                    source: file.display().to_string(),
                })
                .await
                .map_err(rpc_error)
            })?;
            for p in r.into_inner().applied {
                println!("{} applied", policy_line(&p));
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
                println!("invalid: {e}");
            }
        }
        PolicyCmd::Delete { name, namespace, kind } => {
            let r = rt.block_on(async {
                let mut c = client(&socket).await?;
                let one = find_policy(&mut c, name, namespace, kind.as_deref()).await?;
                c.delete_policy(v1::DeletePolicyRequest {
                    r#ref: Some(one.clone()),
                })
                .await
                .map_err(rpc_error)?;
                anyhow::Ok(one)
            })?;
            println!("{} {} deleted", r.kind, r.name);
        }
        PolicyCmd::Trace {
            from,
            to,
            port,
            l7,
            output,
        } => {
            let http_headers = l7.headers()?;
            let r = rt.block_on(async {
                let mut c = client(&socket).await?;
                c.trace_policy(v1::TracePolicyRequest {
                    from: from.clone(),
                    to: to.clone(),
                    port: port.clone(),
                    http_method: l7.http_method.clone().unwrap_or_default(),
                    http_path: l7.http_path.clone().unwrap_or_default(),
                    http_host: l7.http_host.clone().unwrap_or_default(),
                    http_headers,
                    grpc_method: l7.grpc_method.clone().unwrap_or_default(),
                })
                .await
                .map_err(rpc_error)
            })?;
            let r = r.into_inner();
            if *output == Format::Json {
                let steps: Vec<_> = r
                    .steps
                    .iter()
                    .map(|s| serde_json::json!({"endpoint": s.endpoint, "direction": s.direction, "allowed": s.allowed, "explanation": s.explanation, "redirected": s.redirected, "l7Verdict": s.l7_verdict, "l7Rule": s.l7_rule, "l7Path": s.l7_path}))
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
            agent_args,
            encryption,
            encrypt_node,
            datastore,
        } => {
            let routing: Routing = routing.parse().map_err(|e| anyhow::anyhow!("--routing: {e}"))?;
            let datastore: DatastoreKind = datastore.parse().map_err(|e| anyhow::anyhow!("--datastore: {e}"))?;
            if !["none", "wireguard", "ipsec"].contains(&encryption.as_str()) {
                anyhow::bail!("--encryption {encryption:?}: use none, wireguard or ipsec");
            }
            let mut agent_args = agent_args.clone();
            agent_args.extend(["--encryption".to_string(), encryption.clone()]);
            if *encrypt_node {
                agent_args.push("--encrypt-node".into());
            }
            let spec = LabSpec {
                name_prefix: cli.lab.clone(),
                nodes: *nodes,
                pods_per_node: *pods_per_node,
                routing,
                state_dir: None,
                agent_args,
                datastore,
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
                "lab {:?} up in {:.1}s ({} routing, {} datastore)",
                cli.lab,
                started.elapsed().as_secs_f64(),
                spec.routing.as_str(),
                spec.datastore
            );
            print_lab(&lab);
            println!();
            let first = lab.pods().first().map(|p| p.display_name());
            for (i, line) in try_commands(&cli.lab, first.as_deref()).iter().enumerate() {
                println!("{}{line}", if i == 0 { "try:  " } else { "      " });
            }
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
        LabCmd::ApiServer { state_dir } => sinew_lab::kube::serve(state_dir)?,
        LabCmd::Status => print_lab(&load_lab(cli)?),
        LabCmd::Exec { pod, command } => {
            let lab = load_lab(cli)?;
            let status = lab.exec(pod, command)?;
            std::process::exit(status.code().unwrap_or(1));
        }
        LabCmd::Apply { file } => {
            let docs = read_manifest(file)?;
            let mut lab = load_lab(cli)?;
            lab.apply(&docs, &mut |a| println!("{a}"))?;
        }
        LabCmd::Delete { kind, name, file } => {
            let mut lab = load_lab(cli)?;
            match (kind, name, file) {
                (_, _, Some(file)) => {
                    let docs = read_manifest(file)?;
                    for line in lab.delete_objects(&docs)? {
                        println!("{line}");
                    }
                }
                (Some(LabKind::Pod), Some(name), None) => {
                    let key = lab.pod(name)?.key();
                    lab.delete_pod(&key)?;
                    println!("pod/{key} deleted");
                }
                (Some(LabKind::Namespace), Some(name), None) => {
                    for key in lab.delete_namespace(name)? {
                        println!("pod/{key} deleted");
                    }
                    println!("namespace/{name} deleted");
                }
                _ => bail!("say what to delete: `sinew lab delete pod NAMESPACE/NAME`, `sinew lab delete namespace NAME` or `sinew lab delete -f FILE`"),
            }
        }
        LabCmd::Label {
            kind,
            name,
            labels,
            overwrite,
        } => {
            let mut lab = load_lab(cli)?;
            let (object, (changed, notes)) = match kind {
                LabKind::Pod => {
                    let key = lab.pod(name)?.key();
                    (format!("pod/{key}"), lab.label_pod(&key, labels, *overwrite)?)
                }
                LabKind::Namespace => (
                    format!("namespace/{name}"),
                    lab.label_namespace(name, labels, *overwrite)?,
                ),
            };
            for n in notes {
                eprintln!("{n}");
            }
            println!("{object} {}", if changed { "labeled" } else { "not labeled" });
        }
    }
    Ok(())
}

fn load_lab(cli: &Cli) -> anyhow::Result<Lab> {
    Lab::load(&lab_dir(&cli.lab)).with_context(|| {
        format!(
            "no lab {:?} is up (run `sinew lab up`, or pass its --lab NAME)",
            cli.lab
        )
    })
}

/// Reads a file (or stdin for `-`) of lab documents.
fn read_manifest(file: &str) -> anyhow::Result<Vec<sinew_lab::manifest::Document>> {
    let (name, text) = if file == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("cannot read documents from stdin")?;
        ("stdin".to_owned(), text)
    } else {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {file}: pass an existing YAML file, or - for stdin"))?;
        (file.to_owned(), text)
    };
    let docs = sinew_lab::manifest::parse(&name, &text).map_err(sinew_lab::LabError::from)?;
    if docs.is_empty() {
        bail!("{name}: no documents: write v1 Namespace and v1 Pod documents separated by ---");
    }
    Ok(docs)
}

/// The commands `lab up` suggests; with a lab name other than the default,
/// each carries `--lab NAME` so that it reaches this lab.
fn try_commands(lab_name: &str, first_pod: Option<&str>) -> Vec<String> {
    let lab = if lab_name == DEFAULT_LAB {
        String::new()
    } else {
        format!(" --lab {lab_name}")
    };
    vec![
        format!("sinew{lab} lab exec {} -- ip addr", first_pod.unwrap_or("POD")),
        format!("sinew{lab} --node node1 endpoint list"),
        format!("sinew{lab} lab down"),
    ]
}

fn print_lab(lab: &Lab) {
    match lab.api_server() {
        Some(api) => println!(
            "DATASTORE kubernetes: agents list and watch the API server http://{} ({}), kubeconfig {}; it stores {} as `kubectl apply` would",
            api.address,
            match api.pid {
                Some(pid) if lab.api_server_running() => format!("pid {pid}, running"),
                _ => "NOT RUNNING: `sinew lab down` and up again".to_owned(),
            },
            api.kubeconfig.display(),
            lab.datastore_dir().display()
        ),
        None => println!("DATASTORE local: agents read {}", lab.datastore_dir().display()),
    }
    println!();
    println!(
        "{:<8} {:<14} {:<16} {:<6} {:<14} SOCKET",
        "NODE", "ADDRESS", "POD CIDR", "PODS", "AGENT"
    );
    for n in lab.nodes() {
        let pods = lab.pods().iter().filter(|p| p.node == n.name).count();
        let agent = if agent_ready(&n.socket) {
            "ready"
        } else {
            "not reachable"
        };
        println!(
            "{:<8} {:<14} {:<16} {:<6} {agent:<14} {}",
            n.name,
            n.address.to_string(),
            n.pod_cidr.to_string(),
            pods,
            n.socket.display()
        );
    }
    println!();
    // Pods of `default` by name, others as NAMESPACE/NAME: what exec takes.
    println!("{:<16} {:<8} {:<18} NETNS", "POD", "NODE", "IP");
    for p in lab.pods() {
        let ip = p.ip.map(|i| i.addr().to_string()).unwrap_or_else(|| "-".into());
        println!("{:<16} {:<8} {:<18} {}", p.display_name(), p.node, ip, p.netns.name());
    }
}

fn print_encryption(r: &v1::EncryptionStatusResponse, f: Format) {
    if f == Format::Json {
        let peers: Vec<_> = r
            .peers
            .iter()
            .map(|p| {
                serde_json::json!({
                    "node": p.node, "publicKey": p.public_key, "endpoint": p.endpoint,
                    "allowedIPs": p.allowed_ips, "handshakeDone": p.handshake_done,
                    "lastHandshakeSecondsAgo": p.last_handshake_seconds_ago,
                    "rxBytes": p.rx_bytes, "txBytes": p.tx_bytes,
                })
            })
            .collect();
        let ipsec = r.ipsec.as_ref().map(|i| {
            let peers: Vec<_> = i
                .peers
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "node": p.node, "address": p.address, "ready": p.ready,
                        "outSpi": p.out_spi, "outWireSpi": p.out_wire_spi,
                        "inSpis": p.in_spis, "inWireSpis": p.in_wire_spis,
                        "rxBytes": p.rx_bytes, "txBytes": p.tx_bytes,
                        "rxPackets": p.rx_packets, "txPackets": p.tx_packets,
                    })
                })
                .collect();
            serde_json::json!({
                "epoch": i.epoch, "spis": i.spis, "rotated": i.rotated,
                "lastRotationSecondsAgo": i.last_rotation_seconds_ago, "rotating": i.rotating,
                "peers": peers,
            })
        });
        let v = serde_json::json!({
            "ipsec": ipsec,
            "mode": r.mode, "implementation": r.implementation, "device": r.device,
            "publicKey": r.public_key, "keyAgeSeconds": r.key_age_seconds, "port": r.port,
            "encryptNode": r.encrypt_node, "peers": peers, "nodesWithoutKey": r.nodes_without_key,
            "deviceDrops": {"noPeer": r.no_peer_drops, "decryptErrors": r.decrypt_errors,
                "disallowedSource": r.disallowed_source, "unknownSender": r.unknown_sender},
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return;
    }
    if r.mode == "none" {
        println!(
            "Mode:           none (pod traffic between nodes is not encrypted; agent flag --encryption wireguard)"
        );
        return;
    }
    println!("Mode:           {} ({})", r.mode, r.implementation);
    if let Some(i) = &r.ipsec {
        print_ipsec(r, i);
        return;
    }
    println!("Device:         {} port {}", r.device, r.port);
    println!("Public key:     {} (age {}s)", r.public_key, r.key_age_seconds);
    println!(
        "Node traffic:   {}",
        if r.encrypt_node {
            "encrypted"
        } else {
            "pod traffic only"
        }
    );
    println!(
        "Device drops:   no peer {}, decrypt errors {}, disallowed source {}, unknown sender {}",
        r.no_peer_drops, r.decrypt_errors, r.disallowed_source, r.unknown_sender
    );
    if !r.nodes_without_key.is_empty() {
        println!(
            "Without key:    {} (their traffic is dropped as no_encryption_key)",
            r.nodes_without_key.join(", ")
        );
    }
    println!(
        "{:<12} {:<22} {:<16} {:>12} {:>12}  ALLOWED",
        "PEER", "ENDPOINT", "HANDSHAKE", "RX", "TX"
    );
    for p in &r.peers {
        let hs = if p.handshake_done {
            format!("{}s ago", p.last_handshake_seconds_ago)
        } else {
            "none yet".to_string()
        };
        println!(
            "{:<12} {:<22} {:<16} {:>12} {:>12}  {}",
            p.node,
            p.endpoint,
            hs,
            p.rx_bytes,
            p.tx_bytes,
            p.allowed_ips.join(",")
        );
    }
}

fn print_ipsec(r: &v1::EncryptionStatusResponse, i: &v1::IpsecStatus) {
    let spis: Vec<String> = i.spis.iter().map(|s| s.to_string()).collect();
    println!("Epoch:          {:#018x}", i.epoch);
    println!(
        "Cluster keys:   SPIs [{}] received with; newest seen {}s ago{}",
        spis.join(", "),
        r.key_age_seconds,
        if i.rotating {
            " (rotating: older keys kept for their grace period)"
        } else {
            ""
        }
    );
    if i.rotated {
        println!("Last rotation:  {}s ago", i.last_rotation_seconds_ago);
    } else {
        println!("Last rotation:  none since the agent started");
    }
    println!(
        "Node traffic:   {}",
        if r.encrypt_node {
            "encrypted"
        } else {
            "pod traffic only (VXLAN)"
        }
    );
    println!(
        "SA drops:       integrity failures {}, replay {}",
        r.decrypt_errors, r.unknown_sender
    );
    if !r.nodes_without_key.is_empty() {
        println!(
            "Without SAs:    {} (their traffic is dropped as no_encryption_key)",
            r.nodes_without_key.join(", ")
        );
    }
    println!(
        "{:<12} {:<16} {:<6} {:<22} {:<30} {:>12} {:>12}",
        "PEER", "ADDRESS", "READY", "OUT SPI (WIRE)", "IN SPIS (WIRE)", "RX", "TX"
    );
    for p in &i.peers {
        let ins: Vec<String> = p
            .in_spis
            .iter()
            .zip(&p.in_wire_spis)
            .map(|(c, w)| format!("{c} ({w:#x})"))
            .collect();
        let out = if p.ready {
            format!("{} ({:#x})", p.out_spi, p.out_wire_spi)
        } else {
            "-".to_string()
        };
        println!(
            "{:<12} {:<16} {:<6} {:<22} {:<30} {:>12} {:>12}",
            p.node,
            p.address,
            if p.ready { "yes" } else { "no" },
            out,
            ins.join(","),
            p.rx_bytes,
            p.tx_bytes
        );
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
            "attachMode": s.attach_mode, "podAttachMode": s.pod_attach_mode, "podAttachMode": s.pod_attach_mode, "routingMode": s.routing_mode, "podCIDR": sinew_proto::addr::text(s.pod_cidr.as_ref()), "nodeIP": sinew_proto::addr::text(s.node_ip.as_ref()),
            "endpoints": s.endpoints, "ipsAllocated": s.ips_allocated, "ipsCapacity": s.ips_capacity,
            "remoteNodes": s.remote_nodes, "bpfPinPath": s.bpf_pin_path, "uptimeSeconds": s.uptime_seconds,
            "mapsReused": s.maps_reused, "features": features,
            "datastoreErrors": s.datastore_errors, "reconcileError": s.reconcile_error,
            "encryption": s.encryption,
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return;
    }
    let state = match (s.healthy, s.reconcile_error.is_empty()) {
        (false, _) => "NOT READY",
        (true, false) => "DEGRADED",
        (true, true) => "ok",
    };
    println!("Agent:        {state} ({})", s.version);
    if !s.reconcile_error.is_empty() {
        println!("Reconcile:    FAILING, retried every second: {}", s.reconcile_error);
    }
    if !s.datastore_errors.is_empty() {
        println!(
            "Datastore:    {} invalid documents; what their files held stays in force until they are fixed or removed:",
            s.datastore_errors.len()
        );
        for e in &s.datastore_errors {
            println!("  {e}");
        }
    } else if !s.healthy && !s.reason.is_empty() {
        println!("Warning:      {}", s.reason);
    }
    println!(
        "Node:         {} ({})",
        s.node_name,
        sinew_proto::addr::text(s.node_ip.as_ref())
    );
    println!(
        "Pod CIDR:     {}  {}/{} addresses allocated",
        sinew_proto::addr::text(s.pod_cidr.as_ref()),
        s.ips_allocated,
        s.ips_capacity
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
    println!(
        "Encryption:   {}",
        if s.encryption.is_empty() {
            "unknown (agent too old to say)"
        } else {
            &s.encryption
        }
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

/// One endpoint of `endpoint list -o json`: with the attachment (container
/// id and pod-side interface) a runtime lists in `cni.dev/valid-attachments`.
fn endpoint_json(e: &v1::Endpoint) -> serde_json::Value {
    use sinew_proto::addr::text;
    let att = e.attachment.clone().unwrap_or_default();
    serde_json::json!({
        "id": e.id, "namespace": e.pod_namespace, "pod": e.pod_name, "ip": text(e.ip.as_ref()),
        "identity": e.identity, "interface": e.host_ifname, "ifindex": e.host_ifindex,
        "podInterface": att.ifname, "containerID": att.container_id,
        "podMAC": text(e.pod_mac.as_ref()), "hostMAC": text(e.host_mac.as_ref()), "netns": e.netns, "state": e.state, "node": e.node_name,
    })
}

const ENDPOINT_HEADER: [&str; 7] = ["ID", "POD", "IP", "IDENTITY", "INTERFACE", "POD-IF", "STATE"];

fn endpoint_row(cols: [&str; 7]) -> String {
    let [id, pod, ip, identity, host_if, pod_if, state] = cols;
    format!("{id:<5} {pod:<28} {ip:<15} {identity:<9} {host_if:<15} {pod_if:<7} {state}")
}

fn endpoint_table(eps: &[v1::Endpoint]) -> Vec<String> {
    use sinew_proto::addr::text;
    let mut out = vec![endpoint_row(ENDPOINT_HEADER)];
    for e in eps {
        let att = e.attachment.clone().unwrap_or_default();
        let pod = sinew_flows::render::pod(&e.pod_namespace, &e.pod_name, &att.container_id);
        out.push(endpoint_row([
            &e.id.to_string(),
            &pod,
            &text(e.ip.as_ref()),
            &e.identity.to_string(),
            &e.host_ifname,
            &att.ifname,
            &e.state,
        ]));
    }
    out
}

fn print_endpoints(eps: &[v1::Endpoint], f: Format) {
    if f == Format::Json {
        let v: Vec<_> = eps.iter().map(endpoint_json).collect();
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return;
    }
    for line in endpoint_table(eps) {
        println!("{line}");
    }
}

// ------------------------------------------------------------------ observe

fn observe_request(a: &ObserveArgs) -> anyhow::Result<sinew_proto::observer_v1::GetFlowsRequest> {
    use sinew_proto::observer_v1 as pb;
    let now = sinew_flows::now_unix_nanos();
    let since = a
        .since
        .as_deref()
        .map(|s| sinew_flows::render::parse_since(s, now))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--since {e}"))?;
    let until = a
        .until
        .as_deref()
        .map(|s| sinew_flows::render::parse_since(s, now))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--until {e}"))?;
    // Checked here, before any agent is asked, so that the error names the
    // flag (the agent checks the same and names the request field).
    {
        use sinew_flows::{check_label, check_namespace, check_pod};
        for (flag, v) in [("--pod", &a.pod), ("--from-pod", &a.from_pod), ("--to-pod", &a.to_pod)] {
            if let Some(v) = v {
                check_pod(flag, v)?;
            }
        }
        if let Some(ns) = &a.namespace {
            check_namespace("--namespace", ns)?;
        }
        for l in &a.labels {
            check_label("--label", l)?;
        }
    }
    let drop_reason = match a.drop_reason.as_deref() {
        None => None,
        Some(r) => Some(match r.parse::<u8>() {
            Ok(code) => u32::from(code),
            Err(_) => sinew_abi::DropReason::ALL
                .iter()
                .find(|d| d.label() == r || d.c_name().eq_ignore_ascii_case(r))
                .map(|d| u32::from(d.code()))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--drop-reason {r:?}: use a code or one of {}",
                        sinew_abi::DropReason::ALL[1..]
                            .iter()
                            .map(|d| d.label())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?,
        }),
    };
    let protocol = a
        .protocol
        .as_deref()
        .map(|p| {
            sinew_flows::parse_protocol(p)
                .map(u32::from)
                .ok_or_else(|| anyhow::anyhow!("--protocol {p:?}: use tcp, udp, icmp, sctp or a number"))
        })
        .transpose()?;
    let filter = pb::FlowFilter {
        pod: a.pod.clone().unwrap_or_default(),
        namespace: a.namespace.clone().unwrap_or_default(),
        from_pod: a.from_pod.clone().unwrap_or_default(),
        to_pod: a.to_pod.clone().unwrap_or_default(),
        labels: a.labels.clone(),
        identity: a.identity,
        verdict: match a.verdict.as_deref().map(str::to_ascii_uppercase).as_deref() {
            Some("FORWARDED") => pb::Verdict::Forwarded as i32,
            Some("DROPPED") => pb::Verdict::Dropped as i32,
            _ => 0,
        },
        drop_reason,
        protocol,
        port: a.port.map(u32::from),
        direction: match a.direction.as_deref() {
            Some("ingress") => pb::TrafficDirection::Ingress as i32,
            Some("egress") => pb::TrafficDirection::Egress as i32,
            _ => 0,
        },
        event_type: match a.event_type.as_deref() {
            Some("drop") => pb::EventType::Drop as i32,
            Some("trace") => pb::EventType::Trace as i32,
            Some("policy-verdict") => pb::EventType::PolicyVerdict as i32,
            Some("l7") => pb::EventType::L7 as i32,
            _ => 0,
        },
    };
    let number = match (a.last, a.follow || a.since.is_some()) {
        (Some(n), _) => n,
        (None, true) => 0,
        (None, false) => 20,
    };
    // Following without --last or --since starts from now.
    let since = match since {
        None if a.follow && a.last.is_none() => Some(now),
        s => s,
    };
    Ok(pb::GetFlowsRequest {
        number,
        follow: a.follow,
        since_unix_nanos: since.unwrap_or(0),
        until_unix_nanos: until.unwrap_or(0),
        filters: if filter == pb::FlowFilter::default() {
            Vec::new()
        } else {
            vec![filter]
        },
    })
}

/// Writes one line; false when stdout is gone (`| head`), which ends the
/// command quietly.
fn emit(out: &mut impl std::io::Write, line: &str) -> bool {
    writeln!(out, "{line}").and_then(|_| out.flush()).is_ok()
}

fn observe(cli: &Cli, a: &ObserveArgs) -> anyhow::Result<()> {
    use sinew_flows::render;
    use sinew_proto::observer_v1 as pb;
    let socket = cli.socket()?;
    if a.status || matches!(a.cmd, Some(ObserveCmd::Status(_))) {
        let json = matches!(&a.cmd, Some(ObserveCmd::Status(o)) if o.output == Format::Json)
            || (a.status && a.output == FlowFormat::Json);
        let st = runtime()?.block_on(async {
            let mut c = observer_client(&socket).await?;
            c.server_status(pb::ServerStatusRequest {}).await.map_err(rpc_error)
        })?;
        print_observer_status(&st.into_inner(), json);
        return Ok(());
    }
    let req = observe_request(a)?;
    let tz = render::local_zone();
    let rt = runtime()?;
    rt.block_on(async {
        let mut c = observer_client(&socket).await?;
        let mut stream = c.get_flows(req).await.map_err(rpc_error)?.into_inner();
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        if a.output == FlowFormat::Table && !emit(&mut out, render::TABLE_HEADER) {
            return Ok(());
        }
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            let msg = tokio::select! {
                m = stream.message() => m.map_err(rpc_error)?,
                _ = &mut ctrl_c => return Ok(()),
            };
            let Some(msg) = msg else { return Ok(()) };
            let line = match msg.response {
                Some(pb::get_flows_response::Response::Flow(f)) => match a.output {
                    FlowFormat::Table => render::table_row(&f, &tz),
                    FlowFormat::Compact => render::compact(&f, &tz),
                    FlowFormat::Json => render::json(&f).to_string(),
                },
                Some(pb::get_flows_response::Response::LostEvents(l)) => {
                    eprintln!(
                        "warning: {} flows were not shown: this terminal read too slowly (narrow the filters)",
                        l.count
                    );
                    continue;
                }
                None => continue,
            };
            if !emit(&mut out, &line) {
                return Ok(());
            }
        }
    })
}

fn print_observer_status(s: &sinew_proto::observer_v1::ServerStatusResponse, json: bool) {
    let counts = |v: &[sinew_proto::observer_v1::EventCount]| -> serde_json::Value {
        v.iter()
            .map(|c| (c.r#type.clone(), serde_json::Value::from(c.count)))
            .collect()
    };
    if json {
        let v = serde_json::json!({
            "node": s.node_name, "enabled": s.enabled, "numFlows": s.num_flows,
            "currentFlows": s.current_flows, "maxFlows": s.max_flows,
            "flowsByType": counts(&s.flows_by_type), "flowsByDropReason": s.flows_by_drop_reason,
            "eventsLost": counts(&s.events_lost), "eventsLostTotal": s.events_lost_total,
            "followerDropped": s.follower_dropped, "followers": s.followers,
            "eventRingBytes": s.event_ring_bytes, "uptimeSeconds": s.uptime_nanos / 1_000_000_000,
            "observerStart": sinew_flows::render::rfc3339(s.observer_start_unix_nanos),
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return;
    }
    let list = |v: &[sinew_proto::observer_v1::EventCount]| {
        v.iter()
            .map(|c| format!("{} {}", c.r#type, c.count))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("Node:            {}", s.node_name);
    if !s.enabled {
        println!("Flow events:     off (the agent runs with --events=false)");
    }
    println!("Flows seen:      {} ({})", s.num_flows, list(&s.flows_by_type));
    println!("Flow buffer:     {}/{}", s.current_flows, s.max_flows);
    println!(
        "Events lost:     {} ({}){}",
        s.events_lost_total,
        list(&s.events_lost),
        if s.events_lost_total > 0 {
            "; the datapath ring was full: raise --event-ring-size"
        } else {
            ""
        }
    );
    println!(
        "Followers:       {} now, {} flows dropped for slow ones",
        s.followers, s.follower_dropped
    );
    println!("Event ring:      {} bytes", s.event_ring_bytes);
    println!("Uptime:          {}s", s.uptime_nanos / 1_000_000_000);
    if !s.flows_by_drop_reason.is_empty() {
        let mut r: Vec<_> = s.flows_by_drop_reason.iter().collect();
        r.sort();
        println!("Drops by reason:");
        for (k, v) in r {
            println!("  {k:<24} {v}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn install_args(args: &[&str]) -> InstallArgs {
        let cli = Cli::try_parse_from([&["sinew", "install", "--print"][..], args].concat()).unwrap();
        match cli.cmd {
            Command::Install(a) => a,
            _ => unreachable!(),
        }
    }

    /// A key is rendered only when asked, fresh each time, and only with
    /// IPsec.
    #[test]
    fn install_renders_the_ipsec_secret_only_when_asked() {
        let plain = install(&install_args(&["--encryption", "ipsec"])).unwrap();
        assert!(plain.contains("--ipsec-keys-secret=kube-system/sinew-ipsec-keys"));
        assert!(!plain.contains("kind: Secret"));
        let a = install(&install_args(&["--encryption", "ipsec", "--generate-ipsec-key"])).unwrap();
        let b = install(&install_args(&["--encryption", "ipsec", "--generate-ipsec-key"])).unwrap();
        let secret = |out: &str| -> serde_json::Value {
            let doc = out.rsplit("\n---\n").next().unwrap();
            serde_yaml::from_str(doc).unwrap()
        };
        let (sa, sb) = (secret(&a), secret(&b));
        assert_eq!(sa["kind"], "Secret");
        assert_eq!(sa["metadata"]["namespace"], "kube-system");
        let keys = |s: &serde_json::Value| {
            sinew_model::ipsec::parse_keys("secret", s["stringData"]["ipsec-keys.yaml"].as_str().unwrap()).unwrap()
        };
        let (ka, kb) = (keys(&sa), keys(&sb));
        assert_eq!((ka.keys.len(), ka.keys[0].spi, ka.keys[0].key.len()), (1, 256, 36));
        assert_ne!(ka.keys[0].key, kb.keys[0].key, "never a fixed key");
        let e = install(&install_args(&["--generate-ipsec-key"])).unwrap_err();
        assert!(e.to_string().contains("--encryption ipsec"), "{e}");
    }

    fn ep(ns: &str, name: &str, container_id: &str) -> v1::Endpoint {
        v1::Endpoint {
            id: 3,
            attachment: Some(v1::Attachment {
                container_id: container_id.into(),
                ifname: "eth0".into(),
            }),
            pod_namespace: ns.into(),
            pod_name: name.into(),
            host_ifname: "lxc0123456789a".into(),
            ip: Some(std::net::Ipv4Addr::new(10, 244, 1, 9).into()),
            identity: 256,
            state: "ready".into(),
            ..Default::default()
        }
    }

    /// A runtime builds its GC list (`cni.dev/valid-attachments`) from the
    /// container id and the pod-side interface name.
    #[test]
    fn endpoint_json_has_the_attachment() {
        let j = endpoint_json(&ep("a", "web", "c0ffee"));
        assert_eq!(
            (j["containerID"].as_str(), j["podInterface"].as_str()),
            (Some("c0ffee"), Some("eth0"))
        );
        assert_eq!(j["interface"], "lxc0123456789a");
    }

    /// Pods without Kubernetes names (podman, cnitool) show their
    /// container, never "/"; the table has the pod-side interface.
    #[test]
    fn endpoint_table_names_unnamed_pods() {
        let rows = endpoint_table(&[ep("a", "web", "c0ffee"), ep("", "", "0123456789abcdef0123")]);
        assert!(rows[0].contains("POD-IF"), "{}", rows[0]);
        assert!(rows[1].contains(" a/web ") && rows[1].contains(" eth0 "), "{}", rows[1]);
        assert!(rows[2].contains(" container 0123456789ab "), "{}", rows[2]);
        assert!(!rows[2].contains(" / "), "{}", rows[2]);
        let col = |r: &str, w: &str| r.find(w);
        assert_eq!(col(&rows[0], "POD-IF"), col(&rows[1], "eth0"));
    }
}

#[cfg(test)]
mod lab_tests {
    use super::*;

    #[test]
    fn suggested_commands_name_a_lab_only_when_it_is_not_the_default() {
        let default = try_commands(DEFAULT_LAB, Some("node1-pod1"));
        assert_eq!(default[0], "sinew lab exec node1-pod1 -- ip addr");
        assert!(default.iter().all(|c| !c.contains("--lab")), "{default:?}");
        let named = try_commands("mine", None);
        assert_eq!(named[0], "sinew --lab mine lab exec POD -- ip addr");
        assert!(named.iter().all(|c| c.starts_with("sinew --lab mine ")), "{named:?}");
    }
}
