//! sinew-cni: the CNI 1.1 plugin that container runtimes exec for every pod
//! sandbox. It plumbs a veth pair into the pod's network namespace and
//! registers the endpoint with the node's sinew-agent over its unix socket.
//!
//! The binary (`main.rs`) only gathers the environment and stdin and prints
//! what [`execute`] returns; everything else is this library, so tests and
//! other programs can run a command without exec'ing the plugin.
//!
//! stdout carries exactly one result or error document and nothing else: the
//! runtime parses it. Diagnostics go to the optional "logFile".
//!
//! DEL when the agent is unreachable: the host veth is still removed (its
//! name is derived from container id and interface), then the plugin answers
//! code 11 "try again later" so the runtime retries DEL and the agent releases
//! the address once it is back.
#![forbid(unsafe_code)]

pub mod commands;
pub mod config;
pub mod env;
pub mod error;
pub mod lock;
pub mod result;
pub mod veth;

use std::io::Write;
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use config::CniVersion;
use env::{CniEnv, Command};
use error::CniError;

/// What one invocation prints and how it exits.
#[derive(Debug)]
pub struct Outcome {
    /// The one document for stdout (none for a successful DEL, CHECK, GC
    /// or STATUS).
    pub stdout: Option<serde_json::Value>,
    pub success: bool,
}

impl Outcome {
    fn new(outcome: Result<Option<serde_json::Value>, CniError>, version: CniVersion) -> Self {
        match outcome {
            Ok(doc) => Self {
                stdout: doc,
                success: true,
            },
            Err(e) => Self {
                stdout: Some(e.to_json(version)),
                success: false,
            },
        }
    }
}

/// Runs one CNI command. `env` looks up the CNI_* variables; `stdin` reads
/// the network configuration and is not called for VERSION.
pub fn execute(env: impl Fn(&str) -> Option<String>, stdin: impl FnOnce() -> std::io::Result<Vec<u8>>) -> Outcome {
    let started = Instant::now();
    let env = CniEnv::from_lookup(env);

    if let Ok(CniEnv {
        command: Command::Version,
        ..
    }) = &env
    {
        return Outcome::new(Ok(Some(result::version_info())), CniVersion::LATEST);
    }

    let stdin = match stdin() {
        Ok(b) => b,
        Err(source) => {
            let e = CniError::Io {
                msg: "cannot read the network configuration from stdin".into(),
                source,
            };
            return Outcome::new(Err(e), CniVersion::LATEST);
        }
    };
    let version = config::sniff_version(&stdin).unwrap_or(CniVersion::LATEST);

    let env = match env {
        Ok(env) => env,
        Err(e) => return Outcome::new(Err(e.into()), version),
    };
    let conf = match config::parse(&stdin) {
        Ok(c) => c,
        Err(e) => return Outcome::new(Err(e.into()), version),
    };

    let outcome = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(commands::run(&env, &conf)),
        Err(source) => Err(CniError::Io {
            msg: "cannot start the async runtime".into(),
            source,
        }),
    };

    if let Some(path) = &conf.log_file {
        log_line(path, &env, started, &outcome);
    }
    Outcome::new(outcome, version)
}

/// One line per invocation. Logging must never fail the command.
fn log_line(path: &Path, env: &CniEnv, started: Instant, outcome: &Result<Option<serde_json::Value>, CniError>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let result = match outcome {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("error code={} msg={:?}", e.code(), e.to_string()),
    };
    let line = format!(
        "{now:.3} {} container={} ifname={} netns={} duration_ms={ms:.2} {result}\n",
        env.command, env.container_id, env.ifname, env.netns
    );
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = f.write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn version_answers_without_reading_stdin() {
        let out = execute(env(&[("CNI_COMMAND", "VERSION")]), || {
            panic!("VERSION must not read stdin")
        });
        assert!(out.success);
        assert!(out.stdout.unwrap()["supportedVersions"].is_array());
    }

    #[test]
    fn failures_are_one_error_document_in_the_config_version() {
        let out = execute(env(&[("CNI_COMMAND", "ADD")]), || {
            Err(std::io::Error::other("stdin closed"))
        });
        assert!(!out.success);
        let doc = out.stdout.unwrap();
        assert!(doc["msg"].as_str().unwrap().contains("stdin"), "{doc}");

        // A config that names its version but does not parse: the error
        // document is shaped for that version.
        let conf = br#"{"cniVersion": "0.4.0", "name": 5}"#;
        let out = execute(env(&[("CNI_COMMAND", "ADD")]), || Ok(conf.to_vec()));
        assert!(!out.success);
        let doc = out.stdout.unwrap();
        assert_eq!(doc["cniVersion"], "0.4.0", "{doc}");
        assert!(doc["code"].as_u64().is_some(), "{doc}");
    }
}
