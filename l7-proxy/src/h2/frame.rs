//! HTTP/2 frame layout (RFC 9113 section 4 and 6): the header, types,
//! flags, error codes and settings, and writers for the frames the proxy
//! sends. Payloads are parsed where they are handled.

pub const HEAD_LEN: usize = 9;
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const INTERNAL_ERROR: u32 = 0x2;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const STREAM_CLOSED: u32 = 0x5;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// The default and smallest SETTINGS_MAX_FRAME_SIZE; the proxy never
/// announces a larger one, so no frame it receives may be longer.
pub const MAX_FRAME: usize = 16_384;
pub const MAX_WINDOW: i64 = (1 << 31) - 1;
pub const DEFAULT_WINDOW: i64 = 65_535;

#[derive(Debug, Clone, Copy)]
pub struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

/// The frame header at the start of `b`, if all nine bytes are there.
pub fn head(b: &[u8]) -> Option<Head> {
    let h = b.get(..HEAD_LEN)?;
    Some(Head {
        len: u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize,
        kind: h[3],
        flags: h[4],
        stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
    })
}

/// Hands each whole frame at the front of `buf` to `f`, in order, while
/// `f` returns `Ok(true)`. A frame longer than [`MAX_FRAME`] stops it with
/// `too_long()`. Returns the octets of the frames handed over (a partial
/// frame stays for the next read) and the first error.
pub fn each_frame<E>(
    buf: &[u8],
    too_long: impl FnOnce() -> E,
    mut f: impl FnMut(Head, &[u8]) -> Result<bool, E>,
) -> (usize, Result<(), E>) {
    let mut pos = 0;
    while let Some(h) = head(&buf[pos..]) {
        if h.len > MAX_FRAME {
            return (pos, Err(too_long()));
        }
        let Some(p) = buf.get(pos + HEAD_LEN..pos + HEAD_LEN + h.len) else {
            break;
        };
        pos += HEAD_LEN + h.len;
        match f(h, p) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return (pos, Err(e)),
        }
    }
    (pos, Ok(()))
}

pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub fn put_head(w: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let l = (len as u32).to_be_bytes();
    w.extend_from_slice(&[l[1], l[2], l[3], kind, flags]);
    w.extend_from_slice(&stream.to_be_bytes());
}

/// A header block as HEADERS and, past `max_frame`, CONTINUATION frames.
pub fn put_headers(w: &mut Vec<u8>, stream: u32, block: &[u8], end_stream: bool, max_frame: usize) {
    let mut chunks = block.chunks(max_frame.max(1)).peekable();
    let mut kind = HEADERS;
    let mut flags = if end_stream { END_STREAM } else { 0 };
    if block.is_empty() {
        put_head(w, 0, HEADERS, flags | END_HEADERS, stream);
        return;
    }
    while let Some(c) = chunks.next() {
        if chunks.peek().is_none() {
            flags |= END_HEADERS;
        }
        put_head(w, c.len(), kind, flags, stream);
        w.extend_from_slice(c);
        kind = CONTINUATION;
        flags = 0;
    }
}

pub fn put_data(w: &mut Vec<u8>, stream: u32, data: &[u8], end_stream: bool) {
    put_head(w, data.len(), DATA, if end_stream { END_STREAM } else { 0 }, stream);
    w.extend_from_slice(data);
}

pub fn put_rst(w: &mut Vec<u8>, stream: u32, code: u32) {
    put_head(w, 4, RST_STREAM, 0, stream);
    w.extend_from_slice(&code.to_be_bytes());
}

pub fn put_window_update(w: &mut Vec<u8>, stream: u32, inc: u32) {
    put_head(w, 4, WINDOW_UPDATE, 0, stream);
    w.extend_from_slice(&inc.to_be_bytes());
}

pub fn put_goaway(w: &mut Vec<u8>, last: u32, code: u32) {
    put_head(w, 8, GOAWAY, 0, 0);
    w.extend_from_slice(&last.to_be_bytes());
    w.extend_from_slice(&code.to_be_bytes());
}

pub fn put_settings(w: &mut Vec<u8>, values: &[(u16, u32)]) {
    put_head(w, values.len() * 6, SETTINGS, 0, 0);
    for (id, v) in values {
        w.extend_from_slice(&id.to_be_bytes());
        w.extend_from_slice(&v.to_be_bytes());
    }
}

pub fn put_ping(w: &mut Vec<u8>, flags: u8, payload: &[u8]) {
    put_head(w, 8, PING, flags, 0);
    w.extend_from_slice(payload);
}

/// The payload of a HEADERS or DATA frame less its padding (and for
/// HEADERS the priority fields), or None when the padding does not fit
/// (RFC 9113 6.1 and 6.2: a connection error PROTOCOL_ERROR).
pub fn unpad(h: &Head, p: &[u8]) -> Option<(usize, usize)> {
    let mut start = 0;
    let mut end = p.len();
    if h.flags & PADDED != 0 {
        let pad = *p.first()? as usize;
        start = 1;
        end = end.checked_sub(pad)?;
    }
    if h.kind == HEADERS && h.flags & PRIORITY_FLAG != 0 {
        start += 5;
    }
    (start <= end).then_some((start, end))
}
