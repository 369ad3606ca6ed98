//! `sinew-operator`: one per cluster. It allocates each Node's pod CIDRs
//! from the cluster pool ([`ipam`]), garbage-collects identities
//! ([`identity_gc`]), will run the CA for workload certificates ([`ca`]),
//! and prints the CRDs. The reconcilers are pure functions over what the
//! API holds; [`controller`] reads and writes the API with kube-rs, only
//! while this operator holds the lease ([`leader`]).
//!
//! It never touches a node's datapath and never writes what agents own
//! (SinewEndpoints, identity creation): it only allocates, records and
//! deletes.
#![forbid(unsafe_code)]

pub mod ca;
pub mod config;
pub mod controller;
pub mod identity_gc;
pub mod ipam;
pub mod leader;
pub mod metrics;
