//! Request smuggling guard for HTTP/1 connections.
//!
//! hyper reads a request with both Content-Length and Transfer-Encoding as
//! chunked and closes the connection after it, and when Transfer-Encoding
//! comes first it drops the Content-Length before the service sees the
//! headers. A proxy must refuse such a request outright (RFC 9112 6.1: the
//! upstream or a later hop may frame it the other way), and count it. So
//! this module follows the framing of the bytes the client sends, the way
//! hyper frames them, and notes the first request head that carries both
//! headers, two Content-Lengths or an obs-fold line. The service refuses
//! that request with 400 and closes; the heads hyper refuses itself are
//! counted as smuggling rather than as malformed.
//!
//! [`Framing`] is the pure state machine (fed bytes, returns findings);
//! [`GuardedIo`] runs it on every read of a connection.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What makes a request head ambiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finding {
    /// Content-Length and Transfer-Encoding in one request.
    ContentLengthAndTransferEncoding,
    /// More than one Content-Length header.
    DuplicateContentLength,
    /// A header line continued on the next line (obs-fold).
    ObsFold,
}

impl Finding {
    pub fn name(self) -> &'static str {
        match self {
            Finding::ContentLengthAndTransferEncoding => "content-length with transfer-encoding",
            Finding::DuplicateContentLength => "several content-lengths",
            Finding::ObsFold => "obs-fold",
        }
    }
    fn code(self) -> u64 {
        match self {
            Finding::ContentLengthAndTransferEncoding => 1,
            Finding::DuplicateContentLength => 2,
            Finding::ObsFold => 3,
        }
    }
    fn from_code(c: u64) -> Option<Self> {
        match c {
            1 => Some(Finding::ContentLengthAndTransferEncoding),
            2 => Some(Finding::DuplicateContentLength),
            3 => Some(Finding::ObsFold),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading a request head.
    Head,
    /// Skipping this many body bytes.
    Body(u64),
    /// A chunk-size line: the size so far, and whether an extension began.
    ChunkSize {
        size: u64,
        ext: bool,
    },
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// Trailer lines after the last chunk; `fresh` at the start of a line.
    Trailer {
        fresh: bool,
    },
    /// Framing is no longer followed: an upgrade or CONNECT took the
    /// connection over, a finding ended it, or hyper will refuse what
    /// comes (too large, bad Transfer-Encoding).
    Off,
}

/// Follows HTTP/1 request framing over the bytes of one connection.
#[derive(Debug)]
pub struct Framing {
    state: State,
    head: Vec<u8>,
    /// Request heads completed so far (the ordinal of the next one).
    heads: u64,
    max_head: usize,
}

impl Framing {
    /// `max_head`: the longest head to buffer; a longer one is hyper's to
    /// refuse (431) and ends the following.
    pub fn new(max_head: usize) -> Self {
        Framing {
            state: State::Head,
            head: Vec::new(),
            heads: 0,
            max_head,
        }
    }

    /// Feeds bytes the client sent, in order. Returns the first finding
    /// with the ordinal (from 0) of the request head it is in; after a
    /// finding nothing more is followed.
    pub fn feed(&mut self, mut b: &[u8]) -> Option<(u64, Finding)> {
        while !b.is_empty() {
            match self.state {
                State::Off => return None,
                State::Head => {
                    if self.head.is_empty() {
                        // Empty lines before a request line are skipped.
                        let skip = b.iter().take_while(|c| **c == b'\r' || **c == b'\n').count();
                        b = &b[skip..];
                        if b.is_empty() {
                            return None;
                        }
                    }
                    // Copy up to the end of the head.
                    let mut end = None;
                    for (i, c) in b.iter().enumerate() {
                        self.head.push(*c);
                        if *c == b'\n' && (self.head.ends_with(b"\n\n") || self.head.ends_with(b"\n\r\n")) {
                            end = Some(i + 1);
                            break;
                        }
                        if self.head.len() > self.max_head {
                            self.state = State::Off;
                            return None;
                        }
                    }
                    let end = end?;
                    b = &b[end..];
                    let ordinal = self.heads;
                    self.heads += 1;
                    let head = std::mem::take(&mut self.head);
                    match judge_head(&head) {
                        Err(f) => {
                            self.state = State::Off;
                            return Some((ordinal, f));
                        }
                        Ok(next) => self.state = next,
                    }
                }
                State::Body(n) => {
                    let k = (b.len() as u64).min(n);
                    b = &b[k as usize..];
                    self.state = if n == k { State::Head } else { State::Body(n - k) };
                }
                State::ChunkSize { size, ext } => {
                    let c = b[0];
                    b = &b[1..];
                    self.state = match c {
                        b'\n' if size == 0 => State::Trailer { fresh: true },
                        b'\n' => State::ChunkData(size),
                        b'\r' => State::ChunkSize { size, ext },
                        _ if !ext && c.is_ascii_hexdigit() => {
                            let d = (c as char).to_digit(16).unwrap_or(0) as u64;
                            match size.checked_mul(16).and_then(|s| s.checked_add(d)) {
                                Some(size) => State::ChunkSize { size, ext },
                                None => State::Off,
                            }
                        }
                        _ => State::ChunkSize { size, ext: true },
                    };
                }
                State::ChunkData(n) => {
                    let k = (b.len() as u64).min(n);
                    b = &b[k as usize..];
                    self.state = if n == k {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(n - k)
                    };
                }
                State::ChunkEnd => {
                    let c = b[0];
                    b = &b[1..];
                    if c == b'\n' {
                        self.state = State::ChunkSize { size: 0, ext: false };
                    }
                }
                State::Trailer { fresh } => {
                    let c = b[0];
                    b = &b[1..];
                    self.state = match c {
                        b'\n' if fresh => State::Head,
                        b'\n' => State::Trailer { fresh: true },
                        b'\r' => State::Trailer { fresh },
                        _ => State::Trailer { fresh: false },
                    };
                }
            }
        }
        None
    }
}

/// The framing after a complete head, or what makes it ambiguous.
fn judge_head(head: &[u8]) -> Result<State, Finding> {
    let mut lines = head.split(|c| *c == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let connect = request_line.starts_with(b"CONNECT ");
    let (mut cl, mut te, mut upgrade) = (Vec::new(), None::<&[u8]>, false);
    for line in lines {
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(Finding::ObsFold);
        }
        let Some(colon) = line.iter().position(|c| *c == b':') else {
            continue;
        };
        let name = &line[..colon];
        let value = line[colon + 1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            cl.push(value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Several lines are one list; the last coding decides.
            te = Some(value);
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        }
    }
    if te.is_some() && !cl.is_empty() {
        return Err(Finding::ContentLengthAndTransferEncoding);
    }
    if cl.len() > 1 {
        return Err(Finding::DuplicateContentLength);
    }
    if connect || upgrade {
        return Ok(State::Off);
    }
    if let Some(te) = te {
        let last = te.rsplit(|c| *c == b',').next().unwrap_or_default().trim_ascii();
        return Ok(if last.eq_ignore_ascii_case(b"chunked") {
            State::ChunkSize { size: 0, ext: false }
        } else {
            State::Off
        });
    }
    match cl.first() {
        None => Ok(State::Head),
        Some(v) => match std::str::from_utf8(v).ok().and_then(|v| v.parse::<u64>().ok()) {
            Some(0) => Ok(State::Head),
            Some(n) => Ok(State::Body(n)),
            None => Ok(State::Off),
        },
    }
}

/// The first finding on a connection, shared between its reader and the
/// service that answers its requests.
#[derive(Debug, Default)]
pub struct Findings(AtomicU64);

impl Findings {
    fn set(&self, ordinal: u64, f: Finding) {
        let v = ((ordinal + 1) << 2) | f.code();
        let _ = self.0.compare_exchange(0, v, Ordering::Release, Ordering::Relaxed);
    }

    /// The finding in request head `ordinal` (from 0), if any.
    pub fn at(&self, ordinal: u64) -> Option<Finding> {
        let v = self.0.load(Ordering::Acquire);
        (v != 0 && (v >> 2) == ordinal + 1)
            .then(|| Finding::from_code(v & 3))
            .flatten()
    }

    /// Whether any head on the connection was ambiguous.
    pub fn any(&self) -> Option<Finding> {
        Finding::from_code(self.0.load(Ordering::Acquire) & 3)
    }
}

/// A client stream whose reads go through [`Framing`].
pub struct GuardedIo<T> {
    inner: T,
    framing: Framing,
    findings: Arc<Findings>,
}

impl<T> GuardedIo<T> {
    pub fn new(inner: T, max_head: usize, findings: Arc<Findings>) -> Self {
        GuardedIo {
            inner,
            framing: Framing::new(max_head),
            findings,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            if let Some((ordinal, f)) = this.framing.feed(&buf.filled()[before..]) {
                this.findings.set(ordinal, f);
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, b)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, b)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> (Option<(u64, Finding)>, u64) {
        let mut f = Framing::new(16 * 1024);
        let mut found = None;
        for c in chunks {
            // Byte by byte too: reads split anywhere.
            for b in c.chunks(1) {
                if let Some(x) = f.feed(b) {
                    found.get_or_insert(x);
                }
            }
        }
        (found, f.heads)
    }

    #[test]
    fn ambiguous_heads_are_found_in_either_order() {
        use Finding::*;
        let cases: [(&[u8], Finding); 5] = [
            (
                b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
                ContentLengthAndTransferEncoding,
            ),
            (
                b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n",
                ContentLengthAndTransferEncoding,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
                DuplicateContentLength,
            ),
            (b"GET / HTTP/1.1\r\nx-a: b\r\n c\r\n\r\n", ObsFold),
            (b"GET / HTTP/1.1\r\nx-a: b\r\n\tc\r\n\r\n", ObsFold),
        ];
        for (head, want) in cases {
            assert_eq!(run(&[head]).0, Some((0, want)), "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn bodies_are_skipped_so_only_real_heads_count() {
        // A chunked body and a sized body whose bytes look like heads.
        let body = b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let chunked = format!(
            "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{}\r\n0\r\nx-trailer: 1\r\n\r\n",
            body.len(),
            String::from_utf8_lossy(body)
        );
        let sized = format!(
            "POST /b HTTP/1.1\r\nContent-Length: {}\r\n\r\n{}",
            body.len(),
            String::from_utf8_lossy(body)
        );
        let get = b"\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(run(&[chunked.as_bytes(), sized.as_bytes(), get]), (None, 3));
        // The third request is the bad one: its ordinal is 2.
        let bad = b"POST /d HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            run(&[chunked.as_bytes(), sized.as_bytes(), bad]).0,
            Some((2, Finding::ContentLengthAndTransferEncoding))
        );
    }

    #[test]
    fn upgrades_and_oversized_heads_stop_the_following() {
        let ws = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(run(&[ws]), (None, 1));
        let mut f = Framing::new(64);
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(100));
        assert_eq!(f.feed(big.as_bytes()), None);
        assert_eq!(f.heads, 0);
    }

    #[test]
    fn findings_are_kept_per_ordinal() {
        let f = Findings::default();
        assert_eq!(f.at(0), None);
        f.set(3, Finding::ObsFold);
        f.set(4, Finding::DuplicateContentLength);
        assert_eq!(f.at(3), Some(Finding::ObsFold));
        assert_eq!(f.at(4), None);
        assert_eq!(f.any(), Some(Finding::ObsFold));
    }
}
