//! The transparent listeners. They are bound with SO_REUSEPORT so that a
//! new proxy process can bind the same ports while the old one still
//! serves: with `net.ipv4.tcp_migrate_req` on, connections waiting in the
//! old process's accept queue move to the new listener when the old one
//! closes, so a restart refuses no connection.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "bind {addr}: {source} (another process without SO_REUSEPORT holds the port, or the address is not local)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "set {option} on the listener for {addr}: {source} (the proxy needs CAP_NET_ADMIN for transparent listeners)"
    )]
    Option {
        addr: SocketAddr,
        option: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Binds one listener socket. It joins the port's SO_REUSEPORT group (and
/// gets connections) only once [`listen`] is called: a restarting proxy
/// listens after its first snapshot is in force, so it never answers with
/// no rules while the old process still could.
pub fn bind(addr: SocketAddr, transparent: bool) -> Result<Socket, ListenError> {
    let opt = |option: &'static str| move |source| ListenError::Option { addr, option, source };
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(opt("socket"))?;
    sock.set_reuse_address(true).map_err(opt("SO_REUSEADDR"))?;
    sock.set_reuse_port(true).map_err(opt("SO_REUSEPORT"))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true).map_err(opt("IPV6_V6ONLY"))?;
    }
    if transparent {
        match addr {
            SocketAddr::V4(_) => sock.set_ip_transparent_v4(true).map_err(opt("IP_TRANSPARENT"))?,
            SocketAddr::V6(_) => sock.set_ip_transparent_v6(true).map_err(opt("IPV6_TRANSPARENT"))?,
        }
    }
    // Accepted sockets inherit it (Linux copies the listener's TCP
    // options), so no connection needs its own setsockopt.
    sock.set_tcp_nodelay(true).map_err(opt("TCP_NODELAY"))?;
    sock.set_nonblocking(true).map_err(opt("O_NONBLOCK"))?;
    sock.bind(&addr.into())
        .map_err(|source| ListenError::Bind { addr, source })?;
    Ok(sock)
}

/// Starts listening on a socket from [`bind`].
pub fn listen(sock: Socket) -> Result<std::net::TcpListener, ListenError> {
    let addr = sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    sock.listen(4096).map_err(|source| ListenError::Bind { addr, source })?;
    // No ACK of its own for a request that the response will acknowledge
    // within microseconds (delayed, as haproxy does for HTTP): one segment
    // less per new connection on both ends. Accepted sockets inherit it;
    // set after listen(), which resets the delayed-ACK state. A request
    // answered later is acknowledged by the delayed-ACK timer, and one of
    // two or more full segments as usual. Best effort: only a cost if lost.
    let _ = sock.set_tcp_quickack(false);
    Ok(sock.into())
}

/// Turns on `net.ipv4.tcp_migrate_req` in this network namespace (best
/// effort: kernels before 5.14 do not have it, and then a restart may reset
/// connections still queued in the old process).
pub fn enable_request_migration() -> io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", b"1")
}

/// An IPv4 address as IPv4 even when a dual-stack socket reports it mapped.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The options set once on the listener are the accepted sockets'
    /// (Linux copies them), so no connection needs a setsockopt of its own.
    #[test]
    fn accepted_sockets_inherit_nodelay_and_delayed_acks() {
        let l = listen(bind("127.0.0.1:0".parse().unwrap(), false).unwrap()).unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        let s = socket2::SockRef::from(&s);
        assert!(s.tcp_nodelay().unwrap());
        assert!(!s.tcp_quickack().unwrap());
    }
}
