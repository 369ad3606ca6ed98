//! Reading a TCP socket without the extra failed read.
//!
//! Tokio learns that a socket has nothing more to read only from a read
//! that fails with EAGAIN, so a proxy that reads until then makes one
//! wasted system call every time a socket wakes it: more than half of
//! sinew-proxy's receive calls in an HTTP/2 benchmark. A TCP read that
//! returns less than the room it was given has emptied the receive queue
//! (the kernel copies until the queue is empty or the buffer full), so
//! [`read_now`] clears the socket's readiness right there, as haproxy does
//! when a receive comes back short.
//!
//! This is safe against data that arrives meanwhile: `try_io` clears only
//! the readiness it saw before the read (tokio's readiness tick), and new
//! data raises a new edge for the reactor. A FIN is never lost either:
//! tokio keeps a read-closed readiness when it clears the rest.

use std::io;

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// One read into `buf`'s spare room, without waiting: `Some(n)` bytes came
/// (0 at the end of the stream), `None` when nothing is there yet (wait for
/// `readable`). A short read marks the socket not readable, so the next
/// call returns `None` without a system call until new data arrives.
pub fn read_now(sock: &TcpStream, buf: &mut BytesMut) -> io::Result<Option<usize>> {
    let room = buf.capacity() - buf.len();
    let mut short = 0;
    let r = sock.try_io(Interest::READABLE, || {
        let n = sock.try_read_buf(buf)?;
        if n > 0 && n < room {
            short = n;
            // Drained: clear the readiness this read was made under.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match r {
        _ if short > 0 => Ok(Some(short)),
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Grows `buf` when it is nearly full, before a read.
fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
}

/// Waits for bytes and reads them into `buf` (growing it when nearly
/// full); 0 at the end of the stream.
pub async fn fill(sock: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    make_room(buf);
    loop {
        if let Some(n) = read_now(sock, buf)? {
            return Ok(n);
        }
        sock.readable().await?;
    }
}

/// A listening socket registered for [`accept`].
pub fn listener(l: std::net::TcpListener) -> io::Result<tokio::io::unix::AsyncFd<std::net::TcpListener>> {
    // SAFETY: the std listener owns its descriptor, keeps it open and never
    // swaps it while the AsyncFd holds the listener.
    Ok(unsafe { tokio::io::unix::AsyncFd::register_with_interest(l, Interest::READABLE) }?)
}

/// Accepts one connection from `l` without registering it with the
/// reactor: a client that sends its request with the connection (most do)
/// is read, answered and closed with no `epoll_ctl` at all, as haproxy
/// does. Tokio's own accept registers every socket (an `epoll_ctl` to add
/// it and one to remove it), and its first read waits for the reactor to
/// report data that is usually already there.
pub async fn accept(
    l: &tokio::io::unix::AsyncFd<std::net::TcpListener>,
) -> io::Result<(std::net::TcpStream, std::net::SocketAddr)> {
    use std::os::fd::{AsRawFd, FromRawFd};
    loop {
        let mut ready = l.readable().await?;
        let r = ready.try_io(|l| loop {
            // SAFETY: all zeroes is a valid sockaddr_storage (plain data).
            let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            // SAFETY: `ss` and `len` describe a writable sockaddr_storage.
            let fd = unsafe {
                libc::accept4(
                    l.as_raw_fd(),
                    (&mut ss as *mut libc::sockaddr_storage).cast(),
                    &mut len,
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    // A connection reset while queued, or a signal: the
                    // next one may be there.
                    Some(libc::ECONNABORTED | libc::EINTR) => continue,
                    _ => return Err(e),
                }
            }
            // SAFETY: accept4 returned a new socket that nothing else owns.
            let s = unsafe { std::net::TcpStream::from_raw_fd(fd) };
            match sockaddr(&ss) {
                Some(peer) => return Ok((s, peer)),
                // Not an IP peer: cannot happen on a TCP listener.
                None => continue,
            }
        });
        match r {
            Ok(r) => return r,
            // Nothing queued: readiness cleared, wait again.
            Err(_would_block) => continue,
        }
    }
}

fn sockaddr(ss: &libc::sockaddr_storage) -> Option<std::net::SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// A client connection that is registered with the reactor only once it
/// has to wait: reads and writes go straight to the socket until one
/// would block.
pub struct Client {
    raw: Option<std::net::TcpStream>,
    io: Option<TcpStream>,
}

impl Client {
    /// A non-blocking socket, not yet registered.
    pub fn new(s: std::net::TcpStream) -> Self {
        Client { raw: Some(s), io: None }
    }

    /// Whether the reactor knows the socket yet.
    pub fn is_registered(&self) -> bool {
        self.io.is_some()
    }

    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        match (&self.raw, &self.io) {
            (Some(s), _) => s.local_addr(),
            (_, Some(s)) => s.local_addr(),
            _ => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// The socket as tokio's, registering it now if it was not.
    pub fn registered(&mut self) -> io::Result<&mut TcpStream> {
        if let Some(s) = self.raw.take() {
            self.io = Some(TcpStream::from_std(s)?);
        }
        self.io.as_mut().ok_or_else(|| io::ErrorKind::NotConnected.into())
    }

    /// Turns the connection into tokio's stream, registered.
    pub fn into_registered(mut self) -> io::Result<TcpStream> {
        self.registered()?;
        self.io.take().ok_or_else(|| io::ErrorKind::NotConnected.into())
    }

    /// As [`fill`]: waits for bytes and reads them into `buf`; 0 at the
    /// end of the stream. The first attempt on an unregistered socket is
    /// a plain read; only one that would block registers it.
    pub async fn fill(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        if let Some(s) = &self.raw {
            make_room(buf);
            match read_raw(s, buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r,
            }
        }
        fill(self.registered()?, buf).await
    }

    /// Writes all of `data`: straight to the socket while it takes it, then
    /// (registered) waiting for room.
    pub async fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        use std::io::Write as _;
        if let Some(mut s) = self.raw.as_ref() {
            while !data.is_empty() {
                match s.write(data) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => data = &data[n..],
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            if data.is_empty() {
                return Ok(());
            }
        }
        tokio::io::AsyncWriteExt::write_all(self.registered()?, data).await
    }

    /// Shuts the sending side.
    pub fn shutdown_write(&self) -> io::Result<()> {
        match (&self.raw, &self.io) {
            (Some(s), _) => s.shutdown(std::net::Shutdown::Write),
            (_, Some(s)) => socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write),
            _ => Ok(()),
        }
    }
}

/// One non-blocking read into `buf`'s spare room.
fn read_raw(s: &std::net::TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    use bytes::BufMut as _;
    use std::os::fd::AsRawFd;
    let (ptr, room) = {
        let spare = buf.chunk_mut();
        (spare.as_mut_ptr(), spare.len())
    };
    loop {
        // SAFETY: the pointer and length are `buf`'s spare capacity, which
        // read(2) only writes to; `advance_mut` below covers what it wrote.
        let n = unsafe { libc::read(s.as_raw_fd(), ptr.cast(), room) };
        if n >= 0 {
            // SAFETY: the kernel initialised the first `n` spare bytes.
            unsafe { buf.advance_mut(n as usize) };
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A short read clears readiness; bytes that come later, and the
    /// peer's FIN after a short read, are still read (never a hang).
    #[tokio::test]
    async fn a_short_read_clears_readiness_and_later_bytes_and_the_end_still_come() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let mut buf = BytesMut::with_capacity(64 * 1024);

        client.write_all(b"hello").await.unwrap();
        assert_eq!(fill(&server, &mut buf).await.unwrap(), 5);
        // Drained: no read is made, nothing is there.
        assert_eq!(read_now(&server, &mut buf).unwrap(), None);

        client.write_all(b" world").await.unwrap();
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), fill(&server, &mut buf))
            .await
            .expect("bytes after a short read wake the reader")
            .unwrap();
        assert_eq!(n, 6);
        assert_eq!(&buf[..], b"hello world");

        client.write_all(b"!").await.unwrap();
        client.shutdown().await.unwrap();
        let mut total = 0;
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                match fill(&server, &mut buf).await.unwrap() {
                    0 => break,
                    n => total += n,
                }
            }
        })
        .await;
        assert!(end.is_ok(), "the FIN after a short read is seen");
        assert_eq!(total, 1);
        assert_eq!(&buf[..], b"hello world!");
    }

    /// A read that fills the room leaves the socket readable: what is
    /// queued is read at once, and only a read that finds nothing says so.
    #[tokio::test]
    async fn a_full_read_keeps_the_socket_readable() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let mut small = BytesMut::with_capacity(1000);
        let room = small.capacity();
        // Over loopback the bytes are queued when the write returns.
        client.write_all(&vec![7u8; 3 * room]).await.unwrap();
        server.readable().await.unwrap();
        for _ in 0..3 {
            assert_eq!(read_now(&server, &mut small).unwrap(), Some(room));
            small.clear();
        }
        assert_eq!(read_now(&server, &mut small).unwrap(), None);
    }

    /// A client whose request is already there is read and answered
    /// without the reactor; one that makes the proxy wait is registered
    /// then, and its later bytes and its end still wake the reader.
    #[tokio::test]
    async fn a_client_is_registered_only_when_it_makes_the_proxy_wait() {
        let std_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_l.set_nonblocking(true).unwrap();
        let addr = std_l.local_addr().unwrap();
        let l = listener(std_l).unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (s, peer) = accept(&l).await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let mut c = Client::new(s);
        let mut buf = BytesMut::with_capacity(1024);
        assert_eq!(c.fill(&mut buf).await.unwrap(), 18);
        c.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        assert!(
            !c.is_registered(),
            "a read and a write that did not block register nothing"
        );
        let mut got = [0u8; 19];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut got)
            .await
            .unwrap();
        assert_eq!(&got, b"HTTP/1.1 200 OK\r\n\r\n");

        // Nothing there: the read registers and waits for the next bytes.
        let late = async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            client.write_all(b"next").await.unwrap();
            client
        };
        let (n, mut client) = tokio::join!(
            tokio::time::timeout(std::time::Duration::from_secs(5), c.fill(&mut buf)),
            late
        );
        assert_eq!(n.expect("bytes after registering wake the reader").unwrap(), 4);
        assert!(c.is_registered());
        assert!(buf.ends_with(b"next"));
        client.shutdown().await.unwrap();
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), c.fill(&mut buf)).await;
        assert_eq!(end.expect("the end is seen").unwrap(), 0);
    }

    /// A write larger than the socket takes at once goes through once the
    /// peer reads: the rest waits, registered, for room.
    #[tokio::test]
    async fn a_write_that_would_block_finishes_when_the_peer_reads() {
        let std_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_l.set_nonblocking(true).unwrap();
        let addr = std_l.local_addr().unwrap();
        let l = listener(std_l).unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (s, _) = accept(&l).await.unwrap();
        let mut c = Client::new(s);
        let big = vec![9u8; 16 * 1024 * 1024];
        let reader = async {
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut client, &mut got)
                .await
                .unwrap();
            got.len()
        };
        let writer = async {
            c.write_all(&big).await.unwrap();
            assert!(c.is_registered(), "16 MiB do not fit a socket buffer at once");
            c.shutdown_write().unwrap();
        };
        let (n, ()) = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            tokio::join!(reader, writer)
        })
        .await
        .expect("the write finishes");
        assert_eq!(n, big.len());
    }
}
