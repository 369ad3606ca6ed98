//! The netlink wire format every family shares: a 16-byte message header,
//! then a family header, then attributes (type-length-value, 4-byte aligned,
//! nestable). All integers are in host byte order unless an attribute says
//! otherwise (ports and some addresses are big-endian).
//!
//! [`MsgBuilder`] writes one request; [`Messages`] splits a received
//! datagram into messages and [`attrs`] walks the attributes of one.

// Values from the kernel's uapi header linux/netlink.h. They are ABI.
pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_DUMP: u16 = 0x300;
/// Set in an attribute's type when its payload is more attributes.
pub const NLA_F_NESTED: u16 = 0x8000;
/// Set in an attribute's type when its payload is in network byte order.
pub const NLA_F_NET_BYTEORDER: u16 = 0x4000;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

pub const NLMSG_HDRLEN: usize = 16;
pub const NLA_HDRLEN: usize = 4;

/// Rounds up to netlink's 4-byte alignment.
pub const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

pub fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

pub fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

pub fn read_i64(b: &[u8], at: usize) -> Option<i64> {
    Some(i64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

pub fn read_i32(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// A NUL-terminated string attribute (the NUL is optional).
pub fn read_cstr(data: &[u8]) -> String {
    let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

/// Builds one netlink message; length and sequence are filled in by
/// [`MsgBuilder::finish`].
#[derive(Debug, Clone)]
pub struct MsgBuilder {
    buf: Vec<u8>,
}

/// Where a nested attribute started, to close it with [`MsgBuilder::nest_end`].
#[derive(Debug, Clone, Copy)]
#[must_use = "close the nest with nest_end"]
pub struct Nest(usize);

impl MsgBuilder {
    pub fn new(ty: u16, flags: u16) -> Self {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&ty.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        Self { buf }
    }

    /// Adds header flags (the socket adds NLM_F_ACK to changes).
    pub fn add_flags(&mut self, flags: u16) {
        let f = u16::from_ne_bytes([self.buf[6], self.buf[7]]) | flags;
        self.buf[6..8].copy_from_slice(&f.to_ne_bytes());
    }

    /// The message type given to [`MsgBuilder::new`].
    pub fn ty(&self) -> u16 {
        u16::from_ne_bytes([self.buf[4], self.buf[5]])
    }

    fn pad(&mut self) {
        self.buf.resize(align4(self.buf.len()), 0);
    }

    /// Appends raw bytes (a family header), padded to alignment.
    pub fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
        self.pad();
    }

    pub fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = (NLA_HDRLEN + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    pub fn attr_u8(&mut self, ty: u16, v: u8) {
        self.attr(ty, &[v]);
    }

    pub fn attr_u16(&mut self, ty: u16, v: u16) {
        self.attr(ty, &v.to_ne_bytes());
    }

    pub fn attr_u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_ne_bytes());
    }

    /// A 16-bit attribute in network byte order (ports).
    pub fn attr_be16(&mut self, ty: u16, v: u16) {
        self.attr(ty, &v.to_be_bytes());
    }

    pub fn attr_str(&mut self, ty: u16, s: &str) {
        let mut data = Vec::with_capacity(s.len() + 1);
        data.extend_from_slice(s.as_bytes());
        data.push(0);
        self.attr(ty, &data);
    }

    pub fn nest_start(&mut self, ty: u16) -> Nest {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        Nest(at)
    }

    /// The length of the message so far (to split long requests).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Never true: a message always has its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn nest_end(&mut self, nest: Nest) {
        let at = nest.0;
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// The finished message with its length and sequence number.
    pub fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// The fields of a message header a receiver needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
}

/// Iterates over the netlink messages in one datagram. A malformed length
/// yields one error and ends the iteration.
pub struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Messages<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Self { rest: b }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<(Header, &'a [u8]), &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let parsed = (|| {
            let len = read_u32(self.rest, 0).ok_or("short header")? as usize;
            if len < NLMSG_HDRLEN || len > self.rest.len() {
                return Err("bad message length");
            }
            let hdr = Header {
                ty: read_u16(self.rest, 4).ok_or("short header")?,
                flags: read_u16(self.rest, 6).ok_or("short header")?,
                seq: read_u32(self.rest, 8).ok_or("short header")?,
            };
            let payload = &self.rest[NLMSG_HDRLEN..len];
            self.rest = self.rest.get(align4(len)..).unwrap_or(&[]);
            Ok((hdr, payload))
        })();
        if parsed.is_err() {
            self.rest = &[];
        }
        Some(parsed)
    }
}

/// Iterates over (type, data) of the attributes in `b`, with the nested and
/// byte-order flags masked off the type. Stops at the first truncated one.
pub fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = read_u16(b, 0)? as usize;
        let ty = read_u16(b, 2)? & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > b.len() {
            return None;
        }
        let data = &b[NLA_HDRLEN..len];
        b = b.get(align4(len)..).unwrap_or(&[]);
        Some((ty, data))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_pads_attributes_and_nests() {
        let mut m = MsgBuilder::new(16, NLM_F_REQUEST);
        m.bytes(&[1, 2, 3, 4, 5]); // padded to 8
        let n = m.nest_start(18);
        m.attr_str(1, "veth"); // 4 + 5 -> padded to 12
        m.attr_be16(2, 4789);
        m.nest_end(n);
        assert_eq!(m.ty(), 16);
        let b = m.finish(42);
        assert_eq!(b.len(), NLMSG_HDRLEN + 8 + 4 + 12 + 8);
        assert_eq!(read_u32(&b, 0), Some(b.len() as u32));
        assert_eq!(read_u16(&b, 4), Some(16));
        assert_eq!(read_u16(&b, 6), Some(NLM_F_REQUEST));
        assert_eq!(read_u32(&b, 8), Some(42));
        assert_eq!(&b[NLMSG_HDRLEN..NLMSG_HDRLEN + 8], &[1, 2, 3, 4, 5, 0, 0, 0]);
        let outer: Vec<_> = attrs(&b[NLMSG_HDRLEN + 8..]).collect();
        assert_eq!(outer.len(), 1);
        assert_eq!(outer[0].0, 18);
        let inner: Vec<_> = attrs(outer[0].1).collect();
        assert_eq!(inner, vec![(1, &b"veth\0"[..]), (2, &4789u16.to_be_bytes()[..])]);
    }

    #[test]
    fn messages_split_a_datagram_and_reject_bad_lengths() {
        let mut dgram = MsgBuilder::new(NLMSG_DONE, NLM_F_MULTI).finish(1);
        let mut second = MsgBuilder::new(NLMSG_ERROR, 0);
        second.bytes(&0i32.to_ne_bytes());
        dgram.extend(second.finish(2));
        let got: Vec<_> = Messages::new(&dgram).map(|m| m.unwrap()).collect();
        assert_eq!(
            got[0].0,
            Header {
                ty: NLMSG_DONE,
                flags: NLM_F_MULTI,
                seq: 1
            }
        );
        assert_eq!(
            got[1].0,
            Header {
                ty: NLMSG_ERROR,
                flags: 0,
                seq: 2
            }
        );
        assert_eq!(read_i32(got[1].1, 0), Some(0));

        let mut bad = MsgBuilder::new(NLMSG_DONE, 0).finish(1);
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        let mut it = Messages::new(&bad);
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
        let short = [8u8, 0, 0];
        assert!(Messages::new(&short).next().unwrap().is_err());
    }

    #[test]
    fn attrs_stop_at_truncated_data_and_mask_flags() {
        let b = [8u8, 0, 1, 0, 1, 2]; // claims 8 bytes, has 6
        assert_eq!(attrs(&b).count(), 0);
        let mut m = MsgBuilder::new(0, 0);
        let n = m.nest_start(7 | NLA_F_NESTED);
        m.nest_end(n);
        let b = m.finish(0);
        assert_eq!(attrs(&b[NLMSG_HDRLEN..]).collect::<Vec<_>>(), vec![(7, &[][..])]);
    }

    #[test]
    fn read_cstr_stops_at_nul() {
        assert_eq!(read_cstr(b"eth0\0junk"), "eth0");
        assert_eq!(read_cstr(b"eth0"), "eth0");
    }
}
