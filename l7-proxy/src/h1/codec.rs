//! The HTTP/1.1 message heads the proxy reads and writes, and the body
//! framing it follows (RFC 9112). Pure: bytes in, offsets and decisions
//! out, no I/O, so the fuzz targets drive exactly what the proxy runs.
//!
//! A head is parsed in place (httparse) into offsets of the buffer it
//! arrived in; nothing is copied or rebuilt for judging. The head sent on
//! is written from those offsets: the request line with the target that
//! was judged, then the client's header lines in their order and spelling,
//! less the hop-by-hop ones.

use std::mem::MaybeUninit;
use std::ops::Range;

/// What makes a request head ambiguous about where its body ends: a hop
/// that frames it the other way sees another request in it (RFC 9112 6.1,
/// 6.3 and 5.2). Refused with 400, the connection closed, and counted as
/// smuggling.
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
}

/// Why a request head is refused before it is judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadError {
    /// Longer than the limit, or more header lines than the limit (431).
    TooLarge,
    /// Ambiguous framing (400, counted as smuggling).
    Smuggling(Finding),
    /// Not a well-formed HTTP/1.x request head (400).
    Malformed,
    /// A request line whose version is HTTP/x.y but not 1.0 or 1.1 (505,
    /// RFC 9110 15.6.6).
    Version,
    /// A request line that ends in no HTTP version at all: not HTTP (say
    /// an invalid HTTP/2 connection preface, or HTTP/0.9). Closed without
    /// an answer, like other bytes that are not HTTP.
    NotHttp,
    /// A transfer coding other than a final `chunked` (RFC 9112 6.3: the
    /// length cannot be determined; 400).
    BadTransferEncoding,
}

/// How a message's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(u64),
    Chunked,
    /// A response without a length: it ends when the upstream closes.
    UntilClose,
}

/// One header line, as offsets into the head's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderAt {
    pub name: (u32, u32),
    pub value: (u32, u32),
}

impl HeaderAt {
    pub fn name<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.name.0 as usize..self.name.1 as usize]
    }
    pub fn value<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.value.0 as usize..self.value.1 as usize]
    }
    pub fn is(&self, buf: &[u8], name: &str) -> bool {
        self.name(buf).eq_ignore_ascii_case(name.as_bytes())
    }
}

/// What `Connection` and the hop-by-hop fields of a head say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hop {
    /// `Connection: close`.
    pub close: bool,
    /// `Connection: keep-alive` (what keeps an HTTP/1.0 connection open).
    pub keep_alive: bool,
    /// `Connection` lists `upgrade`.
    pub upgrade: bool,
    /// Other names `Connection` lists: those fields are hop-by-hop too
    /// (RFC 9110 7.6.1). Offsets into the buffer.
    pub listed: Vec<(u32, u32)>,
}

/// A request head parsed in its buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of the head, its final empty line included.
    pub len: usize,
    pub method: Range<usize>,
    pub target: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub headers: Vec<HeaderAt>,
    pub body: BodyKind,
    pub hop: Hop,
    /// The Host header's value.
    pub host: Option<Range<usize>>,
    /// `Upgrade: websocket` on an HTTP/1.1 request that lists `upgrade`
    /// in `Connection`.
    pub websocket: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// content-type application/grpc*.
    pub grpc: bool,
}

impl RequestHead {
    /// Whether the client's connection ends after this exchange.
    pub fn closes(&self) -> bool {
        self.hop.close || (self.minor == 0 && !self.hop.keep_alive)
    }
}

/// A response head parsed in its buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub minor: u8,
    /// The status code and reason phrase as sent, after the version.
    pub status_line: Range<usize>,
    pub headers: Vec<HeaderAt>,
    pub body: BodyKind,
    pub hop: Hop,
}

impl ResponseHead {
    /// Whether the upstream connection can carry another request after
    /// this response's body.
    pub fn reusable(&self) -> bool {
        !self.hop.close && (self.minor == 1 || self.hop.keep_alive) && self.body != BodyKind::UntilClose
    }
}

fn at(buf: &[u8], s: &[u8]) -> (u32, u32) {
    let start = s.as_ptr() as usize - buf.as_ptr() as usize;
    (start as u32, (start + s.len()) as u32)
}

fn range(buf: &[u8], s: &[u8]) -> Range<usize> {
    let (a, b) = at(buf, s);
    a as usize..b as usize
}

/// The parsed header lines as offsets into `buf`.
fn header_offsets(buf: &[u8], parsed: &[httparse::Header<'_>]) -> Vec<HeaderAt> {
    parsed
        .iter()
        .map(|h| HeaderAt {
            name: at(buf, h.name.as_bytes()),
            value: at(buf, h.value),
        })
        .collect()
}

/// A header line that starts with a space or tab continues the one before
/// it (obs-fold, RFC 9112 5.2).
fn has_obs_fold(head: &[u8]) -> bool {
    head.windows(2)
        .any(|w| w[0] == b'\n' && (w[1] == b' ' || w[1] == b'\t'))
}

/// The comma-separated tokens of a field value, trimmed.
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|c| *c == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The framing and connection fields of a head's header lines.
struct Fields {
    length: Option<u64>,
    lengths: usize,
    bad_length: bool,
    /// Transfer-Encoding present; and whether its last coding is chunked.
    te: bool,
    te_chunked: bool,
    hop: Hop,
}

fn fields(buf: &[u8], headers: &[HeaderAt]) -> Fields {
    let mut f = Fields {
        length: None,
        lengths: 0,
        bad_length: false,
        te: false,
        te_chunked: false,
        hop: Hop::default(),
    };
    for h in headers {
        let (n, v) = (h.name(buf), h.value(buf));
        if n.eq_ignore_ascii_case(b"content-length") {
            f.lengths += 1;
            match parse_length(v) {
                Some(l) => f.length = Some(l),
                None => f.bad_length = true,
            }
        } else if n.eq_ignore_ascii_case(b"transfer-encoding") {
            f.te = true;
            // The codings of every Transfer-Encoding line, in order: the
            // last one decides.
            if let Some(last) = tokens(v).last() {
                f.te_chunked = last.eq_ignore_ascii_case(b"chunked");
            }
        } else if n.eq_ignore_ascii_case(b"connection") {
            for t in tokens(v) {
                if t.eq_ignore_ascii_case(b"close") {
                    f.hop.close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    f.hop.keep_alive = true;
                } else if t.eq_ignore_ascii_case(b"upgrade") {
                    f.hop.upgrade = true;
                } else {
                    f.hop.listed.push(at(buf, t));
                }
            }
        }
    }
    f
}

/// Header slots on the stack: a head with up to this many lines is parsed
/// without touching the heap (a larger limit takes a vector).
const STACK_HEADERS: usize = 128;

type Slot<'b> = MaybeUninit<httparse::Header<'b>>;

fn header_storage<'s, 'b>(
    stack: &'s mut [Slot<'b>; STACK_HEADERS],
    heap: &'s mut Vec<Slot<'b>>,
    max_headers: usize,
) -> &'s mut [Slot<'b>] {
    if max_headers <= STACK_HEADERS {
        &mut stack[..max_headers]
    } else {
        heap.resize_with(max_headers, MaybeUninit::uninit);
        heap
    }
}

/// What a request line the parser refused for its version is: an HTTP
/// version it does not speak, or no HTTP version at all.
fn version_error(buf: &[u8]) -> HeadError {
    let start = buf.iter().position(|c| *c != b'\r' && *c != b'\n').unwrap_or(0);
    let line = &buf[start..];
    let line = &line[..line.iter().position(|c| *c == b'\n').unwrap_or(line.len())];
    let version = line.rsplit(|c| *c == b' ').next().unwrap_or_default();
    if version.starts_with(b"HTTP/") {
        HeadError::Version
    } else {
        HeadError::NotHttp
    }
}

/// Parses the request head at the start of `buf`. `Ok(None)`: incomplete,
/// read more (the caller enforces the size limit on what it buffers).
/// Empty lines before the request line are skipped (RFC 9112 2.2) and
/// counted in `len`.
pub fn parse_request(buf: &[u8], max_headers: usize) -> Result<Option<RequestHead>, HeadError> {
    let mut stack = [const { MaybeUninit::uninit() }; STACK_HEADERS];
    let mut heap = Vec::new();
    let storage = header_storage(&mut stack, &mut heap, max_headers);
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, storage) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            // A continuation line in what has come so far is refused now,
            // not after the rest of a head that can never be valid.
            return if has_obs_fold(buf) {
                Err(HeadError::Smuggling(Finding::ObsFold))
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) if has_obs_fold(buf) => return Err(HeadError::Smuggling(Finding::ObsFold)),
        Err(httparse::Error::Version) => return Err(version_error(buf)),
        Err(_) => return Err(HeadError::Malformed),
    };
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Malformed);
    };
    let headers = header_offsets(buf, req.headers);
    let f = fields(buf, &headers);
    if f.lengths > 1 {
        return Err(HeadError::Smuggling(Finding::DuplicateContentLength));
    }
    if f.lengths == 1 && f.te {
        return Err(HeadError::Smuggling(Finding::ContentLengthAndTransferEncoding));
    }
    if f.bad_length {
        return Err(HeadError::Malformed);
    }
    if f.te && (!f.te_chunked || minor == 0) {
        return Err(HeadError::BadTransferEncoding);
    }
    let body = match (f.te, f.length) {
        (true, _) => BodyKind::Chunked,
        (false, Some(0) | None) => BodyKind::None,
        (false, Some(n)) => BodyKind::Length(n),
    };
    let mut host = None;
    let mut hosts = 0;
    let mut upgrade_websocket = false;
    let mut expect_continue = false;
    let mut grpc = false;
    for h in &headers {
        let (n, v) = (h.name(buf), h.value(buf));
        if n.eq_ignore_ascii_case(b"host") {
            hosts += 1;
            host = Some(h.value.0 as usize..h.value.1 as usize);
        } else if n.eq_ignore_ascii_case(b"upgrade") {
            upgrade_websocket |= tokens(v).any(|t| t.eq_ignore_ascii_case(b"websocket"));
        } else if n.eq_ignore_ascii_case(b"expect") {
            expect_continue |= v.eq_ignore_ascii_case(b"100-continue");
        } else if n.eq_ignore_ascii_case(b"content-type") {
            grpc |= v.len() >= 16 && v[..16].eq_ignore_ascii_case(b"application/grpc");
        }
    }
    // RFC 9112 3.2: a request with more than one Host line is refused.
    if hosts > 1 {
        return Err(HeadError::Malformed);
    }
    Ok(Some(RequestHead {
        len,
        method: range(buf, method.as_bytes()),
        target: range(buf, path.as_bytes()),
        minor,
        websocket: minor == 1 && f.hop.upgrade && upgrade_websocket,
        headers,
        body,
        hop: f.hop,
        host,
        expect_continue,
        grpc,
    }))
}

/// Parses the response head at the start of `buf`, for a request with
/// `method` (a HEAD request's response has no body).
pub fn parse_response(buf: &[u8], max_headers: usize, method: &[u8]) -> Result<Option<ResponseHead>, HeadError> {
    let mut stack = [const { MaybeUninit::uninit() }; STACK_HEADERS];
    let mut heap = Vec::new();
    let storage = header_storage(&mut stack, &mut heap, max_headers);
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut res, buf, storage) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    let (Some(status), Some(minor)) = (res.code, res.version) else {
        return Err(HeadError::Malformed);
    };
    let headers = header_offsets(buf, res.headers);
    // "HTTP/1.x " is 9 bytes; the code and reason run to the line's end.
    let line_end = buf[..len].iter().position(|c| *c == b'\n').unwrap_or(len);
    let line_end = if line_end > 0 && buf[line_end - 1] == b'\r' {
        line_end - 1
    } else {
        line_end
    };
    let status_line = 9.min(line_end)..line_end;
    let f = fields(buf, &headers);
    if f.lengths > 1 || f.bad_length || (f.te && f.lengths > 0) {
        // RFC 9112 6.3: an invalid length in a response is an
        // unrecoverable error for the proxy (502).
        return Err(HeadError::Malformed);
    }
    let body = if method.eq_ignore_ascii_case(b"HEAD") || (100..200).contains(&status) || status == 204 || status == 304
    {
        BodyKind::None
    } else if f.te {
        if f.te_chunked {
            BodyKind::Chunked
        } else {
            BodyKind::UntilClose
        }
    } else {
        match f.length {
            Some(0) => BodyKind::None,
            Some(n) => BodyKind::Length(n),
            None => BodyKind::UntilClose,
        }
    };
    Ok(Some(ResponseHead {
        len,
        status,
        minor,
        status_line,
        headers,
        body,
        hop: f.hop,
    }))
}

/// The fields a proxy never forwards (RFC 9110 7.6.1, RFC 9112 and the
/// ones clients still send): `keep_upgrade` keeps `Upgrade` for a
/// WebSocket handshake. Transfer-Encoding, Content-Length and Trailer go
/// on unchanged with a body that is forwarded unchanged.
fn is_hop_by_hop(name: &[u8], keep_upgrade: bool) -> bool {
    const ALWAYS: [&[u8]; 5] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"http2-settings",
    ];
    ALWAYS.iter().any(|h| name.eq_ignore_ascii_case(h)) || (!keep_upgrade && name.eq_ignore_ascii_case(b"upgrade"))
}

fn write_fields(out: &mut Vec<u8>, buf: &[u8], headers: &[HeaderAt], hop: &Hop, keep_upgrade: bool, skip_expect: bool) {
    for h in headers {
        let n = h.name(buf);
        if is_hop_by_hop(n, keep_upgrade)
            || (skip_expect && n.eq_ignore_ascii_case(b"expect"))
            || hop
                .listed
                .iter()
                .any(|&(a, b)| n.eq_ignore_ascii_case(&buf[a as usize..b as usize]))
        {
            continue;
        }
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value(buf));
        out.extend_from_slice(b"\r\n");
    }
}

/// Writes the head sent upstream: the request line with `target` (what was
/// judged), the client's fields less the hop-by-hop ones, and for a
/// WebSocket handshake its `Connection: upgrade`. An `Expect:
/// 100-continue` is answered by the proxy and not sent on
/// (`answered_continue`). An HTTP/1.0 request stays HTTP/1.0, so the
/// upstream answers in a form its client reads.
pub fn write_request(out: &mut Vec<u8>, buf: &[u8], head: &RequestHead, target: &[u8], answered_continue: bool) {
    out.extend_from_slice(&buf[head.method.clone()]);
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(if head.minor == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    write_fields(out, buf, &head.headers, &head.hop, head.websocket, answered_continue);
    if head.websocket {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the response head sent to the client, in the client's HTTP
/// version, with the upstream's status line and fields less the
/// hop-by-hop ones; `close` adds `Connection: close`, and an HTTP/1.0
/// client whose connection stays open gets `Connection: keep-alive`.
pub fn write_response(out: &mut Vec<u8>, buf: &[u8], head: &ResponseHead, client_minor: u8, close: bool) {
    out.extend_from_slice(if client_minor == 0 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    out.extend_from_slice(&buf[head.status_line.clone()]);
    out.extend_from_slice(b"\r\n");
    let upgrade = head.status == 101;
    write_fields(out, buf, &head.headers, &head.hop, upgrade, false);
    if upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    } else if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if client_minor == 0 {
        // An HTTP/1.0 client that asked to keep the connection open
        // keeps it only when the answer says so (RFC 9112 9.3).
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Why a chunked body is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkError {
    /// Not a chunk-size line, a size past 2^64, or a missing CRLF.
    Malformed,
    /// A chunk-size line or the trailer section longer than the limit.
    TooLong,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// A chunk-size line: the size so far, its digits, and whether an
    /// extension began.
    Size {
        size: u64,
        digits: u8,
        ext: bool,
    },
    /// The LF of the chunk-size line.
    SizeLf {
        size: u64,
    },
    Data(u64),
    /// The CR and the LF after a chunk's data.
    DataCr,
    DataLf,
    /// Trailer lines after the last chunk; `fresh` at the start of a line.
    Trailer {
        fresh: bool,
    },
    TrailerLf {
        fresh: bool,
    },
    Done,
}

/// Follows a chunked body (RFC 9112 7.1) as its bytes go by, to find where
/// it ends: forwarded unchanged, framed here. Strict: lines end in CRLF,
/// sizes are hex, and a line may not run on past `max_line` bytes.
#[derive(Clone, Debug)]
pub struct Chunked {
    state: Chunk,
    line: usize,
    max_line: usize,
}

impl Chunked {
    pub fn new(max_line: usize) -> Self {
        Chunked {
            state: Chunk::Size {
                size: 0,
                digits: 0,
                ext: false,
            },
            line: 0,
            max_line,
        }
    }

    pub fn done(&self) -> bool {
        self.state == Chunk::Done
    }

    /// Follows `b`; returns how many of its bytes belong to the body:
    /// all of them, or fewer when the body ends inside `b`.
    pub fn advance(&mut self, b: &[u8]) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < b.len() {
            match self.state {
                Chunk::Done => return Ok(i),
                Chunk::Data(n) => {
                    let k = ((b.len() - i) as u64).min(n);
                    i += k as usize;
                    self.state = if k == n { Chunk::DataCr } else { Chunk::Data(n - k) };
                    continue;
                }
                _ => {}
            }
            let c = b[i];
            i += 1;
            self.line += 1;
            if self.line > self.max_line {
                return Err(ChunkError::TooLong);
            }
            self.state = match self.state {
                Chunk::Size { size, digits, ext } => match c {
                    b'\r' if digits > 0 => Chunk::SizeLf { size },
                    _ if ext => {
                        if c == b'\n' {
                            return Err(ChunkError::Malformed);
                        }
                        Chunk::Size { size, digits, ext }
                    }
                    b';' | b' ' | b'\t' if digits > 0 => Chunk::Size {
                        size,
                        digits,
                        ext: true,
                    },
                    _ if c.is_ascii_hexdigit() && digits < 16 => Chunk::Size {
                        size: size << 4 | u64::from((c as char).to_digit(16).unwrap_or(0)),
                        digits: digits + 1,
                        ext,
                    },
                    _ => return Err(ChunkError::Malformed),
                },
                Chunk::SizeLf { size } => match c {
                    b'\n' => {
                        self.line = 0;
                        if size == 0 {
                            Chunk::Trailer { fresh: true }
                        } else {
                            Chunk::Data(size)
                        }
                    }
                    _ => return Err(ChunkError::Malformed),
                },
                Chunk::DataCr => match c {
                    b'\r' => Chunk::DataLf,
                    _ => return Err(ChunkError::Malformed),
                },
                Chunk::DataLf => match c {
                    b'\n' => {
                        self.line = 0;
                        Chunk::Size {
                            size: 0,
                            digits: 0,
                            ext: false,
                        }
                    }
                    _ => return Err(ChunkError::Malformed),
                },
                Chunk::Trailer { fresh } => match c {
                    b'\r' => Chunk::TrailerLf { fresh },
                    b'\n' => return Err(ChunkError::Malformed),
                    // The trailer section as a whole is bounded by the
                    // line limit: it is never reset inside it.
                    _ => Chunk::Trailer { fresh: false },
                },
                Chunk::TrailerLf { fresh } => match c {
                    b'\n' if fresh => Chunk::Done,
                    b'\n' => Chunk::Trailer { fresh: true },
                    _ => return Err(ChunkError::Malformed),
                },
                Chunk::Data(_) | Chunk::Done => unreachable!("handled above"),
            };
        }
        Ok(i)
    }
}

/// Where a request's target points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target<'b> {
    /// Origin form: the path and the query (without its `?`).
    Origin { path: &'b str, query: Option<&'b str> },
    /// Absolute form (`http://host/path`): its authority too.
    Absolute {
        authority: &'b str,
        path: &'b str,
        query: Option<&'b str>,
    },
}

/// Reads a request target: origin or absolute form with an http(s) scheme,
/// checked with the `http` crate's URI grammar. Authority and asterisk
/// forms (and anything else) are refused: they name no path to judge.
pub fn parse_target(t: &[u8]) -> Option<Target<'_>> {
    let split = |pq: &'_ str| -> (usize, Option<usize>) {
        match pq.find('?') {
            Some(i) => (i, Some(i + 1)),
            None => (pq.len(), None),
        }
    };
    if t.first() == Some(&b'/') {
        http::uri::PathAndQuery::try_from(t).ok()?;
        let s = std::str::from_utf8(t).ok()?;
        let (p, q) = split(s);
        return Some(Target::Origin {
            path: &s[..p],
            query: q.map(|q| &s[q..]),
        });
    }
    let uri = http::Uri::try_from(t).ok()?;
    let scheme = uri.scheme_str()?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    uri.authority()?;
    let s = std::str::from_utf8(t).ok()?;
    let after_scheme = s.find("://")? + 3;
    let rest = &s[after_scheme..];
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..auth_end];
    let pq = &rest[auth_end..];
    let (p, q) = split(pq);
    let path = if p == 0 { "/" } else { &pq[..p] };
    Some(Target::Absolute {
        authority,
        path,
        query: q.map(|q| &pq[q..]),
    })
}

/// The host a request names, as rules match it: lower case, without a
/// port (an IPv6 literal keeps its brackets).
pub fn host_name(raw: &str) -> String {
    let h = match raw.rsplit_once(':') {
        Some((h, p))
            if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(']') || h.starts_with('[') && h.ends_with(']') =>
        {
            h
        }
        _ => raw,
    };
    h.to_ascii_lowercase()
}

/// The request's fields, as sinew-l7's header rules look them up.
pub struct HeadFields<'a> {
    pub buf: &'a [u8],
    pub headers: &'a [HeaderAt],
}

impl sinew_l7::Headers for HeadFields<'_> {
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.headers
            .iter()
            .filter(|h| h.is(self.buf, name))
            .any(|h| f(h.value(self.buf)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(b: &[u8]) -> Result<Option<RequestHead>, HeadError> {
        parse_request(b, 100)
    }

    #[test]
    fn request_heads_and_their_framing() {
        let b = b"\r\nPOST /a?b HTTP/1.1\r\nHost: Web:80\r\nContent-Length: 3\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n\r\nabc";
        let h = req(b).unwrap().unwrap();
        assert_eq!(&b[h.method.clone()], b"POST");
        assert_eq!(&b[h.target.clone()], b"/a?b");
        assert_eq!(h.body, BodyKind::Length(3));
        assert_eq!(h.len, b.len() - 3);
        assert!(h.hop.keep_alive && !h.closes());
        assert_eq!(&b[h.host.clone().unwrap()], b"Web:80");
        let mut out = Vec::new();
        write_request(&mut out, b, &h, b"/a?b", false);
        assert_eq!(
            out, b"POST /a?b HTTP/1.1\r\nHost: Web:80\r\nContent-Length: 3\r\n\r\n",
            "Connection and what it lists are hop-by-hop"
        );
        assert_eq!(req(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        let h = req(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(h.closes());
        assert_eq!(h.body, BodyKind::None);
        let h = req(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.body, BodyKind::Chunked);
    }

    /// RFC 9112 6.1, 6.3 and 5.2: the heads a hop could frame two ways.
    #[test]
    fn ambiguous_framing_is_refused() {
        use Finding::*;
        for (b, want) in [
            (
                &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n"[..],
                HeadError::Smuggling(DuplicateContentLength),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                HeadError::Smuggling(ContentLengthAndTransferEncoding),
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                HeadError::Smuggling(ContentLengthAndTransferEncoding),
            ),
            (b"GET / HTTP/1.1\r\nx-a: b\r\n c\r\n\r\n", HeadError::Smuggling(ObsFold)),
            (b"GET / HTTP/1.1\r\nx-a: b\r\n\tc", HeadError::Smuggling(ObsFold)),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                HeadError::BadTransferEncoding,
            ),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                HeadError::BadTransferEncoding,
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n", HeadError::Malformed),
            (b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n", HeadError::Malformed),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", HeadError::Malformed),
            (b"GET / HTTP/1.1\r\nnocolon\r\n\r\n", HeadError::Malformed),
            (b"GET / HTTP/2.0\r\n\r\n", HeadError::Version),
            (b"\r\nGET / HTTP/1.2\r\n\r\n", HeadError::Version),
            (b"GET / HTTPS/1.1\r\n\r\n", HeadError::NotHttp),
            // h2spec 3.5 #2: an invalid HTTP/2 connection preface.
            (b"INVALID CONNECTION PREFACE\r\n\r\n", HeadError::NotHttp),
        ] {
            assert_eq!(req(b), Err(want), "{}", String::from_utf8_lossy(b));
        }
        let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
        assert_eq!(
            req(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
            Err(HeadError::TooLarge)
        );
    }

    #[test]
    fn websocket_and_expect() {
        let b =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nExpect: 100-continue\r\n\r\n";
        let h = req(b).unwrap().unwrap();
        assert!(h.websocket && h.expect_continue);
        let mut out = Vec::new();
        write_request(&mut out, b, &h, b"/ws", true);
        assert_eq!(
            out,
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nconnection: upgrade\r\n\r\n"
        );
        // An h2c upgrade is not a WebSocket one: its fields are dropped.
        let b = b"GET / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AA\r\n\r\n";
        let h = req(b).unwrap().unwrap();
        assert!(!h.websocket);
        let mut out = Vec::new();
        write_request(&mut out, b, &h, b"/", false);
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn response_framing() {
        let r = |b: &[u8], m: &[u8]| parse_response(b, 100, m).unwrap().unwrap();
        let b = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\nok";
        let h = r(b, b"GET");
        assert_eq!((h.status, h.body, h.reusable()), (200, BodyKind::Length(2), true));
        let mut out = Vec::new();
        write_response(&mut out, b, &h, 0, true);
        assert_eq!(
            out,
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\n"
        );
        let mut out = Vec::new();
        write_response(&mut out, b, &h, 0, false);
        assert_eq!(
            out,
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nconnection: keep-alive\r\n\r\n"
        );
        assert_eq!(r(b, b"HEAD").body, BodyKind::None);
        assert_eq!(r(b"HTTP/1.1 204 No Content\r\n\r\n", b"GET").body, BodyKind::None);
        let h = r(b"HTTP/1.1 200 OK\r\n\r\n", b"GET");
        assert_eq!((h.body, h.reusable()), (BodyKind::UntilClose, false));
        let h = r(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", b"GET");
        assert!(!h.reusable());
        assert_eq!(
            r(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET").body,
            BodyKind::Chunked
        );
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            100,
            b"GET"
        )
        .is_err());
    }

    #[test]
    fn chunked_bodies_end_where_they_end() {
        let body = b"3\r\nabc\r\n10;ext=1\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\nGET /next";
        let end = body.len() - 9;
        // Whole, and one byte at a time.
        let mut c = Chunked::new(4096);
        assert_eq!(c.advance(body), Ok(end));
        assert!(c.done());
        let mut c = Chunked::new(4096);
        let mut n = 0;
        for b in body.chunks(1) {
            n += c.advance(b).unwrap();
            if c.done() {
                break;
            }
        }
        assert_eq!(n, end);
        for bad in [
            &b"x\r\n"[..],
            b"3\nabc\r\n",
            b"3\r\nabcX\r\n",
            b"11111111111111111\r\n",
            b"0\r\n\n",
        ] {
            assert_eq!(Chunked::new(4096).advance(bad), Err(ChunkError::Malformed), "{bad:?}");
        }
        let long = format!("1;{}\r\n", "e".repeat(100));
        assert_eq!(Chunked::new(64).advance(long.as_bytes()), Err(ChunkError::TooLong));
    }

    #[test]
    fn targets() {
        assert_eq!(
            parse_target(b"/a/b?c=d"),
            Some(Target::Origin {
                path: "/a/b",
                query: Some("c=d")
            })
        );
        assert_eq!(
            parse_target(b"http://Web:80"),
            Some(Target::Absolute {
                authority: "Web:80",
                path: "/",
                query: None
            })
        );
        assert_eq!(
            parse_target(b"HTTP://web/x?y"),
            Some(Target::Absolute {
                authority: "web",
                path: "/x",
                query: Some("y")
            })
        );
        for bad in [&b"web:80"[..], b"*", b"ftp://web/x", b"/a b", b"/a\x00b"] {
            assert_eq!(parse_target(bad), None, "{bad:?}");
        }
        assert_eq!(host_name("Web:8080"), "web");
        assert_eq!(host_name("[::1]:80"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
    }
}
