//! Helpers the privileged test harnesses of every crate share: the root
//! check and running `sinew-cni` the way a container runtime does.

use std::ffi::OsStr;
use std::io::{ErrorKind, Write};
use std::process::{Command, Output, Stdio};

/// Fails the calling test unless it runs as root. Privileged tests must
/// fail, never skip or pass silently, when they cannot run; `what` says
/// what needs root (shown in the failure).
pub fn require_root(what: &str) {
    assert!(
        is_root(),
        "{what} needs root (network namespaces, BPF programs and pins): run the tests as root, \
         e.g. `sudo -E cargo test` (the CI does)"
    );
}

/// Whether the process runs with root's effective user id.
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Runs a CNI plugin command like a runtime does: with exactly `env` (plus
/// PATH) in its environment, `stdin` (the network configuration) on its
/// standard input, and its output captured. `cmd` says what to exec and
/// where (e.g. [`crate::cni::command`] for a lab node's namespace).
///
/// A plugin may exit without reading its configuration (VERSION does), so
/// a closed stdin pipe is not an error; what the plugin printed is.
///
/// # Panics
///
/// When the plugin cannot be started or waited for, failing the test.
pub fn run_cni<K, V>(mut cmd: Command, env: &[(K, V)], stdin: &str) -> Output
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run the CNI plugin {program}: {e} (is it built?)"));
    if let Some(mut pipe) = child.stdin.take() {
        if let Err(e) = pipe.write_all(stdin.as_bytes()) {
            assert_eq!(e.kind(), ErrorKind::BrokenPipe, "writing {program}'s stdin: {e}");
        }
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for the CNI plugin {program}: {e}"))
}

/// Runs `sinew lab up` for lab `lab` in a child process (`up` carries the
/// binary, its arguments and working directory) and guards the lab it
/// made, so that the lab is taken down however the test ends. Returns the
/// guard and what `up` printed on stdout.
///
/// Why not [`LabGuard::up_with`](crate::LabGuard::up_with): these tests
/// prove the CLI, so the CLI must bring the lab up. The guard is loaded
/// from the state directory before `up`'s exit status is checked: a
/// failed `sinew lab up` leaves the partial lab for inspection, and a
/// failing test must not leave it behind.
///
/// # Panics
///
/// When `up` cannot run or fails (its output is in the message).
pub fn cli_lab_up(mut up: Command, lab: &str) -> (crate::LabGuard, String) {
    let out = up
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", up.get_program()));
    let guard = crate::LabGuard::load(&crate::lab::default_state_dir(lab));
    assert!(
        out.status.success(),
        "{up:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let guard = guard.unwrap_or_else(|e| panic!("{up:?} succeeded but left no lab state: {e}"));
    (guard, String::from_utf8_lossy(&out.stdout).into_owned())
}
