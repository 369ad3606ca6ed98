//! Bulk TCP throughput with iperf3 (Debian package `iperf3`): the server in
//! one namespace, the client in another, both started with
//! [`sinew_testvms::command_in`] so that only the network namespace changes,
//! each from a thread pinned to its side's CPU ([`crate::cpu`]).

use std::net::IpAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use sinew_testvms::netns::{command_in, NetnsError};

use crate::cpu::{self, Role};
use sinew_testvms::NetNs;

/// How long to wait for the server to listen.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors from running iperf3.
#[derive(Debug, thiserror::Error)]
pub enum IperfError {
    /// A namespace could not be opened.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// iperf3 could not be started.
    #[error("cannot run iperf3 in {netns}: {source} (install it: apt-get install iperf3)")]
    Spawn {
        /// Namespace.
        netns: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The server never listened.
    #[error("iperf3 server in {netns} is not listening on port {port} after {secs} s{exited}")]
    NotListening {
        /// Namespace.
        netns: String,
        /// Port.
        port: u16,
        /// Seconds waited.
        secs: u64,
        /// Exit status if it died.
        exited: String,
    },
    /// The client exited unsuccessfully or printed no usable result.
    #[error("iperf3 -c {target} -P {streams} in {netns}: {reason}")]
    Client {
        /// Namespace.
        netns: String,
        /// Server address.
        target: IpAddr,
        /// Parallel streams.
        streams: u32,
        /// What went wrong (iperf3's own error when it gave one).
        reason: String,
    },
}

/// A running iperf3 server, killed on drop.
#[derive(Debug)]
pub struct IperfServer {
    child: Child,
    addr: IpAddr,
    port: u16,
}

impl IperfServer {
    /// Starts `iperf3 -s` bound to `addr:port` in `netns` and waits until it
    /// listens.
    pub fn start(netns: &NetNs, addr: IpAddr, port: u16) -> Result<Self, IperfError> {
        let mut cmd = command_in(netns, "iperf3")?;
        cmd.args(["-s", "-B", &addr.to_string(), "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cpu::on(Role::Server, || cmd.spawn()).map_err(|source| IperfError::Spawn {
            netns: netns.name().to_owned(),
            source,
        })?;
        let mut server = Self { child, addr, port };
        let start = Instant::now();
        loop {
            if listening(netns, port) {
                return Ok(server);
            }
            let exited = server.child.try_wait().ok().flatten();
            if exited.is_some() || start.elapsed() > SERVER_READY_TIMEOUT {
                return Err(IperfError::NotListening {
                    netns: netns.name().to_owned(),
                    port,
                    secs: SERVER_READY_TIMEOUT.as_secs(),
                    exited: exited.map(|s| format!(" (it exited: {s})")).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The address it is bound to.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listening(netns: &NetNs, port: u16) -> bool {
    // `ss` inside the namespace: /proc/net/tcp would show this process's
    // namespace, not the server's.
    let Ok(mut cmd) = command_in(netns, "ss") else {
        return false;
    };
    cmd.args(["-Hltn", &format!("sport = :{port}")]);
    cmd.stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
}

/// Runs `iperf3 -c` from `netns` against `server` with `streams` parallel
/// streams for `secs` seconds and returns the receiver's bits per second.
pub fn run_client(netns: &NetNs, server: &IperfServer, streams: u32, secs: u32) -> Result<f64, IperfError> {
    let mut cmd = command_in(netns, "iperf3")?;
    cmd.args([
        "-c",
        &server.addr.to_string(),
        "-p",
        &server.port.to_string(),
        "-t",
        &secs.max(1).to_string(),
        "-P",
        &streams.max(1).to_string(),
        "-J",
    ])
    .stdin(Stdio::null());
    let out = cpu::on(Role::Client, || cmd.output()).map_err(|source| IperfError::Spawn {
        netns: netns.name().to_owned(),
        source,
    })?;
    let client_err = |reason: String| IperfError::Client {
        netns: netns.name().to_owned(),
        target: server.addr,
        streams,
        reason,
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let parsed = parse_bits_per_second(&text);
    match (out.status.success(), parsed) {
        (true, Ok(bps)) => Ok(bps),
        (_, Err(reason)) => Err(client_err(format!(
            "{reason}; exit {}; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
        (false, Ok(_)) => Err(client_err(format!("exit {}", out.status))),
    }
}

/// Reads `end.sum_received.bits_per_second` from iperf3's `-J` output
/// (falling back to `sum_sent`); iperf3's own `error` field becomes the error.
pub fn parse_bits_per_second(json: &str) -> Result<f64, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("iperf3 printed no JSON result ({e})"))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(format!("iperf3 error: {err}"));
    }
    let end = v.get("end").ok_or("iperf3 JSON has no \"end\" section")?;
    ["sum_received", "sum_sent"]
        .iter()
        .find_map(|k| end.get(k)?.get("bits_per_second")?.as_f64())
        .filter(|bps| *bps > 0.0)
        .ok_or_else(|| "iperf3 JSON has no positive end.sum_received.bits_per_second".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_receiver_rate() {
        let j = r#"{"start":{},"end":{"sum_sent":{"bits_per_second":2.5e9},"sum_received":{"bits_per_second":2.4e9}}}"#;
        assert_eq!(parse_bits_per_second(j), Ok(2.4e9));
        let j = r#"{"end":{"sum_sent":{"bits_per_second":1e9}}}"#;
        assert_eq!(parse_bits_per_second(j), Ok(1e9));
    }

    #[test]
    fn reports_iperf_errors() {
        let j = r#"{"start":{},"end":{},"error":"unable to connect to server: Connection refused"}"#;
        let e = parse_bits_per_second(j).unwrap_err();
        assert!(e.contains("Connection refused"), "{e}");
        assert!(parse_bits_per_second("garbage").is_err());
        assert!(parse_bits_per_second(r#"{"end":{"sum_received":{"bits_per_second":0}}}"#).is_err());
    }
}
