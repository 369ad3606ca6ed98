//! CPU pinning and the CPU model, for results that can be compared.
//!
//! Request/response latency over veth depends on where the client and the
//! server run: on some processors TCP_RR is bimodal (p50 5 µs or 60 µs)
//! depending on whether the two land on the same core, siblings or distant
//! cores. Every arm of every scenario therefore runs its client on one
//! fixed CPU and its server on another, the same for baselines and Sinew,
//! and every result names the CPU model it was measured on.
//!
//! Threads are pinned with `sched_setaffinity(2)`; programs (iperf3, the
//! services client) are started from a pinned thread and inherit its
//! affinity. Pinning is off until [`init`] is called (by `sinew-bench`'s
//! `main`), so library users and unit tests are not pinned by surprise.

use std::fmt;
use std::sync::OnceLock;

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// Which side of a benchmark a thread or program is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The load generator (TCP_RR client, iperf3 -c, the services client).
    Client,
    /// The server (request/response server, iperf3 -s).
    Server,
}

/// The CPUs the two sides run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pinning {
    /// The client's CPU.
    pub client: usize,
    /// The server's CPU.
    pub server: usize,
}

impl Pinning {
    /// The CPU of `role`.
    pub fn cpu(&self, role: Role) -> usize {
        match role {
            Role::Client => self.client,
            Role::Server => self.server,
        }
    }

    /// The default: the last two CPUs this process may use (client on the
    /// last), or the only one for both.
    pub fn choose(allowed: &[usize]) -> Option<Self> {
        match allowed {
            [] => None,
            [only] => Some(Self {
                client: *only,
                server: *only,
            }),
            [.., server, client] => Some(Self {
                client: *client,
                server: *server,
            }),
        }
    }
}

impl fmt::Display for Pinning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client on CPU {}, server on CPU {}", self.client, self.server)
    }
}

/// How the user asked to pin (`--cpus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// [`Pinning::choose`] over the CPUs this process may use.
    Auto,
    /// No pinning (results then vary with the scheduler).
    Off,
    /// These CPUs.
    Fixed(Pinning),
}

/// Errors of CPU pinning.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// `--cpus` could not be read.
    #[error("--cpus {0:?}: expected auto, off or CLIENT,SERVER (CPU numbers, e.g. 1,0)")]
    Parse(String),
    /// The affinity mask could not be read.
    #[error("cannot read this process's CPU affinity: {0}")]
    Affinity(nix::Error),
    /// A requested CPU is not one this process may run on.
    #[error(
        "CPU {cpu} is not in this process's affinity mask {allowed:?}: pick CPUs from it with --cpus CLIENT,SERVER"
    )]
    NotAllowed {
        /// The requested CPU.
        cpu: usize,
        /// The CPUs this process may use.
        allowed: Vec<usize>,
    },
}

/// Reads `auto`, `off` or `CLIENT,SERVER`.
pub fn parse_request(s: &str) -> Result<Request, CpuError> {
    let bad = || CpuError::Parse(s.to_owned());
    match s.trim() {
        "auto" | "" => Ok(Request::Auto),
        "off" | "none" => Ok(Request::Off),
        pair => {
            let (c, sv) = pair.split_once(',').ok_or_else(bad)?;
            Ok(Request::Fixed(Pinning {
                client: c.trim().parse().map_err(|_| bad())?,
                server: sv.trim().parse().map_err(|_| bad())?,
            }))
        }
    }
}

static PINNING: OnceLock<Option<Pinning>> = OnceLock::new();

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Result<Vec<usize>, CpuError> {
    let set = sched_getaffinity(Pid::from_raw(0)).map_err(CpuError::Affinity)?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// Decides the pinning for the rest of the process and returns it (None:
/// off). Checks that the CPUs are usable, so pinning cannot fail later.
pub fn init(request: Request) -> Result<Option<Pinning>, CpuError> {
    let allowed = allowed_cpus()?;
    let pinning = match request {
        Request::Off => None,
        Request::Auto => Pinning::choose(&allowed),
        Request::Fixed(p) => {
            for cpu in [p.client, p.server] {
                if !allowed.contains(&cpu) {
                    return Err(CpuError::NotAllowed { cpu, allowed });
                }
            }
            Some(p)
        }
    };
    Ok(*PINNING.get_or_init(|| pinning))
}

/// The pinning [`init`] chose; None before [`init`] or when off.
pub fn pinning() -> Option<Pinning> {
    PINNING.get().copied().flatten()
}

/// Pins the calling thread to `role`'s CPU (nothing when pinning is off).
pub fn pin_current(role: Role) {
    let Some(p) = pinning() else { return };
    let cpu = p.cpu(role);
    let mut set = CpuSet::new();
    // init() checked that the CPU exists and is allowed, so neither call
    // fails short of a cpuset change under our feet; then say so and go on.
    let pinned = set.set(cpu).and_then(|()| sched_setaffinity(Pid::from_raw(0), &set));
    if let Err(e) = pinned {
        eprintln!("warning: cannot pin the {role:?} to CPU {cpu} ({e}); this result is unpinned");
    }
}

/// Runs `f` on a new thread pinned to `role`'s CPU; programs `f` starts
/// inherit the affinity.
pub fn on<T, F>(role: Role, f: F) -> T
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    if pinning().is_none() {
        return f();
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            pin_current(role);
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The CPU model from `/proc/cpuinfo` (x86's `model name`, or Arm's
/// `CPU part` line), with the number of online CPUs.
pub fn model() -> String {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let online = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{} ({online} CPUs usable)", parse_model(&text))
}

/// The model line of a `/proc/cpuinfo` text.
pub fn parse_model(cpuinfo: &str) -> String {
    let field = |key: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key && !v.trim().is_empty()).then(|| v.split_whitespace().collect::<Vec<_>>().join(" "))
        })
    };
    field("model name")
        .or_else(|| field("Hardware"))
        .or_else(|| field("CPU part").map(|p| format!("Arm CPU part {p}")))
        .unwrap_or_else(|| "unknown CPU model".to_owned())
}

/// One line for every result: the CPU model and the pinning.
pub fn describe() -> String {
    match pinning() {
        Some(p) => format!("{}; {p}", model()),
        None => format!("{}; not pinned", model()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_two_allowed_cpus_are_chosen() {
        assert_eq!(Pinning::choose(&[]), None);
        assert_eq!(Pinning::choose(&[3]), Some(Pinning { client: 3, server: 3 }));
        assert_eq!(Pinning::choose(&[0, 1]), Some(Pinning { client: 1, server: 0 }));
        assert_eq!(Pinning::choose(&[0, 2, 5, 7]), Some(Pinning { client: 7, server: 5 }));
    }

    #[test]
    fn requests_parse() {
        assert_eq!(parse_request("auto").unwrap(), Request::Auto);
        assert_eq!(parse_request("off").unwrap(), Request::Off);
        assert_eq!(
            parse_request("1, 0").unwrap(),
            Request::Fixed(Pinning { client: 1, server: 0 })
        );
        assert!(parse_request("1").is_err());
        assert!(parse_request("a,b").is_err());
    }

    #[test]
    fn model_lines_are_found() {
        let x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)   CPU @ 2.20GHz\n";
        assert_eq!(parse_model(x86), "Intel(R) Xeon(R) CPU @ 2.20GHz");
        assert_eq!(parse_model("processor : 0\nCPU part : 0xd0c\n"), "Arm CPU part 0xd0c");
        assert_eq!(parse_model(""), "unknown CPU model");
    }

    #[test]
    fn unpinned_on_runs_inline() {
        // init() is never called in unit tests: pinning stays off.
        assert_eq!(pinning(), None);
        assert_eq!(on(Role::Client, || 7), 7);
    }
}
