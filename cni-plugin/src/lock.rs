//! One lock per container, so that ADD, DEL and CHECK of one container never
//! run at the same time.
//!
//! Why: the spec forbids a runtime to run them in parallel, but runtimes do
//! (two kubelet retries, a test harness), and then an ADD's clean-up of a
//! "leftover" veth or of its own failure deleted what a concurrent ADD had
//! just reported as plumbed. Holding this lock, an ADD sees either nothing or
//! a finished attachment.
//!
//! The lock is an advisory `flock` on `<dir>/<container id>.lock`: the
//! kernel drops it when the plugin exits, however it exits, so a killed
//! plugin never leaves a container locked. DEL removes the file while it
//! holds the lock; whoever then wins the lock on the unlinked file notices
//! (the path no longer names the file it locked) and locks a fresh one.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the lock files live: tmpfs, so they vanish with a reboot, like the
/// network namespaces they are about.
pub const DEFAULT_DIR: &str = "/run/sinew/cni-locks";

/// How long to wait for another operation on the same container. A healthy
/// ADD takes milliseconds; the runtime's own timeout is minutes.
pub const WAIT: Duration = Duration::from_secs(60);

const POLL: Duration = Duration::from_millis(2);

/// Longest container id used as a file name as it is; longer ones (the spec
/// sets no limit) are hashed to stay under NAME_MAX.
const MAX_PLAIN_NAME: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot create the lock directory {dir}: {source}: sinew-cni must run as root with /run writable")]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another CNI operation for container {container_id} has held its lock {} for over {secs} s: it is stuck; find it with `fuser {}` and end it, then retry", path.display(), path.display())]
    Timeout {
        container_id: String,
        path: PathBuf,
        secs: u64,
    },
}

/// A held lock; released when dropped (the file is closed).
#[derive(Debug)]
pub struct ContainerLock {
    file: File,
    path: PathBuf,
}

impl ContainerLock {
    /// Waits up to `wait` for the lock of `container_id` under `dir`.
    /// `container_id` must already be validated (letters, digits, `_.-`).
    pub fn acquire(dir: &Path, container_id: &str, wait: Duration) -> Result<Self, LockError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| LockError::Dir {
                dir: dir.to_owned(),
                source,
            })?;
        let path = dir.join(file_name(container_id));
        let file_err = |source| LockError::File {
            path: path.clone(),
            source,
        };
        let deadline = Instant::now() + wait;
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(file_err)?;
            loop {
                match file.try_lock() {
                    Ok(()) => break,
                    Err(TryLockError::WouldBlock) if Instant::now() < deadline => std::thread::sleep(POLL),
                    Err(TryLockError::WouldBlock) => {
                        return Err(LockError::Timeout {
                            container_id: container_id.to_owned(),
                            path,
                            secs: wait.as_secs(),
                        })
                    }
                    Err(TryLockError::Error(e)) => return Err(file_err(e)),
                }
            }
            // A DEL may have removed the file between our open and our lock:
            // then we hold a lock nobody else will see. Only a lock on the
            // file the path still names counts.
            let held = file.metadata().map_err(file_err)?;
            match std::fs::metadata(&path) {
                Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                    return Ok(Self { file, path });
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(file_err(e)),
            }
        }
    }

    /// Removes the lock file, still holding the lock, then releases it: for
    /// DEL, after which the container has nothing left to serialise.
    pub fn remove(self) {
        // A file left behind costs one inode on tmpfs and is reused by the
        // next operation on the same id: nothing to report.
        let _ = std::fs::remove_file(&self.path);
        drop(self.file);
    }
}

fn file_name(container_id: &str) -> String {
    if container_id.len() <= MAX_PLAIN_NAME {
        return format!("{container_id}.lock");
    }
    // FNV-1a: only stability matters; a collision only serialises two
    // containers that could have run side by side.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{}-{h:016x}.lock", &container_id[..64])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_and_times_out_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let held = ContainerLock::acquire(dir.path(), "c1", WAIT).unwrap();
        let e = ContainerLock::acquire(dir.path(), "c1", Duration::from_millis(20)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("c1") && msg.contains("fuser"), "{msg}");
        // Another container is not blocked.
        ContainerLock::acquire(dir.path(), "c2", Duration::ZERO).unwrap();
        drop(held);
        ContainerLock::acquire(dir.path(), "c1", Duration::ZERO).unwrap();
    }

    #[test]
    fn remove_hands_waiters_a_fresh_file() {
        let dir = tempfile::tempdir().unwrap();
        let held = ContainerLock::acquire(dir.path(), "c1", WAIT).unwrap();
        let waiter = std::thread::spawn({
            let dir = dir.path().to_owned();
            move || ContainerLock::acquire(&dir, "c1", WAIT).unwrap()
        });
        std::thread::sleep(Duration::from_millis(30));
        held.remove();
        let got = waiter.join().unwrap();
        // The waiter holds the file the path names now, so a third caller
        // has to wait for it.
        assert!(dir.path().join("c1.lock").exists());
        assert!(ContainerLock::acquire(dir.path(), "c1", Duration::from_millis(10)).is_err());
        drop(got);
    }

    #[test]
    fn long_ids_get_short_distinct_names() {
        let a = "a".repeat(300);
        let b = format!("{}b", "a".repeat(299));
        assert!(file_name(&a).len() < 100);
        assert_ne!(file_name(&a), file_name(&b));
        assert_eq!(file_name("abc"), "abc.lock");
    }
}
