//! Building test frames byte by byte, and reading and verifying the frames
//! that a program hands back. Built by hand rather than with a packet crate
//! so that every byte the datapath sees is one the test chose.

use std::net::Ipv4Addr;

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ESP: u8 = 50;
pub const IPPROTO_SCTP: u8 = 132;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO: u8 = 8;
pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

pub type Mac = [u8; 6];

/// The ones' complement sum of `data` folded to 16 bits, before inversion.
fn sum16(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

/// The Internet checksum (RFC 1071) of `data`, seeded with `initial`.
pub fn checksum(initial: u32, data: &[u8]) -> u16 {
    !(sum16(initial, data) as u16)
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut ph = Vec::with_capacity(12);
    ph.extend_from_slice(&src.octets());
    ph.extend_from_slice(&dst.octets());
    ph.extend_from_slice(&[0, proto]);
    ph.extend_from_slice(&(len as u16).to_be_bytes());
    sum16(0, &ph)
}

/// The transport layer of an IPv4 packet.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// Echo request (`reply == false`) or echo reply.
    IcmpEcho {
        reply: bool,
        id: u16,
        seq: u16,
    },
    /// Any other ICMP message: type and code, zero rest of header.
    Icmp {
        ty: u8,
        code: u8,
    },
    /// An SCTP packet with one chunk: INIT (`vtag` 0) or, with a `vtag`,
    /// a DATA chunk of an association.
    Sctp {
        sport: u16,
        dport: u16,
        vtag: u32,
    },
    /// ESP: SPI and sequence number, then the payload as it is (what
    /// encryption made of it; nothing here checks it).
    Esp {
        spi: u32,
        seq: u32,
    },
}

/// CRC32c (Castagnoli), the SCTP checksum (RFC 9260 appendix A).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An Ethernet + IPv4 frame under construction.
#[derive(Clone, Debug)]
pub struct Ipv4Frame {
    pub eth_dst: Mac,
    pub eth_src: Mac,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub ident: u16,
    /// Flags and fragment offset as on the wire (0x4000 = DF).
    pub frag: u16,
    /// IP options, padded by the caller to a multiple of 4 bytes.
    pub options: Vec<u8>,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Ipv4Frame {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        Self {
            eth_dst: [0x02, 0, 0, 0, 0, 0xfe],
            eth_src: [0x02, 0, 0, 0, 0, 0xfd],
            src,
            dst,
            ttl: 64,
            ident: 0x1234,
            frag: 0x4000,
            options: Vec::new(),
            l4,
            payload: b"sinew test payload".to_vec(),
        }
    }

    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
        Self::new(
            src.0,
            dst.0,
            L4::Tcp {
                sport: src.1,
                dport: dst.1,
                flags,
                seq: 1000,
            },
        )
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        Self::new(
            src.0,
            dst.0,
            L4::Udp {
                sport: src.1,
                dport: dst.1,
            },
        )
    }

    pub fn sctp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), vtag: u32) -> Self {
        Self::new(
            src.0,
            dst.0,
            L4::Sctp {
                sport: src.1,
                dport: dst.1,
                vtag,
            },
        )
    }

    pub fn esp(src: Ipv4Addr, dst: Ipv4Addr, spi: u32, seq: u32) -> Self {
        Self::new(src, dst, L4::Esp { spi, seq })
    }

    pub fn echo(src: Ipv4Addr, dst: Ipv4Addr, reply: bool, id: u16) -> Self {
        Self::new(src, dst, L4::IcmpEcho { reply, id, seq: 7 })
    }

    pub fn macs(mut self, dst: Mac, src: Mac) -> Self {
        self.eth_dst = dst;
        self.eth_src = src;
        self
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn frag(mut self, frag: u16) -> Self {
        self.frag = frag;
        self
    }

    pub fn options(mut self, options: Vec<u8>) -> Self {
        assert_eq!(options.len() % 4, 0, "IP options must be padded to 4 bytes");
        self.options = options;
        self
    }

    fn l4_bytes(&self) -> (u8, Vec<u8>) {
        let mut seg = Vec::new();
        let proto = match self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                seq,
            } => {
                seg.extend_from_slice(&sport.to_be_bytes());
                seg.extend_from_slice(&dport.to_be_bytes());
                seg.extend_from_slice(&seq.to_be_bytes());
                seg.extend_from_slice(&0u32.to_be_bytes()); // ack
                seg.extend_from_slice(&[5 << 4, flags]);
                seg.extend_from_slice(&64240u16.to_be_bytes()); // window
                seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
                IPPROTO_TCP
            }
            L4::Udp { sport, dport } => {
                seg.extend_from_slice(&sport.to_be_bytes());
                seg.extend_from_slice(&dport.to_be_bytes());
                seg.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                seg.extend_from_slice(&[0, 0]);
                IPPROTO_UDP
            }
            L4::IcmpEcho { reply, id, seq } => {
                seg.extend_from_slice(&[if reply { ICMP_ECHO_REPLY } else { ICMP_ECHO }, 0, 0, 0]);
                seg.extend_from_slice(&id.to_be_bytes());
                seg.extend_from_slice(&seq.to_be_bytes());
                IPPROTO_ICMP
            }
            L4::Icmp { ty, code } => {
                seg.extend_from_slice(&[ty, code, 0, 0, 0, 0, 0, 0]);
                IPPROTO_ICMP
            }
            L4::Sctp { sport, dport, vtag } => {
                seg.extend_from_slice(&sport.to_be_bytes());
                seg.extend_from_slice(&dport.to_be_bytes());
                seg.extend_from_slice(&vtag.to_be_bytes());
                seg.extend_from_slice(&[0, 0, 0, 0]); // CRC32c, below
                if vtag == 0 {
                    // INIT: initiate tag, a_rwnd, streams out/in, initial TSN.
                    seg.extend_from_slice(&[1, 0, 0, 20]);
                    seg.extend_from_slice(&0x5eed_0001u32.to_be_bytes());
                    seg.extend_from_slice(&65536u32.to_be_bytes());
                    seg.extend_from_slice(&[0, 10, 0, 10]);
                    seg.extend_from_slice(&1u32.to_be_bytes());
                } else {
                    // DATA with the payload, padded to 4 bytes.
                    let len = 16 + self.payload.len();
                    seg.extend_from_slice(&[0, 0x03]);
                    seg.extend_from_slice(&(len as u16).to_be_bytes());
                    seg.extend_from_slice(&1u32.to_be_bytes()); // TSN
                    seg.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]); // stream, seq, PPID
                    seg.extend_from_slice(&self.payload);
                    seg.resize(seg.len().next_multiple_of(4), 0);
                }
                let crc = crc32c(&seg);
                seg[8..12].copy_from_slice(&crc.to_le_bytes());
                return (IPPROTO_SCTP, seg);
            }
            L4::Esp { spi, seq } => {
                seg.extend_from_slice(&spi.to_be_bytes());
                seg.extend_from_slice(&seq.to_be_bytes());
                seg.extend_from_slice(&self.payload);
                return (IPPROTO_ESP, seg);
            }
        };
        seg.extend_from_slice(&self.payload);
        let sum = match proto {
            IPPROTO_ICMP => checksum(0, &seg),
            _ => checksum(pseudo_header_sum(self.src, self.dst, proto, seg.len()), &seg),
        };
        // UDP sends an all-ones checksum when the sum is zero (RFC 768).
        let sum = if proto == IPPROTO_UDP && sum == 0 { 0xffff } else { sum };
        let at = match proto {
            IPPROTO_TCP => 16,
            IPPROTO_UDP => 6,
            _ => 2,
        };
        seg[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        (proto, seg)
    }

    pub fn build(&self) -> Vec<u8> {
        let (proto, seg) = self.l4_bytes();
        let hlen = IPV4_HLEN + self.options.len();
        let mut ip = Vec::with_capacity(hlen + seg.len());
        ip.push(0x40 | (hlen / 4) as u8);
        ip.push(0);
        ip.extend_from_slice(&((hlen + seg.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&self.ident.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.extend_from_slice(&[self.ttl, proto, 0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.options);
        let sum = checksum(0, &ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        ip.extend_from_slice(&seg);
        ethernet(self.eth_dst, self.eth_src, ETH_P_IP, &ip)
    }
}

/// `inner` (a whole frame) in a VXLAN packet from `src` to `dst` with `vni`.
pub fn vxlan(src: Ipv4Addr, dst: Ipv4Addr, vni: u32, inner: &[u8]) -> Ipv4Frame {
    let mut f = Ipv4Frame::udp((src, 50000), (dst, 8472));
    let mut payload = vec![0x08, 0, 0, 0];
    payload.extend_from_slice(&(vni << 8).to_be_bytes());
    payload.extend_from_slice(inner);
    f.payload = payload;
    f
}

pub fn ethernet(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An Ethernet/IPv4 ARP message, broadcast when it is a request.
pub fn arp(op: u16, sha: Mac, sip: Ipv4Addr, tha: Mac, tip: Ipv4Addr) -> Vec<u8> {
    let mut body = Vec::with_capacity(28);
    body.extend_from_slice(&1u16.to_be_bytes()); // ARPHRD_ETHER
    body.extend_from_slice(&ETH_P_IP.to_be_bytes());
    body.extend_from_slice(&[6, 4]);
    body.extend_from_slice(&op.to_be_bytes());
    body.extend_from_slice(&sha);
    body.extend_from_slice(&sip.octets());
    body.extend_from_slice(&tha);
    body.extend_from_slice(&tip.octets());
    let dst = if op == ARP_REQUEST { [0xff; 6] } else { tha };
    ethernet(dst, sha, ETH_P_ARP, &body)
}

/// A minimal IPv6 + UDP frame; only its EtherType matters to the datapath.
pub fn ipv6_udp(dst: Mac, src: Mac) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0, 0, 8, IPPROTO_UDP, 64];
    ip.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]);
    ip.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6]);
    ip.extend_from_slice(&[0x9c, 0x40, 0, 53, 0, 8, 0, 0]);
    ethernet(dst, src, ETH_P_IPV6, &ip)
}

/// Read-only accessors for a frame a program returned. Every accessor panics
/// with a clear message on a frame too short for it, which fails the test.
#[derive(Clone, Copy)]
pub struct View<'a>(pub &'a [u8]);

impl View<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> [u8; N] {
        self.0
            .get(at..at + N)
            .unwrap_or_else(|| panic!("frame of {} bytes has no bytes {at}..{}", self.0.len(), at + N))
            .try_into()
            .expect("slice has length N")
    }
    fn u16_at(&self, at: usize) -> u16 {
        u16::from_be_bytes(self.bytes(at))
    }
    fn ip4_at(&self, at: usize) -> Ipv4Addr {
        Ipv4Addr::from(self.bytes::<4>(at))
    }

    pub fn eth_dst(&self) -> Mac {
        self.bytes(0)
    }
    pub fn eth_src(&self) -> Mac {
        self.bytes(6)
    }
    pub fn ethertype(&self) -> u16 {
        self.u16_at(12)
    }

    pub fn arp_op(&self) -> u16 {
        self.u16_at(ETH_HLEN + 6)
    }
    pub fn arp_sha(&self) -> Mac {
        self.bytes(ETH_HLEN + 8)
    }
    pub fn arp_sip(&self) -> Ipv4Addr {
        self.ip4_at(ETH_HLEN + 14)
    }
    pub fn arp_tha(&self) -> Mac {
        self.bytes(ETH_HLEN + 18)
    }
    pub fn arp_tip(&self) -> Ipv4Addr {
        self.ip4_at(ETH_HLEN + 24)
    }

    fn ip_hlen(&self) -> usize {
        usize::from(self.bytes::<1>(ETH_HLEN)[0] & 0x0f) * 4
    }
    fn ip_total_len(&self) -> usize {
        usize::from(self.u16_at(ETH_HLEN + 2))
    }
    pub fn ttl(&self) -> u8 {
        self.bytes::<1>(ETH_HLEN + 8)[0]
    }
    pub fn protocol(&self) -> u8 {
        self.bytes::<1>(ETH_HLEN + 9)[0]
    }
    pub fn ip_src(&self) -> Ipv4Addr {
        self.ip4_at(ETH_HLEN + 12)
    }
    pub fn ip_dst(&self) -> Ipv4Addr {
        self.ip4_at(ETH_HLEN + 16)
    }
    fn l4_off(&self) -> usize {
        ETH_HLEN + self.ip_hlen()
    }
    /// TCP/UDP source port.
    pub fn sport(&self) -> u16 {
        self.u16_at(self.l4_off())
    }
    /// TCP/UDP destination port.
    pub fn dport(&self) -> u16 {
        self.u16_at(self.l4_off() + 2)
    }
    pub fn udp_checksum(&self) -> u16 {
        self.u16_at(self.l4_off() + 6)
    }
    pub fn icmp_type(&self) -> u8 {
        self.bytes::<1>(self.l4_off())[0]
    }
    pub fn icmp_id(&self) -> u16 {
        self.u16_at(self.l4_off() + 4)
    }
    /// The NAT "port" of a flow: the ICMP echo identifier, or the source port.
    pub fn flow_sport(&self) -> u16 {
        if self.protocol() == IPPROTO_ICMP {
            self.icmp_id()
        } else {
            self.sport()
        }
    }
    /// The destination side of [`Self::flow_sport`].
    pub fn flow_dport(&self) -> u16 {
        if self.protocol() == IPPROTO_ICMP {
            self.icmp_id()
        } else {
            self.dport()
        }
    }

    /// The IP total length field.
    pub fn ip_len(&self) -> usize {
        self.ip_total_len()
    }
    /// IP flags and fragment offset.
    pub fn frag_off(&self) -> u16 {
        self.u16_at(ETH_HLEN + 6)
    }
    /// UDP length field.
    pub fn udp_len(&self) -> u16 {
        self.u16_at(self.l4_off() + 4)
    }
    /// The VXLAN header after UDP: (flags word, VNI).
    pub fn vxlan(&self) -> (u32, u32) {
        let at = self.l4_off() + 8;
        (
            u32::from_be_bytes(self.bytes(at)),
            u32::from_be_bytes(self.bytes::<4>(at + 4)) >> 8,
        )
    }
    /// The frame inside a VXLAN packet (from its Ethernet header on).
    pub fn vxlan_inner(&self) -> View<'_> {
        View(&self.0[self.l4_off() + 16..])
    }

    /// The IPv4 header checksum verifies (sums to zero).
    pub fn ip_checksum_ok(&self) -> bool {
        let hdr = &self.0[ETH_HLEN..ETH_HLEN + self.ip_hlen()];
        checksum(0, hdr) == 0
    }

    /// The TCP, UDP, ICMP or SCTP checksum verifies. A UDP checksum of zero means
    /// "none" and is accepted.
    pub fn l4_checksum_ok(&self) -> bool {
        let start = self.l4_off();
        let end = ETH_HLEN + self.ip_total_len();
        let seg = &self.0[start..end];
        match self.protocol() {
            IPPROTO_ICMP => checksum(0, seg) == 0,
            IPPROTO_UDP if seg[6..8] == [0, 0] => true,
            proto @ (IPPROTO_TCP | IPPROTO_UDP) => {
                checksum(pseudo_header_sum(self.ip_src(), self.ip_dst(), proto, seg.len()), seg) == 0
            }
            IPPROTO_SCTP => {
                let mut zeroed = seg.to_vec();
                zeroed[8..12].fill(0);
                seg[8..12] == crc32c(&zeroed).to_le_bytes()
            }
            other => panic!("no checksum check for IP protocol {other}"),
        }
    }
}

#[test]
fn built_frames_carry_valid_checksums() {
    let a = Ipv4Addr::new(10, 0, 0, 1);
    let b = Ipv4Addr::new(10, 0, 0, 2);
    for f in [
        Ipv4Frame::tcp((a, 1), (b, 2), TCP_SYN),
        Ipv4Frame::udp((a, 1), (b, 2)),
        Ipv4Frame::echo(a, b, false, 9),
        Ipv4Frame::sctp((a, 1), (b, 2), 0),
        Ipv4Frame::sctp((a, 1), (b, 2), 7),
    ] {
        let bytes = f.build();
        let v = View(&bytes);
        assert!(v.ip_checksum_ok() && v.l4_checksum_ok(), "{f:?}");
        // Flipping one payload bit must break the L4 checksum.
        let mut bad = bytes.clone();
        *bad.last_mut().expect("payload") ^= 1;
        assert!(!View(&bad).l4_checksum_ok(), "{f:?}");
        let mut bad = bytes;
        bad[ETH_HLEN + 8] ^= 1;
        assert!(!View(&bad).ip_checksum_ok(), "{f:?}");
    }
}

#[test]
fn crc32c_matches_rfc3720_examples() {
    assert_eq!(crc32c(&[0; 32]), 0x8a91_36aa);
    assert_eq!(crc32c(&[0xff; 32]), 0x62a8_ab43);
}

#[test]
fn checksum_matches_rfc1071_example() {
    // RFC 1071 section 3: the sum of these words is 0xddf2.
    let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
    assert_eq!(checksum(0, &data), !0xddf2);
}
