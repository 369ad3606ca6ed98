//! Connections to original destinations. HTTP/1 connections are pooled
//! per (destination, mark); HTTP/2 ones belong to the client connection
//! whose streams they carry ([`crate::h2`]). Every socket carries the SO_MARK that tells the datapath this
//! is the proxy's own traffic for a client of a given identity: it is not
//! redirected again and is judged at the destination as that client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::{TcpSocket, TcpStream};

use crate::metrics::{Metrics, UpstreamError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    dst: SocketAddr,
    mark: u32,
}

/// An HTTP/1 connection to an original destination, between exchanges:
/// the socket, the bytes read past the last response (none, when the
/// upstream keeps to the protocol), and when its last exchange ended.
pub struct H1Conn {
    pub stream: TcpStream,
    pub buf: BytesMut,
    pub mark: u32,
    pub idle_since: Instant,
    /// It carried an exchange before: the upstream may have closed it
    /// while it sat idle.
    pub reused: bool,
}

impl H1Conn {
    fn new(stream: TcpStream, mark: u32) -> Self {
        H1Conn {
            stream,
            buf: BytesMut::with_capacity(8 * 1024),
            mark,
            idle_since: Instant::now(),
            reused: false,
        }
    }

    /// Whether it can take a request. One idle for a moment is taken as
    /// is (a close that races the request is caught when the response
    /// fails to come); one idle longer is asked first, with a read that
    /// does not wait: the upstream's FIN, or bytes it had no reason to
    /// send, mean it cannot.
    pub fn usable(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        if self.idle_since.elapsed() < Duration::from_millis(100) {
            return true;
        }
        let mut b = [0u8; 1];
        matches!(self.stream.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// Idle connections past `idle_per_key` (up to four times it) stay this
/// long: when the number of requests in flight dips for a moment, the next
/// peak finds its connections still open instead of connecting again (a
/// connection closed and reopened costs both ends a handshake each way;
/// haproxy's `pool-purge-delay` does the same).
pub const SURPLUS_IDLE: Duration = Duration::from_secs(2);

pub struct Pool {
    h1: Mutex<HashMap<Key, Vec<H1Conn>>>,
    connect_timeout: Duration,
    idle_per_key: usize,
    idle_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Upstream connections client connections hold between their
    /// requests ([`Pool::hold`]), and how many may be held.
    held: std::sync::atomic::AtomicUsize,
    max_held: usize,
}

impl Pool {
    pub fn new(connect_timeout: Duration, idle_per_key: usize, idle_timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            h1: Mutex::default(),
            connect_timeout,
            idle_per_key,
            idle_timeout,
            metrics,
            held: Default::default(),
            max_held: idle_per_key.saturating_mul(4),
        }
    }

    /// Whether a client connection may hold an upstream connection of its
    /// own between requests. A few hundred busy clients each keep theirs;
    /// past the cap (four times the idle pool) they give it back after each
    /// exchange, so a thousand idle clients do not hold a thousand upstream
    /// connections and their buffers. Pair with [`Pool::unhold`].
    pub fn hold(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.held
            .fetch_update(Relaxed, Relaxed, |n| (n < self.max_held).then_some(n + 1))
            .is_ok()
    }

    /// A held upstream connection is no longer held.
    pub fn unhold(&self) {
        self.held.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Opens a marked TCP connection to `dst`.
    pub async fn connect(&self, dst: SocketAddr, mark: u32) -> Result<TcpStream, UpstreamError> {
        let sock = match dst {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|_| UpstreamError::ConnectFailed)?;
        if mark != 0 {
            socket2::SockRef::from(&sock).set_mark(mark).map_err(|e| {
                tracing::warn!(%dst, mark, error = %e, "cannot set SO_MARK on the upstream socket (the proxy needs CAP_NET_ADMIN)");
                UpstreamError::ConnectFailed
            })?;
        }
        let _ = sock.set_nodelay(true);
        match tokio::time::timeout(self.connect_timeout, sock.connect(dst)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => {
                tracing::debug!(%dst, error = %e, "upstream connect failed");
                Err(UpstreamError::ConnectFailed)
            }
            Err(_) => Err(UpstreamError::ConnectTimeout),
        }
    }

    /// A new HTTP/1 connection to `dst`.
    pub async fn connect_h1(&self, dst: SocketAddr, mark: u32) -> Result<H1Conn, UpstreamError> {
        Ok(H1Conn::new(self.connect(dst, mark).await?, mark))
    }

    /// An idle HTTP/1 connection to `dst` for `mark`, newest first (the
    /// warmest), or a new one.
    pub async fn checkout_h1(&self, dst: SocketAddr, mark: u32) -> Result<H1Conn, UpstreamError> {
        if let Some(c) = self.take_h1(dst, mark) {
            return Ok(c);
        }
        self.connect_h1(dst, mark).await
    }

    fn take_h1(&self, dst: SocketAddr, mark: u32) -> Option<H1Conn> {
        let mut idle = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&Key { dst, mark })?;
        while let Some(c) = list.pop() {
            if c.idle_since.elapsed() < self.idle_timeout && c.usable() {
                return Some(c);
            }
        }
        None
    }

    /// Gives back an HTTP/1 connection whose last exchange ended cleanly
    /// (at its `idle_since`). Synchronous, no task. Idle connections are
    /// closed past `idle_timeout`; past `idle_per_key` once idle for
    /// [`SURPLUS_IDLE`], and none are kept past four times `idle_per_key`.
    pub fn give_back_h1(&self, dst: SocketAddr, c: H1Conn) {
        let now = Instant::now();
        let key = Key { dst, mark: c.mark };
        let mut idle = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(key).or_default();
        // The oldest sit at the front: expire from there, stopping at the
        // first one still fresh, so a give-back costs a clock read or two.
        // (One a client held for long comes back with its own, older
        // time; `take_h1` checks each one it pops as well.)
        let stale = list
            .iter()
            .position(|c| now.duration_since(c.idle_since) < self.idle_timeout)
            .unwrap_or(list.len());
        list.drain(..stale);
        let surplus = list.len().saturating_sub(self.idle_per_key);
        let spent = list
            .iter()
            .take(surplus)
            .take_while(|c| now.duration_since(c.idle_since) >= SURPLUS_IDLE)
            .count();
        list.drain(..spent);
        if list.len() < self.idle_per_key.saturating_mul(4) && now.duration_since(c.idle_since) < self.idle_timeout {
            list.push(c);
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The idle list of one key after giving back connections idle for
    /// the given times, oldest first.
    async fn idle_after(idle_per_key: usize, ages: &[Duration]) -> usize {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = l.local_addr().unwrap();
        let pool = Pool::new(
            Duration::from_secs(1),
            idle_per_key,
            Duration::from_secs(60),
            Arc::new(Metrics::default()),
        );
        for age in ages {
            let mut c = pool.connect_h1(dst, 0).await.unwrap();
            c.idle_since = Instant::now() - *age;
            pool.give_back_h1(dst, c);
        }
        let idle = pool.h1.lock().unwrap();
        idle.get(&Key { dst, mark: 0 }).map_or(0, Vec::len)
    }

    #[tokio::test]
    async fn surplus_idle_connections_outlive_a_dip_but_not_long() {
        let fresh = Duration::ZERO;
        let old = SURPLUS_IDLE + Duration::from_secs(1);
        // Past idle_per_key (2), fresh ones stay, up to four times it.
        assert_eq!(idle_after(2, &[fresh; 6]).await, 6);
        assert_eq!(idle_after(2, &[fresh; 12]).await, 8);
        // Surplus idle past SURPLUS_IDLE goes at the next give-back; the
        // first idle_per_key stay until idle_timeout.
        assert_eq!(idle_after(2, &[old, old, old, old, fresh]).await, 3);
        assert_eq!(idle_after(2, &[old, old]).await, 2);
        // Past idle_timeout none stay.
        assert_eq!(idle_after(2, &[Duration::from_secs(61), fresh]).await, 1);
    }
}
