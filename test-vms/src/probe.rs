//! Connectivity checks between namespaces that need no external tools:
//! a TCP echo server on a thread in one namespace, a client on a thread in
//! another. The machines that run the tests do not have `ping`.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sinew_lab::netns::{NetNs, NetnsError};

/// Errors from a probe.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The server side failed.
    #[error("server in {netns} on {addr}: {source}")]
    Server {
        /// Server namespace.
        netns: String,
        /// Listen address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The client side failed, which is what an unreachable peer looks like.
    #[error("client in {netns} to {addr}: {source} (no route, or traffic dropped on the way)")]
    Client {
        /// Client namespace.
        netns: String,
        /// Target address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The echo came back different.
    #[error("echo from {addr} was {got:?}, expected {expected:?}")]
    Mismatch {
        /// Target address.
        addr: SocketAddr,
        /// What came back.
        got: Vec<u8>,
        /// What was sent.
        expected: Vec<u8>,
    },
}

/// Listens on `server_ip:port` in `server`, connects from `client`, sends a
/// few bytes and checks the echo. Returns the connect-to-echo time. Port 0
/// picks a free port.
pub fn tcp_echo(
    server: &NetNs,
    server_ip: IpAddr,
    port: u16,
    client: &NetNs,
    timeout: Duration,
) -> Result<Duration, ProbeError> {
    let (ready_tx, ready_rx) = mpsc::channel::<Result<SocketAddr, ProbeError>>();
    let listen = SocketAddr::new(server_ip, port);
    std::thread::scope(|scope| {
        let server_thread = scope.spawn(move || -> Result<(), ProbeError> {
            let server_err = |source| ProbeError::Server {
                netns: server.name().to_owned(),
                addr: listen,
                source,
            };
            let result = server.run(|| -> Result<(), ProbeError> {
                let listener = match TcpListener::bind(listen) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(server_err(e)));
                        return Ok(());
                    }
                };
                let addr = listener.local_addr().map_err(server_err)?;
                listener.set_nonblocking(true).map_err(server_err)?;
                let _ = ready_tx.send(Ok(addr));
                let deadline = Instant::now() + timeout;
                let (mut conn, _) = loop {
                    match listener.accept() {
                        Ok(c) => break c,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if Instant::now() >= deadline {
                                // The client reports the failure.
                                return Ok(());
                            }
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => return Err(server_err(e)),
                    }
                };
                conn.set_nonblocking(false).map_err(server_err)?;
                conn.set_read_timeout(Some(timeout)).map_err(server_err)?;
                let mut buf = [0u8; 64];
                let n = conn.read(&mut buf).map_err(server_err)?;
                conn.write_all(&buf[..n]).map_err(server_err)?;
                Ok(())
            });
            result?
        });
        let addr = match ready_rx.recv() {
            Ok(Ok(addr)) => addr,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return match server_thread.join() {
                    Ok(r) => r.map(|()| Duration::ZERO),
                    Err(p) => std::panic::resume_unwind(p),
                }
            }
        };
        let client_result = client.run(|| -> Result<Duration, ProbeError> {
            let client_err = |source| ProbeError::Client {
                netns: client.name().to_owned(),
                addr,
                source,
            };
            let start = Instant::now();
            let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(client_err)?;
            s.set_read_timeout(Some(timeout)).map_err(client_err)?;
            let msg = b"sinew-probe";
            s.write_all(msg).map_err(client_err)?;
            let mut got = vec![0u8; msg.len()];
            s.read_exact(&mut got).map_err(client_err)?;
            if got != msg {
                return Err(ProbeError::Mismatch {
                    addr,
                    got,
                    expected: msg.to_vec(),
                });
            }
            Ok(start.elapsed())
        });
        let server_result = match server_thread.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        };
        let elapsed = client_result??;
        server_result?;
        Ok(elapsed)
    })
}
