//! The tests and the VM tier of the simulated clusters: the lab itself is
//! product code in `sinew-lab` (re-exported here as [`lab`] and its
//! modules, so tests keep their paths); this crate adds [`baseline`] (the
//! same topology with plain kernel routing, for benchmarks) and [`probe`]
//! (TCP probes run inside namespaces).

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod baseline;
pub mod probe;
pub mod support;

pub use sinew_lab as lab;
pub use sinew_lab::{bpffs, cgroup, cni, datastore, kube, manifest, netns, process, topology};
pub use sinew_lab::{
    command_in, sh, Binaries, DownSummary, Lab, LabError, LabGuard, LabSpec, NetNs, NodeRecord, PodRecord, Routing,
    Topology, UpOptions,
};
