//! Connections to original destinations, pooled per (destination, mark,
//! protocol). Every socket carries the SO_MARK that tells the datapath this
//! is the proxy's own traffic for a client of a given identity: it is not
//! redirected again and is judged at the destination as that client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpSocket, TcpStream};

use crate::metrics::{Metrics, UpstreamError};

pub type Body = BoxBody<Bytes, hyper::Error>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Http1,
    Http2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    dst: SocketAddr,
    mark: u32,
    proto: Proto,
}

pub enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

type Idle = Vec<(Instant, http1::SendRequest<Body>)>;

pub struct Pool {
    h1: Mutex<HashMap<Key, Idle>>,
    h2: Mutex<HashMap<Key, http2::SendRequest<Body>>>,
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
            h2: Mutex::default(),
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

    /// A new HTTP/1 connection to `dst`, its connection task spawned.
    pub async fn connect_h1(&self, dst: SocketAddr, mark: u32) -> Result<http1::SendRequest<Body>, UpstreamError> {
        let io = TokioIo::new(self.connect(dst, mark).await?);
        let (send, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|_| UpstreamError::Handshake)?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(send)
    }

    /// A sender ready for one request, pooled or new.
    pub async fn checkout(self: &Arc<Self>, dst: SocketAddr, mark: u32, proto: Proto) -> Result<Sender, UpstreamError> {
        let key = Key { dst, mark, proto };
        match proto {
            Proto::Http1 => {
                while let Some(mut s) = self.take_h1(&key) {
                    // Ready at once, or shortly after the exchange it was
                    // given back from has settled; closed means try another.
                    if ready_h1(&mut s).await {
                        return Ok(Sender::H1(s));
                    }
                }
                self.connect_h1(dst, mark).await.map(Sender::H1)
            }
            Proto::Http2 => {
                if let Some(s) = self.h2.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
                    if !s.is_closed() && s.is_ready() {
                        return Ok(Sender::H2(s.clone()));
                    }
                }
                let io = TokioIo::new(self.connect(dst, mark).await?);
                let (send, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Duration::from_secs(30))
                    .handshake(io)
                    .await
                    .map_err(|_| UpstreamError::Handshake)?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                self.h2
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, send.clone());
                Ok(Sender::H2(send))
            }
        }
    }

    /// An idle HTTP/1 sender for `key`, newest first (the warmest
    /// connection). Only closed ones are skipped here: one given back the
    /// moment its exchange ended may not have seen its connection turn
    /// ready yet, so the caller waits for that ([`Sender::ready`]).
    fn take_h1(&self, key: &Key) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(key)?;
        while let Some((at, s)) = list.pop() {
            if !s.is_closed() && at.elapsed() < self.idle_timeout {
                return Some(s);
            }
        }
        None
    }

    /// Gives back an HTTP/1 sender whose exchange has ended (its response
    /// body finished or was dropped). Synchronous, no task: the next
    /// checkout waits for the connection to be ready, and finds out then
    /// if it closed. Idle connections past `idle_per_key`, or idle longer
    /// than `idle_timeout`, are closed.
    pub fn give_back_h1(&self, dst: SocketAddr, mark: u32, s: http1::SendRequest<Body>) {
        if s.is_closed() {
            return;
        }
        let key = Key {
            dst,
            mark,
            proto: Proto::Http1,
        };
        let now = Instant::now();
        let mut idle = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(key).or_default();
        // The oldest sit at the front: expire from there, stopping at the
        // first one still fresh, so a give-back costs one clock read.
        let stale = list
            .iter()
            .position(|(at, s)| now.duration_since(*at) < self.idle_timeout && !s.is_closed())
            .unwrap_or(list.len());
        list.drain(..stale);
        if list.len() < self.idle_per_key {
            list.push((now, s));
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// Waits until an HTTP/1 connection given back after an exchange can take
/// the next request: true when it can, false when it closed (or has not
/// settled within a second, which a finished exchange never takes).
pub async fn ready_h1(s: &mut http1::SendRequest<Body>) -> bool {
    if s.is_ready() {
        return true;
    }
    matches!(
        tokio::time::timeout(Duration::from_secs(1), s.ready()).await,
        Ok(Ok(()))
    )
}
