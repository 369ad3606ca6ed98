//! A blocking netlink socket of one protocol in one network namespace, and
//! the three exchanges every family uses: a change acknowledged by the
//! kernel ([`Socket::request_ack`]), a request answered by one message
//! ([`Socket::request_one`]) and a dump ([`Socket::dump`]).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType};

use crate::message::{read_i32, Messages, MsgBuilder, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLM_F_ACK};

/// The netlink protocols Sinew speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// rtnetlink: links, addresses, routes, neighbours.
    Route,
    /// Generic netlink: WireGuard and other families resolved by name.
    Generic,
    /// XFRM (IPsec states and policies), NETLINK_XFRM.
    Xfrm,
}

/// NETLINK_XFRM in linux/netlink.h. ABI.
pub const NETLINK_XFRM: i32 = 6;
/// AF_NETLINK in linux/socket.h. ABI.
const AF_NETLINK: i32 = 16;
/// SOCK_RAW in linux/net.h. ABI.
const SOCK_RAW: i32 = 3;

impl Protocol {
    fn open(self) -> Result<OwnedFd, Errno> {
        let proto = match self {
            Self::Route => SockProtocol::NetlinkRoute,
            Self::Generic => SockProtocol::NetlinkGeneric,
            // nix 0.29 has no NETLINK_XFRM; socket2 takes any protocol
            // number through a safe constructor (close-on-exec like ours).
            Self::Xfrm => {
                return socket2::Socket::new(
                    socket2::Domain::from(AF_NETLINK),
                    socket2::Type::from(SOCK_RAW),
                    Some(socket2::Protocol::from(NETLINK_XFRM)),
                )
                .map(OwnedFd::from)
                .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))
            }
        };
        socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, proto)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}; {hint}", hint = hint(*.0))]
    Socket(#[source] Errno),
    #[error("cannot enter the network namespace {path}: {source}; check that the path is a network namespace (nsfs) and that this process has CAP_SYS_ADMIN")]
    EnterNetns {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("{op}: {errno}; {hint}", hint = hint(*.errno))]
    Kernel { op: String, errno: Errno },
    #[error("malformed netlink reply to {op}: {reason}; this is a bug in sinew-netlink or an unexpected kernel, please report it with the kernel version")]
    Protocol { op: String, reason: &'static str },
}

impl NetlinkError {
    /// The kernel's errno, when the kernel refused.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Kernel { errno, .. } | Self::Socket(errno) => Some(*errno),
            Self::EnterNetns { source, .. } => Some(*source),
            Self::Protocol { .. } => None,
        }
    }

    /// What the operation was (for callers that add their own context).
    pub fn op(&self) -> Option<&str> {
        match self {
            Self::Kernel { op, .. } | Self::Protocol { op, .. } => Some(op),
            _ => None,
        }
    }
}

/// What a user can do about an errno from a netlink request.
pub fn hint(errno: Errno) -> &'static str {
    match errno {
        Errno::EPERM | Errno::EACCES => "this needs CAP_NET_ADMIN: run it as root",
        Errno::EEXIST => "it already exists: remove the stale object (or let the owner clean it up) and retry",
        Errno::ENODEV => "no such interface: check the name, and that it is in this network namespace",
        Errno::ESRCH => "no such route or object: it may already be gone",
        Errno::ENETUNREACH => {
            "the gateway is not reachable on that interface: check its address and the interface's prefix"
        }
        Errno::EADDRNOTAVAIL => "that address is not on this node: check the source or local address",
        Errno::EPROTONOSUPPORT => {
            "the kernel lacks this protocol: for IPsec it needs ESP (CONFIG_INET_ESP, module esp4) and XFRM_USER"
        }
        Errno::ENOSYS => {
            "the kernel lacks this algorithm: for IPsec rfc4106(gcm(aes)) it needs the gcm, aes and seqiv crypto modules"
        }
        Errno::EOPNOTSUPP => {
            "the kernel lacks this feature: check the kernel version and its modules (veth, vxlan, wireguard, xfrm_interface)"
        }
        Errno::EINVAL | Errno::ERANGE => {
            "the kernel rejected a value (name, MTU, prefix length): check it against the interface's limits"
        }
        Errno::EBUSY => "the object is in use: retry after whatever holds it lets go",
        Errno::ENOBUFS | Errno::ENOMEM => "the kernel is short of memory: retry later",
        _ => "see the errno; the kernel gave no more detail",
    }
}

/// The error an NLMSG_DONE reports: its payload is the dump's final
/// status, an int that is 0 or a negative errno (older kernels may send no
/// payload at all).
pub fn done_errno(payload: &[u8]) -> Option<Errno> {
    match read_i32(payload, 0) {
        Some(code) if code < 0 => Some(Errno::from_raw(-code)),
        _ => None,
    }
}

/// A blocking netlink socket in one network namespace.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Socket {
    /// A socket in the calling thread's network namespace.
    pub fn open(protocol: Protocol) -> Result<Self, NetlinkError> {
        let fd = protocol.open().map_err(NetlinkError::Socket)?;
        Ok(Self {
            fd,
            seq: 0,
            // Dumps arrive in datagrams of up to a page or two; 64 KiB never truncates.
            buf: vec![0; 64 * 1024],
        })
    }

    /// A socket in the network namespace `netns` (an open nsfs file; `path`
    /// names it in errors).
    pub fn open_in(protocol: Protocol, netns: &File, path: &str) -> Result<Self, NetlinkError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                // This thread exits right after, so it never has to switch back.
                setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetlinkError::EnterNetns {
                    path: path.to_string(),
                    source,
                })?;
                Self::open(protocol)
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NetlinkError::Protocol {
                    op: "open_in".into(),
                    reason: "namespace thread panicked",
                })
            })
        })
    }

    fn send(&mut self, msg: MsgBuilder, op: &str) -> Result<u32, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = msg.finish(seq);
        sendto(self.fd.as_raw_fd(), &bytes, &NetlinkAddr::new(0, 0), MsgFlags::empty()).map_err(|errno| {
            NetlinkError::Kernel {
                op: op.to_string(),
                errno,
            }
        })?;
        Ok(seq)
    }

    /// Reads replies to `seq`, giving each (type, payload) to `each` until
    /// it returns true. NLMSG_ERROR with a non-zero code becomes an error;
    /// with zero (an acknowledgement) it is given to `each` like the rest.
    fn receive(
        &mut self,
        seq: u32,
        op: &str,
        mut each: impl FnMut(u16, &[u8]) -> Result<bool, NetlinkError>,
    ) -> Result<(), NetlinkError> {
        let proto = |reason| NetlinkError::Protocol {
            op: op.to_string(),
            reason,
        };
        loop {
            let n =
                recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()).map_err(|errno| NetlinkError::Kernel {
                    op: op.to_string(),
                    errno,
                })?;
            for msg in Messages::new(&self.buf[..n]) {
                let (hdr, payload) = msg.map_err(proto)?;
                // Replies to an earlier request that gave up (an error mid-dump).
                if hdr.seq != seq || hdr.ty == NLMSG_NOOP {
                    continue;
                }
                if hdr.ty == NLMSG_ERROR {
                    let code = read_i32(payload, 0).ok_or(proto("short error message"))?;
                    if code != 0 {
                        return Err(NetlinkError::Kernel {
                            op: op.to_string(),
                            errno: Errno::from_raw(-code),
                        });
                    }
                    return if each(hdr.ty, payload)? {
                        Ok(())
                    } else {
                        Err(proto("unexpected acknowledgement"))
                    };
                }
                if each(hdr.ty, payload)? {
                    return Ok(());
                }
            }
        }
    }

    /// Sends a change (NLM_F_ACK is added) and waits for the kernel's
    /// acknowledgement. `op` describes it for errors ("add route ...").
    pub fn request_ack(&mut self, mut msg: MsgBuilder, op: &str) -> Result<(), NetlinkError> {
        msg.add_flags(NLM_F_ACK);
        let seq = self.send(msg, op)?;
        self.receive(seq, op, |ty, _| Ok(ty == NLMSG_ERROR))
    }

    /// Sends a query answered by one message of type `reply`, returning
    /// what `parse` makes of its payload.
    pub fn request_one<T>(
        &mut self,
        msg: MsgBuilder,
        reply: u16,
        op: &str,
        parse: impl Fn(&[u8]) -> Option<T>,
    ) -> Result<T, NetlinkError> {
        let seq = self.send(msg, op)?;
        let mut out = None;
        self.receive(seq, op, |ty, payload| {
            if ty == reply {
                out = Some(parse(payload).ok_or(NetlinkError::Protocol {
                    op: op.to_string(),
                    reason: "unparseable reply",
                })?);
                return Ok(true);
            }
            Ok(false)
        })?;
        out.ok_or(NetlinkError::Protocol {
            op: op.to_string(),
            reason: "no reply",
        })
    }

    /// Sends a dump request (the caller sets NLM_F_DUMP) and gives every
    /// message of type `reply` to `each` until the kernel says done. The
    /// replies may span many datagrams (NLM_F_MULTI); a dump that fails
    /// part way ends in NLMSG_ERROR, or in an NLMSG_DONE that carries the
    /// negative errno (netlink_dump_done): both are errors here.
    pub fn dump(
        &mut self,
        msg: MsgBuilder,
        reply: u16,
        op: &str,
        mut each: impl FnMut(&[u8]),
    ) -> Result<(), NetlinkError> {
        let seq = self.send(msg, op)?;
        self.receive(seq, op, |ty, payload| {
            if ty == NLMSG_DONE {
                return match done_errno(payload) {
                    Some(errno) => Err(NetlinkError::Kernel {
                        op: op.to_string(),
                        errno,
                    }),
                    None => Ok(true),
                };
            }
            if ty == reply {
                each(payload);
            }
            Ok(false)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_carries_the_dumps_errno() {
        // netlink_dump_done() puts the dump's status (0 or -errno) in DONE.
        assert_eq!(done_errno(&0i32.to_ne_bytes()), None);
        assert_eq!(done_errno(&[]), None);
        assert_eq!(done_errno(&(-19i32).to_ne_bytes()), Some(Errno::ENODEV));
    }

    /// A dump over a real socket: every link of this namespace arrives,
    /// and the dump ends at DONE (needs no privilege).
    #[test]
    fn a_dump_ends_at_done() {
        let mut nl = crate::Rtnl::open().unwrap();
        let links = nl.links().unwrap();
        assert!(links.iter().any(|l| l.name == "lo"), "{links:?}");
    }
}
