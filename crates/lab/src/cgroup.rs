//! One cgroup v2 directory per lab node. Socket-level service load
//! balancing attaches to a cgroup, and the lab's nodes share one machine's
//! cgroup tree, so each node's agent attaches to its own cgroup and every
//! process the lab runs in that node or its pods is started inside it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The directory under the cgroup v2 root that holds the lab nodes'
/// cgroups, `ROOT/sinew-lab/PREFIX-NODE`.
pub const LAB_CGROUP_DIR: &str = "sinew-lab";

/// Errors from creating or entering a node's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup v2 hierarchy is mounted.
    #[error("no cgroup v2 hierarchy is mounted (see `mount -t cgroup2`); mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`")]
    NoCgroup2,
    /// A directory could not be created.
    #[error("cannot create cgroup {path}: {source} (run as root)")]
    Create {
        /// The cgroup directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Where cgroup v2 is mounted (the first cgroup2 mount).
pub fn root() -> Result<PathBuf, CgroupError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .ok_or(CgroupError::NoCgroup2)
}

/// The cgroup of lab node `node` of the lab `prefix`.
pub fn node_cgroup(root: &Path, prefix: &str, node: &str) -> PathBuf {
    root.join(LAB_CGROUP_DIR).join(format!("{prefix}-{node}"))
}

/// Creates the cgroup (and its parents).
pub fn create(path: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(path).map_err(|source| CgroupError::Create {
        path: path.to_owned(),
        source,
    })
}

/// Makes `cmd` start inside the cgroup at `path` (the child moves itself
/// there before exec, so nothing it does happens outside). Without a
/// cgroup the command is left as it is.
pub fn enter_on_exec(cmd: &mut Command, path: Option<&Path>) {
    let Some(path) = path else { return };
    let procs = std::ffi::CString::new(path.join("cgroup.procs").into_os_string().into_encoded_bytes())
        .expect("cgroup paths have no NUL");
    #[allow(unsafe_code)]
    // SAFETY: runs in the forked child before exec and only calls open(2),
    // write(2) and close(2), which are async-signal-safe; the path was
    // allocated before the fork and is moved into the closure.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writing process itself.
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
}

/// The processes in the cgroup.
pub fn procs(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Removes the cgroup after stopping what still runs in it. Returns an
/// error text when it could not.
pub fn remove(path: &Path) -> Result<bool, String> {
    if !path.exists() {
        return Ok(false);
    }
    for pid in procs(path) {
        crate::process::terminate(pid, Duration::from_secs(1));
    }
    // The kernel frees a cgroup a moment after its last process exits.
    let mut last = None;
    for _ in 0..50 {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "cannot remove cgroup {}: {} (processes left: {:?})",
        path.display(),
        last.map(|e| e.to_string()).unwrap_or_default(),
        procs(path)
    ))
}

/// The node cgroups of the lab `prefix` that exist now.
pub fn existing(prefix: &str) -> Vec<PathBuf> {
    let Ok(root) = root() else { return Vec::new() };
    let dir = root.join(LAB_CGROUP_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let want = format!("{prefix}-node");
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix(&want)
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path())
        .collect()
}

/// Removes `ROOT/sinew-lab` when no lab uses it any more.
pub fn remove_parent_if_empty() {
    if let Ok(root) = root() {
        let _ = std::fs::remove_dir(root.join(LAB_CGROUP_DIR));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_cgroups_are_named_by_prefix_and_node() {
        let p = node_cgroup(Path::new("/sys/fs/cgroup/unified"), "lab-7", "node2");
        assert_eq!(p, Path::new("/sys/fs/cgroup/unified/sinew-lab/lab-7-node2"));
    }
}
