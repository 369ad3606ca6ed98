//! The datapath's record of who an ingress connection comes from
//! (`sinew_proxy_src`, pinned by the agent): tuple → the source identity
//! this node's datapath judged the client as. Across nodes in VXLAN mode the
//! client of an ingress proxy may be the source node's proxy, whose address
//! names the node (remote-node) while the VNI named the pod it speaks for;
//! this map is how that identity reaches the proxy.

use std::ffi::CString;
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_OBJ_GET: libc::c_long = 7;

/// `union bpf_attr` for BPF_OBJ_GET (linux/bpf.h); the kernel takes a
/// shorter attr and reads the rest as zero.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` for BPF_MAP_*_ELEM (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad0: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `struct proxy_tw_key` of bpf/lib/maps.h: addresses and ports in
/// network order.
#[repr(C)]
struct Key {
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
}

/// An open `sinew_proxy_src` map.
#[derive(Debug)]
pub struct SourceMap {
    fd: OwnedFd,
}

impl SourceMap {
    /// Opens the pinned map at `path` (needs CAP_BPF or root, and the
    /// agent's BPF filesystem).
    pub fn open(path: &Path) -> io::Result<Self> {
        let p = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut attr = ObjGetAttr {
            pathname: p.as_ptr() as u64,
            ..ObjGetAttr::default()
        };
        // SAFETY: attr is a valid, zero-padded bpf_attr for BPF_OBJ_GET of
        // the size passed, and p outlives the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET,
                &mut attr as *mut ObjGetAttr,
                std::mem::size_of::<ObjGetAttr>(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = i32::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        // SAFETY: the kernel just returned this descriptor, owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// The identity the datapath recorded for the connection from `client`
    /// to `orig` (its original destination), if any.
    pub fn lookup(&self, client: SocketAddrV4, orig: SocketAddrV4) -> Option<u32> {
        let key = Key {
            saddr: client.ip().octets(),
            daddr: orig.ip().octets(),
            sport: client.port().to_be_bytes(),
            dport: orig.port().to_be_bytes(),
        };
        let mut value: u32 = 0;
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: &key as *const Key as u64,
            value: &mut value as *mut u32 as u64,
            ..ElemAttr::default()
        };
        // SAFETY: attr is a valid bpf_attr for BPF_MAP_LOOKUP_ELEM whose key
        // and value point at live buffers of the map's key and value sizes.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_ELEM,
                &mut attr as *mut ElemAttr,
                std::mem::size_of::<ElemAttr>(),
            )
        };
        (r == 0).then_some(value)
    }
}
