//! Benchmarks of the Sinew datapath, each measured against a plain-kernel
//! baseline built in the same run and measured alternately with it, so the
//! ratio Sinew/baseline means something on a shared, noisy machine.
//!
//! [`rr`] is a TCP_RR/TCP_CRR client and server (netperf is not packaged
//! for Debian), [`iperf`] drives iperf3, [`cpu`] pins both to fixed CPUs, [`envs`] builds and tears down the
//! networks being compared and [`scenarios`] runs the comparisons. This
//! crate must never touch the root network namespace or leave anything
//! behind: everything it creates carries a per-process prefix and sits
//! behind a guard that removes it on drop, on error and on Ctrl-C.

#![forbid(unsafe_code)]

pub mod cpu;
pub mod envs;
pub mod h2client;
pub mod idle;
pub mod iperf;
pub mod kube;
pub mod l7;
pub mod l7proxy;
pub mod observe;
pub mod policy;
pub mod report;
pub mod rr;
pub mod scenarios;
pub mod services;
pub mod stats;
pub mod wguserspace;
