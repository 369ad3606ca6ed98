//! Waiting for the machine to be quiet before a measurement, and noticing
//! Ctrl-C so that a run unwinds through its cleanup guards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::Serialize;

/// The machine counts as idle when at least this share of CPU time over a
/// sample was idle (all cores together).
pub const IDLE_SHARE: f64 = 0.90;
/// How long one sample of `/proc/stat` lasts.
const SAMPLE: Duration = Duration::from_millis(500);

/// Errors from the idle check and the interrupt flag.
#[derive(Debug, thiserror::Error)]
pub enum IdleError {
    /// `/proc/stat` could not be read or parsed.
    #[error("cannot read CPU times from /proc/stat: {0}")]
    ProcStat(String),
    /// Installing the SIGINT/SIGTERM handler failed.
    #[error("cannot install the Ctrl-C handler: {0}")]
    Signal(#[source] std::io::Error),
    /// The user pressed Ctrl-C (or the process got SIGTERM).
    #[error("interrupted; cleaning up")]
    Interrupted,
}

/// CPU times from the first (`cpu`) line of `/proc/stat`: (idle, total).
pub fn parse_proc_stat(text: &str) -> Result<(u64, u64), IdleError> {
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| IdleError::ProcStat("no \"cpu \" line".into()))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse::<u64>().map_err(|e| IdleError::ProcStat(format!("{f:?}: {e}"))))
        .collect::<Result<_, _>>()?;
    if fields.len() < 5 {
        return Err(IdleError::ProcStat(format!(
            "only {} fields on the cpu line",
            fields.len()
        )));
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]; guest
    // time is already counted in user, so only the first eight add up.
    let total = fields.iter().take(8).sum();
    Ok((fields[3] + fields[4], total))
}

fn cpu_times() -> Result<(u64, u64), IdleError> {
    let text = std::fs::read_to_string("/proc/stat").map_err(|e| IdleError::ProcStat(e.to_string()))?;
    parse_proc_stat(&text)
}

/// The share of CPU time that was idle during the next `over`.
pub fn idle_share(over: Duration) -> Result<f64, IdleError> {
    let (i0, t0) = cpu_times()?;
    std::thread::sleep(over);
    let (i1, t1) = cpu_times()?;
    let dt = t1.saturating_sub(t0);
    Ok(if dt == 0 {
        1.0
    } else {
        i1.saturating_sub(i0) as f64 / dt as f64
    })
}

/// What waiting for idle found.
#[derive(Debug, Clone, Serialize)]
pub struct IdleWait {
    /// Whether the machine became idle in time.
    pub idle: bool,
    /// Seconds spent waiting.
    pub waited_secs: f64,
    /// The last measured idle share.
    pub idle_share: f64,
}

impl IdleWait {
    /// A one-line description for the report.
    pub fn note(&self, what: &str) -> Option<String> {
        if self.idle {
            None
        } else {
            Some(format!(
                "{what}: machine still busy after {:.0} s (idle {:.0}% < {:.0}%), measured anyway",
                self.waited_secs,
                self.idle_share * 100.0,
                IDLE_SHARE * 100.0
            ))
        }
    }
}

/// Samples `/proc/stat` until at least [`IDLE_SHARE`] of CPU time is idle
/// or `max` has passed; proceeds either way and says which.
pub fn wait_for_idle(max: Duration) -> Result<IdleWait, IdleError> {
    let start = Instant::now();
    loop {
        check_interrupted()?;
        let share = idle_share(SAMPLE)?;
        let waited = start.elapsed();
        if share >= IDLE_SHARE || waited >= max {
            return Ok(IdleWait {
                idle: share >= IDLE_SHARE,
                waited_secs: waited.as_secs_f64(),
                idle_share: share,
            });
        }
    }
}

static INTERRUPTED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Makes SIGINT and SIGTERM set a flag that [`check_interrupted`] reports,
/// so the run unwinds and its guards remove what it created. A second
/// signal ends the process at once.
pub fn install_interrupt_handler() -> Result<(), IdleError> {
    let flag = INTERRUPTED.get_or_init(|| Arc::new(AtomicBool::new(false))).clone();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Registered first, so it sees the flag before this signal sets it.
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone()).map_err(IdleError::Signal)?;
        signal_hook::flag::register(sig, flag.clone()).map_err(IdleError::Signal)?;
    }
    Ok(())
}

/// Fails with [`IdleError::Interrupted`] once Ctrl-C was pressed.
pub fn check_interrupted() -> Result<(), IdleError> {
    match INTERRUPTED.get() {
        Some(f) if f.load(Ordering::Relaxed) => Err(IdleError::Interrupted),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_cpu_line() {
        let text = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\nintr 1\n";
        assert_eq!(parse_proc_stat(text).unwrap(), (850, 1000));
        assert!(parse_proc_stat("intr 1\n").is_err());
        assert!(parse_proc_stat("cpu  1 2\n").is_err());
    }

    #[test]
    fn idle_share_is_a_fraction() {
        let s = idle_share(Duration::from_millis(50)).unwrap();
        assert!((0.0..=1.0).contains(&s), "{s}");
    }
}
