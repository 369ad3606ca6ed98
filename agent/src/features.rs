//! Kernel features the agent detects at start, and whether it uses them;
//! shown by `sinew status`.

use crate::datapath::AttachMode;

#[derive(Clone, Debug)]
pub struct Feature {
    pub name: &'static str,
    pub available: bool,
    pub used: bool,
    pub detail: String,
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn at_least(major: u8, minor: u8) -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(major, minor, 0))
}

pub fn detect(mode: AttachMode, pod_mode: AttachMode, vxlan: bool, masquerade: bool) -> Vec<Feature> {
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    let bpffs =
        nix::sys::statfs::statfs("/sys/fs/bpf").is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
    vec![
        Feature {
            name: "kernel",
            available: true,
            used: true,
            detail: kernel_release(),
        },
        Feature {
            name: "tcx",
            available: at_least(6, 6),
            used: mode == AttachMode::Tcx || pod_mode == AttachMode::Tcx,
            detail: "bpf_mprog links on tc ingress/egress (6.6+)".into(),
        },
        Feature {
            name: "clsact",
            available: true,
            used: mode == AttachMode::Clsact || pod_mode == AttachMode::Clsact,
            detail: "cls_bpf filters: pod veths (attach waits for no RCU grace period), devices before 6.6".into(),
        },
        Feature {
            name: "bpf_redirect_peer",
            available: at_least(5, 10),
            used: true,
            detail: "local delivery straight into the pod netns".into(),
        },
        Feature {
            name: "btf",
            available: btf,
            used: false,
            detail: "/sys/kernel/btf/vmlinux".into(),
        },
        Feature {
            name: "bpffs",
            available: bpffs,
            used: true,
            detail: "/sys/fs/bpf, pinned maps and links".into(),
        },
        Feature {
            name: "bpf_redirect_neigh",
            available: at_least(5, 10),
            used: true,
            detail: "pod traffic to other nodes handed to the uplink, skipping the host stack (BPF host routing)"
                .into(),
        },
        Feature {
            name: "bpf-vxlan",
            available: at_least(5, 15),
            used: vxlan,
            detail: "VXLAN headers added and removed by the programs (identity in the VNI); GSO kept".into(),
        },
        Feature {
            name: "vxlan-collect-md",
            available: true,
            used: vxlan,
            detail: "one external-mode VXLAN device: the node's own packets, and what the programs leave to it".into(),
        },
        Feature {
            name: "bpf-masquerade",
            available: true,
            used: masquerade,
            detail: "SNAT to the node address at the uplink".into(),
        },
    ]
}
