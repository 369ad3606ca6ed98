//! Puts the proxy's listening sockets into the datapath's sockhash
//! (`sinew_proxy_listeners`), where `proxy_lookup` (bpf_proxy.c) finds them
//! for the one connection TC cannot hand over itself: a new SYN on a tuple
//! that still has a TIME_WAIT socket of an earlier proxied connection.
//!
//! The proxy does not touch BPF: the agent takes duplicates of its
//! listeners with `pidfd_getfd(2)`, found by inode (`/proc/PID/net/tcp`,
//! state LISTEN, on the ports its Hello named, against `/proc/PID/fd`).
//! A listener that closes leaves the map by itself, so a restarted proxy
//! only needs registering again when it says Hello.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use aya::maps::{Map, MapData, SockHash};

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("cannot read {path}: {source}")]
    Proc {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sinew-proxy (pid {pid}) has no listening socket on port {port}")]
    NotListening { pid: u32, port: u16 },
    #[error("cannot take the proxy's listener (pid {pid}, fd {fd}): {source}; the agent needs CAP_SYS_PTRACE over the proxy")]
    Take {
        pid: u32,
        fd: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the pinned map {path}: {message}")]
    Map { path: String, message: String },
}

/// The inodes of the TCP sockets listening on `ports` in `table` (the text
/// of /proc/net/tcp or tcp6), by port.
pub fn listening_inodes(table: &str, ports: &[u16]) -> BTreeMap<u16, u64> {
    let mut found = BTreeMap::new();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != "0A" {
            continue;
        }
        let Some(port) = f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) else {
            continue;
        };
        if ports.contains(&port) {
            if let Ok(inode) = f[9].parse() {
                found.entry(port).or_insert(inode);
            }
        }
    }
    found
}

/// The fd number of socket `inode` in process `pid`.
fn fd_of(pid: u32, inode: u64) -> Result<Option<i32>, ListenerError> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|source| ListenerError::Proc {
        path: dir.clone(),
        source,
    })?;
    let want = format!("socket:[{inode}]");
    for e in entries.flatten() {
        if std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == want.as_str()) {
            if let Some(fd) = e.file_name().to_str().and_then(|n| n.parse().ok()) {
                return Ok(Some(fd));
            }
        }
    }
    Ok(None)
}

/// A duplicate of fd `fd` of process `pid` (pidfd_open + pidfd_getfd).
fn take_fd(pid: u32, fd: i32) -> Result<OwnedFd, ListenerError> {
    let err = |source| ListenerError::Take { pid, fd, source };
    // SAFETY: pidfd_open takes no pointers; a non-negative result is a new
    // descriptor that nothing else owns.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if pidfd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: pidfd is a fresh descriptor, owned from here on.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: pidfd_getfd takes no pointers; pidfd is open.
    let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if dup < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: dup is a fresh descriptor, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(dup as i32) })
}

/// Registers the listeners of proxy `pid` on `ports` in the pinned
/// sockhash at `map`, replacing earlier entries for those ports.
pub fn register(map: &Path, pid: u32, ports: &[u16]) -> Result<(), ListenerError> {
    let mut inodes = BTreeMap::new();
    for table in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{table}");
        let text = std::fs::read_to_string(&path).map_err(|source| ListenerError::Proc { path, source })?;
        for (port, inode) in listening_inodes(&text, ports) {
            inodes.entry(port).or_insert(inode);
        }
    }
    let data = MapData::from_pin(map).map_err(|e| ListenerError::Map {
        path: map.display().to_string(),
        message: e.to_string(),
    })?;
    let mut hash: SockHash<MapData, u32> = SockHash::try_from(Map::SockHash(data)).map_err(|e| ListenerError::Map {
        path: map.display().to_string(),
        message: e.to_string(),
    })?;
    for &port in ports {
        let inode = *inodes.get(&port).ok_or(ListenerError::NotListening { pid, port })?;
        let fd = fd_of(pid, inode)?.ok_or(ListenerError::NotListening { pid, port })?;
        let sock = take_fd(pid, fd)?;
        hash.insert(u32::from(port), sock.as_raw_fd(), 0)
            .map_err(|e| ListenerError::Map {
                path: map.display().to_string(),
                message: e.to_string(),
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_inodes_are_found_by_port_and_state() {
        // /proc/net/tcp: a listener on 15006 (0x3A9E), a connection from
        // 15001 (0x3A99, state 01), a listener on 9962 not asked for.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:3A9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:3A99 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
   2: 00000000:26EA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0
";
        let found = listening_inodes(table, &[15006, 15001]);
        assert_eq!(found, BTreeMap::from([(15006, 4242)]));
    }
}
