//! [`LabGuard`]: a lab that is taken down when it goes out of scope, the
//! one guard the lab's tests, the kernel tests, the CLI's tests and the
//! benchmarks share, whether the lab was brought up in-process or by
//! `sinew lab up`.

use std::path::Path;

use crate::error::LabError;
use crate::lab::Lab;
use crate::spec::{Binaries, LabSpec, UpOptions};

/// Lines of each agent's log [`LabGuard::agent_logs`] shows.
const LOG_LINES: usize = 40;

/// A lab taken down (CNI DELs, agents, namespaces, pins) when the guard
/// drops. If the thread is panicking (a failed assertion), the last lines
/// of every agent's log go to stderr first.
#[derive(Debug)]
pub struct LabGuard {
    /// The lab. A field, so that `&guard.lab` is the `&Lab` the helpers of
    /// tests take; [`LabGuard::lab`] and [`LabGuard::lab_mut`] say the same.
    pub lab: Lab,
}

impl LabGuard {
    /// Guards a lab that is up.
    pub fn new(lab: Lab) -> Self {
        Self { lab }
    }

    /// Guards the lab whose state is in `state_dir`: one that `sinew lab
    /// up` brought up in another process, or what a failed [`Lab::up`]
    /// left (its state file is written before anything else exists).
    pub fn load(state_dir: &Path) -> Result<Self, LabError> {
        Lab::load(state_dir).map(Self::new)
    }

    /// Brings a lab up with [`Lab::up_with`]. If that fails, the agents'
    /// logs go to stderr and whatever part of the lab exists is taken down
    /// before the error is returned.
    pub fn up_with(
        spec: &LabSpec,
        binaries: &Binaries,
        options: &UpOptions<'_>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self, LabError> {
        match Lab::up_with(spec, binaries, options, progress) {
            Ok(lab) => Ok(Self::new(lab)),
            Err(e) => {
                let state_dir = spec.state_dir();
                if let Ok(lab) = Lab::load(&state_dir) {
                    eprintln!("---- agent logs of lab {} ----\n{}", spec.name_prefix, agent_logs(&lab));
                }
                take_down(&state_dir, &spec.name_prefix);
                Err(e)
            }
        }
    }

    /// The lab.
    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// The lab, for adding and deleting pods or restarting agents.
    pub fn lab_mut(&mut self) -> &mut Lab {
        &mut self.lab
    }

    /// The last lines of every agent's log, for failure messages.
    pub fn agent_logs(&self) -> String {
        agent_logs(&self.lab)
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- agent logs ----\n{}", self.agent_logs());
        }
        let prefix = self.lab.spec().name_prefix.clone();
        take_down(self.lab.state_dir(), &prefix);
    }
}

/// [`Lab::down`], saying on stderr what it could not remove and how to
/// retry (a guard has no caller to return an error to).
fn take_down(state_dir: &Path, prefix: &str) {
    let retry = format!("retry with `sinew --lab {prefix} lab down`");
    match Lab::down(state_dir) {
        Ok(s) if s.is_clean() => {}
        Ok(s) => eprintln!(
            "warning: lab {} left behind: {} (warnings: {}); {retry}",
            state_dir.display(),
            s.left_behind.join(", "),
            s.warnings.join("; ")
        ),
        Err(e) => eprintln!("warning: taking down lab {}: {e}; {retry}", state_dir.display()),
    }
}

fn agent_logs(lab: &Lab) -> String {
    let mut out = String::new();
    for node in lab.nodes() {
        out.push_str(&format!(
            "== {} (last {LOG_LINES} lines)\n{}\n",
            node.agent_log.display(),
            tail(&node.agent_log, LOG_LINES)
        ));
    }
    out
}

/// The last `n` lines of a file, or a note that it cannot be read.
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
