//! The proxy's configuration, parsed once into typed values.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sinew_abi::{PROXY_EGRESS_PORT_DEFAULT, PROXY_INGRESS_PORT_DEFAULT};

/// Bounds that keep one client from holding more than its share.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest HTTP/1 request head (request line and headers); more is
    /// answered 431.
    pub max_header_bytes: usize,
    /// Most header lines in an HTTP/1 request.
    pub max_headers: usize,
    /// Time for a client to send the first bytes and a complete HTTP/1
    /// request head.
    pub header_read_timeout: Duration,
    /// How long an HTTP/1 client connection may sit idle between requests
    /// before the proxy closes it (quietly: not a drop).
    pub keepalive_timeout: Duration,
    /// Largest decoded HTTP/2 header list.
    pub h2_max_header_list_size: u32,
    /// Concurrent streams per HTTP/2 connection.
    pub h2_max_concurrent_streams: u32,
    /// Streams a client may open and reset before the server accepted them
    /// (rapid reset, CVE-2023-44487); more is a GOAWAY.
    pub h2_max_pending_accept_reset_streams: usize,
    /// Streams the server may reset for the client's protocol errors.
    pub h2_max_local_error_reset_streams: usize,
    /// HTTP/2 PING interval; a client that does not answer within
    /// `h2_keepalive_timeout` (or that stopped reading, as in a PING or
    /// SETTINGS flood) is disconnected.
    pub h2_keepalive_interval: Duration,
    pub h2_keepalive_timeout: Duration,
    /// Connecting to the original destination.
    pub upstream_connect_timeout: Duration,
    /// Idle upstream connections kept per destination and mark.
    pub upstream_idle_per_key: usize,
    pub upstream_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(75),
            h2_max_header_list_size: 16 * 1024,
            h2_max_concurrent_streams: 100,
            h2_max_pending_accept_reset_streams: 20,
            h2_max_local_error_reset_streams: 100,
            h2_keepalive_interval: Duration::from_secs(20),
            h2_keepalive_timeout: Duration::from_secs(10),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_idle_per_key: 32,
            upstream_idle_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Transparent listeners for ingress rules (the destination's node).
    pub ingress: Vec<SocketAddr>,
    /// Transparent listeners for egress rules (the source's node).
    pub egress: Vec<SocketAddr>,
    /// Set IP_TRANSPARENT on the listeners (needed for connections the
    /// datapath assigns to them); off only in tests without CAP_NET_ADMIN.
    pub transparent: bool,
    /// Prometheus metrics and health (`/metrics`, `/healthz`, `/ready`).
    pub admin: Option<SocketAddr>,
    /// The agent's ProxyControl socket; `None` runs on the snapshot the
    /// caller installs (tests).
    pub agent_socket: Option<PathBuf>,
    /// Test hook: treat every accepted connection as addressed to this
    /// original destination instead of the socket's local address.
    pub original_dst_override: Option<SocketAddr>,
    /// The datapath's pinned `sinew_proxy_src` map (ingress connections'
    /// source identities); without it the client's address names the
    /// client.
    pub source_map: Option<PathBuf>,
    /// One line per request on stdout.
    pub access_log: bool,
    /// How long a draining process (SIGTERM) waits for requests in flight.
    pub drain_timeout: Duration,
    /// Worker threads of the data runtime.
    pub data_threads: usize,
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ingress: vec![SocketAddr::from(([0, 0, 0, 0], PROXY_INGRESS_PORT_DEFAULT))],
            egress: vec![SocketAddr::from(([0, 0, 0, 0], PROXY_EGRESS_PORT_DEFAULT))],
            transparent: true,
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 15090))),
            agent_socket: Some(PathBuf::from(sinew_proto::DEFAULT_PROXY_SOCKET)),
            original_dst_override: None,
            source_map: None,
            access_log: false,
            drain_timeout: Duration::from_secs(30),
            data_threads: 2,
            limits: Limits::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration {name} = {value}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub value: String,
    pub reason: &'static str,
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ingress.is_empty() && self.egress.is_empty() {
            return Err(ConfigError {
                name: "listeners",
                value: "none".into(),
                reason: "give at least one ingress or egress listener address",
            });
        }
        if self.data_threads == 0 {
            return Err(ConfigError {
                name: "data-threads",
                value: "0".into(),
                reason: "the data runtime needs at least one worker",
            });
        }
        if self.limits.max_header_bytes < 8192 {
            return Err(ConfigError {
                name: "max-header-bytes",
                value: self.limits.max_header_bytes.to_string(),
                reason: "a request head needs at least 8192 bytes of buffer",
            });
        }
        Ok(())
    }
}
