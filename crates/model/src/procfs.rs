//! The two `/proc` reads that tell whether a process the agent or the lab
//! started is still the one they started: both outlive their starter and
//! are found again by pid, which the kernel may have given to another
//! program meanwhile.

/// The command line of `pid`, split at NULs; `None` when it is gone.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// Whether `pid` exists and is not a zombie (an exited child nobody has
/// reaped yet is not running).
pub fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the last ')', since the command name may contain one.
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_runs_and_a_pid_beyond_the_maximum_does_not() {
        let me = std::process::id();
        assert!(running(me));
        assert!(cmdline(me).is_some_and(|c| !c.is_empty()));
        // pid_max is at most 2^22.
        assert!(!running(1 << 23));
        assert_eq!(cmdline(1 << 23), None);
    }
}
