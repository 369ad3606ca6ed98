//! Small, netns-correct facts about interfaces and the network changes the
//! agent makes, all through netlink (sinew-netlink): the agent runs no `ip`
//! process. Everything here acts on the calling thread's network namespace;
//! /sys/class/net is avoided because it shows the namespace that mounted
//! sysfs, not ours.

use std::net::Ipv4Addr;
use std::process::Command;

use sinew_netlink::rtnl::links::LinkChange;
use sinew_netlink::{NetlinkError, Rtnl};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("interface {0} does not exist in this network namespace")]
    NoSuchInterface(String),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("cannot run `ip` (install iproute2): {0}")]
    NoIp(#[source] std::io::Error),
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
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

/// The MAC address of an interface (SIOCGIFHWADDR on a socket of the calling
/// thread's network namespace). One lookup by name: getifaddrs would dump
/// every interface and address of the node, which grows with the pods.
pub fn mac(name: &str) -> Result<[u8; 6], NetError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let missing = || NetError::NoSuchInterface(name.to_string());
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(missing());
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(missing());
    }
    // SAFETY: raw is a descriptor we just opened and own alone.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads ifr_name (NUL-terminated: the name is
    // shorter than IFNAMSIZ and the rest is zero) and writes ifr_hwaddr
    // inside req, which lives for the whole call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
    if rc < 0 {
        return Err(missing());
    }
    // SAFETY: a successful SIOCGIFHWADDR filled the hwaddr member.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(hw.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(mac)
}

/// The first IPv4 address of an interface.
pub fn ipv4(name: &str) -> Option<Ipv4Addr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        (a.interface_name == name).then_some(())?;
        a.address?.as_sockaddr_in().map(|s| s.ip())
    })
}

pub fn mtu(name: &str) -> Result<u32, NetError> {
    Rtnl::open()?
        .link_by_name(name)?
        .map(|l| l.mtu)
        .ok_or_else(|| NetError::NoSuchInterface(name.to_string()))
}

/// Deletes a link by name; false when there was none.
pub fn delete_link(name: &str) -> Result<bool, NetError> {
    Ok(Rtnl::open()?.delete_link(name)?)
}

/// Runs `ip ARGS` and returns its output, for setup-time changes only.
pub fn ip_output(args: &[&str]) -> Result<String, NetError> {
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
    // A value already in place is not written: in a container that is not
    // privileged /proc/sys is read-only, and the DaemonSet's init container
    // sets these on the host beforehand (deploy/).
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|source| NetError::Sysctl { path, source })
}

/// Creates (or adopts) the node's VXLAN device in external mode: one
/// device for all tunnels, remote and VNI chosen per packet by BPF.
pub fn ensure_vxlan(name: &str, port: u16, mtu: u32) -> Result<u32, NetError> {
    let mut nl = Rtnl::open()?;
    if nl.link_by_name(name)?.is_none() {
        nl.create_vxlan_external(name, port)?;
    }
    let link = nl
        .link_by_name(name)?
        .ok_or_else(|| NetError::NoSuchInterface(name.to_string()))?;
    // No ARP: BPF sets both MACs of every frame it delivers from the tunnel.
    nl.set_link(
        link.index,
        LinkChange {
            up: Some(true),
            mtu: Some(mtu),
            arp: Some(false),
        },
    )?;
    Ok(link.index)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ioctl agrees with the kernel's link dump for every interface
    /// of this namespace that has a hardware address.
    #[test]
    fn mac_matches_the_link_dump() {
        let mut seen = 0;
        for a in nix::ifaddrs::getifaddrs().expect("getifaddrs") {
            let Some(want) = a.address.as_ref().and_then(|s| s.as_link_addr()).and_then(|l| l.addr()) else {
                continue;
            };
            assert_eq!(mac(&a.interface_name).unwrap(), want, "{}", a.interface_name);
            seen += 1;
        }
        assert!(seen > 0, "no interface with a link address (not even lo)");
    }

    #[test]
    fn mac_of_a_missing_interface_is_an_error() {
        for name in ["sinew-no-such0", "", "a-name-longer-than-ifnamsiz"] {
            assert!(matches!(mac(name), Err(NetError::NoSuchInterface(_))), "{name:?}");
        }
    }
}
