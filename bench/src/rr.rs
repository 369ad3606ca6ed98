//! A TCP request/response benchmark in the spirit of netperf's TCP_RR and
//! TCP_CRR, since Debian does not ship netperf.
//!
//! The server is a listening socket bound inside one namespace; sockets keep
//! the namespace they were created in, so its accept loop can run on any
//! thread. Clients run on a thread inside another namespace (see
//! [`sinew_testvms::NetNs::run`]), because `connect` creates a socket in the
//! calling thread's namespace. One connection is served at a time: the
//! clients here are sequential, and a thread per connection would add its
//! own spawn cost to every TCP_CRR transaction.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::stats::percentile;

/// How often a blocked server wakes up to see whether it should stop.
const SERVER_POLL: Duration = Duration::from_millis(100);
/// How long a client waits for one response before calling it lost.
const CLIENT_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the request/response benchmark.
#[derive(Debug, thiserror::Error)]
pub enum RrError {
    /// The server could not listen.
    #[error("cannot listen on {addr}: {source} (is the address configured in this namespace?)")]
    Bind {
        /// Listen address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A socket option or address query failed.
    #[error("socket setup on {addr}: {source}")]
    Socket {
        /// The address involved.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The client could not connect or a transaction failed.
    #[error("{test} to {addr} failed after {done} transactions: {source} (is the path between the namespaces up?)")]
    Client {
        /// `TCP_RR` or `TCP_CRR`.
        test: &'static str,
        /// Server address.
        addr: SocketAddr,
        /// Transactions completed before the failure.
        done: u64,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The server echoed fewer bytes than were sent.
    #[error("{test} to {addr}: the server closed the connection mid-transaction")]
    ShortReply {
        /// `TCP_RR` or `TCP_CRR`.
        test: &'static str,
        /// Server address.
        addr: SocketAddr,
    },
    /// Not a single transaction completed in the allotted time.
    #[error("{test} to {addr}: no transaction completed in {secs:.1} s")]
    NoTransactions {
        /// `TCP_RR` or `TCP_CRR`.
        test: &'static str,
        /// Server address.
        addr: SocketAddr,
        /// The duration.
        secs: f64,
    },
}

/// What a client does and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RrConfig {
    /// Bytes per request and per response.
    pub message_size: usize,
    /// How long the client keeps going.
    pub duration: Duration,
}

impl Default for RrConfig {
    fn default() -> Self {
        Self {
            message_size: 1,
            duration: Duration::from_secs(5),
        }
    }
}

/// The outcome of one client run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct RrResult {
    /// Completed transactions (TCP_RR) or connections (TCP_CRR).
    pub transactions: u64,
    /// Wall time of the run in seconds.
    pub elapsed_secs: f64,
    /// Transactions per second.
    pub rate: f64,
    /// Median transaction latency in microseconds.
    pub p50_us: f64,
    /// 99th percentile transaction latency in microseconds.
    pub p99_us: f64,
}

impl RrResult {
    fn from_latencies(mut latencies_ns: Vec<u64>, elapsed: Duration) -> Self {
        latencies_ns.sort_unstable();
        let us = |q| percentile(&latencies_ns, q).map_or(f64::NAN, |ns| ns as f64 / 1000.0);
        let secs = elapsed.as_secs_f64();
        Self {
            transactions: latencies_ns.len() as u64,
            elapsed_secs: secs,
            rate: if secs > 0.0 {
                latencies_ns.len() as f64 / secs
            } else {
                0.0
            },
            p50_us: us(0.50),
            p99_us: us(0.99),
        }
    }
}

/// An echo server: every connection gets back each `message_size`-byte
/// request as a response of the same size, until it closes. Stops and joins
/// its thread on drop.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves on `listener`, which may belong to any namespace.
    pub fn start(listener: TcpListener, message_size: usize) -> Result<Self, RrError> {
        let addr = listener.local_addr().map_err(|source| RrError::Socket {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        // A receive timeout on a listening socket also bounds accept(2), so
        // the loop notices `stop` without a wake-up connection (which would
        // have to be made from inside the server's namespace).
        set_timeout(&listener, SERVER_POLL).map_err(|source| RrError::Socket { addr, source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("rr-server-{addr}"))
            .spawn(move || {
                crate::cpu::pin_current(crate::cpu::Role::Server);
                serve(listener, message_size.max(1), &flag)
            })
            .map_err(|source| RrError::Socket { addr, source })?;
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Binds `addr` in the calling thread's namespace and serves on it.
    pub fn bind(addr: SocketAddr, message_size: usize) -> Result<Self, RrError> {
        let listener = TcpListener::bind(addr).map_err(|source| RrError::Bind { addr, source })?;
        Self::start(listener, message_size)
    }

    /// The address it listens on (with the real port when bound to port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn set_timeout<F: std::os::fd::AsFd>(fd: &F, t: Duration) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    use nix::sys::time::TimeVal;
    let tv = TimeVal::new(t.as_secs() as _, t.subsec_micros() as _);
    setsockopt(fd, sockopt::ReceiveTimeout, &tv).map_err(std::io::Error::from)
}

fn serve(listener: TcpListener, size: usize, stop: &AtomicBool) {
    let mut buf = vec![0u8; size];
    while !stop.load(Ordering::Relaxed) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!(error = %e, "rr server accept failed");
                std::thread::sleep(SERVER_POLL);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(SERVER_POLL));
        echo(stream, &mut buf, stop);
    }
}

/// Echoes `buf.len()`-byte messages until EOF, an error, or `stop`.
fn echo(mut stream: TcpStream, buf: &mut [u8], stop: &AtomicBool) {
    loop {
        let mut got = 0;
        while got < buf.len() {
            match stream.read(&mut buf[got..]) {
                Ok(0) => return,
                Ok(n) => got += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) =>
                {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
        if stream.write_all(buf).is_err() {
            return;
        }
    }
}

/// TCP_RR: one connection, `message_size`-byte request and response
/// back-to-back for `duration`. Run it on a thread in the client's namespace;
/// it pins that thread to the client's CPU ([`crate::cpu`]).
pub fn tcp_rr(server: SocketAddr, cfg: RrConfig) -> Result<RrResult, RrError> {
    const TEST: &str = "TCP_RR";
    crate::cpu::pin_current(crate::cpu::Role::Client);
    let err = |done, source| RrError::Client {
        test: TEST,
        addr: server,
        done,
        source,
    };
    let mut stream = TcpStream::connect_timeout(&server, CLIENT_IO_TIMEOUT).map_err(|e| err(0, e))?;
    stream.set_nodelay(true).map_err(|e| err(0, e))?;
    stream
        .set_read_timeout(Some(CLIENT_IO_TIMEOUT))
        .map_err(|e| err(0, e))?;
    let size = cfg.message_size.max(1);
    let req = vec![0x5a_u8; size];
    let mut resp = vec![0u8; size];
    // Sized for a fast loopback run so the vector rarely grows mid-measurement.
    let mut lat = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let mut now = start;
    while now < deadline {
        let t0 = now;
        stream.write_all(&req).map_err(|e| err(lat.len() as u64, e))?;
        read_reply(&mut stream, &mut resp).map_err(|e| match e {
            ReplyError::Closed => RrError::ShortReply {
                test: TEST,
                addr: server,
            },
            ReplyError::Io(e) => err(lat.len() as u64, e),
        })?;
        now = Instant::now();
        lat.push((now - t0).as_nanos() as u64);
    }
    let elapsed = now - start;
    let _ = stream.shutdown(Shutdown::Both);
    finish(TEST, server, lat, elapsed, cfg.duration)
}

/// TCP_CRR: connect, one request, one response, close, repeated for
/// `duration`; each transaction's latency includes the handshake. Run it on
/// a thread in the client's namespace; with thousands of connections per
/// second that namespace needs `net.ipv4.tcp_tw_reuse = 1`.
pub fn tcp_crr(server: SocketAddr, cfg: RrConfig) -> Result<RrResult, RrError> {
    crr_loop(server, cfg, CLIENT_IO_TIMEOUT, None)
}

/// [`tcp_crr`] that also reports, per connection, the time from just
/// before `connect()` to the first byte of the response: what a new
/// connection to a service costs before any data flows (the handshake plus
/// whatever the path does to a connection's first packet, such as NAT).
/// `connect_timeout` bounds each connect.
pub fn tcp_crr_first_byte(
    server: SocketAddr,
    cfg: RrConfig,
    connect_timeout: Duration,
) -> Result<CrrFirstByte, RrError> {
    let mut first = Vec::with_capacity(1 << 18);
    let crr = crr_loop(server, cfg, connect_timeout, Some(&mut first))?;
    first.sort_unstable();
    let us = |q| percentile(&first, q).map_or(f64::NAN, |ns| ns as f64 / 1000.0);
    Ok(CrrFirstByte {
        crr,
        first_byte_p50_us: us(0.50),
        first_byte_p99_us: us(0.99),
    })
}

/// What [`tcp_crr_first_byte`] measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct CrrFirstByte {
    /// The TCP_CRR result (latencies are connect-to-close).
    pub crr: RrResult,
    /// Median time from connect() to the first response byte, in µs.
    pub first_byte_p50_us: f64,
    /// 99th percentile of the same, in µs.
    pub first_byte_p99_us: f64,
}

fn crr_loop(
    server: SocketAddr,
    cfg: RrConfig,
    connect_timeout: Duration,
    mut first_byte: Option<&mut Vec<u64>>,
) -> Result<RrResult, RrError> {
    crate::cpu::pin_current(crate::cpu::Role::Client);
    const TEST: &str = "TCP_CRR";
    let size = cfg.message_size.max(1);
    let req = vec![0xa5_u8; size];
    let mut resp = vec![0u8; size];
    let mut lat = Vec::with_capacity(1 << 18);
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let mut now = start;
    while now < deadline {
        let t0 = now;
        let done = lat.len() as u64;
        let err = |source| RrError::Client {
            test: TEST,
            addr: server,
            done,
            source,
        };
        let mut stream = TcpStream::connect_timeout(&server, connect_timeout).map_err(err)?;
        stream.set_nodelay(true).map_err(err)?;
        stream.set_read_timeout(Some(CLIENT_IO_TIMEOUT)).map_err(err)?;
        stream.write_all(&req).map_err(err)?;
        read_reply(&mut stream, &mut resp).map_err(|e| match e {
            ReplyError::Closed => RrError::ShortReply {
                test: TEST,
                addr: server,
            },
            ReplyError::Io(e) => err(e),
        })?;
        if let Some(v) = first_byte.as_deref_mut() {
            v.push((Instant::now() - t0).as_nanos() as u64);
        }
        drop(stream);
        now = Instant::now();
        lat.push((now - t0).as_nanos() as u64);
    }
    finish(TEST, server, lat, now - start, cfg.duration)
}

enum ReplyError {
    Closed,
    Io(std::io::Error),
}

fn read_reply(stream: &mut TcpStream, buf: &mut [u8]) -> Result<(), ReplyError> {
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(ReplyError::Closed),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(ReplyError::Io(e)),
        }
    }
    Ok(())
}

fn finish(
    test: &'static str,
    addr: SocketAddr,
    lat: Vec<u64>,
    elapsed: Duration,
    duration: Duration,
) -> Result<RrResult, RrError> {
    if lat.is_empty() {
        return Err(RrError::NoTransactions {
            test,
            addr,
            secs: duration.as_secs_f64(),
        });
    }
    Ok(RrResult::from_latencies(lat, elapsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_from_latencies() {
        let lat: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let r = RrResult::from_latencies(lat, Duration::from_secs(2));
        assert_eq!(r.transactions, 1000);
        assert_eq!(r.rate, 500.0);
        assert_eq!(r.p50_us, 500.0);
        assert_eq!(r.p99_us, 990.0);
    }
}
