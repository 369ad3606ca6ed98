//! HPACK (RFC 7541) for the proxy's own HTTP/2 path.
//!
//! The decoder keeps the peer's dynamic table and writes every field of a
//! header block into one reusable buffer ([`Fields`]): no allocation per
//! field once the buffers have grown. The encoder is stateless: it uses
//! the static table where a name (or name and value) is in it and sends
//! everything else as a literal that is not indexed, so blocks can be
//! written in any order and the peer's table is never filled. Fields the
//! client sent as never-indexed stay never-indexed (RFC 7541 7.1.3).

use std::collections::VecDeque;
use std::ops::Range;

use super::huffman;

/// RFC 7541 Appendix A.
const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// Per-entry overhead of the table size (RFC 7541 4.1).
const ENTRY_OVERHEAD: usize = 32;
/// Integers above this are refused: no length or index is that large.
const MAX_INT: usize = 1 << 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HpackError {
    /// An index of 0 or beyond both tables.
    BadIndex,
    /// An integer or string that runs past the block, or an oversized one.
    Truncated,
    /// A Huffman string that does not decode.
    Huffman,
    /// A dynamic table size update above the limit this side set, or
    /// after the first field of a block.
    BadSizeUpdate,
}

/// One decoded field: ranges into [`Fields::buf`].
#[derive(Debug, Clone)]
pub struct Field {
    name: Range<u32>,
    value: Range<u32>,
    /// Sent as a literal never indexed.
    pub sensitive: bool,
}

/// The fields of one header block, in order.
#[derive(Debug, Default)]
pub struct Fields {
    buf: Vec<u8>,
    list: Vec<Field>,
    /// The block was over the header list size limit: its fields past the
    /// limit were decoded (the table stays in step) but not kept.
    pub too_large: bool,
}

impl Fields {
    pub fn clear(&mut self) {
        self.buf.clear();
        self.list.clear();
        self.too_large = false;
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn name(&self, f: &Field) -> &[u8] {
        &self.buf[f.name.start as usize..f.name.end as usize]
    }

    pub fn value(&self, f: &Field) -> &[u8] {
        &self.buf[f.value.start as usize..f.value.end as usize]
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8], &Field)> {
        self.list.iter().map(|f| (self.name(f), self.value(f), f))
    }

    /// The first field with this (lowercase) name.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.iter().find(|(n, _, _)| *n == name).map(|(_, v, _)| v)
    }

    /// Adds a field (tests and locally made heads).
    pub fn push(&mut self, name: &[u8], value: &[u8]) {
        let n0 = self.buf.len() as u32;
        self.buf.extend_from_slice(name);
        let v0 = self.buf.len() as u32;
        self.buf.extend_from_slice(value);
        self.list.push(Field {
            name: n0..v0,
            value: v0..self.buf.len() as u32,
            sensitive: false,
        });
    }
}

struct Entry {
    /// Name then value.
    bytes: Box<[u8]>,
    name_len: usize,
}

impl Entry {
    fn size(&self) -> usize {
        self.bytes.len() + ENTRY_OVERHEAD
    }
}

/// The decoding side of one connection direction.
pub struct Decoder {
    /// Newest first.
    table: VecDeque<Entry>,
    size: usize,
    max_size: usize,
    /// SETTINGS_HEADER_TABLE_SIZE as this side announced it.
    limit: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(4096)
    }
}

fn int(src: &[u8], pos: &mut usize, prefix_bits: u32) -> Result<usize, HpackError> {
    let mask = (1usize << prefix_bits) - 1;
    let first = *src.get(*pos).ok_or(HpackError::Truncated)? as usize & mask;
    *pos += 1;
    if first < mask {
        return Ok(first);
    }
    let mut v = mask;
    let mut shift = 0;
    loop {
        let b = *src.get(*pos).ok_or(HpackError::Truncated)? as usize;
        *pos += 1;
        v += (b & 0x7f) << shift;
        if v > MAX_INT {
            return Err(HpackError::Truncated);
        }
        if b & 0x80 == 0 {
            return Ok(v);
        }
        shift += 7;
        // Continuation bytes of zeros add nothing but must end: no integer
        // the decoder accepts needs more than four of them.
        if shift > 21 {
            return Err(HpackError::Truncated);
        }
    }
}

fn string(src: &[u8], pos: &mut usize, out: &mut Vec<u8>) -> Result<(), HpackError> {
    let huff = *src.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = int(src, pos, 7)?;
    let end = pos
        .checked_add(len)
        .filter(|&e| e <= src.len())
        .ok_or(HpackError::Truncated)?;
    let s = &src[*pos..end];
    *pos = end;
    if huff {
        huffman::decode(s, out).map_err(|_| HpackError::Huffman)
    } else {
        out.extend_from_slice(s);
        Ok(())
    }
}

impl Decoder {
    pub fn new(limit: usize) -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: limit,
            limit,
        }
    }

    fn evict_to(&mut self, max: usize) {
        while self.size > max {
            match self.table.pop_back() {
                Some(e) => self.size -= e.size(),
                None => break,
            }
        }
    }

    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.max_size {
            // RFC 7541 4.4: an entry larger than the table empties it.
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max_size - size);
        let mut bytes = Vec::with_capacity(name.len() + value.len());
        bytes.extend_from_slice(name);
        bytes.extend_from_slice(value);
        self.table.push_front(Entry {
            bytes: bytes.into_boxed_slice(),
            name_len: name.len(),
        });
        self.size += size;
    }

    /// (name, value) of an index into both tables (RFC 7541 2.3.3).
    fn lookup(&self, idx: usize) -> Result<(&[u8], &[u8]), HpackError> {
        match idx {
            0 => Err(HpackError::BadIndex),
            1..=61 => Ok(STATIC[idx - 1]),
            _ => self
                .table
                .get(idx - 62)
                .map(|e| e.bytes.split_at(e.name_len))
                .ok_or(HpackError::BadIndex),
        }
    }

    /// Decodes one whole header block into `out` (cleared first). Fields
    /// beyond `max_list_size` (RFC 9113 SETTINGS_MAX_HEADER_LIST_SIZE
    /// arithmetic) are not kept and `out.too_large` is set. An error
    /// leaves the table out of step with the peer's: a connection error.
    pub fn decode(&mut self, block: &[u8], out: &mut Fields, max_list_size: usize) -> Result<(), HpackError> {
        out.clear();
        let mut pos = 0;
        let mut list_size = 0usize;
        let mut seen_field = false;
        while pos < block.len() {
            let b = block[pos];
            if b & 0xe0 == 0x20 {
                // Dynamic table size update (RFC 7541 6.3).
                if seen_field {
                    return Err(HpackError::BadSizeUpdate);
                }
                let n = int(block, &mut pos, 5)?;
                if n > self.limit {
                    return Err(HpackError::BadSizeUpdate);
                }
                self.max_size = n;
                self.evict_to(n);
                continue;
            }
            seen_field = true;
            let mark = out.buf.len();
            let (name_end, sensitive) = if b & 0x80 != 0 {
                let idx = int(block, &mut pos, 7)?;
                let (n, v) = self.lookup(idx)?;
                out.buf.extend_from_slice(n);
                let ne = out.buf.len();
                out.buf.extend_from_slice(v);
                (ne, false)
            } else {
                let (prefix, indexing, sensitive) = match b & 0xf0 {
                    0x40..=0x70 => (6, true, false),
                    0x10 => (4, false, true),
                    _ => (4, false, false),
                };
                let idx = int(block, &mut pos, prefix)?;
                if idx == 0 {
                    string(block, &mut pos, &mut out.buf)?;
                } else {
                    let (n, _) = self.lookup(idx)?;
                    out.buf.extend_from_slice(n);
                }
                let ne = out.buf.len();
                string(block, &mut pos, &mut out.buf)?;
                if indexing {
                    let (n, v) = out.buf[mark..].split_at(ne - mark);
                    self.insert(n, v);
                }
                (ne, sensitive)
            };
            let end = out.buf.len();
            list_size += end - mark + ENTRY_OVERHEAD;
            if list_size > max_list_size {
                out.too_large = true;
            }
            if out.too_large {
                out.buf.truncate(mark);
                continue;
            }
            out.list.push(Field {
                name: mark as u32..name_end as u32,
                value: name_end as u32..end as u32,
                sensitive,
            });
        }
        Ok(())
    }
}

fn put_int(dst: &mut Vec<u8>, first: u8, prefix_bits: u32, v: usize) {
    let mask = (1usize << prefix_bits) - 1;
    if v < mask {
        dst.push(first | v as u8);
        return;
    }
    dst.push(first | mask as u8);
    let mut rest = v - mask;
    while rest >= 0x80 {
        dst.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    dst.push(rest as u8);
}

fn put_str(dst: &mut Vec<u8>, s: &[u8]) {
    put_int(dst, 0, 7, s.len());
    dst.extend_from_slice(s);
}

/// The static index of a name, and of the whole field where it is there.
fn static_index(name: &[u8], value: &[u8]) -> (Option<usize>, bool) {
    let whole = |i: usize| (Some(i), STATIC[i - 1].1 == value);
    match name {
        b":authority" => (Some(1), false),
        b":method" => match value {
            b"GET" => (Some(2), true),
            b"POST" => (Some(3), true),
            _ => (Some(2), false),
        },
        b":path" => match value {
            b"/" => (Some(4), true),
            b"/index.html" => (Some(5), true),
            _ => (Some(4), false),
        },
        b":scheme" => match value {
            b"http" => (Some(6), true),
            b"https" => (Some(7), true),
            _ => (Some(6), false),
        },
        b":status" => match value {
            b"200" => (Some(8), true),
            b"204" => (Some(9), true),
            b"206" => (Some(10), true),
            b"304" => (Some(11), true),
            b"400" => (Some(12), true),
            b"404" => (Some(13), true),
            b"500" => (Some(14), true),
            _ => (Some(8), false),
        },
        b"accept-encoding" => whole(16),
        _ => (STATIC[14..].iter().position(|(n, _)| *n == name).map(|i| i + 15), false),
    }
}

/// Appends one field to a header block, without touching any table.
pub fn encode(dst: &mut Vec<u8>, name: &[u8], value: &[u8], sensitive: bool) {
    match static_index(name, value) {
        (Some(i), true) if !sensitive => put_int(dst, 0x80, 7, i),
        (Some(i), _) => {
            put_int(dst, if sensitive { 0x10 } else { 0 }, 4, i);
            put_str(dst, value);
        }
        (None, _) => {
            dst.push(if sensitive { 0x10 } else { 0 });
            put_str(dst, name);
            put_str(dst, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(f: &Fields) -> Vec<(String, String)> {
        f.iter()
            .map(|(n, v, _)| {
                (
                    String::from_utf8(n.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                )
            })
            .collect()
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn rfc7541_c3_requests_without_huffman_share_one_table() {
        let mut d = Decoder::default();
        let mut f = Fields::default();
        d.decode(
            &hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"),
            &mut f,
            1 << 20,
        )
        .unwrap();
        assert_eq!(
            fields(&f),
            [
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        assert_eq!(d.size, 57);
        d.decode(&hex("8286 84be 5808 6e6f 2d63 6163 6865"), &mut f, 1 << 20)
            .unwrap();
        assert_eq!(fields(&f)[3], (":authority".into(), "www.example.com".into()));
        assert_eq!(fields(&f)[4], ("cache-control".into(), "no-cache".into()));
        assert_eq!(d.size, 110);
        d.decode(
            &hex("8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65"),
            &mut f,
            1 << 20,
        )
        .unwrap();
        assert_eq!(fields(&f)[1], (":scheme".into(), "https".into()));
        assert_eq!(fields(&f)[2], (":path".into(), "/index.html".into()));
        assert_eq!(fields(&f)[3], (":authority".into(), "www.example.com".into()));
        assert_eq!(fields(&f)[4], ("custom-key".into(), "custom-value".into()));
        assert_eq!(d.size, 164);
    }

    #[test]
    fn rfc7541_c4_requests_with_huffman() {
        let mut d = Decoder::default();
        let mut f = Fields::default();
        d.decode(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"), &mut f, 1 << 20)
            .unwrap();
        assert_eq!(fields(&f)[3], (":authority".into(), "www.example.com".into()));
        d.decode(&hex("8286 84be 5886 a8eb 1064 9cbf"), &mut f, 1 << 20)
            .unwrap();
        assert_eq!(fields(&f)[4], ("cache-control".into(), "no-cache".into()));
    }

    #[test]
    fn eviction_size_updates_and_bad_input() {
        // A 64-byte table: two 32+ entries do not fit together.
        let mut d = Decoder::new(64);
        let mut f = Fields::default();
        let mut block = Vec::new();
        block.push(0x40);
        put_str(&mut block, b"a");
        put_str(&mut block, b"1");
        block.push(0x40);
        put_str(&mut block, b"b");
        put_str(&mut block, b"2");
        d.decode(&block, &mut f, 1 << 20).unwrap();
        assert_eq!(d.table.len(), 1);
        d.decode(&[0x80 | 62], &mut f, 1 << 20).unwrap();
        assert_eq!(fields(&f), [("b".to_string(), "2".to_string())]);
        assert_eq!(d.decode(&[0x80 | 63], &mut f, 1 << 20), Err(HpackError::BadIndex));
        assert_eq!(d.decode(&[0x80], &mut f, 1 << 20), Err(HpackError::BadIndex));
        // A size update to 0 empties the table; above the limit is refused,
        // and so is one after a field.
        d.decode(&[0x20], &mut f, 1 << 20).unwrap();
        assert_eq!(d.size, 0);
        assert_eq!(d.decode(&[0x3f, 0x22], &mut f, 1 << 20), Err(HpackError::BadSizeUpdate));
        assert_eq!(d.decode(&[0x82, 0x20], &mut f, 1 << 20), Err(HpackError::BadSizeUpdate));
        // Strings and integers that run past the block.
        assert_eq!(
            d.decode(&[0x00, 0x05, b'a'], &mut f, 1 << 20),
            Err(HpackError::Truncated)
        );
        assert_eq!(
            d.decode(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], &mut f, 1 << 20),
            Err(HpackError::Truncated)
        );
        // Found by l7_hpack: an integer of endless zero continuation bytes
        // (the shift outgrew the word).
        let mut zeros = vec![0xff, 0xff, 0xff, 0xff];
        zeros.extend([0x80; 120]);
        zeros.push(0x86);
        assert_eq!(d.decode(&zeros, &mut f, 1 << 20), Err(HpackError::Truncated));
    }

    #[test]
    fn a_list_over_the_limit_is_flagged_and_the_table_stays_in_step() {
        let mut d = Decoder::default();
        let mut f = Fields::default();
        let mut block = Vec::new();
        for i in 0..10 {
            block.push(0x40);
            put_str(&mut block, format!("name-{i}").as_bytes());
            put_str(&mut block, &[b'v'; 40]);
        }
        d.decode(&block, &mut f, 200).unwrap();
        assert!(f.too_large);
        assert_eq!(f.len(), 2);
        assert_eq!(d.table.len(), 10);
        d.decode(&[0x80 | 62], &mut f, 200).unwrap();
        assert!(!f.too_large);
        assert_eq!(f.get(b"name-9"), Some(&[b'v'; 40][..]));
    }

    #[test]
    fn encoded_fields_decode_back_with_their_sensitivity() {
        let mut block = Vec::new();
        let want: &[(&[u8], &[u8], bool)] = &[
            (b":method", b"GET", false),
            (b":method", b"PATCH", false),
            (b":path", b"/a/b?c", false),
            (b":status", b"403", false),
            (b"authorization", b"secret", true),
            (b"x-custom", b"v", false),
            (b"x-token", &[b't'; 300], true),
            (b"accept-encoding", b"gzip, deflate", false),
        ];
        for (n, v, s) in want {
            encode(&mut block, n, v, *s);
        }
        let mut d = Decoder::default();
        let mut f = Fields::default();
        d.decode(&block, &mut f, 1 << 20).unwrap();
        let got: Vec<(&[u8], &[u8], bool)> = f.iter().map(|(n, v, x)| (n, v, x.sensitive)).collect();
        assert_eq!(got, want);
        // Nothing entered the table.
        assert_eq!(d.size, 0);
        // A whole static match is one byte.
        let mut one = Vec::new();
        encode(&mut one, b":status", b"200", false);
        assert_eq!(one, [0x88]);
    }
}
