//! A multi-queue TUN device: one file per queue, each read and written by
//! its own thread. The kernel spreads what it sends into the device over
//! the queues by flow hash, so several flows encrypt on several CPUs.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    pad: [u8; 22],
}

/// Opens `queues` queues of the TUN device `name` (created by the first),
/// non-blocking, without packet information headers: each read is one IP
/// packet. The device lives while any queue is open.
pub fn open(name: &str, queues: usize) -> io::Result<Vec<File>> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?}: 1 to 15 bytes"),
        ));
    }
    (0..queues.max(1))
        .map(|_| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(|e| io::Error::new(e.kind(), format!("/dev/net/tun: {e} (is the tun module loaded?)")))?;
            let mut req = IfReq {
                name: [0; libc::IFNAMSIZ],
                flags: (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE) as libc::c_short,
                pad: [0; 22],
            };
            req.name[..name.len()].copy_from_slice(name.as_bytes());
            // SAFETY: TUNSETIFF reads a struct ifreq (name, flags) from the
            // pointer, which is valid and as large as the kernel's ifreq.
            let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
            if r < 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "TUNSETIFF {name}: {e} (a device of that name that is not a multi-queue TUN exists? delete it)"
                    ),
                ));
            }
            Ok(f)
        })
        .collect()
}

/// Waits until `fd` is readable or `timeout_ms` passed; true when readable.
pub fn wait_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    r > 0 && p.revents & libc::POLLIN != 0
}

/// One read of a non-blocking fd; None when nothing is waiting.
pub fn read(fd: RawFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: the buffer is valid for buf.len() bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    (n > 0).then_some(n as usize)
}

/// One packet into the device (the kernel receives it).
pub fn write(fd: RawFd, pkt: &[u8]) -> bool {
    // SAFETY: the buffer is valid for pkt.len() bytes.
    let n = unsafe { libc::write(fd, pkt.as_ptr().cast(), pkt.len()) };
    n == pkt.len() as isize
}
