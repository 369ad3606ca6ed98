//! Making sure a BPF filesystem is mounted at `/sys/fs/bpf`, where agents
//! pin their maps, and removing a lab's pin directories.

use std::path::{Path, PathBuf};

/// Where bpffs is mounted.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// Root of Sinew's pins; each lab node gets `SINEW_PIN_ROOT/PREFIX-nodeI`.
pub const SINEW_PIN_ROOT: &str = "/sys/fs/bpf/sinew";

/// Errors from mounting bpffs or removing pins.
#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    /// Mounting failed.
    #[error("cannot mount bpffs at {BPFFS_MOUNT}: {0} (run as root; is CONFIG_BPF_SYSCALL set?)")]
    Mount(#[source] nix::Error),
    /// Removing a pin or directory failed.
    #[error("cannot remove BPF pins at {path}: {source}")]
    Remove {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Whether `mount_point` is a bpffs mount in this mount namespace.
pub fn is_mounted_at(mount_point: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
        info.lines().any(|line| {
            // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS ... - FSTYPE SOURCE ..."
            let mut fields = line.split_whitespace();
            let mount = fields.nth(4);
            let fstype = line.split(" - ").nth(1).and_then(|rest| rest.split_whitespace().next());
            mount == Some(mount_point) && fstype == Some("bpf")
        })
    })
}

/// Mounts bpffs at `/sys/fs/bpf` unless it already is. Touches only the
/// mount table, never the network.
pub fn ensure_mounted() -> Result<(), BpffsError> {
    if is_mounted_at(BPFFS_MOUNT) {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS_MOUNT,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(BpffsError::Mount)
}

/// Removes a pin directory recursively. bpffs allows unlink and rmdir, so
/// pins go first and directories after. A missing directory is not an error.
pub fn remove_pins(dir: &Path) -> Result<bool, BpffsError> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(BpffsError::Remove {
                path: dir.to_owned(),
                source,
            })
        }
        Ok(_) => {}
    }
    std::fs::remove_dir_all(dir).map_err(|source| BpffsError::Remove {
        path: dir.to_owned(),
        source,
    })?;
    Ok(true)
}

/// A node's pin directory: `/sys/fs/bpf/sinew/PREFIX-NODE`.
pub fn pin_dir(prefix: &str, node: &str) -> PathBuf {
    Path::new(SINEW_PIN_ROOT).join(format!("{prefix}-{node}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_dirs_include_the_prefix() {
        assert_eq!(pin_dir("lab", "node2"), Path::new("/sys/fs/bpf/sinew/lab-node2"));
    }

    #[test]
    fn proc_is_not_bpffs() {
        assert!(!is_mounted_at("/proc"));
    }

    #[test]
    fn removing_a_missing_directory_is_fine() {
        assert!(!remove_pins(Path::new("/nonexistent/sinew-pins")).unwrap());
    }
}
