//! Named network namespaces and running code or programs inside them.
//!
//! Namespaces are created with `ip netns add`, so they are bind-mounted at
//! `/run/netns/NAME` and outlive the process that made them: `sinew lab up`,
//! `exec` and `down` are separate processes. Entering a namespace only ever
//! switches the network namespace (`CLONE_NEWNET`). `ip netns exec` also
//! unshares the mount namespace and remounts `/sys`, which hides
//! `/sys/fs/bpf` from the agent, so it is never used here.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

use nix::sched::CloneFlags;

/// Where iproute2 bind-mounts named network namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Errors from creating, entering or running commands in a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A namespace name that iproute2 or the filesystem would reject.
    #[error("invalid network namespace name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The namespace file could not be opened.
    #[error("cannot open network namespace {path}: {source} (does the namespace exist? run as root)")]
    Open {
        /// Path of the namespace file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `setns(CLONE_NEWNET)` failed.
    #[error("cannot enter network namespace {name}: {source} (is it a namespace file? are we root?)")]
    Enter {
        /// Namespace name.
        name: String,
        /// The underlying error.
        #[source]
        source: nix::Error,
    },
    /// A program could not be started at all.
    #[error("cannot run `{command}` in netns {netns}: {source} (is it installed and in PATH?)")]
    Spawn {
        /// The command line.
        command: String,
        /// Namespace name, or "root".
        netns: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A program ran and exited unsuccessfully.
    #[error("`{command}` in netns {netns} failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Namespace name, or "root".
        netns: String,
        /// Exit status as text.
        status: String,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// Reading or writing a sysctl inside a namespace failed.
    #[error("sysctl {key} in netns {netns}: {source}")]
    Sysctl {
        /// Dotted sysctl name.
        key: String,
        /// Namespace name.
        netns: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The thread running a closure in the namespace could not be spawned.
    #[error("cannot spawn a thread for netns {netns}: {source}")]
    Thread {
        /// Namespace name.
        netns: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Serialises `ip netns add` within this process: two concurrent first-time
/// calls can both bind-mount `/run/netns` onto itself and the upper mount then
/// hides namespaces mounted on the lower one.
static CREATE_LOCK: Mutex<()> = Mutex::new(());
const CREATE_LOCK_FILE: &str = "/run/.sinew-netns.lock";

/// A named network namespace at `/run/netns/NAME`.
///
/// This is only a name: dropping it does not delete the namespace (labs
/// outlive the process that created them). Owners that want cleanup call
/// [`NetNs::delete`], typically from their own `Drop`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Refers to an existing (or future) namespace by name without touching it.
    pub fn named(name: impl Into<String>) -> Result<Self, NetnsError> {
        let name = name.into();
        validate_name(&name)?;
        Ok(Self { name })
    }

    /// Creates the namespace with `ip netns add` and brings its `lo` up.
    pub fn create(name: impl Into<String>) -> Result<Self, NetnsError> {
        let ns = Self::named(name)?;
        {
            let _guard = CREATE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            // The same race exists between processes (parallel test binaries,
            // two labs): hold an flock while iproute2 may set up the mount.
            let _flock = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(CREATE_LOCK_FILE)
                .ok()
                .and_then(|f| nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).ok());
            run_checked(Command::new("ip").args(["netns", "add", &ns.name]), "root")?;
        }
        sh(&ns, "ip link set lo up")?;
        Ok(ns)
    }

    /// Deletes the namespace (`ip netns del`). Processes still inside keep it
    /// alive until they exit. Deleting a namespace that does not exist is not
    /// an error, so cleanup can be repeated.
    pub fn delete(&self) -> Result<(), NetnsError> {
        if !self.exists() {
            return Ok(());
        }
        run_checked(Command::new("ip").args(["netns", "del", &self.name]), "root")?;
        Ok(())
    }

    /// The namespace name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// Whether `/run/netns/NAME` exists.
    pub fn exists(&self) -> bool {
        self.path().exists()
    }

    /// Opens the namespace file; the returned fd can be passed to `setns`.
    pub fn open(&self) -> Result<OwnedFd, NetnsError> {
        let path = self.path();
        File::open(&path)
            .map(OwnedFd::from)
            .map_err(|source| NetnsError::Open { path, source })
    }

    /// Runs `f` on a fresh OS thread that has entered this namespace and
    /// returns its result. Only the network namespace changes; the thread
    /// ends with the closure, so no other code ever runs in the namespace by
    /// accident. Do not `.await` inside: an async runtime could move the task
    /// to a thread in another namespace. A panic in `f` is propagated.
    pub fn run<F, T>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let fd = self.open()?;
        let name = self.name.clone();
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("netns-{}", self.name))
                .spawn_scoped(scope, move || {
                    nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)
                        .map_err(|source| NetnsError::Enter { name, source })?;
                    drop(fd);
                    Ok(f())
                })
                .map_err(|source| NetnsError::Thread {
                    netns: self.name.clone(),
                    source,
                })?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Writes a sysctl (dotted name, e.g. `net.ipv4.ip_forward`) inside this
    /// namespace. `/proc/sys/net` resolves against the calling thread's
    /// namespace, hence the write happens on a thread inside it.
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<(), NetnsError> {
        let path = sysctl_path(key);
        self.run(|| std::fs::write(&path, value))?
            .map_err(|source| NetnsError::Sysctl {
                key: key.to_owned(),
                netns: self.name.clone(),
                source,
            })
    }

    /// Reads a sysctl inside this namespace, trimmed.
    pub fn sysctl(&self, key: &str) -> Result<String, NetnsError> {
        let path = sysctl_path(key);
        self.run(|| std::fs::read_to_string(&path))?
            .map(|v| v.trim().to_owned())
            .map_err(|source| NetnsError::Sysctl {
                key: key.to_owned(),
                netns: self.name.clone(),
                source,
            })
    }
}

impl std::fmt::Display for NetNs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

fn validate_name(name: &str) -> Result<(), NetnsError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 200 {
        Some("it is longer than 200 bytes")
    } else if name.starts_with('.') {
        Some("it starts with a dot")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        Some("use only ASCII letters, digits, '-', '_' and '.'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NetnsError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Names of all namespaces currently bind-mounted under `/run/netns`.
pub fn list() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_RUN_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// Builds a [`Command`] for `program` that runs inside `netns`.
///
/// The namespace file is opened now, in the parent, and the child calls
/// `setns(CLONE_NEWNET)` on it between fork and exec. The mount namespace is
/// the caller's, so `/sys/fs/bpf` and `/run` look the same as outside (and
/// `/sys/class/net` shows the caller's devices, not the namespace's).
pub fn command_in(netns: &NetNs, program: impl AsRef<OsStr>) -> Result<Command, NetnsError> {
    let fd = netns.open()?;
    let mut cmd = Command::new(program);
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only calls
    // setns(2), which is async-signal-safe; it allocates nothing and touches
    // no locks. `fd` is owned by the closure, so it stays open until the
    // Command is dropped, and it is O_CLOEXEC so the program does not inherit it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Makes the program start in a new session (`setsid`), detached from the
/// caller's terminal and process group, so that it survives the caller
/// exiting and does not receive the terminal's Ctrl-C.
pub fn detach(cmd: &mut Command) {
    #[allow(unsafe_code)]
    // SAFETY: runs in the forked child before exec and only calls setsid(2),
    // which is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs a whitespace-separated command line (no shell, no quoting) inside
/// `netns` and returns its standard output. Fails with the command and its
/// standard error when it exits unsuccessfully.
///
/// ```no_run
/// # use sinew_lab::netns::{sh, NetNs};
/// let ns = NetNs::create("demo")?;
/// sh(&ns, "ip link add dummy0 type dummy")?;
/// # Ok::<(), sinew_lab::netns::NetnsError>(())
/// ```
pub fn sh(netns: &NetNs, command_line: &str) -> Result<String, NetnsError> {
    let argv: Vec<&str> = command_line.split_whitespace().collect();
    run_in(netns, &argv)
}

/// Like [`sh`] with an explicit argument vector, for arguments that contain spaces.
pub fn run_in<S: AsRef<OsStr>>(netns: &NetNs, argv: &[S]) -> Result<String, NetnsError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(NetnsError::Spawn {
            command: String::new(),
            netns: netns.name.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
        });
    };
    let mut cmd = command_in(netns, program)?;
    cmd.args(args);
    let out = run_checked(&mut cmd, &netns.name)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with captured output; an unsuccessful exit becomes
/// [`NetnsError::Failed`] carrying the command line and its stderr.
pub fn run_checked(cmd: &mut Command, netns: &str) -> Result<Output, NetnsError> {
    let command = describe(cmd);
    tracing::debug!(%netns, %command, "running");
    let out = cmd.stdin(Stdio::null()).output().map_err(|source| NetnsError::Spawn {
        command: command.clone(),
        netns: netns.to_owned(),
        source,
    })?;
    if !out.status.success() {
        return Err(NetnsError::Failed {
            command,
            netns: netns.to_owned(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// The command line of `cmd` as text, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(NetNs::named("sinew-lab-node1-pod2").is_ok());
        assert!(NetNs::named("").is_err());
        assert!(NetNs::named("a/b").is_err());
        assert!(NetNs::named("..").is_err());
        assert!(NetNs::named("a b").is_err());
    }

    #[test]
    fn sysctl_names_map_to_proc_paths() {
        assert_eq!(
            sysctl_path("net.ipv4.conf.all.rp_filter"),
            Path::new("/proc/sys/net/ipv4/conf/all/rp_filter")
        );
    }

    #[test]
    fn describe_joins_program_and_args() {
        let mut c = Command::new("ip");
        c.args(["link", "show"]);
        assert_eq!(describe(&c), "ip link show");
    }
}
