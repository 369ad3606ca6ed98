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

/// Waits for bytes and reads them into `buf` (growing it when nearly
/// full); 0 at the end of the stream.
pub async fn fill(sock: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    loop {
        if let Some(n) = read_now(sock, buf)? {
            return Ok(n);
        }
        sock.readable().await?;
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
}
