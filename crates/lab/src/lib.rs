//! The simulated cluster behind `sinew lab`, kernel integration tests and
//! benchmarks: node and pod network namespaces on one machine, connected by
//! veths and a bridge ([`topology`]), a `local` datastore (or the fake
//! Kubernetes API of `sinew-fakeapi` mirroring it, in the caller's process
//! or as a lab daemon: [`kube`]), one
//! `sinew-agent` per node and pods wired by `sinew-cni`; users' own
//! Namespace and Pod documents ([`manifest`]).
//!
//! [`Lab`] is the entry; its work is split by concern: what a lab is asked
//! to be (`spec`), what it remembers (`state`), its agents, its pods and
//! namespaces, `apply` of documents, teardown, errors, and [`LabGuard`].
//!
//! This crate must never touch the root network namespace (only files
//! under `/run`, the bpffs mount and the lab's cgroups), never use
//! `ip netns exec` (its `/sys` remount hides `/sys/fs/bpf`), and must let
//! labs with different prefixes run side by side.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod bpffs;
pub mod cgroup;
pub mod cni;
pub mod datastore;
pub mod kube;
pub mod manifest;
pub mod netns;
pub mod process;
pub mod topology;

mod agents;
mod apply;
mod error;
mod guard;
mod lab;
mod pods;
mod spec;
mod state;
mod teardown;

pub use agents::AGENT_STOP_GRACE;
pub use apply::{Applied, ApplyAction};
pub use error::LabError;
pub use guard::{tail, LabGuard};
pub use lab::Lab;
pub use netns::{command_in, sh, NetNs};
pub use spec::{
    default_agent_timeout, default_state_dir, Binaries, DatastoreKind, LabSpec, Routing, UpOptions,
    DEFAULT_AGENT_TIMEOUT, DEFAULT_STATE_ROOT, POD_IFNAME, POD_NAMESPACE, SOCKET_ROOT,
};
pub use state::{ApiServerRecord, NodeRecord, PodRecord, STATE_FILE};
pub use teardown::DownSummary;
pub use topology::Topology;
