//! Frame-level checks of HTTP/2 connections that h2 leaves out or answers
//! with another error code than RFC 9113 requires.
//!
//! h2 refuses a SETTINGS, PING, WINDOW_UPDATE, RST_STREAM or PRIORITY frame
//! of the wrong length, a SETTINGS ACK with a payload and an initial window
//! size above 2^31-1, but always with PROTOCOL_ERROR; RFC 9113 asks for
//! FRAME_SIZE_ERROR (sections 4.2, 6.3, 6.4, 6.5, 6.7, 6.9) and
//! FLOW_CONTROL_ERROR (6.5.2). [`FrameScan`] follows the frame headers of
//! the bytes a client sends (and the payloads of its SETTINGS frames), and
//! [`H2Guard`] runs it on every read: the first violation is not handed to
//! h2; the guard writes GOAWAY with the right code itself, between two of
//! h2's frames, and ends the connection, which the proxy counts as an
//! `h2_protocol` drop. It also follows the frames h2 writes, to find those
//! boundaries, and counts every RST_STREAM h2 sends for a client's error
//! (malformed headers, content-length mismatch, refused streams), which
//! otherwise end a request that the proxy never sees.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::{DropReason, Metrics};

/// RFC 9113 section 7 error codes the guard sends or counts.
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const FRAME_SIZE_ERROR: u32 = 0x6;

const PREFACE_LEN: usize = 24;
const HEAD_LEN: usize = 9;
/// SETTINGS payloads kept for their values; a longer one is beyond the
/// default SETTINGS_MAX_FRAME_SIZE and h2 refuses it by its length.
const MAX_SETTINGS_PAYLOAD: usize = 16_384;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

/// A frame the client must not send, and the GOAWAY code it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Violation {
    pub frame_type: u8,
    pub code: u32,
    /// What is wrong, for the log.
    pub what: &'static str,
}

/// A complete frame header, and the first bytes of the payload when the
/// frame type needs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub len: u32,
    pub ty: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    fn parse(b: &[u8; HEAD_LEN]) -> Self {
        Head {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            ty: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

/// What a frame header alone says is wrong (RFC 9113 section 6).
pub fn check_head(h: &Head) -> Option<Violation> {
    let v = |code, what| {
        Some(Violation {
            frame_type: h.ty,
            code,
            what,
        })
    };
    match h.ty {
        // PRIORITY: 6.3, "a length other than 5 octets" is FRAME_SIZE_ERROR.
        0x2 if h.len != 5 => v(FRAME_SIZE_ERROR, "PRIORITY length is not 5"),
        // RST_STREAM: 6.4.
        0x3 if h.stream == 0 => v(PROTOCOL_ERROR, "RST_STREAM on stream 0"),
        0x3 if h.len != 4 => v(FRAME_SIZE_ERROR, "RST_STREAM length is not 4"),
        // SETTINGS: 6.5.
        0x4 if h.stream != 0 => v(PROTOCOL_ERROR, "SETTINGS on a stream"),
        0x4 if h.flags & 0x1 != 0 && h.len != 0 => v(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload"),
        0x4 if !h.len.is_multiple_of(6) => v(FRAME_SIZE_ERROR, "SETTINGS length is not a multiple of 6"),
        // PING: 6.7.
        0x6 if h.stream != 0 => v(PROTOCOL_ERROR, "PING on a stream"),
        0x6 if h.len != 8 => v(FRAME_SIZE_ERROR, "PING length is not 8"),
        // GOAWAY: 6.8 and 4.2 (too small for its mandatory fields).
        0x7 if h.stream != 0 => v(PROTOCOL_ERROR, "GOAWAY on a stream"),
        0x7 if h.len < 8 => v(FRAME_SIZE_ERROR, "GOAWAY shorter than 8"),
        // WINDOW_UPDATE: 6.9.
        0x8 if h.len != 4 => v(FRAME_SIZE_ERROR, "WINDOW_UPDATE length is not 4"),
        _ => None,
    }
}

/// What a SETTINGS payload says is wrong (RFC 9113 section 6.5.2).
pub fn check_settings(payload: &[u8]) -> Option<Violation> {
    for e in payload.chunks_exact(6) {
        let id = u16::from_be_bytes([e[0], e[1]]);
        let value = u32::from_be_bytes([e[2], e[3], e[4], e[5]]);
        if id == SETTINGS_INITIAL_WINDOW_SIZE && value > 0x7fff_ffff {
            return Some(Violation {
                frame_type: 0x4,
                code: FLOW_CONTROL_ERROR,
                what: "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
            });
        }
    }
    None
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scan {
    /// Skipping this many bytes of the client preface.
    Preface(usize),
    Head,
    /// Payload bytes left of the current frame.
    Payload(u64),
    /// A violation was found: nothing more is followed.
    Stopped,
}

/// Follows the frames of one direction of an HTTP/2 connection.
#[derive(Debug)]
pub struct FrameScan {
    state: Scan,
    head: [u8; HEAD_LEN],
    head_len: usize,
    cur: Option<Head>,
    /// The payload of the current frame, for the types that need it.
    keep: Vec<u8>,
    check: bool,
    /// The highest client stream id a HEADERS frame opened.
    pub last_stream: u32,
    /// Server side: RST_STREAM frames that answer a client's error or a
    /// limit (not a cancellation or an upstream failure).
    pub fault_resets: u64,
}

/// What feeding bytes found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// A violation in the frame that starts at this offset of the bytes
    /// fed (0 when it started in an earlier call).
    Violation(usize, Violation),
    Nothing,
}

impl FrameScan {
    /// The client side: starts after the preface and checks every frame.
    pub fn client() -> Self {
        Self::new(Scan::Preface(PREFACE_LEN), true)
    }

    /// The server side: frames from the first byte, no checks; reports
    /// RST_STREAM frames.
    pub fn server() -> Self {
        Self::new(Scan::Head, false)
    }

    fn new(state: Scan, check: bool) -> Self {
        FrameScan {
            state,
            head: [0; HEAD_LEN],
            head_len: 0,
            cur: None,
            keep: Vec::new(),
            check,
            last_stream: 0,
            fault_resets: 0,
        }
    }

    /// Whether the bytes fed so far end at a frame boundary.
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, Scan::Head) && self.head_len == 0
    }

    /// Feeds the next bytes of the direction.
    pub fn feed(&mut self, b: &[u8]) -> Found {
        let mut i = 0;
        // Where the current frame began in `b` (0 if in an earlier call).
        let mut start = 0;
        while i < b.len() {
            match self.state {
                Scan::Stopped => break,
                Scan::Preface(n) => {
                    let k = n.min(b.len() - i);
                    i += k;
                    self.state = if n == k { Scan::Head } else { Scan::Preface(n - k) };
                }
                Scan::Head => {
                    if self.head_len == 0 {
                        start = i;
                    }
                    let k = (HEAD_LEN - self.head_len).min(b.len() - i);
                    self.head[self.head_len..self.head_len + k].copy_from_slice(&b[i..i + k]);
                    self.head_len += k;
                    i += k;
                    if self.head_len < HEAD_LEN {
                        break;
                    }
                    self.head_len = 0;
                    let h = Head::parse(&self.head);
                    if self.check {
                        if let Some(v) = check_head(&h) {
                            self.state = Scan::Stopped;
                            return Found::Violation(start, v);
                        }
                        if h.ty == 0x1 && !h.stream.is_multiple_of(2) {
                            self.last_stream = self.last_stream.max(h.stream);
                        }
                    }
                    self.cur = Some(h);
                    self.keep.clear();
                    self.state = Scan::Payload(u64::from(h.len));
                }
                Scan::Payload(n) => {
                    let k = (n.min((b.len() - i) as u64)) as usize;
                    if let Some(h) = self.cur {
                        let wanted = match (self.check, h.ty) {
                            (true, 0x4) => MAX_SETTINGS_PAYLOAD,
                            (false, 0x3) => 4,
                            _ => 0,
                        };
                        let room = wanted.saturating_sub(self.keep.len()).min(k);
                        self.keep.extend_from_slice(&b[i..i + room]);
                    }
                    i += k;
                    self.state = Scan::Payload(n - k as u64);
                }
            }
            if self.state == Scan::Payload(0) {
                self.state = Scan::Head;
                let Some(h) = self.cur.take() else { continue };
                if self.check && h.ty == 0x4 {
                    if let Some(v) = check_settings(&self.keep) {
                        self.state = Scan::Stopped;
                        return Found::Violation(start, v);
                    }
                }
                if !self.check && h.ty == 0x3 {
                    if let Some(w) = self.keep.get(..4) {
                        if client_fault(u32::from_be_bytes([w[0], w[1], w[2], w[3]])) {
                            self.fault_resets += 1;
                        }
                    }
                }
            }
        }
        Found::Nothing
    }
}

/// A GOAWAY frame (RFC 9113 section 6.8).
pub fn goaway(last_stream: u32, code: u32) -> [u8; 17] {
    let mut f = [0u8; 17];
    f[..3].copy_from_slice(&8u32.to_be_bytes()[1..]);
    f[3] = 0x7;
    f[9..13].copy_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    f[13..].copy_from_slice(&code.to_be_bytes());
    f
}

/// Whether an RST_STREAM the server sends with this code answers a
/// client's error or a limit (not a cancellation or an upstream failure).
fn client_fault(code: u32) -> bool {
    // PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR,
    // REFUSED_STREAM, COMPRESSION_ERROR, ENHANCE_YOUR_CALM.
    matches!(code, 0x1 | 0x3 | 0x5 | 0x6 | 0x7 | 0x9 | 0xb)
}

/// The violation that ended a connection, shared with the code that counts
/// it (0: none; else `code << 8 | frame type`, plus 1 << 40).
#[derive(Debug, Default)]
pub struct GuardVerdict(AtomicU64);

impl GuardVerdict {
    fn set(&self, v: Violation) {
        let x = (1u64 << 40) | (u64::from(v.code) << 8) | u64::from(v.frame_type);
        self.0.store(x, Ordering::Release);
    }

    /// (frame type, GOAWAY code) of the violation, if one ended the
    /// connection.
    pub fn get(&self) -> Option<(u8, u32)> {
        let x = self.0.load(Ordering::Acquire);
        (x != 0).then_some(((x & 0xff) as u8, ((x >> 8) & 0xffff_ffff) as u32))
    }
}

/// An HTTP/2 client stream whose frames go through [`FrameScan`].
pub struct H2Guard<T> {
    inner: T,
    rx: FrameScan,
    tx: FrameScan,
    /// Found, not yet answered.
    pending: Option<Violation>,
    /// The GOAWAY being written and how much of it is out.
    goaway: Option<([u8; 17], usize)>,
    done: bool,
    verdict: Arc<GuardVerdict>,
    metrics: Arc<Metrics>,
}

impl<T> H2Guard<T> {
    pub fn new(inner: T, verdict: Arc<GuardVerdict>, metrics: Arc<Metrics>) -> Self {
        H2Guard {
            inner,
            rx: FrameScan::client(),
            tx: FrameScan::server(),
            pending: None,
            goaway: None,
            done: false,
            verdict,
            metrics,
        }
    }
}

fn ended() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "HTTP/2 protocol violation: GOAWAY sent",
    )
}

impl<T: AsyncRead + AsyncWrite + Unpin> H2Guard<T> {
    /// Writes the GOAWAY (if the server's frames allow it here) and ends.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(v) = self.pending.take() {
            self.verdict.set(v);
            // In the middle of one of h2's frames a GOAWAY would corrupt
            // it; then the connection just closes (rare: h2 writes whole
            // frames into a socket with room).
            if self.tx.at_boundary() {
                self.goaway = Some((goaway(self.rx.last_stream, v.code), 0));
            }
            self.done = true;
        }
        while let Some((f, n)) = self.goaway.as_mut() {
            if *n == f.len() {
                self.goaway = None;
                let _ = Pin::new(&mut self.inner).poll_flush(cx);
                break;
            }
            match Pin::new(&mut self.inner).poll_write(cx, &f[*n..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => self.goaway = None,
                Poll::Ready(Ok(k)) => *n += k,
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Err(ended()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for H2Guard<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending.is_some() || this.done {
            return this.poll_answer(cx);
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            if let Found::Violation(at, v) = this.rx.feed(&buf.filled()[before..]) {
                tracing::debug!(violation = v.what, code = v.code, "HTTP/2 frame refused");
                // h2 gets the frames before the bad one, never that one.
                buf.set_filled(before + at);
                this.pending = Some(v);
                if at == 0 {
                    return this.poll_answer(cx);
                }
            }
        }
        r
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for H2Guard<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(Err(ended()));
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, b);
        if let Poll::Ready(Ok(n)) = r {
            let seen = this.tx.fault_resets;
            this.tx.feed(&b[..n]);
            for _ in seen..this.tx.fault_resets {
                this.metrics.dropped(DropReason::H2Protocol);
            }
        }
        r
    }
    /// h2 writes a frame head and its DATA payload in one vectored write
    /// when the stream supports it (no copy, one syscall): keep that.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(Err(ended()));
        }
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            let seen = this.tx.fault_resets;
            let mut left = n;
            for b in bufs {
                if left == 0 {
                    break;
                }
                let k = left.min(b.len());
                this.tx.feed(&b[..k]);
                left -= k;
            }
            for _ in seen..this.tx.fault_resets {
                this.metrics.dropped(DropReason::H2Protocol);
            }
        }
        r
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

    fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([ty, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    fn client_bytes(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut b = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        for f in frames {
            b.extend(f);
        }
        b
    }

    /// Feeds in pieces of every size: the result must not depend on how
    /// reads split the bytes.
    fn scan(b: &[u8]) -> Option<Violation> {
        let mut whole = None;
        for step in [1, 2, 7, 9, 10, 4096] {
            let mut s = FrameScan::client();
            let mut found = None;
            for c in b.chunks(step) {
                if let Found::Violation(_, v) = s.feed(c) {
                    found = Some(v);
                    break;
                }
            }
            if step == 1 {
                whole = found;
            }
            assert_eq!(found, whole, "split in {step}-byte pieces");
        }
        whole
    }

    #[test]
    fn wrong_lengths_and_values_get_the_rfc_code() {
        let ok_settings = frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let cases: [(Vec<u8>, Option<u32>); 12] = [
            (frame(4, 0, 0, &[0; 5]), Some(FRAME_SIZE_ERROR)),
            (frame(4, 1, 0, &[0; 6]), Some(FRAME_SIZE_ERROR)),
            (frame(4, 0, 1, &[]), Some(PROTOCOL_ERROR)),
            (frame(4, 0, 0, &[0, 4, 0x80, 0, 0, 0]), Some(FLOW_CONTROL_ERROR)),
            (frame(4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]), None),
            (frame(6, 0, 0, &[0; 7]), Some(FRAME_SIZE_ERROR)),
            (frame(8, 0, 0, &[0; 5]), Some(FRAME_SIZE_ERROR)),
            (frame(3, 0, 1, &[0; 3]), Some(FRAME_SIZE_ERROR)),
            (frame(3, 0, 0, &[0; 4]), Some(PROTOCOL_ERROR)),
            (frame(2, 0, 1, &[0; 4]), Some(FRAME_SIZE_ERROR)),
            (frame(7, 0, 0, &[0; 4]), Some(FRAME_SIZE_ERROR)),
            // An unknown type of any length is not ours to judge.
            (frame(0x42, 0xff, 3, &[1; 33]), None),
        ];
        for (bad, want) in cases {
            let got = scan(&client_bytes(&[
                ok_settings.clone(),
                frame(6, 0, 0, &[0; 8]),
                bad.clone(),
            ]));
            assert_eq!(got.map(|v| v.code), want, "{bad:02x?}");
        }
    }

    #[test]
    fn the_offset_names_the_start_of_the_bad_frame() {
        let good = frame(6, 0, 0, &[0; 8]);
        let b = client_bytes(&[good.clone(), frame(6, 0, 0, &[0; 3])]);
        let mut s = FrameScan::client();
        match s.feed(&b) {
            Found::Violation(at, v) => {
                assert_eq!(at, PREFACE_LEN + good.len());
                assert_eq!(v.code, FRAME_SIZE_ERROR);
            }
            other => panic!("{other:?}"),
        }
        // After a violation nothing more is followed.
        assert_eq!(s.feed(&good), Found::Nothing);
    }

    #[test]
    fn the_server_side_reports_resets_and_boundaries() {
        let mut s = FrameScan::server();
        let mut b = frame(4, 0, 0, &[]);
        b.extend(frame(3, 0, 1, &PROTOCOL_ERROR.to_be_bytes()));
        // A cancellation is not the client's fault.
        b.extend(frame(3, 0, 3, &8u32.to_be_bytes()));
        b.extend(frame(3, 0, 5, &7u32.to_be_bytes()));
        let (a, c) = b.split_at(13);
        s.feed(a);
        assert!(!s.at_boundary());
        assert_eq!(s.fault_resets, 0);
        s.feed(c);
        assert!(s.at_boundary());
        assert_eq!(s.fault_resets, 2);
    }

    #[test]
    fn goaway_names_the_last_stream_and_the_code() {
        let mut s = FrameScan::client();
        let _ = s.feed(&client_bytes(&[frame(1, 4, 5, &[0x82]), frame(1, 4, 3, &[0x82])]));
        assert_eq!(s.last_stream, 5);
        assert_eq!(
            goaway(5, FRAME_SIZE_ERROR).to_vec(),
            frame(7, 0, 0, &[0, 0, 0, 5, 0, 0, 0, 6])
        );
    }
}
