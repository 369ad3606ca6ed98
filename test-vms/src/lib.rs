//! Simulated multi-node Kubernetes clusters on one machine, for the
//! `sinew lab` command, kernel integration tests and benchmarks.
//!
//! Every node, pod, the underlay and an external host are network
//! namespaces connected by veths and a bridge ([`topology`]); a [`lab::Lab`]
//! adds a `local` datastore, one `sinew-agent` per node and pods wired by
//! `sinew-cni`, and takes users' own Namespace and Pod documents
//! ([`manifest`]); [`baseline`] wires the same topology with plain kernel
//! routing for comparison. This crate must never touch the root network
//! namespace (only files under `/run` and the bpffs mount), never use
//! `ip netns exec` (its `/sys` remount hides `/sys/fs/bpf`), and must let
//! labs with different prefixes run side by side.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod baseline;
pub mod bpffs;
pub mod cgroup;
pub mod cni;
pub mod datastore;
pub mod lab;
pub mod manifest;
pub mod netns;
pub mod probe;
pub mod process;
pub mod support;
pub mod topology;

pub use lab::{Binaries, DownSummary, Lab, LabError, LabSpec, NodeRecord, PodRecord, Routing, UpOptions};
pub use netns::{command_in, sh, NetNs};
pub use topology::Topology;
