//! What can go wrong loading, attaching and using the datapath.

use std::path::PathBuf;
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot load the BPF object {object}: {source}; the kernel log or `dmesg` may say more, and the agent needs CAP_BPF and CAP_NET_ADMIN")]
    Load {
        object: &'static str,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("cannot load program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cannot attach to {ifname} ({hook}): {source}")]
    Attach {
        ifname: String,
        hook: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot pin {path}: {source}; is /sys/fs/bpf a bpffs mount?")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("cannot create {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
