//! Finding and stopping the lab's processes through `/proc`.
//!
//! Agents are detached and usually outlive the process that started them,
//! so they are found again by pid (checked against their command line, in
//! case the pid was reused) or by an argument that only this lab uses.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

pub use sinew_model::procfs::cmdline;

/// Whether `pid` exists and is not a zombie. Reaps it first when it is our
/// own exited child, so a zombie does not look alive.
pub fn is_running(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    // ECHILD (not our child) is the normal case; nothing to do then.
    let _ = waitpid(Pid::from_raw(raw), Some(WaitPidFlag::WNOHANG));
    sinew_model::procfs::running(pid)
}

/// Pids whose command line has an argument containing `needle`.
pub fn find_by_arg(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    all_pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter(|&pid| cmdline(pid).is_some_and(|args| args.iter().skip(1).any(|a| a.contains(needle))))
        .filter(|&pid| is_running(pid))
        .collect()
}

/// Pids whose network namespace is the one bind-mounted at `netns_path`.
pub fn in_netns(netns_path: &Path) -> Vec<u32> {
    let Ok(target) = std::fs::metadata(netns_path) else {
        return Vec::new();
    };
    let me = std::process::id();
    all_pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.dev() == target.dev() && m.ino() == target.ino())
        })
        .collect()
}

fn all_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILL and waits up to one more
/// second. Returns whether the process is gone.
pub fn terminate(pid: u32, grace: Duration) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return true;
    };
    if !is_running(pid) {
        return true;
    }
    let _ = kill(Pid::from_raw(raw), Signal::SIGTERM);
    if wait_gone(pid, grace) {
        return true;
    }
    tracing::warn!(pid, "process ignored SIGTERM; sending SIGKILL");
    let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
    wait_gone(pid, Duration::from_secs(1))
}

fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_running(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // `is_running` reaps the exited child, which is what this checks.
    #[allow(clippy::zombie_processes)]
    fn terminate_stops_a_child_and_sees_it_gone() {
        let child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        assert!(is_running(pid));
        // Until exec, the child still shows the parent's (or no) command line.
        let deadline = Instant::now() + Duration::from_secs(5);
        while cmdline(pid).unwrap() != ["sleep", "30"] {
            assert!(Instant::now() < deadline, "{:?}", cmdline(pid));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(find_by_arg("30").contains(&pid));
        assert!(terminate(pid, Duration::from_secs(5)));
        assert!(!is_running(pid));
    }

    #[test]
    fn own_netns_contains_self_only_if_not_excluded() {
        let pids = in_netns(Path::new("/proc/self/ns/net"));
        assert!(!pids.contains(&std::process::id()));
        assert!(in_netns(Path::new("/nonexistent")).is_empty());
    }
}
