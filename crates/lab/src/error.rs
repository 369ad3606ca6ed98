//! [`LabError`]: everything bringing a lab up, using it or taking it down
//! can fail with, each saying what to do.

use std::path::PathBuf;

use crate::bpffs::BpffsError;
use crate::cni::CniError;
use crate::datastore::DatastoreError;
use crate::manifest::ManifestError;
use crate::netns::NetnsError;
use crate::topology::TopologyError;

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
    /// A datastore that is neither `local` nor `kubernetes`.
    #[error("unknown datastore {0:?}: use \"local\" (the lab's datastore directory) or \"kubernetes\" (a Kubernetes API server on the external host)")]
    UnknownDatastore(String),
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
    /// The fake Kubernetes API server of a lab could not start.
    #[error("the lab's Kubernetes API server (sinew-fakeapi): {reason}")]
    KubeApi {
        /// What went wrong.
        reason: String,
    },
    /// Policies `sinew policy apply` was given are invalid; none was stored.
    #[error("policy rejected; the policies in force are unchanged:\n{errors}")]
    PolicyRejected {
        /// One line per problem.
        errors: String,
    },
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

impl From<ManifestError> for LabError {
    fn from(e: ManifestError) -> Self {
        LabError::Manifest(e)
    }
}

pub(crate) fn rollback_summary(undone: &[String], failed: &[String]) -> String {
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
