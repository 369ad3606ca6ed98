//! Small, netns-correct facts about interfaces and the few setup-time
//! network changes the agent makes. Everything here acts on the calling
//! thread's network namespace; /sys/class/net is avoided because it shows
//! the namespace that mounted sysfs, not ours.

use std::net::Ipv4Addr;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("interface {0} does not exist in this network namespace")]
    NoSuchInterface(String),
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("cannot run `ip` ({0}); install iproute2")]
    NoIp(std::io::Error),
    #[error("cannot write sysctl {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub fn ifindex(name: &str) -> Result<u32, NetError> {
    nix::net::if_::if_nametoindex(name).map_err(|_| NetError::NoSuchInterface(name.to_string()))
}

/// The MAC address of an interface, through getifaddrs (netlink, netns-correct).
pub fn mac(name: &str) -> Result<[u8; 6], NetError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|_| NetError::NoSuchInterface(name.to_string()))?;
    for a in addrs {
        if a.interface_name != name {
            continue;
        }
        if let Some(link) = a.address.as_ref().and_then(|s| s.as_link_addr()) {
            if let Some(m) = link.addr() {
                return Ok(m);
            }
        }
    }
    Err(NetError::NoSuchInterface(name.to_string()))
}

/// The first IPv4 address of an interface.
pub fn ipv4(name: &str) -> Option<Ipv4Addr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        (a.interface_name == name).then_some(())?;
        a.address?.as_sockaddr_in().map(|s| s.ip())
    })
}

pub fn mtu(name: &str) -> Result<u32, NetError> {
    let out = ip_output(&["-o", "link", "show", "dev", name])?;
    out.split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| NetError::NoSuchInterface(name.to_string()))
}

fn ip_output(args: &[&str]) -> Result<String, NetError> {
    let out = Command::new("ip").args(args).output().map_err(NetError::NoIp)?;
    if !out.status.success() {
        return Err(NetError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip ARGS` for setup-time changes (devices, routes); not on any
/// per-pod path.
pub fn ip(args: &[&str]) -> Result<(), NetError> {
    ip_output(args).map(|_| ())
}

/// Writes a sysctl of this network namespace (/proc/sys/net is per netns).
pub fn sysctl(key: &str, value: &str) -> Result<(), NetError> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).map_err(|source| NetError::Sysctl { path, source })
}

/// Creates (or adopts) the node's VXLAN device in external mode: one
/// device for all tunnels, remote and VNI chosen per packet by BPF.
pub fn ensure_vxlan(name: &str, port: u16, mtu: u32) -> Result<u32, NetError> {
    if ifindex(name).is_err() {
        ip(&[
            "link",
            "add",
            name,
            "type",
            "vxlan",
            "external",
            "dstport",
            &port.to_string(),
        ])?;
    }
    // No ARP: BPF sets both MACs of every frame it delivers from the tunnel.
    ip(&["link", "set", name, "mtu", &mtu.to_string(), "arp", "off", "up"])?;
    ifindex(name)
}
