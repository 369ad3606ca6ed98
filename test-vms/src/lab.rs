//! A simulated cluster with real agents: the [`Topology`], a `local`
//! datastore, one `sinew-agent` per node and pods wired up by `sinew-cni`.
//!
//! A lab is described by a [`LabSpec`] and remembered in a JSON state file,
//! so that `up`, `exec` and `down` can run as separate processes. All names
//! (namespaces, state dir, sockets, pin dirs) derive from the prefix, so
//! labs with different prefixes run side by side.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs::OpenOptions;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Output, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

use crate::bpffs::{self, BpffsError};
use crate::cni::{self, CniError, CniRequest};
use crate::datastore::{self, ContainerPort, DatastoreError};
use crate::manifest::{self, Document, LabObject, LabelEdit, ManifestError, NamespaceDoc, PodDoc};
use crate::netns::{command_in, detach, NetNs, NetnsError};
use crate::process;
use crate::topology::{self, Names, Topology, TopologyError, UPLINK};

/// Parent of the default state directories, `/run/sinew-lab/PREFIX`.
pub const DEFAULT_STATE_ROOT: &str = "/run/sinew-lab";
/// Parent of the agents' socket directories, `/run/sinew/PREFIX/NODE`.
pub const SOCKET_ROOT: &str = "/run/sinew";
/// The state file inside the state directory.
pub const STATE_FILE: &str = "state.json";
/// How long `up` waits for each agent by default.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop_agent` waits after SIGTERM before SIGKILL.
pub const AGENT_STOP_GRACE: Duration = Duration::from_secs(5);
/// How long `down` waits for one CNI DEL.
const DOWN_CNI_TIMEOUT: Duration = Duration::from_secs(15);
/// The Kubernetes namespace of the lab's pods.
pub const POD_NAMESPACE: &str = "default";
/// The pod-side interface name the CNI plugin is asked for.
pub const POD_IFNAME: &str = "eth0";
const STATE_VERSION: u32 = 1;

/// Errors from bringing a lab up, using it or taking it down.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A spec field is out of range.
    #[error("invalid lab spec: {field} = {value}: {reason}")]
    InvalidSpec {
        /// The field name.
        field: &'static str,
        /// Its value.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A routing mode that is neither `vxlan` nor `native`.
    #[error("unknown routing mode {0:?}: use \"vxlan\" or \"native\"")]
    UnknownRouting(String),
    /// The topology could not be built.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// A namespace operation or command failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The CNI plugin failed or answered badly.
    #[error(transparent)]
    Cni(#[from] CniError),
    /// A datastore manifest could not be written.
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    /// bpffs could not be mounted or pins removed.
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
    /// `up` found an existing state file.
    #[error("a lab is already up with state in {0}: run `sinew lab down` first")]
    AlreadyUp(PathBuf),
    /// Namespaces with the prefix exist but this state dir has no lab.
    #[error("network namespaces of a lab named {prefix:?} exist ({netns}): take that lab down (`sinew lab down`) or choose another prefix")]
    PrefixInUse {
        /// The prefix.
        prefix: String,
        /// The existing namespaces.
        netns: String,
    },
    /// No state file where one was expected.
    #[error("no lab state in {0}: run `sinew lab up` first (or pass the lab's --state-dir)")]
    NotUp(PathBuf),
    /// The state file is unreadable or malformed.
    #[error("cannot read lab state {path}: {reason} (run `sinew lab down` to clean up)")]
    BadState {
        /// The state file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A node's cgroup could not be made.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A binary the lab needs does not exist.
    #[error("{name} not found at {path}: build it (`cargo build -p {package}`) or pass its path")]
    MissingBinary {
        /// The binary name.
        name: &'static str,
        /// Where it was expected.
        path: PathBuf,
        /// The cargo package that builds it.
        package: &'static str,
    },
    /// No node with that name.
    #[error("no node {name:?} in this lab; nodes are: {known}")]
    UnknownNode {
        /// The requested name.
        name: String,
        /// The existing names, comma-separated.
        known: String,
    },
    /// No pod with that name.
    #[error("no pod {name:?} in this lab; pods are: {known}")]
    UnknownPod {
        /// The requested name.
        name: String,
        /// The existing names, comma-separated.
        known: String,
    },
    /// A bare pod name that several namespaces have.
    #[error("pod name {name:?} is in more than one namespace ({candidates}): say which with NAMESPACE/NAME")]
    AmbiguousPod {
        /// The requested name.
        name: String,
        /// The matching `NS/NAME`s, comma-separated.
        candidates: String,
    },
    /// No namespace with that name.
    #[error("no namespace {name:?} in this lab; namespaces are: {known}")]
    UnknownNamespace {
        /// The requested name.
        name: String,
        /// The existing names, comma-separated.
        known: String,
    },
    /// A request the lab refuses, as Kubernetes would.
    #[error("{what}: {reason}")]
    Refused {
        /// What was asked for (`namespace default`).
        what: String,
        /// Why not, and what to do instead.
        reason: String,
    },
    /// A document of an apply or delete file is invalid; nothing was done.
    /// (Not a `#[source]`: the message already holds it, and the CLI
    /// prints sources after it.)
    #[error("{0}\nnothing was changed")]
    Manifest(ManifestError),
    /// Applying a document failed; what this apply had made was undone.
    #[error("{document}: {cause}\n{}", rollback_summary(undone, undo_failed))]
    ApplyFailed {
        /// `FILE: document N (Pod x/a)`.
        document: String,
        /// What went wrong (in the message, so not a `#[source]`).
        cause: Box<LabError>,
        /// What was undone, one item each.
        undone: Vec<String>,
        /// Undo steps that failed.
        undo_failed: Vec<String>,
    },
    /// A pod name that is taken or not a DNS label.
    #[error("invalid pod name {name:?}: {reason}")]
    InvalidPodName {
        /// The rejected name.
        name: String,
        /// Why.
        reason: String,
    },
    /// An agent exited while `up` or `start_agent` waited for it.
    #[error("{node}: sinew-agent exited with {status} before it was ready; see {log}:\n{tail}")]
    AgentExited {
        /// The node.
        node: String,
        /// Its exit status.
        status: String,
        /// The agent log.
        log: PathBuf,
        /// The last lines of the log.
        tail: String,
    },
    /// An agent did not become ready in time.
    #[error("{node}: sinew-agent was not ready within {secs} s (socket {socket}); see {log}")]
    AgentTimeout {
        /// The node.
        node: String,
        /// Seconds waited.
        secs: u64,
        /// The socket path it should create.
        socket: PathBuf,
        /// The agent log.
        log: PathBuf,
    },
    /// An agent would not stop.
    #[error("{node}: sinew-agent (pid {pid}) did not exit after SIGKILL")]
    AgentStuck {
        /// The node.
        node: String,
        /// Its pid.
        pid: u32,
    },
    /// A program could not be run in a pod or node.
    #[error("cannot run {argv:?} in {target}: {source}")]
    Exec {
        /// Pod or node name.
        target: String,
        /// The command.
        argv: Vec<String>,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// How pod traffic crosses between nodes; passed to the agent as `--routing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// Encapsulated in VXLAN between node addresses.
    #[default]
    Vxlan,
    /// Routed as-is over the underlay.
    Native,
}

impl Routing {
    /// The flag value: `vxlan` or `native`.
    pub fn as_str(self) -> &'static str {
        match self {
            Routing::Vxlan => "vxlan",
            Routing::Native => "native",
        }
    }
}

impl fmt::Display for Routing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Routing {
    type Err = LabError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vxlan" => Ok(Routing::Vxlan),
            "native" => Ok(Routing::Native),
            other => Err(LabError::UnknownRouting(other.to_owned())),
        }
    }
}

fn default_prefix() -> String {
    topology::DEFAULT_PREFIX.to_owned()
}

/// What a lab looks like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabSpec {
    /// Prefix of every name the lab creates; default `sinew-lab`.
    #[serde(default = "default_prefix")]
    pub name_prefix: String,
    /// Number of nodes, 1..=200.
    pub nodes: u32,
    /// Pods created on each node by `up`, 0..=200.
    pub pods_per_node: u32,
    /// Cross-node routing mode.
    #[serde(default)]
    pub routing: Routing,
    /// State directory; default `/run/sinew-lab/PREFIX`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Extra `sinew-agent` flags for every node (e.g. `--policy-map-size`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agent_args: Vec<String>,
}

impl Default for LabSpec {
    fn default() -> Self {
        Self {
            name_prefix: default_prefix(),
            nodes: 2,
            pods_per_node: 2,
            routing: Routing::default(),
            state_dir: None,
            agent_args: Vec::new(),
        }
    }
}

impl LabSpec {
    /// Checks every field; the error names the field, value and reason.
    pub fn validate(&self) -> Result<(), LabError> {
        topology::validate_prefix(&self.name_prefix).map_err(|e| LabError::InvalidSpec {
            field: "name_prefix",
            value: self.name_prefix.clone(),
            reason: e.to_string(),
        })?;
        if self.nodes == 0 || self.nodes > topology::MAX_NODES {
            return Err(LabError::InvalidSpec {
                field: "nodes",
                value: self.nodes.to_string(),
                reason: format!("use 1..={}", topology::MAX_NODES),
            });
        }
        if self.pods_per_node > 200 {
            return Err(LabError::InvalidSpec {
                field: "pods_per_node",
                value: self.pods_per_node.to_string(),
                reason: "use 0..=200 (a node's pod CIDR is a /24)".into(),
            });
        }
        Ok(())
    }

    /// The state directory: the explicit one, or `/run/sinew-lab/PREFIX`.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| default_state_dir(&self.name_prefix))
    }
}

/// The default state directory of a lab with `prefix`.
pub fn default_state_dir(prefix: &str) -> PathBuf {
    Path::new(DEFAULT_STATE_ROOT).join(prefix)
}

/// Where the lab's programs are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binaries {
    /// `sinew-agent`.
    pub agent: PathBuf,
    /// `sinew-cni`.
    pub cni: PathBuf,
    /// `sinew` (the CLI).
    pub sinew: PathBuf,
}

impl Binaries {
    /// The binaries in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            agent: dir.join("sinew-agent"),
            cni: dir.join("sinew-cni"),
            sinew: dir.join("sinew"),
        }
    }

    /// The binaries next to the running executable; for a test binary in
    /// `target/debug/deps`, those in `target/debug`.
    pub fn from_current_exe() -> Result<Self, LabError> {
        let exe = std::env::current_exe().map_err(|source| LabError::Io {
            what: "cannot find the running executable",
            path: PathBuf::from("/proc/self/exe"),
            source,
        })?;
        let mut dir = exe.parent().unwrap_or(Path::new("/")).to_owned();
        if dir.file_name().is_some_and(|n| n == "deps") {
            if let Some(parent) = dir.parent() {
                dir = parent.to_owned();
            }
        }
        Ok(Self::in_dir(&dir))
    }

    /// Fails with a build hint if the agent or the CNI plugin is missing.
    pub fn check(&self) -> Result<(), LabError> {
        for (name, package, path) in [
            ("sinew-agent", "sinew-agent", &self.agent),
            ("sinew-cni", "sinew-cni", &self.cni),
        ] {
            if !path.is_file() {
                return Err(LabError::MissingBinary {
                    name,
                    path: path.clone(),
                    package,
                });
            }
        }
        Ok(())
    }
}

/// One node as recorded in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Datastore name, `nodeI`.
    pub name: String,
    /// 1-based index.
    pub index: u32,
    /// The node's namespace.
    pub netns: NetNs,
    /// Underlay address.
    pub address: Ipv4Addr,
    /// Pod CIDR.
    pub pod_cidr: Ipv4Net,
    /// The agent's gRPC socket, `/run/sinew/PREFIX/NODE/agent.sock`.
    pub socket: PathBuf,
    /// The agent's `--state-dir`, also holding `agent.log`.
    pub state_dir: PathBuf,
    /// The agent's `--bpf-root`, `/sys/fs/bpf/sinew/PREFIX-NODE`.
    pub bpf_root: PathBuf,
    /// The agent's stdout and stderr.
    pub agent_log: PathBuf,
    /// The running agent's pid, if started.
    pub agent_pid: Option<u32>,
    /// The node's cgroup (`CGROUP2/sinew-lab/PREFIX-NODE`): its agent
    /// attaches socket load balancing there, and every process the lab
    /// runs in the node or its pods starts in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
}

impl From<ManifestError> for LabError {
    fn from(e: ManifestError) -> Self {
        LabError::Manifest(e)
    }
}

fn rollback_summary(undone: &[String], failed: &[String]) -> String {
    let mut s = if undone.is_empty() {
        "this apply had made nothing yet; nothing was changed".to_owned()
    } else {
        format!("rolled back what this apply had made: {}", undone.join(", "))
    };
    if !failed.is_empty() {
        s.push_str(&format!(
            "\ncould not roll back: {}; remove it with `sinew lab delete` or `sinew lab down`",
            failed.join("; ")
        ));
    }
    s
}

/// One pod as recorded in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Node name.
    pub node: String,
    /// The pod's network namespace.
    pub netns: NetNs,
    /// The address the CNI plugin reported; `None` until ADD succeeded.
    pub ip: Option<IpNet>,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Named container ports written into the Pod manifest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    /// `spec.serviceAccountName` written into the Pod manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

impl PodRecord {
    /// `NAMESPACE/NAME`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The name a user types: `NAME` in `default`, else `NAMESPACE/NAME`.
    pub fn display_name(&self) -> String {
        if self.namespace == POD_NAMESPACE {
            self.name.clone()
        } else {
            self.key()
        }
    }

    fn manifest(&self) -> String {
        datastore::pod_yaml_full(
            &self.namespace,
            &self.name,
            &self.node,
            &self.labels,
            &self.ports,
            self.service_account.as_deref(),
        )
    }
}

/// What `apply` did with one document, in `kubectl apply`'s words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyAction {
    /// It did not exist and was made.
    Created,
    /// Its labels changed.
    Configured,
    /// It already existed as described.
    Unchanged,
}

impl fmt::Display for ApplyAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ApplyAction::Created => "created",
            ApplyAction::Configured => "configured",
            ApplyAction::Unchanged => "unchanged",
        })
    }
}

/// One line of `apply`'s result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// `namespace/x` or `pod/x/a`.
    pub object: String,
    /// What happened.
    pub action: ApplyAction,
    /// For a pod: its node.
    pub node: Option<String>,
    /// For a pod without `spec.nodeName`: the lab chose its node.
    pub scheduled: bool,
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.object, self.action)?;
        match (&self.node, self.scheduled) {
            (Some(n), true) => write!(f, " (no spec.nodeName: scheduled on {n})"),
            (Some(n), false) if self.action == ApplyAction::Created => write!(f, " on {n}"),
            _ => Ok(()),
        }
    }
}

/// What an apply will do with one document, decided before anything is made.
#[derive(Debug, Clone)]
enum Step {
    NamespaceCreate(NamespaceDoc),
    NamespaceRelabel(NamespaceDoc),
    NamespaceSame(String),
    PodCreate {
        pod: PodDoc,
        node: String,
        scheduled: bool,
    },
    PodRelabel {
        key: String,
        labels: BTreeMap<String, String>,
    },
    PodSame {
        key: String,
        node: String,
    },
}

/// How to undo one step of an apply that failed later.
enum Undo {
    NamespaceCreated(String),
    NamespaceRelabeled(String, BTreeMap<String, String>),
    PodCreated(String),
    PodRelabeled(String, BTreeMap<String, String>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LabState {
    version: u32,
    spec: LabSpec,
    binaries: Binaries,
    nodes: Vec<NodeRecord>,
    pods: Vec<PodRecord>,
    /// Namespaces with a manifest, and their labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

/// Options of [`Lab::up_with`].
pub struct UpOptions<'a> {
    /// Called with the agent socket once it exists, until it returns true
    /// (for example a gRPC status call). Without it, `up` waits for the
    /// socket file and 200 ms.
    pub ready: Option<&'a dyn Fn(&Path) -> bool>,
    /// How long to wait for each agent.
    pub agent_timeout: Duration,
}

impl Default for UpOptions<'_> {
    fn default() -> Self {
        Self {
            ready: None,
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
        }
    }
}

/// What [`Lab::down`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownSummary {
    /// Things removed or stopped, one line each.
    pub removed: Vec<String>,
    /// Steps that failed but did not stop the teardown.
    pub warnings: Vec<String>,
    /// Things that still exist afterwards; empty when the lab is gone.
    pub left_behind: Vec<String>,
}

impl DownSummary {
    /// Whether nothing of the lab remains.
    pub fn is_clean(&self) -> bool {
        self.left_behind.is_empty()
    }
}

/// A lab, loaded from or backed by its state directory.
#[derive(Debug)]
pub struct Lab {
    dir: PathBuf,
    state: LabState,
}

impl Lab {
    /// Brings a lab up: topology, datastore, agents, pods. Progress lines go
    /// to `progress`. On failure the partial lab stays for inspection;
    /// [`Lab::down`] removes it.
    pub fn up(spec: &LabSpec, binaries: &Binaries, progress: &mut dyn FnMut(&str)) -> Result<Lab, LabError> {
        Self::up_with(spec, binaries, &UpOptions::default(), progress)
    }

    /// [`Lab::up`] with a readiness check and timeout.
    pub fn up_with(
        spec: &LabSpec,
        binaries: &Binaries,
        options: &UpOptions<'_>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Lab, LabError> {
        binaries.check()?;
        let mut lab = Self::up_underlay_only(spec, binaries, progress)?;
        bpffs::ensure_mounted()?;
        for i in 0..lab.state.nodes.len() {
            let name = lab.state.nodes[i].name.clone();
            progress(&format!("{name}: starting agent"));
            lab.start_agent_with(&name, options)?;
        }
        let per_node = lab.state.spec.pods_per_node;
        for i in 0..lab.state.nodes.len() {
            let node = lab.state.nodes[i].name.clone();
            for j in 1..=per_node {
                let pod = format!("{node}-pod{j}");
                progress(&format!("{node}: pod {j}/{per_node} {pod}"));
                let labels = BTreeMap::from([("app".to_owned(), format!("pod{j}")), ("node".to_owned(), node.clone())]);
                lab.add_pod(&node, &pod, labels)?;
            }
        }
        Ok(lab)
    }

    /// The first part of [`Lab::up`]: state file, topology and datastore,
    /// without agents or pods. The lab can be completed with
    /// [`Lab::start_agent`] and [`Lab::add_pod`], and taken down as usual.
    pub fn up_underlay_only(
        spec: &LabSpec,
        binaries: &Binaries,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Lab, LabError> {
        spec.validate()?;
        let dir = spec.state_dir();
        let state_file = dir.join(STATE_FILE);
        if state_file.exists() {
            return Err(LabError::AlreadyUp(dir));
        }
        let names = Names::new(&spec.name_prefix)?;
        // Checked before the state file exists: `down` of this state dir
        // would otherwise delete another lab's namespaces.
        let in_use = names.existing_netns();
        if !in_use.is_empty() {
            return Err(LabError::PrefixInUse {
                prefix: spec.name_prefix.clone(),
                netns: in_use.join(", "),
            });
        }
        create_dir(&dir)?;
        let cgroup_root = crate::cgroup::root()?;
        let nodes = (1..=spec.nodes)
            .map(|index| {
                let name = topology::node_name(index);
                let state_dir = dir.join(&name);
                Ok(NodeRecord {
                    netns: NetNs::named(names.node(index))?,
                    address: topology::node_address(index),
                    pod_cidr: topology::pod_cidr(index),
                    socket: Path::new(SOCKET_ROOT)
                        .join(&spec.name_prefix)
                        .join(&name)
                        .join("agent.sock"),
                    agent_log: state_dir.join("agent.log"),
                    state_dir,
                    bpf_root: bpffs::pin_dir(&spec.name_prefix, &name),
                    agent_pid: None,
                    cgroup: Some(crate::cgroup::node_cgroup(&cgroup_root, &spec.name_prefix, &name)),
                    index,
                    name,
                })
            })
            .collect::<Result<Vec<_>, LabError>>()?;
        // Written before anything else exists, so `down` can always find
        // what a failed `up` left.
        let lab = Lab {
            dir,
            state: LabState {
                version: STATE_VERSION,
                spec: spec.clone(),
                binaries: binaries.clone(),
                nodes,
                pods: Vec::new(),
                namespaces: BTreeMap::new(),
            },
        };
        lab.save()?;
        let mut topo = Topology::create(&spec.name_prefix, spec.nodes, progress)?;
        topo.persist();
        progress("writing datastore");
        for node in &lab.state.nodes {
            create_dir(&node.state_dir)?;
            if let Some(cg) = &node.cgroup {
                crate::cgroup::create(cg)?;
            }
            datastore::write_atomic(
                &datastore::node_path(&lab.datastore_dir(), &node.name),
                &datastore::node_yaml(&node.name, node.pod_cidr, node.address),
            )?;
        }
        create_dir(&lab.datastore_dir().join("pods"))?;
        Ok(lab)
    }

    /// Loads the lab whose state is in `state_dir`.
    pub fn load(state_dir: &Path) -> Result<Lab, LabError> {
        let state = read_state(state_dir)?.ok_or_else(|| LabError::NotUp(state_dir.to_owned()))?;
        Ok(Lab {
            dir: state_dir.to_owned(),
            state,
        })
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// The `local` datastore directory, `STATE/datastore`.
    pub fn datastore_dir(&self) -> PathBuf {
        self.dir.join("datastore")
    }

    /// The spec the lab was brought up with.
    pub fn spec(&self) -> &LabSpec {
        &self.state.spec
    }

    /// The binaries the lab runs.
    pub fn binaries(&self) -> &Binaries {
        &self.state.binaries
    }

    /// The nodes, in index order.
    pub fn nodes(&self) -> &[NodeRecord] {
        &self.state.nodes
    }

    /// The pods, in creation order.
    pub fn pods(&self) -> &[PodRecord] {
        &self.state.pods
    }

    /// A node by name (`node1`).
    pub fn node(&self, name: &str) -> Result<&NodeRecord, LabError> {
        self.state
            .nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| LabError::UnknownNode {
                name: name.to_owned(),
                known: join(self.state.nodes.iter().map(|n| n.name.as_str())),
            })
    }

    /// A pod by `NAMESPACE/NAME`, or by a bare `NAME` that only one
    /// namespace has.
    pub fn pod(&self, name: &str) -> Result<&PodRecord, LabError> {
        Ok(&self.state.pods[self.pod_index(name)?])
    }

    /// The namespaces the lab knows: `default`, those with a manifest and
    /// those with pods.
    pub fn namespaces(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut all = self.state.namespaces.clone();
        for ns in std::iter::once(POD_NAMESPACE).chain(self.state.pods.iter().map(|p| p.namespace.as_str())) {
            all.entry(ns.to_owned()).or_default();
        }
        all
    }

    /// The topology, for building on it (e.g. baseline pods); dropping it
    /// deletes nothing.
    pub fn topology(&self) -> Result<Topology, LabError> {
        Ok(Topology::attach(&self.state.spec.name_prefix, self.state.spec.nodes)?)
    }

    /// Starts the node's agent with the lab's flags (again, after
    /// [`Lab::stop_agent`]) and waits for its socket. Returns its pid.
    pub fn start_agent(&mut self, node: &str) -> Result<u32, LabError> {
        self.start_agent_with(node, &UpOptions::default())
    }

    /// [`Lab::start_agent`] with a readiness check and timeout.
    pub fn start_agent_with(&mut self, node: &str, options: &UpOptions<'_>) -> Result<u32, LabError> {
        let rec = self.node(node)?.clone();
        if let Some(pid) = rec.agent_pid {
            if self.is_our_agent(&rec, pid) {
                return Ok(pid);
            }
        }
        create_dir(&rec.state_dir)?;
        if let Some(sock_dir) = rec.socket.parent() {
            create_dir(sock_dir)?;
        }
        // A stale socket would make the wait below succeed at once.
        match std::fs::remove_file(&rec.socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(LabError::Io {
                    what: "cannot remove stale agent socket",
                    path: rec.socket.clone(),
                    source: e,
                })
            }
            _ => {}
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&rec.agent_log)
            .map_err(|source| LabError::Io {
                what: "cannot open agent log",
                path: rec.agent_log.clone(),
                source,
            })?;
        let log_err = log.try_clone().map_err(|source| LabError::Io {
            what: "cannot open agent log",
            path: rec.agent_log.clone(),
            source,
        })?;
        let args = self.agent_args(&rec);
        let mut cmd = command_in(&rec.netns, &self.state.binaries.agent)?;
        crate::cgroup::enter_on_exec(&mut cmd, rec.cgroup.as_deref());
        cmd.args(&args).stdin(Stdio::null()).stdout(log).stderr(log_err);
        detach(&mut cmd);
        let child = cmd.spawn().map_err(|source| LabError::Exec {
            target: rec.name.clone(),
            argv: std::iter::once(self.state.binaries.agent.display().to_string())
                .chain(args.iter().cloned())
                .collect(),
            source,
        })?;
        let pid = child.id();
        tracing::info!(node = %rec.name, pid, "started sinew-agent");
        self.node_mut(node)?.agent_pid = Some(pid);
        self.save()?;
        wait_for_agent(&rec, child, options)?;
        Ok(pid)
    }

    /// Stops the node's agent: SIGTERM, then SIGKILL after 5 s. Returns
    /// whether an agent was running. Pinned maps stay, so pod traffic keeps
    /// flowing while the agent is down.
    pub fn stop_agent(&mut self, node: &str) -> Result<bool, LabError> {
        let rec = self.node(node)?.clone();
        let mut pids: Vec<u32> = rec
            .agent_pid
            .filter(|&pid| self.is_our_agent(&rec, pid))
            .into_iter()
            .collect();
        // Also an agent whose pid was never recorded (a crashed `up`).
        for pid in process::find_by_arg(&rec.socket.to_string_lossy()) {
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        let was_running = !pids.is_empty();
        for pid in pids {
            if !process::terminate(pid, AGENT_STOP_GRACE) {
                return Err(LabError::AgentStuck {
                    node: rec.name.clone(),
                    pid,
                });
            }
        }
        self.node_mut(node)?.agent_pid = None;
        self.save()?;
        Ok(was_running)
    }

    /// Whether the node's recorded agent process is running.
    pub fn agent_running(&self, node: &str) -> Result<bool, LabError> {
        let rec = self.node(node)?;
        Ok(rec.agent_pid.is_some_and(|pid| self.is_our_agent(rec, pid)))
    }

    /// Creates a pod on `node`: its namespace, its datastore manifest, and a
    /// CNI ADD through the node's agent. On failure everything for this pod
    /// is undone and the error carries the CNI code and message.
    pub fn add_pod(
        &mut self,
        node: &str,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<&PodRecord, LabError> {
        self.add_pod_full(node, POD_NAMESPACE, name, labels, Vec::new())
    }

    /// Writes a Namespace manifest with `labels` (again: replaces them).
    /// Pods in a namespace without one still work; they only lack its labels.
    pub fn add_namespace(&mut self, name: &str, labels: &BTreeMap<String, String>) -> Result<(), LabError> {
        validate_pod_name(name)?;
        datastore::write_atomic(
            &datastore::namespace_path(&self.datastore_dir(), name),
            &datastore::namespace_yaml(name, labels),
        )?;
        self.state.namespaces.insert(name.to_owned(), labels.clone());
        self.save()
    }

    /// Rewrites a pod's manifest with new labels, as a `kubectl label`
    /// would; the agents pick it up from the datastore, give the pod the
    /// identity of its new labels and enforce policy accordingly.
    pub fn relabel_pod(&mut self, name: &str, labels: BTreeMap<String, String>) -> Result<(), LabError> {
        let idx = self.pod_index(name)?;
        let pod = &mut self.state.pods[idx];
        pod.labels = labels;
        let pod = pod.clone();
        datastore::write_atomic(
            &datastore::pod_path(&self.datastore_dir(), &pod.namespace, &pod.name),
            &pod.manifest(),
        )?;
        self.save()
    }

    /// `sinew lab label pod`: edits a pod's labels like `kubectl label`.
    /// Returns whether they changed, and notes (labels that were not there).
    pub fn label_pod(
        &mut self,
        name: &str,
        edits: &[LabelEdit],
        overwrite: bool,
    ) -> Result<(bool, Vec<String>), LabError> {
        let pod = self.pod(name)?;
        let what = format!("pod {}", pod.key());
        let (labels, notes) = manifest::edit_labels(&pod.labels, edits, overwrite)
            .map_err(|reason| LabError::Refused { what, reason })?;
        if labels == pod.labels {
            return Ok((false, notes));
        }
        self.relabel_pod(name, labels)?;
        Ok((true, notes))
    }

    /// `sinew lab label namespace`: edits a namespace's labels like
    /// `kubectl label`; every pod in it gets the identity of its new
    /// namespace labels.
    pub fn label_namespace(
        &mut self,
        name: &str,
        edits: &[LabelEdit],
        overwrite: bool,
    ) -> Result<(bool, Vec<String>), LabError> {
        let current = self.namespace(name)?;
        let what = format!("namespace {name}");
        if edits.iter().any(|e| match e {
            LabelEdit::Set(k, v) => k == manifest::NAMESPACE_NAME_LABEL && v != name,
            LabelEdit::Remove(k) => k == manifest::NAMESPACE_NAME_LABEL,
        }) {
            return Err(LabError::Refused {
                what,
                reason: format!(
                    "{} is always the namespace's name and cannot change",
                    manifest::NAMESPACE_NAME_LABEL
                ),
            });
        }
        let (labels, notes) =
            manifest::edit_labels(&current, edits, overwrite).map_err(|reason| LabError::Refused { what, reason })?;
        if labels == current && self.state.namespaces.contains_key(name) {
            return Ok((false, notes));
        }
        self.add_namespace(name, &labels)?;
        Ok((labels != current, notes))
    }

    /// A namespace's labels; an error naming the known ones if the lab does
    /// not have it.
    pub fn namespace(&self, name: &str) -> Result<BTreeMap<String, String>, LabError> {
        let all = self.namespaces();
        all.get(name).cloned().ok_or_else(|| LabError::UnknownNamespace {
            name: name.to_owned(),
            known: join(all.keys().map(String::as_str)),
        })
    }

    /// Deletes a namespace as Kubernetes does: its pods first (CNI DEL),
    /// then its manifest. Returns the pods deleted. `default` cannot go.
    pub fn delete_namespace(&mut self, name: &str) -> Result<Vec<String>, LabError> {
        if name == POD_NAMESPACE {
            return Err(LabError::Refused {
                what: format!("namespace {name}"),
                reason: "the default namespace cannot be deleted (as in Kubernetes); delete its pods instead".into(),
            });
        }
        self.namespace(name)?;
        let pods: Vec<String> = self
            .state
            .pods
            .iter()
            .filter(|p| p.namespace == name)
            .map(PodRecord::key)
            .collect();
        for key in &pods {
            self.delete_pod(key)?;
        }
        datastore::remove(&datastore::namespace_path(&self.datastore_dir(), name))?;
        self.state.namespaces.remove(name);
        self.save()?;
        Ok(pods)
    }

    /// [`Lab::add_pod`] in any Kubernetes namespace, with named container
    /// ports in its manifest. A pod is named by namespace and name, as in
    /// Kubernetes: `a` may exist in `x` and in `y`.
    pub fn add_pod_full(
        &mut self,
        node: &str,
        namespace: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        ports: Vec<ContainerPort>,
    ) -> Result<&PodRecord, LabError> {
        self.create_pod(node, namespace, name, labels, ports, None)
    }

    fn create_pod(
        &mut self,
        node: &str,
        namespace: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        ports: Vec<ContainerPort>,
        service_account: Option<String>,
    ) -> Result<&PodRecord, LabError> {
        validate_pod_name(name)?;
        validate_pod_name(namespace)?;
        let key = format!("{namespace}/{name}");
        if self.state.pods.iter().any(|p| p.key() == key) {
            return Err(LabError::InvalidPodName {
                name: key,
                reason: "a pod with this name exists in this namespace".into(),
            });
        }
        let rec = self.node(node)?.clone();
        let names = Names::new(&self.state.spec.name_prefix)?;
        // Pods of `default` keep their plain names; elsewhere the namespace
        // goes in with a '.', which neither a namespace nor a pod name has.
        let (netns_name, id_name) = if namespace == POD_NAMESPACE {
            (names.pod(rec.index, name), name.to_owned())
        } else {
            (names.pod(rec.index, &format!("{namespace}.{name}")), key.clone())
        };
        let netns = NetNs::named(netns_name)?;
        if netns.exists() {
            return Err(LabError::InvalidPodName {
                name: key,
                reason: format!("network namespace {netns} already exists; run `sinew lab down`"),
            });
        }
        let netns = NetNs::create(netns.name())?;
        let pod = PodRecord {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            node: rec.name.clone(),
            netns,
            ip: None,
            container_id: cni::container_id(&self.state.spec.name_prefix, &id_name),
            labels,
            ports,
            service_account,
        };
        let manifest = datastore::pod_path(&self.datastore_dir(), &pod.namespace, name);
        let setup = (|| -> Result<IpNet, LabError> {
            datastore::write_atomic(&manifest, &pod.manifest())?;
            self.state.pods.push(pod.clone());
            self.save()?;
            let out = self.cni_for_pod("ADD", &pod, None)?;
            Ok(cni::parse_add(name, &out)?)
        })();
        match setup {
            Ok(ip) => {
                tracing::info!(pod = %key, node = %rec.name, %ip, "pod added");
                let idx = self.pod_index(&key)?;
                self.state.pods[idx].ip = Some(ip);
                self.save()?;
                Ok(&self.state.pods[idx])
            }
            Err(e) => {
                // CNI requires DEL to clean up after a failed ADD.
                let _ = self.cni_for_pod("DEL", &pod, Some(DOWN_CNI_TIMEOUT));
                let _ = pod.netns.delete();
                let _ = datastore::remove(&manifest);
                self.state.pods.retain(|p| p.key() != key);
                let _ = self.save();
                Err(e)
            }
        }
    }

    /// Deletes a pod: CNI DEL, then its namespace and manifest. When DEL
    /// fails nothing is removed, so it can be retried (or `down` used).
    pub fn delete_pod(&mut self, name: &str) -> Result<(), LabError> {
        let pod = self.pod(name)?.clone();
        let out = self.cni_for_pod("DEL", &pod, None)?;
        cni::check("DEL", &pod.name, &out)?;
        pod.netns.delete()?;
        datastore::remove(&datastore::pod_path(&self.datastore_dir(), &pod.namespace, &pod.name))?;
        self.state.pods.retain(|p| p.key() != pod.key());
        self.save()?;
        Ok(())
    }

    /// `sinew lab apply`: makes the lab hold the Namespaces and Pods of
    /// `docs` as `kubectl apply` would. The whole file is checked before
    /// anything is made; a new pod is created through the CNI plugin, a
    /// changed label set is a relabel, an unchanged object is left alone.
    /// A pod's node and spec cannot change. When a step fails, whatever
    /// this apply made or changed before it is undone.
    pub fn apply(&mut self, docs: &[Document], progress: &mut dyn FnMut(&Applied)) -> Result<Vec<Applied>, LabError> {
        let steps = self.plan_apply(docs)?;
        let mut undo: Vec<Undo> = Vec::new();
        let mut done = Vec::new();
        for (doc, step) in steps {
            match self.apply_step(step, &mut undo) {
                Ok(applied) => {
                    progress(&applied);
                    done.push(applied);
                }
                Err(e) => {
                    let (undone, undo_failed) = self.roll_back(undo);
                    return Err(LabError::ApplyFailed {
                        document: format!("{}: document {} ({})", doc.source_name, doc.index, doc.object),
                        cause: Box::new(e),
                        undone,
                        undo_failed,
                    });
                }
            }
        }
        Ok(done)
    }

    /// Decides what [`Lab::apply`] will do, checking every document against
    /// the lab; namespaces come first, then pods, each in file order.
    fn plan_apply<'d>(&self, docs: &'d [Document]) -> Result<Vec<(&'d Document, Step)>, ManifestError> {
        let mut known = self.namespaces();
        let mut per_node: BTreeMap<&str, usize> = self.state.nodes.iter().map(|n| (n.name.as_str(), 0)).collect();
        for p in &self.state.pods {
            *per_node.entry(p.node.as_str()).or_default() += 1;
        }
        let mut steps = Vec::new();
        for doc in docs {
            let LabObject::Namespace(ns) = &doc.object else {
                continue;
            };
            let step = match self.state.namespaces.get(&ns.name) {
                Some(labels) if *labels == ns.labels => Step::NamespaceSame(ns.name.clone()),
                Some(_) => Step::NamespaceRelabel(ns.clone()),
                None => Step::NamespaceCreate(ns.clone()),
            };
            known.insert(ns.name.clone(), ns.labels.clone());
            steps.push((doc, step));
        }
        for doc in docs {
            let LabObject::Pod(pod) = &doc.object else { continue };
            if !known.contains_key(&pod.namespace) {
                return Err(doc.error(
                    "metadata.namespace",
                    format!(
                        "namespace {:?} does not exist: add a v1 Namespace document for it to the file (namespaces: {})",
                        pod.namespace,
                        join(known.keys().map(String::as_str))
                    ),
                ));
            }
            if let Some(node) = &pod.node {
                if self.node(node).is_err() {
                    return Err(doc.error(
                        "spec.nodeName",
                        format!(
                            "no node {node:?} in this lab; nodes are: {} (or leave spec.nodeName out and the lab picks one)",
                            join(self.state.nodes.iter().map(|n| n.name.as_str()))
                        ),
                    ));
                }
            }
            let key = pod.key();
            let step = match self.state.pods.iter().find(|p| p.key() == key) {
                Some(old) => {
                    let delete_first = format!("delete it first (`sinew lab delete pod {key}`), then apply");
                    if pod.node.as_ref().is_some_and(|n| *n != old.node) {
                        return Err(doc.error(
                            "spec.nodeName",
                            format!(
                                "pod {key} runs on {}; a pod's node cannot change (pods are immutable there, as in Kubernetes): {delete_first}",
                                old.node
                            ),
                        ));
                    }
                    if pod.service_account != old.service_account {
                        return Err(doc.error(
                            "spec.serviceAccountName",
                            format!(
                                "pod {key} has {:?}; only the labels of an existing pod can change (as in Kubernetes): {delete_first}",
                                old.service_account.as_deref().unwrap_or("")
                            ),
                        ));
                    }
                    if pod.ports != old.ports {
                        return Err(doc.error(
                            "spec.containers[*].ports",
                            format!(
                                "pod {key} has other ports; only the labels of an existing pod can change (as in Kubernetes): {delete_first}"
                            ),
                        ));
                    }
                    if pod.labels == old.labels {
                        Step::PodSame {
                            key,
                            node: old.node.clone(),
                        }
                    } else {
                        Step::PodRelabel {
                            key,
                            labels: pod.labels.clone(),
                        }
                    }
                }
                None => {
                    // Without spec.nodeName, the node with the fewest pods
                    // (the first of those), counting this file's pods.
                    let (node, scheduled) = match &pod.node {
                        Some(n) => (n.clone(), false),
                        None => {
                            let least = per_node
                                .iter()
                                .min_by_key(|(name, count)| {
                                    (**count, self.node(name).map(|n| n.index).unwrap_or(u32::MAX))
                                })
                                .map(|(name, _)| (*name).to_owned())
                                .expect("a lab has nodes");
                            (least, true)
                        }
                    };
                    *per_node
                        .entry(self.node(&node).expect("checked").name.as_str())
                        .or_default() += 1;
                    Step::PodCreate {
                        pod: pod.clone(),
                        node,
                        scheduled,
                    }
                }
            };
            steps.push((doc, step));
        }
        Ok(steps)
    }

    fn apply_step(&mut self, step: Step, undo: &mut Vec<Undo>) -> Result<Applied, LabError> {
        let ns_done = |name: &str, action| Applied {
            object: format!("namespace/{name}"),
            action,
            node: None,
            scheduled: false,
        };
        Ok(match step {
            Step::NamespaceSame(name) => ns_done(&name, ApplyAction::Unchanged),
            Step::NamespaceCreate(ns) => {
                self.add_namespace(&ns.name, &ns.labels)?;
                undo.push(Undo::NamespaceCreated(ns.name.clone()));
                ns_done(&ns.name, ApplyAction::Created)
            }
            Step::NamespaceRelabel(ns) => {
                let old = self.namespace(&ns.name)?;
                self.add_namespace(&ns.name, &ns.labels)?;
                undo.push(Undo::NamespaceRelabeled(ns.name.clone(), old));
                ns_done(&ns.name, ApplyAction::Configured)
            }
            Step::PodSame { key, node } => Applied {
                object: format!("pod/{key}"),
                action: ApplyAction::Unchanged,
                node: Some(node),
                scheduled: false,
            },
            Step::PodRelabel { key, labels } => {
                let old = self.pod(&key)?.clone();
                self.relabel_pod(&key, labels)?;
                undo.push(Undo::PodRelabeled(key.clone(), old.labels));
                Applied {
                    object: format!("pod/{key}"),
                    action: ApplyAction::Configured,
                    node: Some(old.node),
                    scheduled: false,
                }
            }
            Step::PodCreate { pod, node, scheduled } => {
                self.create_pod(
                    &node,
                    &pod.namespace,
                    &pod.name,
                    pod.labels.clone(),
                    pod.ports.clone(),
                    pod.service_account.clone(),
                )?;
                undo.push(Undo::PodCreated(pod.key()));
                Applied {
                    object: format!("pod/{}", pod.key()),
                    action: ApplyAction::Created,
                    node: Some(node),
                    scheduled,
                }
            }
        })
    }

    /// Undoes the steps of a failed apply, newest first. Returns what was
    /// undone and what could not be.
    fn roll_back(&mut self, undo: Vec<Undo>) -> (Vec<String>, Vec<String>) {
        let (mut undone, mut failed) = (Vec::new(), Vec::new());
        for u in undo.into_iter().rev() {
            let (what, result) = match u {
                Undo::PodCreated(key) => (format!("pod {key} deleted"), self.delete_pod(&key)),
                Undo::PodRelabeled(key, old) => (format!("pod {key} relabelled back"), self.relabel_pod(&key, old)),
                Undo::NamespaceCreated(name) => {
                    let r = datastore::remove(&datastore::namespace_path(&self.datastore_dir(), &name))
                        .map_err(LabError::from)
                        .and_then(|()| {
                            self.state.namespaces.remove(&name);
                            self.save()
                        });
                    (format!("namespace {name} removed"), r)
                }
                Undo::NamespaceRelabeled(name, old) => (
                    format!("namespace {name} relabelled back"),
                    self.add_namespace(&name, &old),
                ),
            };
            match result {
                Ok(()) => undone.push(what),
                Err(e) => failed.push(format!("{what}: {e}")),
            }
        }
        (undone, failed)
    }

    /// `sinew lab delete -f`: deletes the Pods and Namespaces of `docs`
    /// (a Namespace with its pods). Every object must exist, or nothing is
    /// deleted. Returns one line per object deleted.
    pub fn delete_objects(&mut self, docs: &[Document]) -> Result<Vec<String>, LabError> {
        let known = self.namespaces();
        for doc in docs {
            match &doc.object {
                LabObject::Pod(p) => {
                    if !self.state.pods.iter().any(|r| r.key() == p.key()) {
                        return Err(doc
                            .error(
                                "metadata.name",
                                format!(
                                    "no pod {} in this lab; pods are: {}",
                                    p.key(),
                                    join(
                                        self.state
                                            .pods
                                            .iter()
                                            .map(PodRecord::key)
                                            .collect::<Vec<_>>()
                                            .iter()
                                            .map(String::as_str)
                                    )
                                ),
                            )
                            .into());
                    }
                }
                LabObject::Namespace(n) => {
                    if !known.contains_key(&n.name) {
                        return Err(doc
                            .error(
                                "metadata.name",
                                format!(
                                    "no namespace {:?} in this lab; namespaces are: {}",
                                    n.name,
                                    join(known.keys().map(String::as_str))
                                ),
                            )
                            .into());
                    }
                    if n.name == POD_NAMESPACE {
                        return Err(doc
                            .error(
                                "metadata.name",
                                "the default namespace cannot be deleted (as in Kubernetes)",
                            )
                            .into());
                    }
                }
            }
        }
        let mut out = Vec::new();
        for doc in docs {
            if let LabObject::Pod(p) = &doc.object {
                self.delete_pod(&p.key())?;
                out.push(format!("pod/{} deleted", p.key()));
            }
        }
        for doc in docs {
            if let LabObject::Namespace(n) = &doc.object {
                let pods = self.delete_namespace(&n.name)?;
                out.extend(pods.iter().map(|k| format!("pod/{k} deleted")));
                out.push(format!("namespace/{} deleted", n.name));
            }
        }
        Ok(out)
    }

    /// Runs the CNI plugin inside `node`'s namespace with exactly these
    /// inputs and returns its raw output, for tests of malformed requests.
    /// `CNI_PATH` is the plugin's directory.
    #[allow(clippy::too_many_arguments)]
    pub fn invoke_cni(
        &self,
        node: &str,
        command: &str,
        container_id: &str,
        netns: &Path,
        ifname: &str,
        args: &str,
        config_json: &str,
    ) -> Result<Output, LabError> {
        let rec = self.node(node)?;
        let req = CniRequest {
            command: command.to_owned(),
            container_id: container_id.to_owned(),
            netns: netns.to_owned(),
            ifname: ifname.to_owned(),
            args: args.to_owned(),
            config: config_json.to_owned(),
        };
        Ok(cni::invoke(&rec.netns, &self.state.binaries.cni, &req, None)?)
    }

    /// The network configuration the lab passes to the CNI plugin for `node`.
    pub fn cni_config(&self, node: &str) -> Result<String, LabError> {
        Ok(cni::network_config(&self.node(node)?.socket))
    }

    /// Runs `argv` in the pod's namespace with inherited stdio.
    pub fn exec<S: AsRef<OsStr>>(&self, pod: &str, argv: &[S]) -> Result<ExitStatus, LabError> {
        let mut cmd = self.command(pod, argv)?;
        cmd.status().map_err(|source| exec_err(pod, argv, source))
    }

    /// Runs `argv` in the pod's namespace and captures its output.
    pub fn exec_output<S: AsRef<OsStr>>(&self, pod: &str, argv: &[S]) -> Result<Output, LabError> {
        let mut cmd = self.command(pod, argv)?;
        cmd.stdin(Stdio::null())
            .output()
            .map_err(|source| exec_err(pod, argv, source))
    }

    /// A command that runs `argv` in the pod's (or, given a node name, the
    /// node's) network namespace and cgroup, for callers that spawn it
    /// themselves (long-running clients with pipes).
    pub fn command<S: AsRef<OsStr>>(&self, target: &str, argv: &[S]) -> Result<std::process::Command, LabError> {
        let (netns, node) = match self.pod(target) {
            Ok(p) => (p.netns.clone(), p.node.clone()),
            Err(e) => match self.node(target) {
                Ok(n) => (n.netns.clone(), n.name.clone()),
                Err(_) => return Err(e),
            },
        };
        let mut cmd = build(&netns, target, argv)?;
        crate::cgroup::enter_on_exec(&mut cmd, self.node(&node)?.cgroup.as_deref());
        Ok(cmd)
    }

    /// Runs `argv` in the node's namespace and captures its output.
    pub fn node_exec_output<S: AsRef<OsStr>>(&self, node: &str, argv: &[S]) -> Result<Output, LabError> {
        self.node(node)?;
        let mut cmd = self.command(node, argv)?;
        cmd.stdin(Stdio::null())
            .output()
            .map_err(|source| exec_err(node, argv, source))
    }

    /// Takes down the lab whose state is in `state_dir`: CNI DEL for every
    /// pod, agents stopped, every namespace with the lab's prefix deleted
    /// (also ones a failed `up` did not record), pin dirs, socket dirs and
    /// the state dir removed. Best effort: a failing step becomes a warning.
    /// Running it again, or without a lab, does nothing.
    pub fn down(state_dir: &Path) -> Result<DownSummary, LabError> {
        let state = match read_state(state_dir) {
            Ok(Some(state)) => state,
            Ok(None) => {
                let mut summary = DownSummary::default();
                if state_dir.exists() {
                    remove_dir(state_dir, &mut summary);
                    if state_dir.exists() {
                        summary.left_behind.push(state_dir.display().to_string());
                    }
                }
                return Ok(summary);
            }
            Err(e) => {
                // Unreadable state: in the default layout the directory is
                // named after the prefix, which is all teardown needs.
                let prefix = state_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .filter(|p| topology::validate_prefix(p).is_ok())
                    .filter(|p| *state_dir == default_state_dir(p));
                return match prefix {
                    Some(prefix) => {
                        let mut summary = down_state(state_dir, None, &prefix);
                        summary.warnings.insert(0, e.to_string());
                        Ok(summary)
                    }
                    None => Err(e),
                };
            }
        };
        Ok(down_state(state_dir, Some(state.clone()), &state.spec.name_prefix))
    }

    /// Takes down whatever exists of a lab with `prefix` when its state file
    /// is lost: like [`Lab::down`] without the CNI DELs.
    pub fn down_prefix(prefix: &str, state_dir: &Path) -> Result<DownSummary, LabError> {
        topology::validate_prefix(prefix)?;
        let state = read_state(state_dir).ok().flatten();
        Ok(down_state(state_dir, state, prefix))
    }

    fn agent_args(&self, rec: &NodeRecord) -> Vec<String> {
        vec![
            "--node-name".into(),
            rec.name.clone(),
            "--datastore".into(),
            self.datastore_dir().display().to_string(),
            "--socket".into(),
            rec.socket.display().to_string(),
            "--state-dir".into(),
            rec.state_dir.display().to_string(),
            "--bpf-root".into(),
            rec.bpf_root.display().to_string(),
            "--routing".into(),
            self.state.spec.routing.to_string(),
            "--uplink".into(),
            UPLINK.into(),
        ]
        .into_iter()
        .chain(
            rec.cgroup
                .iter()
                .flat_map(|c| ["--cgroup-root".to_string(), c.display().to_string()]),
        )
        .chain(self.state.spec.agent_args.iter().cloned())
        .collect()
    }

    fn is_our_agent(&self, rec: &NodeRecord, pid: u32) -> bool {
        // The pid may have been reused since it was recorded.
        let socket = rec.socket.to_string_lossy();
        process::is_running(pid) && process::cmdline(pid).is_some_and(|args| args.iter().any(|a| *a == socket))
    }

    fn cni_for_pod(&self, command: &str, pod: &PodRecord, timeout: Option<Duration>) -> Result<Output, LabError> {
        let rec = self.node(&pod.node)?;
        cni_request(&self.state.binaries.cni, rec, pod, command, timeout)
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut NodeRecord, LabError> {
        let idx = self.node(name).map(|n| n.index)?;
        Ok(self
            .state
            .nodes
            .iter_mut()
            .find(|n| n.index == idx)
            .expect("looked up above"))
    }

    fn pod_index(&self, name: &str) -> Result<usize, LabError> {
        let found: Vec<usize> = match name.split_once('/') {
            Some((ns, n)) => self
                .state
                .pods
                .iter()
                .position(|p| p.namespace == ns && p.name == n)
                .into_iter()
                .collect(),
            None => (0..self.state.pods.len())
                .filter(|&i| self.state.pods[i].name == name)
                .collect(),
        };
        match found[..] {
            [i] => Ok(i),
            [] => Err(LabError::UnknownPod {
                name: name.to_owned(),
                known: join(
                    self.state
                        .pods
                        .iter()
                        .map(|p| p.display_name())
                        .collect::<Vec<_>>()
                        .iter()
                        .map(String::as_str),
                ),
            }),
            _ => Err(LabError::AmbiguousPod {
                name: name.to_owned(),
                candidates: found
                    .iter()
                    .map(|&i| self.state.pods[i].key())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    fn save(&self) -> Result<(), LabError> {
        let json = serde_json::to_string_pretty(&self.state).expect("state always serialises");
        datastore::write_atomic(&self.dir.join(STATE_FILE), &json)?;
        Ok(())
    }
}

fn cni_request(
    plugin: &Path,
    node: &NodeRecord,
    pod: &PodRecord,
    command: &str,
    timeout: Option<Duration>,
) -> Result<Output, LabError> {
    let req = CniRequest {
        command: command.to_owned(),
        container_id: pod.container_id.clone(),
        netns: pod.netns.path(),
        ifname: POD_IFNAME.to_owned(),
        args: cni::k8s_args(&pod.namespace, &pod.name),
        config: cni::network_config(&node.socket),
    };
    Ok(cni::invoke_in(
        &node.netns,
        node.cgroup.as_deref(),
        plugin,
        &req,
        timeout,
    )?)
}

fn wait_for_agent(rec: &NodeRecord, mut child: Child, options: &UpOptions<'_>) -> Result<(), LabError> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(LabError::AgentExited {
                node: rec.name.clone(),
                status: status.to_string(),
                log: rec.agent_log.clone(),
                tail: log_tail(&rec.agent_log, 20),
            });
        }
        if rec.socket.exists() {
            match options.ready {
                Some(ready) => {
                    if ready(&rec.socket) {
                        return Ok(());
                    }
                }
                None => {
                    std::thread::sleep(Duration::from_millis(200));
                    return Ok(());
                }
            }
        }
        if start.elapsed() >= options.agent_timeout {
            return Err(LabError::AgentTimeout {
                node: rec.name.clone(),
                secs: options.agent_timeout.as_secs(),
                socket: rec.socket.clone(),
                log: rec.agent_log.clone(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn read_state(state_dir: &Path) -> Result<Option<LabState>, LabError> {
    let path = state_dir.join(STATE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(LabError::BadState {
                path,
                reason: e.to_string(),
            })
        }
    };
    let state: LabState = serde_json::from_str(&text).map_err(|e| LabError::BadState {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if state.version != STATE_VERSION {
        return Err(LabError::BadState {
            path,
            reason: format!(
                "state version {} is not {STATE_VERSION}; use the sinew build that created the lab",
                state.version
            ),
        });
    }
    Ok(Some(state))
}

fn down_state(state_dir: &Path, state: Option<LabState>, prefix: &str) -> DownSummary {
    let mut s = DownSummary::default();
    let Ok(names) = Names::new(prefix) else {
        s.warnings.push(format!("invalid prefix {prefix:?}"));
        return s;
    };
    let socket_root = Path::new(SOCKET_ROOT).join(prefix);

    // 1. CNI DEL while the agents still run, so they forget the endpoints.
    if let Some(state) = &state {
        for pod in &state.pods {
            let Some(node) = state.nodes.iter().find(|n| n.name == pod.node) else {
                continue;
            };
            if !node.netns.exists() || !state.binaries.cni.is_file() {
                continue;
            }
            if !node.socket.exists() {
                // No agent to tell; the namespaces go below anyway.
                s.warnings.push(format!(
                    "pod {}: CNI DEL skipped, {} is gone",
                    pod.display_name(),
                    node.socket.display()
                ));
                continue;
            }
            match cni_request(&state.binaries.cni, node, pod, "DEL", Some(DOWN_CNI_TIMEOUT))
                .and_then(|out| Ok(cni::check("DEL", &pod.name, &out)?))
            {
                Ok(()) => s.removed.push(format!("pod {} (CNI DEL)", pod.display_name())),
                Err(e) => s.warnings.push(format!("pod {}: {e}", pod.display_name())),
            }
        }
    }

    // 2. Agents: recorded pids, and any process using the lab's socket dir.
    let mut agents: Vec<u32> = state
        .iter()
        .flat_map(|st| st.nodes.iter())
        .filter_map(|n| {
            let sock = n.socket.to_string_lossy().into_owned();
            n.agent_pid
                .filter(|&pid| process::cmdline(pid).is_some_and(|a| a.contains(&sock)))
        })
        .collect();
    let needle = format!("{}/", socket_root.display());
    for pid in process::find_by_arg(&needle) {
        if !agents.contains(&pid) {
            agents.push(pid);
        }
    }
    for pid in agents {
        if process::terminate(pid, AGENT_STOP_GRACE) {
            s.removed.push(format!("agent pid {pid}"));
        } else {
            s.warnings.push(format!("agent pid {pid} did not exit"));
        }
    }

    // 3. Anything else still running in the lab's namespaces (servers
    //    started with exec) would keep the namespaces alive.
    for name in names.existing_netns() {
        let path = Path::new(crate::netns::NETNS_RUN_DIR).join(&name);
        for pid in process::in_netns(&path) {
            if process::terminate(pid, Duration::from_secs(1)) {
                s.removed.push(format!("process {pid} in {name}"));
            } else {
                s.warnings.push(format!("process {pid} in {name} did not exit"));
            }
        }
    }

    // 4. Namespaces, found by name so that unrecorded ones go too.
    let (removed, failed) = topology::destroy_prefix(&names);
    s.removed.extend(removed.into_iter().map(|n| format!("netns {n}")));
    s.warnings.extend(failed);

    // 5. Pin dirs of recorded nodes and of any node with the prefix.
    for dir in pin_dirs(prefix, state.as_ref()) {
        match bpffs::remove_pins(&dir) {
            Ok(true) => s.removed.push(format!("bpf pins {}", dir.display())),
            Ok(false) => {}
            Err(e) => s.warnings.push(e.to_string()),
        }
    }

    // 6. Node cgroups, recorded or found by name.
    let mut cgroups: Vec<PathBuf> = state
        .iter()
        .flat_map(|st| st.nodes.iter().filter_map(|n| n.cgroup.clone()))
        .collect();
    for c in crate::cgroup::existing(prefix) {
        if !cgroups.contains(&c) {
            cgroups.push(c);
        }
    }
    for c in &cgroups {
        match crate::cgroup::remove(c) {
            Ok(true) => s.removed.push(format!("cgroup {}", c.display())),
            Ok(false) => {}
            Err(e) => s.warnings.push(e),
        }
    }
    crate::cgroup::remove_parent_if_empty();

    // 7. Sockets and state.
    remove_dir(&socket_root, &mut s);
    remove_dir(state_dir, &mut s);

    // 8. Check.
    s.left_behind
        .extend(names.existing_netns().into_iter().map(|n| format!("netns {n}")));
    s.left_behind.extend(
        pin_dirs(prefix, state.as_ref())
            .into_iter()
            .filter(|d| d.exists())
            .map(|d| format!("bpf pins {}", d.display())),
    );
    for p in [&socket_root, &state_dir.to_owned()] {
        if p.exists() {
            s.left_behind.push(p.display().to_string());
        }
    }
    s.left_behind.extend(
        cgroups
            .iter()
            .filter(|c| c.exists())
            .map(|c| format!("cgroup {}", c.display())),
    );
    s.left_behind.extend(
        process::find_by_arg(&needle)
            .into_iter()
            .map(|pid| format!("agent pid {pid}")),
    );
    s
}

fn pin_dirs(prefix: &str, state: Option<&LabState>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = state
        .into_iter()
        .flat_map(|st| st.nodes.iter().map(|n| n.bpf_root.clone()))
        .collect();
    if let Ok(entries) = std::fs::read_dir(bpffs::SINEW_PIN_ROOT) {
        let names = Names::new(prefix).ok();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // Pin dirs are PREFIX-nodeN, the same shape as node namespaces.
            let ours = names.as_ref().is_some_and(|n| n.owns(&name)) && {
                let rest = &name[prefix.len() + 1..];
                rest.starts_with("node") && !rest.contains('-')
            };
            if ours && !dirs.contains(&e.path()) {
                dirs.push(e.path());
            }
        }
    }
    dirs
}

fn remove_dir(dir: &Path, s: &mut DownSummary) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => s.removed.push(format!("directory {}", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => s.warnings.push(format!("cannot remove {}: {e}", dir.display())),
    }
}

fn validate_pod_name(name: &str) -> Result<(), LabError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(LabError::InvalidPodName {
            name: name.to_owned(),
            reason: "use a DNS label: 1-63 lower-case letters, digits or '-', not at either end".into(),
        })
    }
}

fn build<S: AsRef<OsStr>>(netns: &NetNs, target: &str, argv: &[S]) -> Result<std::process::Command, LabError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(exec_err(
            target,
            argv,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
        ));
    };
    let mut cmd = command_in(netns, program)?;
    cmd.args(args);
    Ok(cmd)
}

fn exec_err<S: AsRef<OsStr>>(target: &str, argv: &[S], source: std::io::Error) -> LabError {
    LabError::Exec {
        target: target.to_owned(),
        argv: argv.iter().map(|s| s.as_ref().to_string_lossy().into_owned()).collect(),
        source,
    }
}

fn create_dir(dir: &Path) -> Result<(), LabError> {
    std::fs::create_dir_all(dir).map_err(|source| LabError::Io {
        what: "cannot create directory",
        path: dir.to_owned(),
        source,
    })
}

fn join<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = names.collect();
    if v.is_empty() {
        "(none)".to_owned()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_with_defaults() {
        let spec: LabSpec = serde_json::from_str(r#"{"nodes":3,"pods_per_node":1}"#).unwrap();
        assert_eq!(spec.name_prefix, "sinew-lab");
        assert_eq!(spec.routing, Routing::Vxlan);
        assert_eq!(spec.state_dir(), Path::new("/run/sinew-lab/sinew-lab"));
        let spec: LabSpec =
            serde_json::from_str(r#"{"name_prefix":"x","nodes":1,"pods_per_node":0,"routing":"native"}"#).unwrap();
        assert_eq!(spec.routing, Routing::Native);
        assert!(serde_json::from_str::<LabSpec>(r#"{"nodes":1,"pods_per_node":0,"routing":"gre"}"#).is_err());
    }

    #[test]
    fn spec_validation_names_the_field() {
        let mut spec = LabSpec {
            nodes: 0,
            ..LabSpec::default()
        };
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("nodes = 0"), "{err}");
        spec.nodes = 2;
        spec.name_prefix = "Bad".into();
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("name_prefix"), "{err}");
        spec.name_prefix = "ok".into();
        spec.pods_per_node = 201;
        assert!(spec.validate().is_err());
        spec.pods_per_node = 3;
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn routing_round_trips_through_text() {
        for r in [Routing::Vxlan, Routing::Native] {
            assert_eq!(r.to_string().parse::<Routing>().unwrap(), r);
        }
        assert!("gre".parse::<Routing>().is_err());
    }

    #[test]
    fn binaries_next_to_test_deps_dir_use_its_parent() {
        let b = Binaries::from_current_exe().unwrap();
        let dir = b.agent.parent().unwrap();
        assert_ne!(dir.file_name().unwrap(), "deps");
        assert_eq!(b.cni, dir.join("sinew-cni"));
        assert_eq!(b.sinew, dir.join("sinew"));
    }

    #[test]
    fn pod_names_must_be_dns_labels() {
        assert!(validate_pod_name("node1-pod1").is_ok());
        assert!(validate_pod_name("").is_err());
        assert!(validate_pod_name("Pod").is_err());
        assert!(validate_pod_name("a_b").is_err());
        assert!(validate_pod_name("-a").is_err());
        assert!(validate_pod_name(&"a".repeat(64)).is_err());
    }

    #[test]
    fn down_without_state_is_a_no_op() {
        let dir = Path::new("/nonexistent/sinew-lab-test-state");
        let s = Lab::down(dir).unwrap();
        assert!(s.is_clean());
        assert!(s.removed.is_empty());
    }
}
