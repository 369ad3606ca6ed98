//! sinew-cni: the CNI 1.1 plugin that container runtimes exec for every pod
//! sandbox. It plumbs a veth pair into the pod's network namespace and
//! registers the endpoint with the node's sinew-agent over its unix socket.
//!
//! stdout carries exactly one result or error document and nothing else: the
//! runtime parses it. Diagnostics go to the optional "logFile".
//!
//! DEL when the agent is unreachable: the host veth is still removed (its
//! name is derived from container id and interface), then the plugin answers
//! code 11 "try again later" so the runtime retries DEL and the agent releases
//! the address once it is back.
#![forbid(unsafe_code)]

mod commands;
mod config;
mod env;
mod error;
mod lock;
mod netlink;
mod result;

use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use config::CniVersion;
use env::{CniEnv, Command};
use error::CniError;

fn main() -> ExitCode {
    let started = Instant::now();
    let env = CniEnv::from_lookup(|k| std::env::var(k).ok());

    if let Ok(CniEnv {
        command: Command::Version,
        ..
    }) = &env
    {
        return emit(Ok(Some(result::version_info())), CniVersion::LATEST);
    }

    // Read stdin unless a person runs us from a shell with nothing piped in.
    let mut stdin = Vec::new();
    if !std::io::stdin().is_terminal() {
        if let Err(source) = std::io::stdin().read_to_end(&mut stdin) {
            let e = CniError::Io {
                msg: "cannot read the network configuration from stdin".into(),
                source,
            };
            return emit(Err(e), CniVersion::LATEST);
        }
    }
    let version = config::sniff_version(&stdin).unwrap_or(CniVersion::LATEST);

    let env = match env {
        Ok(env) => env,
        Err(e) => return emit(Err(e.into()), version),
    };
    let conf = match config::parse(&stdin) {
        Ok(c) => c,
        Err(e) => return emit(Err(e.into()), version),
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
    emit(outcome, version)
}

fn emit(outcome: Result<Option<serde_json::Value>, CniError>, version: CniVersion) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let (doc, code) = match outcome {
        Ok(None) => return ExitCode::SUCCESS,
        Ok(Some(doc)) => (doc, ExitCode::SUCCESS),
        Err(e) => (e.to_json(version), ExitCode::FAILURE),
    };
    // If stdout is gone there is nobody left to tell.
    let _ = writeln!(out, "{doc}");
    code
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
